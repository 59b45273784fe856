"""LoRA adapters: PEFT ``save_pretrained`` folders plus a checksummed ``manifest.json`` written by training.

Manifest fields (training passes the descriptive ones; :func:`write_adapter_manifest` computes the rest)::

    name, base_model, base_model_sha256, tasks: [task names], label_sets, prompt_versions: {task: version},
    training: {...}, data_fingerprint, dev_scores, ...           (given)
    files: {relpath: sha256}, sha256 (combined), weights_sha256, manifest_version, created_at   (computed)

:func:`load_adapter` is the one gate before an adapter is served: every file is verified (a tampered file
is refused), the base model hash must match the engine's, and a task the adapter was not trained on gives
a warning and runs zero-shot (that is how a new corpus -- a YAML only -- is served).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from notelake.conf.settings import notelake_home
from notelake.models.base_model import (
    MANIFEST,
    ModelIntegrityError,
    cached_manifest,
    combined_sha256,
    file_lock,
    hash_files,
    publish_model,
    read_manifest,
    verify_files,
)

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
COMPUTED_KEYS = ("files", "sha256", "weights_sha256", "manifest_version", "created_at")


class AdapterError(Exception):
    """An adapter cannot be served: missing/invalid files, tampered, or trained on another base model."""


class ZeroShotWarning(UserWarning):
    """The adapter was not trained on the requested task; the task runs zero-shot through it."""


@dataclass
class AdapterInfo:
    path: Path
    name: str
    sha256: str
    tasks: list[str]
    base_model_sha256: str
    rank: int
    manifest: dict = field(repr=False)

    @property
    def target_modules(self) -> list[str]:
        cfg = _read_adapter_config(self.path)
        mods = cfg.get("target_modules") or []
        return sorted(mods) if isinstance(mods, list) else [str(mods)]


def _read_adapter_config(path: Path) -> dict:
    cfg_path = Path(path) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise AdapterError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT LoRA adapter folder)")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AdapterError(f"{cfg_path}: invalid JSON ({exc})") from None


def write_adapter_manifest(path: str | os.PathLike, **fields: Any) -> dict:
    """Hash every file of the adapter folder and write ``manifest.json``; returns the manifest.

    ``fields`` are the descriptive keys (name, base_model, base_model_sha256, tasks, label_sets,
    prompt_versions, training, data_fingerprint, dev_scores, ...). ``files``, ``sha256``, ``weights_sha256``,
    ``manifest_version`` and ``created_at`` are computed (values passed for them are ignored).
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a folder")
    missing = [k for k in ("name", "base_model_sha256", "tasks") if not fields.get(k)]
    if missing:
        raise AdapterError(f"write_adapter_manifest: missing field(s) {', '.join(missing)}")
    if isinstance(fields["tasks"], str):
        fields["tasks"] = [fields["tasks"]]
    fields = {k: v for k, v in fields.items() if k not in COMPUTED_KEYS}
    files = hash_files(path)
    weights = next((files[w] for w in WEIGHT_FILES if w in files), None)
    manifest = {
        **fields,
        "tasks": list(fields["tasks"]),
        "manifest_version": MANIFEST_VERSION,
        "files": files,
        "sha256": combined_sha256(files),
        "weights_sha256": weights,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path / MANIFEST)
    return manifest


def adapter_sha256(path: str | os.PathLike) -> str:
    """The adapter's combined hash from its manifest (not re-verified)."""
    manifest = read_manifest(Path(path))
    if manifest is None:
        raise AdapterError(f"{path}: no {MANIFEST}")
    return str(manifest["sha256"])


def load_adapter(path: str | os.PathLike, base_model_sha256: str, task_name: str | None = None) -> AdapterInfo:
    """Verify an adapter folder for serving on the base model whose hash is ``base_model_sha256``.

    Raises :class:`AdapterError` for a missing/tampered file, a missing manifest or a base-model mismatch.
    A ``task_name`` not among the manifest's tasks warns (:class:`ZeroShotWarning`) and still returns.
    """
    path = Path(path).expanduser()
    manifest, name = _verified_manifest(path, base_model_sha256)
    trained_on = str(manifest["base_model_sha256"])
    if manifest.get("kind") not in (None, "lora"):
        raise AdapterError(f"adapter {name}: kind {manifest.get('kind')!r} is not a LoRA adapter (serve it as engine.model)")
    cfg = _read_adapter_config(path)
    try:
        rank = int(cfg.get("r") or 0)
    except (TypeError, ValueError):
        rank = 0
    if rank < 1:
        raise AdapterError(f"adapter {name}: {ADAPTER_CONFIG} has no valid rank 'r'")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise AdapterError(f"adapter {name}: no adapter weights ({' or '.join(WEIGHT_FILES)})")
    tasks = [str(t) for t in manifest.get("tasks") or []]
    if task_name is not None and task_name not in tasks:
        msg = f"adapter {name} was not trained on task {task_name}: running zero-shot"
        log.warning(msg)
        warnings.warn(msg, ZeroShotWarning, stacklevel=2)
    return AdapterInfo(path=path.resolve(), name=name, sha256=str(manifest["sha256"]), tasks=tasks,
                       base_model_sha256=trained_on, rank=rank, manifest=manifest)


