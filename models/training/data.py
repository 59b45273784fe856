"""Training examples: gold notes split, chunked like inference, rendered with the chat template, and batched.

One training example = one prompt of the real extraction path: ``build_messages(task, text, answer)`` rendered by
the base tokenizer's own chat template, the loss taken only on the assistant answer tokens (prompt tokens are
labelled -100). PHEE gives one example per sentence; MACCROBAT notes are cut with ``udfs.chunking.chunk_text``
at the task's ``max_chunk_chars`` and give one example per chunk (gold answer restricted to the chunk window),
so training sees exactly what inference sees. Several tasks in one config = multi-task training: the examples
are mixed, each with its own task instruction.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from notelake.conf.settings import ConfigError
from notelake.conf.task import Task, load_task
from notelake.models.training.config import LabelPerturbation, TrainConfig


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


def note_windows(task: Task, record: dict, overlap_chars: int) -> list[tuple[int, str, tuple[int, int] | None]]:
    """(chunk index, text, window) of each prompt a gold note gives: the whole text, or its chunks when it is long
    (window None = the whole text)."""
    text = record["text"]
    if len(text) <= task.max_chunk_chars:
        return [(0, text, None)]
    from notelake.udfs.chunking import chunk_text

    return [(c.index, c.text, (c.start, c.end)) for c in chunk_text(text, task.max_chunk_chars,
                                                                    overlap_chars=overlap_chars)]


def note_examples(tokenizer, task: Task, record: dict, overlap_chars: int,
                  perturbation: LabelPerturbation | None = None,
                  seed: int = 0) -> list[tuple[str, list[int], list[int]]]:
    """(example id, input_ids, labels) for one gold note, one per window. With ``perturbation`` a seeded share of
    the windows is prompted with a perturbed, defined label set (their ids end in ``~z``)."""
    from notelake.udfs.answer import gold_answer
    from notelake.udfs.perturb import perturb_example

    out = []
    for index, text, window in note_windows(task, record, overlap_chars):
        ex_id = f"{task.name}:{record['note_id']}#{index}"
        example_task, example_record = task, record
        rng = random.Random(f"perturb:{seed}:{ex_id}")
        if perturbation is not None and rng.random() < perturbation.fraction:
            example_task, example_record = perturb_example(task, record, rng, perturbation.spec(), window)
            ex_id += PERTURBED_SUFFIX
        ids, labels = encode_example(tokenizer, example_task, text, gold_answer(example_task, example_record, window))
        out.append((ex_id, ids, labels))
    return out


#: ends the id of an example prompted with a perturbed label set
PERTURBED_SUFFIX = "~z"


@dataclass
class DataStats:
    notes_train: int = 0
    notes_val: int = 0
    examples_train: int = 0
    examples_val: int = 0
    dropped_too_long: int = 0
    tokens_train: int = 0  # sum of example lengths (one epoch)
    answer_tokens_train: int = 0
    examples_perturbed: int = 0  # training examples prompted with a perturbed label set


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
                for ex_id, ids, labels in note_examples(tokenizer, task, rec, cfg.chunk_overlap_chars,
                                                        cfg.label_perturbation, cfg.seed):
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
        st.examples_perturbed = sum(e.id.endswith(PERTURBED_SUFFIX) for e in tr)
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


@dataclass
class Datasets:
    """A run's training and validation examples and its data plan (printed before training, kept in the
    manifest)."""

    train: list[Example]
    val: list[Example]
    plan: dict


def planned_steps(cfg: TrainConfig, examples: list[Example]) -> int:
    """Optimizer steps of the run: ``epochs`` passes over ``examples`` when set, else ``steps``."""
    if cfg.epochs is None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * len(examples) / (cfg.batch_size * cfg.grad_accum)))


def estimate_tokens(cfg: TrainConfig, examples: list[Example]) -> int:
    """Expected input tokens (non-padding) for the run's optimizer steps, ignoring the budget."""
    mean = sum(e.n_tokens for e in examples) / len(examples)
    return int(mean * cfg.batch_size * cfg.grad_accum * planned_steps(cfg, examples))


class ExampleDataset:
    """Examples as the ``Trainer`` reads them: input ids and labels."""

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
