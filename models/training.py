"""LoRA / full fine-tuning of the base model on the gold corpora (answer schema v1).

One training example = one prompt of the real extraction path: ``build_messages(task, text, answer)`` rendered by
the base tokenizer's own chat template, the loss taken only on the assistant answer tokens (prompt tokens are
labelled -100). PHEE gives one example per sentence; MACCROBAT notes are cut with ``udfs.chunking.chunk_text``
at the task's ``max_chunk_chars`` and give one example per chunk (gold answer restricted to the chunk window),
so training sees exactly what inference sees. Several tasks in one config = multi-task training: the examples
are mixed, each with its own task instruction.

Every run has a token budget (non-padding input tokens, prompt + answer); the run stops before a step would
exceed it. Reported with every result: tokens processed, wall time, peak RSS, trainable parameters.

Nothing here logs note text or model output text (PHI): only counts, losses and timings.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from notelake.conf.settings import ConfigError, _format_validation_error
from notelake.conf.task import Task, load_task

log = logging.getLogger("notelake.training")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_MODEL_NAME = "smollm2-135m-instruct"


def default_data_dir() -> Path:
    """``NOTELAKE_DATA`` or the repo's sibling ``../shared/data`` (resolved from the repo root)."""
    env = os.environ.get("NOTELAKE_DATA")
    return Path(env).expanduser() if env else (REPO_ROOT / ".." / "shared" / "data").resolve()


