"""A training run's configuration: :class:`TrainConfig` (conf/train/*.yaml) and where its paths resolve."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from notelake.conf.settings import ConfigError, _format_validation_error

REPO_ROOT = Path(__file__).resolve().parents[2]
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


class LabelPerturbation(BaseModel):
    """Examples whose prompt carries a perturbed label set with definitions (udfs/perturb.py): a model that only
    ever saw its tasks' fixed label names answers ``none`` to a new task file; these examples can only be answered
    by reading the definitions."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.3, ge=0, le=1, description="share of training windows (chosen per window, seeded) "
                                                         "prompted with a perturbed, defined label set instead of "
                                                         "the task's own prompt")
    keep_prob: float = Field(0.6, gt=0, le=1, description="each label (event anchors excepted) stays in the set "
                                                          "with this probability")
    max_labels: int = Field(12, ge=1, description="labels per perturbed prompt at most (bounds its length)")
    rename_prob: float = Field(0.5, ge=0, le=1, description="a kept label is renamed with this probability")
    code_prob: float = Field(0.5, ge=0, le=1, description="a renamed label becomes a neutral code (else another "
                                                          "spelling of its name)")

    def spec(self):
        from notelake.udfs.perturb import PerturbSpec

        return PerturbSpec(keep_prob=self.keep_prob, max_labels=self.max_labels, rename_prob=self.rename_prob,
                           code_prob=self.code_prob)


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
    label_perturbation: LabelPerturbation | None = Field(
        None, description="generate: mix in examples prompted with perturbed, defined label sets (zero-shot transfer "
                          "to new task files); null = every example uses its task's own prompt")

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



def resolve_base(name: str) -> Path:
    """The base model's folder: ``name`` itself when it is a folder, else the named model (fetched when needed)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    from notelake.models.base_model import fetch_base, resolve_model

    if name == BASE_MODEL_NAME:
        return Path(fetch_base())
    return Path(resolve_model(name))