def _verified_manifest(path: Path, base_model_sha256: str) -> tuple[dict, str]:
    """The folder's manifest with every file checked against it and its base model equal to the engine's."""
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist")
    try:
        manifest = read_manifest(path)
    except ModelIntegrityError as exc:
        raise AdapterError(str(exc)) from None
    if manifest is None:
        raise AdapterError(f"{path}: no {MANIFEST}; adapters are served only with a checksummed manifest")
    verify_files(path, manifest, AdapterError)
    name = str(manifest.get("name") or path.name)
    trained_on = str(manifest.get("base_model_sha256") or "")
    if trained_on != base_model_sha256:
        raise AdapterError(
            f"adapter {name} was trained on base model sha256 {trained_on or '(none recorded)'} but the engine "
            f"serves base model sha256 {base_model_sha256}: refusing it (retrain it on this base model)"
        )
    return manifest, name


_HEAD_OBJECTIVES = {"tagger": "tag", "pairs": "pair"}


def load_head(path: str | os.PathLike, base_model_sha256: str, task_name: str, kind: str = "tagger") -> AdapterInfo:
    """Verify a classification-head folder for ``task_name``: a tagger (train objective: tag) or, ``kind="pairs"``,
    a relation pair classifier (objective: pair). A head knows only the labels it was trained on, so another task
    is refused (no zero-shot)."""
    path = Path(path).expanduser()
    manifest, name = _verified_manifest(path, base_model_sha256)
    if not str(manifest.get("kind", "")).startswith(kind):
        raise AdapterError(f"{name}: kind {manifest.get('kind')!r} is not {kind} (a folder written by a training run "
                           f"with objective: {_HEAD_OBJECTIVES[kind]})")
    tasks = [str(t) for t in manifest.get("tasks") or []]
    if task_name not in tasks:
        raise AdapterError(f"{kind} {name} was trained on {', '.join(tasks)}, not {task_name}: a classification "
                           "head has no zero-shot mode")
    return AdapterInfo(path=path.resolve(), name=name, sha256=str(manifest["sha256"]), tasks=tasks,
                       base_model_sha256=base_model_sha256, rank=0, manifest=manifest)


def merged_model(base_path: str | os.PathLike, info: AdapterInfo, cache_root: Path | None = None) -> Path:
    """The base model with ``info``'s LoRA folded into its weights (PEFT ``merge_and_unload``), float32.

    Built once per (adapter, base) pair under ``NOTELAKE_HOME/merged`` with a checksummed manifest naming both
    hashes, and verified on every reuse like the base model. Served as a plain model it skips the per-token
    LoRA work (vLLM's CPU LoRA kernels cost much of its decode throughput: docs/benchmarks.md), at the price of
    one adapter per engine.
    """
    root = Path(cache_root or notelake_home() / "merged")
    target = root / f"{info.name}-{info.sha256[:12]}-{info.base_model_sha256[:12]}"

    def ready() -> bool:
        manifest = cached_manifest(target)
        return bool(manifest) and manifest.get("merged_from", {}).get("adapter_sha256") == info.sha256

    if ready():
        return target
    with file_lock(root / f".{target.name}.lock"):
        if ready():  # built by another engine meanwhile
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise ImportError(f"engine.merge_adapter needs peft: pip install -e '.[cpu]' ({exc})") from exc

        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            out = work / "model"
            base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
            PeftModel.from_pretrained(base, str(info.path)).merge_and_unload().save_pretrained(str(out))
            AutoTokenizer.from_pretrained(str(base_path)).save_pretrained(str(out))
            publish_model(out, target, work, name=target.name, dtype="float32",
                          merged_from={"base_model_sha256": info.base_model_sha256, "adapter": info.name,
                                       "adapter_sha256": info.sha256})
            log.info("merged adapter %s into the base model: %s", info.name, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target