def _repo_path(p: Path) -> Path:
    """Relative paths in a training config are relative to the repository root, not the CWD."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p)


class TrainConfig(BaseModel):
    """One training run. Loaded from conf/train/*.yaml; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="adapter name (default: output_dir's folder name)")
    mode: Literal["lora", "full"] = Field("lora", description="lora = PEFT LoRA; full = full fine-tuning (baseline)")
    objective: Literal["generate", "tag", "pair"] = Field(
        "generate", description="generate = instruction-tuned generative extraction (the shipped path); tag = the "
                                "classification-head baseline (models/tagger.py: BIO layers over the tokens, CCE); "
                                "pair = its relation pair classifier (models/pairs.py: relations over concepts)")
    tag_window_chars: int = Field(2000, ge=100, description="tag, pair: notes are cut into windows of at most this "
                                                          "many characters at sentence ends")
    class_weighting: Literal["none", "balanced"] = Field(
        "none", description="tag, pair: balanced = each class's loss weighted by n / (classes x its count) over the "
                            "training codes (the pair classifier's rare 'no', the tagger's rare B/I)")
    pair_candidates_tagger: Path | None = Field(
        None, description="pair: a tagger folder whose predicted concepts on the training notes join the gold ones as "
                          "candidates (one overlapping no gold concept of its label is false: 'no' to all its pairs), "
                          "so the classifier meets the false concepts it will see at inference")
    pair_max_gap_chars: int | None = Field(
        None, ge=0, description="pair: a tail is a candidate only this many characters or fewer from its head, and a "
                                "head's pass reads only the text spanning it and its tails (null = its whole window)")
    pair_seen_min_count: int | None = Field(
        None, ge=1, description="pair: a relation the schema allows between any labels (pairs: null) is decided only "
                                "for the label pairs it holds between this often in the training notes; both limits "
                                "are kept in the classifier's manifest and applied at inference")
    base_model: str = Field(BASE_MODEL_NAME, description="base model name (models.base_model.resolve_model) or folder")
    tasks: list[str] = Field(..., min_length=1, description="task names or task YAML paths; several = multi-task")
    data_dir: Path = Field(default_factory=default_data_dir, description="folder with <task name>/train.jsonl")
    data_fraction: float = Field(1.0, gt=0, le=1, description="fraction of the training notes used (learning curve)")
    max_examples: int | None = Field(None, ge=1, description="cap on training examples per task (after chunking)")
    max_notes: int | None = Field(None, ge=1, description="cap on training notes per task (few-shot: k notes)")
    task_max_notes: dict[str, int] = Field(default_factory=dict, description="cap for one task only, e.g. "
                                           "{maccrobat: 5}: few-shot transfer to a corpus held out of the mix")
    validation_fraction: float = Field(0.05, ge=0, lt=1, description="notes of TRAIN held out for validation/selection")
    max_validation_examples: int = Field(64, ge=0, description="cap on validation examples per task")
    chunk_overlap_chars: int = Field(0, ge=0, description="overlap of training chunks (0 = no duplicated supervision)")
    seed: int = Field(0, description="data split, shuffle, LoRA init and dropout seed")

    init_adapter: Path | None = Field(
        None, description="LoRA mode: continue training this adapter (verified; its rank and modules are kept) "
                          "instead of a fresh one, e.g. few-shot adaptation of a trained adapter to a new corpus")
    lora_r: int = Field(16, ge=1, description="LoRA rank (the engine serves rank <= engine.max_lora_rank)")
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    learning_rate: float = Field(3e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    steps: int = Field(70, ge=1, description="optimizer steps (upper bound; the token budget may stop earlier)")
    epochs: float | None = Field(None, gt=0, description="train this many passes over the training examples "
                                                         "(sets the step count, replacing `steps`)")
    batch_size: int = Field(8, ge=1, description="examples per forward pass")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step")
    max_length: int = Field(1280, ge=32, description="longer examples are dropped (counted), never truncated")
    group_by_length: bool = Field(True, description="batch examples of similar length (less padding)")
    eval_every: int | None = Field(None, ge=1, description="validation loss every N steps (null = at the end only)")
    save_every: int = Field(10, ge=1, description="checkpoint every N steps (resumable)")
    keep_checkpoints: int | None = Field(2, ge=1, description="checkpoints kept (null = all: a learning curve over steps)")
    select_best: bool = Field(False, description="ship the checkpoint with the lowest validation loss")
    token_budget: int | None = Field(None, ge=1, description="hard cap on input tokens processed (non-padding)")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads (null = leave as is)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto = float32 on CPU, bf16 on CUDA")
    save_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="dtype of the saved LoRA weights (float16 halves the committed size; engines upcast)")

    output_dir: Path = Field(..., description="adapter folder written at the end (weights + config + manifest)")
    checkpoint_dir: Path | None = Field(None, description="resumable checkpoints (default .notelake/checkpoints/<name>)")
    resume: bool = Field(True, description="resume from the last checkpoint in checkpoint_dir when present")

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("tasks must be unique")
        return v

    @model_validator(mode="after")
    def _resolve(self) -> "TrainConfig":
        self.data_dir = _repo_path(self.data_dir)
        self.output_dir = _repo_path(self.output_dir)
        if self.init_adapter is not None:
            if self.mode != "lora":
                raise ValueError("init_adapter needs mode: lora")
            self.init_adapter = _repo_path(self.init_adapter)
        if self.name is None:
            self.name = self.output_dir.name
        if self.checkpoint_dir is None:
            self.checkpoint_dir = REPO_ROOT / ".notelake" / "checkpoints" / self.name
        else:
            self.checkpoint_dir = _repo_path(self.checkpoint_dir)
        for key in ("pair_candidates_tagger", "pair_max_gap_chars", "pair_seen_min_count"):
            if getattr(self, key) is not None and self.objective != "pair":
                raise ValueError(f"{key} is for the pair classifier (objective: pair)")
        if self.pair_candidates_tagger is not None:
            self.pair_candidates_tagger = _repo_path(self.pair_candidates_tagger)
        if self.class_weighting != "none" and self.objective == "generate":
            raise ValueError("class_weighting is for the classification heads (objective: tag or pair)")
        if self.select_best and (self.eval_every is None or self.save_every % self.eval_every):
            raise ValueError("select_best needs eval_every set and save_every a multiple of it")
        return self


def load_train_config(path: str | os.PathLike, **overrides: Any) -> TrainConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"training config not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a training config must be a mapping")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(path), exc)) from None


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    id: str  # "<task>:<note_id>#<chunk index>"
    task: str
    input_ids: list[int]
    labels: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def split_notes(records: list[dict], cfg: TrainConfig, task_name: str = "") -> tuple[list[dict], list[dict]]:
    """Seeded split of TRAIN notes into (training, validation); then the data fraction / note cap.

    The training subset for a fraction f is the first f of one fixed seeded permutation, so the 10 % notes are
    inside the 20 % notes, and so on (nested learning curve). Validation never changes with the fraction.
    """
    order = sorted(records, key=lambda r: r["note_id"])
    random.Random(f"split:{cfg.seed}").shuffle(order)
    n_val = int(round(len(order) * cfg.validation_fraction))
    val, train = order[:n_val], order[n_val:]
    n_train = max(1, int(math.floor(len(train) * cfg.data_fraction + 1e-9)))
    for cap in (cfg.max_notes, cfg.task_max_notes.get(task_name)):
        if cap is not None:
            n_train = min(n_train, cap)
    return train[:n_train], val


def _chat_ids(tokenizer, messages: list[dict], **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def encode_example(tokenizer, task: Task, text: str, answer: dict) -> tuple[list[int], list[int]]:
    """Token ids of the full chat (prompt + assistant answer) and labels masking the prompt with -100."""
    from notelake.udfs.prompts import build_messages

    messages = build_messages(task, text, answer=answer)
    full = _chat_ids(tokenizer, messages)
    prompt = _chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    if full[: len(prompt)] != prompt:
        raise RuntimeError("chat template: the prompt is not a prefix of the prompt+answer rendering")
    labels = [-100] * len(prompt) + full[len(prompt):]
    return full, labels


def note_examples(tokenizer, task: Task, record: dict, overlap_chars: int) -> list[tuple[str, list[int], list[int]]]:
    """(example id, input_ids, labels) for one gold note: the whole text, or one per chunk when it is long."""
    from notelake.udfs.answer import gold_answer

    text = record["text"]
    if len(text) <= task.max_chunk_chars:
        ids, labels = encode_example(tokenizer, task, text, gold_answer(task, record))
        return [(f"{task.name}:{record['note_id']}#0", ids, labels)]
    from notelake.udfs.chunking import chunk_text

    out = []
    for chunk in chunk_text(text, task.max_chunk_chars, overlap_chars=overlap_chars):
        answer = gold_answer(task, record, window=(chunk.start, chunk.end))
        ids, labels = encode_example(tokenizer, task, chunk.text, answer)
        out.append((f"{task.name}:{record['note_id']}#{chunk.index}", ids, labels))
    return out


@dataclass
class DataStats:
    notes_train: int = 0
    notes_val: int = 0
    examples_train: int = 0
    examples_val: int = 0
    dropped_too_long: int = 0
    tokens_train: int = 0  # sum of example lengths (one epoch)
    answer_tokens_train: int = 0


def build_datasets(cfg: TrainConfig, tokenizer) -> tuple[list[Example], list[Example], dict[str, DataStats]]:
    train_all: list[Example] = []
    val_all: list[Example] = []
    stats: dict[str, DataStats] = {}
    for task_ref in cfg.tasks:
        task = load_task(task_ref)
        task_name = task.name
        path = cfg.data_dir / task_name / "train.jsonl"
        if not path.exists():
            raise ConfigError(f"no training data for task {task_name!r}: {path} not found (data_dir={cfg.data_dir})")
        train_notes, val_notes = split_notes(read_jsonl(path), cfg, task_name)
        st = DataStats(notes_train=len(train_notes), notes_val=len(val_notes))

        def build(notes: list[dict], cap: int | None) -> list[Example]:
            exs: list[Example] = []
            for rec in notes:
                for ex_id, ids, labels in note_examples(tokenizer, task, rec, cfg.chunk_overlap_chars):
                    if len(ids) > cfg.max_length:
                        st.dropped_too_long += 1
                        continue
                    exs.append(Example(ex_id, task_name, ids, labels))
                    if cap is not None and len(exs) >= cap:
                        return exs
            return exs

        tr = build(train_notes, cfg.max_examples)
        va = build(val_notes, cfg.max_validation_examples) if cfg.max_validation_examples else []
        st.examples_train, st.examples_val = len(tr), len(va)
        st.tokens_train = sum(e.n_tokens for e in tr)
        st.answer_tokens_train = sum(sum(1 for t in e.labels if t != -100) for e in tr)
        stats[task_name] = st
        train_all += tr
        val_all += va
    if not train_all:
        raise ConfigError("no training examples (all dropped as longer than max_length?)")
    random.Random(f"mix:{cfg.seed}").shuffle(train_all)  # multi-task: examples of all tasks mixed
    return train_all, val_all, stats


def data_fingerprint(examples: list[Example]) -> str:
    """sha256 of the sorted example ids used for training."""
    return hashlib.sha256("\n".join(sorted(e.id for e in examples)).encode()).hexdigest()


RUN_FILE = "run.json"
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


def planned_steps(cfg: TrainConfig, examples: list[Example]) -> int:
    """Optimizer steps of the run: ``epochs`` passes over ``examples`` when set, else ``steps``."""
    if cfg.epochs is None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * len(examples) / (cfg.batch_size * cfg.grad_accum)))


def estimate_tokens(cfg: TrainConfig, examples: list[Example]) -> int:
    """Expected input tokens (non-padding) for the run's optimizer steps, ignoring the budget."""
    mean = sum(e.n_tokens for e in examples) / len(examples)
    return int(mean * cfg.batch_size * cfg.grad_accum * planned_steps(cfg, examples))


class _TorchDataset:
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


class PadCollator:
    """Right-pads a batch: input ids with the pad id, labels (when the features have them: training) with -100,
    attention mask 0. ``label_width``: labels per token (a token head's one code per layer); None for one label per
    token (causal LM)."""

    def __init__(self, pad_id: int, label_width: int | None = None):
        self.pad_id = pad_id
        self.label_shape = () if label_width is None else (label_width,)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            mask[i, :k] = 1
        batch = {"input_ids": ids}
        if "labels" in features[0]:
            batch["labels"] = torch.full((len(features), n, *self.label_shape), -100, dtype=torch.long)
            for i, f in enumerate(features):
                batch["labels"][i, :len(f["labels"])] = torch.tensor(f["labels"])
        if len(features) > 1:
            # one unpadded sequence goes without a mask: SDPA then takes its causal fused kernel (no L x L scores)
            batch["attention_mask"] = mask
        return batch


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def resolve_base(name: str) -> Path:
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    from notelake.models.base_model import fetch_base, resolve_model

    if name == BASE_MODEL_NAME:
        return Path(fetch_base())
    return Path(resolve_model(name))


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def count_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


STOP_FILE = "STOP"


def _make_callbacks(cfg: TrainConfig, run_state: dict):
    from transformers import TrainerCallback

    class BudgetAndProgress(TrainerCallback):
        """Progress line per logging step (loss, tokens, tok/s, ETA) and the hard token budget."""

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


def train(cfg: TrainConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """Run one training config end to end; returns the manifest (or the data plan when ``dry_run``)."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = torch.cuda.is_available()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if cuda else torch.float32)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    base_path = resolve_base(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    train_ex, val_ex, stats = build_datasets(cfg, tokenizer)
    est = estimate_tokens(cfg, train_ex)
    planned = min(est, cfg.token_budget) if cfg.token_budget else est
    plan = {
        "examples_train": len(train_ex), "examples_val": len(val_ex),
        "per_task": {k: vars(v) for k, v in stats.items()},
        "mean_example_tokens": round(sum(e.n_tokens for e in train_ex) / len(train_ex), 1),
        "estimated_tokens_for_steps": est, "token_budget": cfg.token_budget, "planned_tokens": planned,
        "steps": planned_steps(cfg, train_ex),
        "epochs_for_steps": round(planned_steps(cfg, train_ex) * cfg.batch_size * cfg.grad_accum / len(train_ex), 3),
    }
    print("data plan: " + json.dumps(plan), flush=True)
    if dry_run:
        return plan
    last = checkpoint_to_resume(cfg, train_ex)  # before the model loads: a wrong folder fails in seconds

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model.config.use_cache = False
    init = None
    if cfg.init_adapter is not None:
        from peft import PeftModel

        from notelake.models.adapters import load_adapter
        from notelake.models.base_model import model_sha256

        init = load_adapter(cfg.init_adapter, model_sha256(base_path))
        model = PeftModel.from_pretrained(model, str(init.path), is_trainable=True)
        print(f"continuing adapter {init.name} (sha256 {init.sha256[:12]}, tasks {init.tasks})", flush=True)
    elif cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    trainable, total = count_params(model)
    print(f"mode {cfg.mode}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.2f} %), "
          f"dtype {str(dtype).removeprefix('torch.')}, device {'cuda' if cuda else 'cpu'}, "
          f"threads {torch.get_num_threads()}", flush=True)

    from transformers import Trainer, TrainingArguments
    has_val = bool(val_ex)
    args = TrainingArguments(
        output_dir=str(cfg.checkpoint_dir),
        max_steps=planned_steps(cfg, train_ex),
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
    run_state: dict[str, Any] = {"stopped_by": "steps"}
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_TorchDataset(train_ex),
        eval_dataset=_TorchDataset(val_ex) if has_val else None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=_make_callbacks(cfg, run_state),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our progress line replaces the raw dict dumps
    if last:
        print(f"resuming from checkpoint {last}", flush=True)
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    train_wall = time.time() - t_train
    final_eval = trainer.evaluate() if has_val else {}
    if final_eval:
        print(f"validation loss {final_eval.get('eval_loss'):.4f} on {len(val_ex)} examples", flush=True)

    tokens = int(trainer.state.num_input_tokens_seen)
    training_record = {
        "config": json.loads(cfg.model_dump_json()),
        "tokens_processed": tokens,
        "token_budget": cfg.token_budget,
        "stopped_by": run_state["stopped_by"],
        "optimizer_steps": int(trainer.state.global_step),
        "examples_seen": int(trainer.state.global_step) * cfg.batch_size * cfg.grad_accum,
        "wall_time_s": round(train_wall, 1),
        "wall_time_total_s": round(time.time() - t_start, 1),
        "tokens_per_s": round(tokens / train_wall, 1) if train_wall > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "trainable_params": trainable,
        "total_params": total,
        "final_train_loss": (run_state.get("losses") or [(None, None)])[-1][1],
        "mean_train_loss": round(float(result.training_loss), 5) if result.training_loss == result.training_loss else None,
        "val_loss": final_eval.get("eval_loss"),
        "val_examples": len(val_ex),
        "loss_curve": run_state.get("losses", []),
        "val_loss_curve": run_state.get("eval_losses", []),
        "resumed_from": Path(last).name if last else None,
        "init_adapter": {"name": init.name, "sha256": init.sha256, "tasks": init.tasks} if init else None,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name if trainer.state.best_model_checkpoint else None,
        "data": plan,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cuda" if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    manifest = save_output(cfg, trainer.model, tokenizer, base_path, train_ex, training_record)
    del trainer, model
    gc.collect()
    return manifest


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


PENDING_MANIFEST = "manifest.pending.json"


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


def main_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
