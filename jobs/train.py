"""Train a LoRA adapter (or the full-fine-tuning baseline) on the gold corpora.

No Spark is involved; run it directly, from the repository root::

    python -m notelake.jobs.train --config conf/train/multitask.yaml
    notelake train --config conf/train/multitask.yaml          # same, through the CLI

    # plan only: example counts, mean tokens per example, estimated tokens for the steps (no training)
    python -m notelake.jobs.train --config conf/train/multitask.yaml --dry-run
    # the classification-head baseline (objective: tag): BIO layers over the tokens, one task per tagger
    python -m notelake.jobs.train --config conf/train/tagger-phee-lora.yaml
    # its relation pair classifier (objective: pair): relations over the tagger's concepts (models/pairs.py)
    python -m notelake.jobs.train --config conf/train/pairs-phee-lora.yaml
    # overrides (any TrainConfig field has a YAML key; the common ones have flags)
    python -m notelake.jobs.train --config conf/train/multitask.yaml --steps 2 --batch-size 1 \
        --max-examples 4 --output-dir /tmp/adapter-smoke --checkpoint-dir /tmp/adapter-smoke-ckpt --token-budget 5000

Relative paths in the config (output_dir, checkpoint_dir, data_dir) are taken from the repository root.
The run resumes from the last checkpoint in ``checkpoint_dir`` (default ``.notelake/checkpoints/<name>``,
git-ignored) unless ``--no-resume`` (which removes them and starts over); checkpoints of a different run there
(``run.json``: another mode, tasks, data or recipe) are refused with exit 2. ``touch <checkpoint_dir>/STOP`` ends
a run gracefully after the current step (checkpoint + adapter written); ``--export-checkpoint
<checkpoint_dir>/checkpoint-N`` writes the adapter folder from a checkpoint of a run that was cut off. The output
folder holds only the weights, their config and ``manifest.json``. Progress lines carry step, loss, tokens,
tokens/s, ETA and peak RSS — never note text.
Exit codes: 0 trained, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import sys

from notelake.conf.settings import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notelake train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="training config YAML (conf/train/*.yaml)")
    p.add_argument("--mode", choices=["lora", "full"])
    p.add_argument("--tasks", help="comma-separated task names (overrides the config)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--max-examples", type=int)
    p.add_argument("--max-notes", type=int)
    p.add_argument("--data-fraction", type=float)
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--token-budget", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--output-dir")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--name")
    p.add_argument("--no-resume", action="store_true",
                   help="start over: remove the checkpoints in checkpoint_dir instead of resuming the last one")
    p.add_argument("--dry-run", action="store_true", help="print the data plan and token estimate, do not train")
    p.add_argument("--export-checkpoint", metavar="CKPT",
                   help="do not train: write output_dir (weights + manifest) from this checkpoint of the config's run")
    p.add_argument("--note", help="free-text note stored in the manifest's training record (with --export-checkpoint)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from notelake.models.training import load_train_config, main_logging, train

    main_logging()
    overrides = {
        "mode": args.mode,
        "tasks": args.tasks.split(",") if args.tasks else None,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_length": args.max_length,
        "max_examples": args.max_examples,
        "max_notes": args.max_notes,
        "data_fraction": args.data_fraction,
        "data_dir": args.data_dir,
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "token_budget": args.token_budget,
        "threads": args.threads,
        "output_dir": args.output_dir,
        "checkpoint_dir": args.checkpoint_dir,
        "name": args.name,
        "resume": False if args.no_resume else None,
    }
    try:
        cfg = load_train_config(args.config, **overrides)
        if cfg.objective in ("tag", "pair"):  # the classification-head baseline (models/tagger.py, pairs.py)
            if args.export_checkpoint:
                raise ConfigError("--export-checkpoint is for generative adapters; a tagger run resumes instead")
            from notelake.models.pairs import train_pairs
            from notelake.models.tagger import train_tagger

            result = (train_tagger if cfg.objective == "tag" else train_pairs)(cfg, dry_run=args.dry_run)
        elif args.export_checkpoint:
            from notelake.models.training import export_checkpoint

            result = export_checkpoint(cfg, args.export_checkpoint, note=args.note)
        else:
            result = train(cfg, dry_run=args.dry_run)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run:
        t = result.get("training", {})
        summary = {k: t.get(k) for k in ("tokens_processed", "token_budget", "stopped_by", "optimizer_steps",
                                          "wall_time_s", "tokens_per_s", "peak_rss_mb", "trainable_params",
                                          "final_train_loss", "val_loss")}
        print("summary: " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
