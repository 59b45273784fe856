"""Checkpoints: which checkpoint a run resumes from, and refusing another run's checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from notelake.conf.settings import ConfigError
from notelake.models.training.config import REPO_ROOT, TrainConfig
from notelake.models.training.data import Example, data_fingerprint

RUN_FILE = "run.json"
STOP_FILE = "STOP"  # ``touch <checkpoint_dir>/STOP``: the run saves a checkpoint, writes its adapter and ends
# config fields that do not change which run a checkpoint belongs to: where things are written, how often, how
# fast, and how long the run goes on (a run extended by steps, epochs or token budget resumes)
_NOT_RUN_IDENTITY = {"name", "output_dir", "checkpoint_dir", "resume", "threads", "save_every", "keep_checkpoints",
                     "data_dir", "steps", "epochs", "token_budget"}


def run_identity(cfg: TrainConfig, examples: list[Example]) -> dict[str, Any]:
    """What makes two runs the same run: the training config less the fields above, and the data. Paths inside the
    repository are kept relative to it, so a clone moved elsewhere still resumes."""
    root = f"{REPO_ROOT}{os.sep}"
    identity = {k: v.removeprefix(root) if isinstance(v, str) else v
                for k, v in json.loads(cfg.model_dump_json()).items() if k not in _NOT_RUN_IDENTITY}
    identity["data_fingerprint"] = data_fingerprint(examples)
    return identity


def checkpoint_to_resume(cfg: TrainConfig, examples: list[Example]) -> str | None:
    """The checkpoint this run resumes from, or None to start fresh; records the run in ``checkpoint_dir/run.json``.

    Refuses (ConfigError) to resume checkpoints of a different run: a config reused with ``--mode``, ``--tasks`` or
    ``--data-fraction`` overrides keeps its ``checkpoint_dir``, and resuming another run's weights and optimizer
    state would train a silently wrong model. ``resume: false`` (``--no-resume``) starts over: the folder's
    checkpoints are removed, so a later resume cannot pick up the old run's higher-numbered ones."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = Path(cfg.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    run_file = ckpt_dir / RUN_FILE
    identity = run_identity(cfg, examples)
    last = None
    if cfg.resume:
        last = get_last_checkpoint(str(ckpt_dir))
    else:
        old = sorted(ckpt_dir.glob("checkpoint-*"))
        for folder in old:
            shutil.rmtree(folder)
        if old:
            print(f"starting over: removed {len(old)} checkpoints of the previous run in {ckpt_dir}", flush=True)
    if last and run_file.exists():
        recorded = json.loads(run_file.read_text())
        differs = sorted(k for k in identity.keys() | recorded.keys() if identity.get(k) != recorded.get(k))
        if differs:
            raise ConfigError(
                f"{ckpt_dir} holds checkpoints of a different run (differs in: {', '.join(differs)}); "
                f"pass --checkpoint-dir DIR for this run, or --no-resume to start over there (removes them)")
    elif last:
        print(f"warning: {ckpt_dir} has no {RUN_FILE} (written before it existed): cannot check that "
              f"{Path(last).name} belongs to this run", flush=True)
    run_file.write_text(json.dumps(identity, indent=1, sort_keys=True))
    return last
