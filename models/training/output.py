"""Writing what a run trained: the adapter (or full model) folder with its manifest, from a finished run or
from a checkpoint; dev scores recorded in a manifest later."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from notelake.conf.task import load_task
from notelake.models.training.config import BASE_MODEL_NAME, TrainConfig, resolve_base
from notelake.models.training.data import Example, build_datasets, data_fingerprint

log = logging.getLogger("notelake.training")

PENDING_MANIFEST = "manifest.pending.json"


def save_output(cfg: TrainConfig, model, tokenizer, base_path: Path, train_ex: list[Example],
                training_record: dict) -> dict:
    """Adapter (or full model) weights + config + manifest into cfg.output_dir; nothing else."""
    from notelake.models.base_model import model_sha256
    from notelake.udfs.answer import ANSWER_SCHEMA_VERSION
    from notelake.udfs.prompts import prompt_version

    tmp = stage_weights(cfg, model, tokenizer)
    inherited = (training_record.get("init_adapter") or {}).get("tasks", [])  # what the continued adapter knew
    tasks = {t.name: t for t in (load_task(ref) for ref in dict.fromkeys([*inherited, *cfg.tasks]))}
    fields = dict(
        name=cfg.name,
        kind=cfg.mode,
        base_model=BASE_MODEL_NAME if cfg.base_model == BASE_MODEL_NAME else str(cfg.base_model),
        base_model_sha256=model_sha256(base_path),
        tasks=list(tasks),
        label_sets={n: sorted(t.concepts) for n, t in tasks.items()},
        relation_sets={n: sorted(t.relations) for n, t in tasks.items()},
        prompt_versions={n: prompt_version(t) for n, t in tasks.items()},
        answer_schema=ANSWER_SCHEMA_VERSION,
        training=training_record,
        data_fingerprint=data_fingerprint(train_ex),
        dev_scores={},
    )
    try:
        from notelake.models.adapters import write_adapter_manifest
    except ImportError:  # trained weights are never thrown away: finish later with finalize_manifest()
        (tmp / PENDING_MANIFEST).write_text(json.dumps(fields, indent=2, default=str) + "\n", encoding="utf-8")
        log.error("notelake.models.adapters is not importable: wrote %s; run finalize_manifest() later", PENDING_MANIFEST)
        manifest = fields
    else:
        manifest = write_adapter_manifest(tmp, **fields)
    publish(tmp, Path(cfg.output_dir))
    return manifest


def stage_weights(cfg: TrainConfig, model, tokenizer) -> Path:
    """The trained weights in ``<output_dir>.tmp`` (LoRA cast to ``save_dtype``; a full model with its tokenizer,
    loadable on its own); :func:`publish` moves the folder in place once its manifest is written."""
    out = Path(cfg.output_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if cfg.mode == "lora" and cfg.save_dtype != "float32":
        _cast_safetensors(tmp / "adapter_model.safetensors", cfg.save_dtype)
    if cfg.mode == "full":
        tokenizer.save_pretrained(str(tmp))
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's generated model card
    return tmp


def publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB)", flush=True)


def export_checkpoint(cfg: TrainConfig, checkpoint: str | os.PathLike, note: str | None = None) -> dict:
    """Write the adapter folder + manifest from a saved checkpoint of ``cfg``'s run (e.g. a run cut off at a
    deadline). Steps, tokens and the loss curve come from the checkpoint's trainer_state.json."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = Path(checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    base_path = resolve_base(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train_ex, val_ex, stats = build_datasets(cfg, tokenizer)
    if cfg.mode == "lora":
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(checkpoint))
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) if cfg.mode == "lora" else \
        sum(p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    history = state.get("log_history", [])
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    record = {
        "config": json.loads(cfg.model_dump_json()),
        "tokens_processed": int(state.get("num_input_tokens_seen") or 0),
        "token_budget": cfg.token_budget,
        "stopped_by": "exported_checkpoint",
        "exported_from": checkpoint.name,
        "note": note,
        "optimizer_steps": int(state.get("global_step") or 0),
        "examples_seen": int(state.get("global_step") or 0) * cfg.batch_size * cfg.grad_accum,
        "wall_time_s": None,
        "tokens_per_s": None,
        "peak_rss_mb": None,
        "trainable_params": trainable,
        "total_params": total,
        "final_train_loss": losses[-1][1] if losses else None,
        "loss_curve": losses,
        "val_loss": None,
        "data": {"examples_train": len(train_ex), "per_task": {k: vars(v) for k, v in stats.items()}},
        "device": "cpu",
    }
    if cfg.init_adapter is not None:
        from notelake.models.base_model import read_manifest

        init_manifest = read_manifest(Path(cfg.init_adapter)) or {}
        record["init_adapter"] = {k: init_manifest.get(k) for k in ("name", "sha256", "tasks")}
    return save_output(cfg, model, tokenizer, base_path, train_ex, record)


def _cast_safetensors(path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype)
    tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def finalize_manifest(adapter_dir: str | os.PathLike) -> dict:
    """Turn a ``manifest.pending.json`` (written when the manifest writer was unavailable) into the manifest."""
    from notelake.models.adapters import write_adapter_manifest

    adapter_dir = Path(adapter_dir)
    pending = adapter_dir / PENDING_MANIFEST
    fields = json.loads(pending.read_text(encoding="utf-8"))
    pending.unlink()
    return write_adapter_manifest(adapter_dir, **fields)


def set_dev_scores(adapter_dir: str | os.PathLike, task: str, scores: dict) -> dict:
    """Record dev scores of ``task`` in an adapter's manifest (recomputing its hashes)."""
    from notelake.models.adapters import write_adapter_manifest

    adapter_dir = Path(adapter_dir)
    manifest = json.loads((adapter_dir / "manifest.json").read_text(encoding="utf-8"))
    manifest["dev_scores"] = {**(manifest.get("dev_scores") or {}), task: scores}
    return write_adapter_manifest(adapter_dir, **manifest)  # the computed keys are recomputed

