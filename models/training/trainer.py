"""The training loop: a transformers ``Trainer`` over the examples, LoRA (PEFT) or full fine-tuning.

Every run has a token budget (non-padding input tokens, prompt + answer); the run stops before a step would
exceed it. Reported with every result: tokens processed, wall time, peak RSS, trainable parameters. A progress
line per optimizer step replaces the ``Trainer``'s own log dicts. The per-token heads (``models/tagger.py``,
``models/pairs.py``) train through the same loop pieces: :func:`setup_training`, :func:`run_trainer`.

Nothing here logs note text or model output text (PHI): only counts, losses and timings.
"""

from __future__ import annotations

import gc
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from notelake.models.training.checkpoints import STOP_FILE, checkpoint_to_resume
from notelake.models.training.config import TrainConfig, resolve_base
from notelake.models.training.data import (Datasets, ExampleDataset, PadCollator, build_datasets, estimate_tokens,
                                           planned_steps)
from notelake.models.training.output import save_output


@dataclass(frozen=True)
class TrainingSetup:
    """What every run starts from: the base model's folder and tokenizer, and when the run started."""

    base_path: Path
    tokenizer: Any
    started: float  # time.time(): the record's wall_time_total_s counts from here


def setup_training(cfg: TrainConfig) -> TrainingSetup:
    """Torch threads (``cfg.threads``), the base model's folder and its tokenizer (pad = eos when it has none)."""
    import torch
    from transformers import AutoTokenizer

    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base_path = resolve_base(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TrainingSetup(base_path, tokenizer, started)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters of ``model``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_callbacks(cfg: TrainConfig, run_state: dict):
    """The ``Trainer`` callbacks of every run: a progress line per logging step (loss, tokens, tok/s, ETA), the
    hard token budget and the STOP file; losses and why the run stopped go into ``run_state``."""
    from transformers import TrainerCallback

    class BudgetAndProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            run_state["t0"] = time.time()
            run_state["tokens0"] = state.num_input_tokens_seen
            run_state["step0"] = state.global_step

        def on_step_end(self, args, state, control, **kw):
            done = state.global_step - run_state["step0"]
            seen = state.num_input_tokens_seen
            if (Path(cfg.checkpoint_dir) / STOP_FILE).exists():  # graceful stop: save, write the adapter, exit
                run_state["stopped_by"] = "stop_file"
                control.should_training_stop = True
                control.should_save = True
                return control
            if cfg.token_budget is not None and done > 0:
                per_step = (seen - run_state["tokens0"]) / done
                if seen + per_step > cfg.token_budget:
                    run_state["stopped_by"] = "token_budget"
                    control.should_training_stop = True
                    control.should_save = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            elapsed = time.time() - run_state["t0"]
            done = state.global_step - run_state["step0"]
            seen = state.num_input_tokens_seen
            tps = (seen - run_state["tokens0"]) / elapsed if elapsed > 0 else 0.0
            eta = (state.max_steps - state.global_step) * elapsed / done if done else float("nan")
            if cfg.token_budget is not None and tps > 0:
                eta = min(eta, max(0.0, cfg.token_budget - seen) / tps)
            parts = [f"step {state.global_step}/{state.max_steps}"]
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if key in logs:
                    parts.append(f"{key} {logs[key]:.4g}")
            parts += [f"tokens {seen:,}", f"{tps:.0f} tok/s", f"elapsed {_fmt_s(elapsed)}",
                      f"ETA {_fmt_s(eta) if eta == eta else '?'}", f"peak_rss {peak_rss_mb():.0f} MiB"]
            if "loss" in logs:
                run_state.setdefault("losses", []).append((state.global_step, float(logs["loss"])))
            if "eval_loss" in logs:
                run_state.setdefault("eval_losses", []).append((state.global_step, float(logs["eval_loss"])))
            print(" | ".join(parts), flush=True)

    return [BudgetAndProgress()]


@dataclass
class TrainerRun:
    """One finished ``Trainer.train`` call: the trainer, its output, its wall time and what the progress callback
    saw (``stopped_by``, ``losses``, ``eval_losses``)."""

    trainer: Any
    result: Any  # transformers TrainOutput
    resumed_from: str | None
    wall_s: float
    state: dict = field(default_factory=dict)

    def record(self, cfg: TrainConfig, setup: TrainingSetup, data: Datasets, params: tuple[int, int],
               val_loss: float | None) -> dict[str, Any]:
        """The manifest's training record fields every run has (steps, tokens, time, memory, losses, device)."""
        import torch

        cuda = torch.cuda.is_available()
        tokens = int(self.trainer.state.num_input_tokens_seen)
        loss = float(self.result.training_loss)
        return {
            "config": json.loads(cfg.model_dump_json()),
            "tokens_processed": tokens,
            "stopped_by": self.state["stopped_by"],
            "optimizer_steps": int(self.trainer.state.global_step),
            "wall_time_s": round(self.wall_s, 1),
            "wall_time_total_s": round(time.time() - setup.started, 1),
            "tokens_per_s": round(tokens / self.wall_s, 1) if self.wall_s > 0 else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "trainable_params": params[0],
            "total_params": params[1],
            "mean_train_loss": round(loss, 5) if loss == loss else None,  # NaN is no JSON number
            "val_loss": val_loss,
            "val_examples": len(data.val),
            "loss_curve": self.state.get("losses", []),
            "resumed_from": Path(self.resumed_from).name if self.resumed_from else None,
            "data": data.plan,
            "device": "cuda" if cuda else "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }


def run_trainer(trainer, cfg: TrainConfig, resume_from: str | None) -> TrainerRun:
    """Train with :func:`progress_callbacks` in place of the ``Trainer``'s printed log dicts, resuming from the
    checkpoint ``resume_from`` when given."""
    from transformers.trainer_callback import PrinterCallback

    state: dict[str, Any] = {"stopped_by": "steps"}
    for callback in progress_callbacks(cfg, state):
        trainer.add_callback(callback)
    trainer.remove_callback(PrinterCallback)  # our progress line replaces the raw dict dumps
    if resume_from:
        print(f"resuming from checkpoint {resume_from}", flush=True)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    return TrainerRun(trainer, result, resume_from, time.time() - t0, state)


def data_plan(cfg: TrainConfig, train_ex: list, val_ex: list, stats: dict) -> dict[str, Any]:
    """Examples, tokens and steps the run will go through (printed before training; ``--dry-run`` stops there)."""
    est = estimate_tokens(cfg, train_ex)
    steps = planned_steps(cfg, train_ex)
    return {
        "examples_train": len(train_ex), "examples_val": len(val_ex),
        "per_task": {k: vars(v) for k, v in stats.items()},
        "mean_example_tokens": round(sum(e.n_tokens for e in train_ex) / len(train_ex), 1),
        "estimated_tokens_for_steps": est, "token_budget": cfg.token_budget,
        "planned_tokens": min(est, cfg.token_budget) if cfg.token_budget else est,
        "steps": steps,
        "epochs_for_steps": round(steps * cfg.batch_size * cfg.grad_accum / len(train_ex), 3),
    }


def causal_lm(cfg: TrainConfig, base_path: Path, dtype):
    """The model to train and the adapter it continues (or None): the base model with a fresh LoRA adapter, with
    ``cfg.init_adapter`` (verified against the base model), or whole for full fine-tuning."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model.config.use_cache = False
    if cfg.init_adapter is not None:
        from peft import PeftModel

        from notelake.models.adapters import load_adapter
        from notelake.models.base_model import model_sha256

        init = load_adapter(cfg.init_adapter, model_sha256(base_path))
        print(f"continuing adapter {init.name} (sha256 {init.sha256[:12]}, tasks {init.tasks})", flush=True)
        return PeftModel.from_pretrained(model, str(init.path), is_trainable=True), init
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg), None
    return model, None


def causal_lm_arguments(cfg: TrainConfig, steps: int, has_val: bool, dtype):
    """``TrainingArguments`` of a generative run: ``cfg``'s recipe, checkpoints in ``cfg.checkpoint_dir``,
    validation loss every ``cfg.eval_every`` steps when there is validation data."""
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(cfg.checkpoint_dir),
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=cfg.keep_checkpoints,
        eval_strategy="steps" if (has_val and cfg.eval_every) else "no",
        eval_steps=cfg.eval_every,
        load_best_model_at_end=bool(cfg.select_best and has_val),
        metric_for_best_model="eval_loss" if cfg.select_best else None,
        greater_is_better=False if cfg.select_best else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not cuda,
        bf16=bool(cuda and dtype == torch.bfloat16),
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=True,
        # batch 1 carries no padding (and no mask: see PadCollator), so "all" tokens are the real ones
        include_num_input_tokens_seen="all" if cfg.batch_size == 1 else "non_padding",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        remove_unused_columns=False,
        save_only_model=False,
    )


def train(cfg: TrainConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """Run one training config end to end; returns the manifest (or the data plan when ``dry_run``)."""
    import torch
    from transformers import Trainer

    setup = setup_training(cfg)
    train_ex, val_ex, stats = build_datasets(cfg, setup.tokenizer)
    data = Datasets(train_ex, val_ex, data_plan(cfg, train_ex, val_ex, stats))
    print("data plan: " + json.dumps(data.plan), flush=True)
    if dry_run:
        return data.plan
    last = checkpoint_to_resume(cfg, train_ex)  # before the model loads: a wrong folder fails in seconds

    torch.manual_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if cuda else torch.float32)
    model, init = causal_lm(cfg, setup.base_path, dtype)
    params = count_params(model)
    print(f"mode {cfg.mode}: trainable params {params[0]:,} of {params[1]:,} ({100 * params[0] / params[1]:.2f} %), "
          f"dtype {str(dtype).removeprefix('torch.')}, device {'cuda' if cuda else 'cpu'}, "
          f"threads {torch.get_num_threads()}", flush=True)
    trainer = Trainer(model=model, args=causal_lm_arguments(cfg, data.plan["steps"], bool(val_ex), dtype),
                      train_dataset=ExampleDataset(train_ex),
                      eval_dataset=ExampleDataset(val_ex) if val_ex else None,
                      data_collator=PadCollator(setup.tokenizer.pad_token_id))
    run = run_trainer(trainer, cfg, last)
    final_eval = trainer.evaluate() if val_ex else {}
    if final_eval:
        print(f"validation loss {final_eval.get('eval_loss'):.4f} on {len(val_ex)} examples", flush=True)
    record = run.record(cfg, setup, data, params, final_eval.get("eval_loss"))
    best = trainer.state.best_model_checkpoint
    record.update({
        "token_budget": cfg.token_budget,
        "examples_seen": record["optimizer_steps"] * cfg.batch_size * cfg.grad_accum,
        "final_train_loss": (run.state.get("losses") or [(None, None)])[-1][1],
        "val_loss_curve": run.state.get("eval_losses", []),
        "init_adapter": {"name": init.name, "sha256": init.sha256, "tasks": init.tasks} if init else None,
        "best_checkpoint": Path(best).name if best else None,
        "dtype": str(dtype).removeprefix("torch."),
    })
    manifest = save_output(cfg, trainer.model, setup.tokenizer, setup.base_path, train_ex, record)
    del trainer, model, run
    gc.collect()
    return manifest


def main_logging() -> None:
    """Log lines of a training process: INFO to stdout, the ML libraries at WARNING."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
