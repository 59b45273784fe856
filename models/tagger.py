"""The classification-head baseline: the base model with a token-classification head, BIO-tagging concepts.

The method we follow compares prompt-based generation with a classification head over token representations.
Here the head is a linear layer over SmolLM2's last hidden states, one BIO layer per label (``udfs/bio.py``:
PHEE nests its concepts), trained with LoRA (the head trained in full beside the adapter) or by full fine-tuning,
on the same train notes, validation split and token budget rules as the generative runs (``models/training/``).

What the backbone costs: SmolLM2 is a causal decoder, so a token's representation sees only the text to its
left. An encoder tagger decides "is this token inside a Drug mention" with the words after it too; here the
first token of "heparin-induced thrombocytopenia" is tagged before the model has seen "induced". No
bidirectional variant of this backbone exists; the figures in docs/quality.md are what the causal head reaches.

Concepts (CCE) only; relations come from the pair classifier over the tagger's concepts (``models/pairs.py``:
``jobs.evaluate --tagger T --pairs P``, and ``engine.pairs`` beside ``engine.backend: tagger`` in the job).
Notes longer than ``tag_window_chars`` are cut into windows at sentence ends (``udfs.chunking``), without overlap.
Spans are grounded by construction: they come from the tokenizer's offsets into the text.

Nothing here logs note text: counts, losses and timings only.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from notelake.conf.settings import ConfigError
from notelake.conf.task import Task, load_task
from notelake.models.evaluation import Mention, NoteItems, gold_items, score_notes
from notelake.models.training.checkpoints import checkpoint_to_resume
from notelake.models.training.config import BASE_MODEL_NAME, TrainConfig, resolve_base
from notelake.models.training.data import (Datasets, Example, ExampleDataset, PadCollator, data_fingerprint,
                                           planned_steps, read_jsonl, split_notes)
from notelake.models.training.output import publish, stage_weights
from notelake.models.training.trainer import TrainingSetup, count_params, run_trainer, setup_training
from notelake.udfs.bio import IGNORE, LAYER_TAGS, decode_layers, encode_layers

log = logging.getLogger("notelake.tagger")

KIND = "tagger"
HEAD = "score"  # the token-classification head of transformers' causal-LM backbones


def labels_of(task: Task) -> list[str]:
    return list(task.concepts)


def windows(text: str, window_chars: int):
    from notelake.udfs.chunking import chunk_text

    return chunk_text(text, window_chars, 0)


def note_tag_examples(tokenizer, task: Task, record: dict, window_chars: int, stats: dict) -> list[Example]:
    """One example per window of a gold note: token ids and per-token, per-label BIO codes."""
    labels = labels_of(task)
    out = []
    for chunk in windows(record["text"], window_chars):
        inside = [
            {**c, "spans": [[s - chunk.start, e - chunk.start] for s, e in c["spans"]]}
            for c in record["concepts"]
            if c["label"] in task.concepts and all(chunk.start <= s and e <= chunk.end for s, e in c["spans"])]
        enc = tokenizer(chunk.text, return_offsets_mapping=True, add_special_tokens=False)
        codes, tag_stats = encode_layers(chunk.text, enc["offset_mapping"], inside, labels)
        for key in ("concepts", "fragments", "overlapping"):
            stats[key] = stats.get(key, 0) + getattr(tag_stats, key)
        out.append(Example(f"{task.name}:{record['note_id']}#{chunk.index}", task.name, list(enc["input_ids"]), codes))
    return out


def head_notes(cfg: TrainConfig) -> tuple[Task, list[dict], list[dict]]:
    """A per-token head's one task and its training and validation notes (the generative runs' split)."""
    if len(cfg.tasks) != 1:
        raise ConfigError("a tagger or pair classifier is trained on one task (its layers are the task's labels)")
    task = load_task(cfg.tasks[0])
    path = cfg.data_dir / task.name / "train.jsonl"
    if not path.exists():
        raise ConfigError(f"no training data for task {task.name!r}: {path} not found")
    train_notes, val_notes = split_notes(read_jsonl(path), cfg, task.name)
    return task, train_notes, val_notes


def build_head_datasets(cfg: TrainConfig, tokenizer, note_examples,
                        derive_task=None) -> tuple[Task, list[Example], list[Example], dict]:
    """Train and validation examples of a per-token head (tagger or pair classifier) for ``cfg``'s one task:
    ``note_examples(tokenizer, task, record, window_chars, counts)`` makes a note's examples and adds to
    ``counts`` (reported as ``<count>_train``). Same note split as the generative runs. ``derive_task(task,
    train_notes) -> (task, stats)``: the task the head learns, derived from its training notes."""
    task, train_notes, val_notes = head_notes(cfg)
    stats: dict[str, Any] = {"notes_train": len(train_notes), "notes_val": len(val_notes), "dropped_too_long": 0}
    if derive_task is not None:
        task, derived = derive_task(task, train_notes)
        stats.update(derived)

    def build(notes: list[dict], cap: int | None, counts: dict) -> list[Example]:
        out: list[Example] = []
        for record in notes:
            for ex in note_examples(tokenizer, task, record, cfg.tag_window_chars, counts):
                if ex.n_tokens > cfg.max_length:
                    stats["dropped_too_long"] += 1
                    continue
                out.append(ex)
        return out[:cap] if cap else out

    counts: dict[str, int] = {}
    train = build(train_notes, cfg.max_examples, counts)
    val = build(val_notes, cfg.max_validation_examples, {}) if cfg.max_validation_examples else []
    stats.update(examples_train=len(train), examples_val=len(val), tokens_train=sum(e.n_tokens for e in train),
                 **{f"{k}_train": v for k, v in counts.items()})
    if not train:
        raise ConfigError("no training examples")
    return task, train, val, stats


def layered_loss(logits, labels, weight=None):
    """Cross-entropy of each layer's classes (a label's O/B/I, a relation's no/yes), averaged over the tokens and
    layers that carry a code (each weighted by its class's ``weight`` when given). ``labels``: (batch, tokens,
    layers); ``logits``: (batch, tokens, layers x classes)."""
    import torch.nn.functional as F

    classes = logits.shape[-1] // labels.shape[-1]
    return F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1), weight=weight, ignore_index=IGNORE)


def balanced_class_weights(examples: list[Example], classes: int) -> list[float]:
    """Inverse-frequency weights of the classes over the examples' codes, ``n / (classes x count)`` (1.0 each when
    the classes are even): the pair classifier's rare "no" counts as much as its common "yes"."""
    counts = [0] * classes
    for example in examples:
        for token in example.labels:
            for code in token:
                if code != IGNORE:
                    counts[code] += 1
    total = sum(counts)
    return [round(total / (classes * count), 4) if count else 0.0 for count in counts]


def load_token_head(base_path: Path, num_outputs: int, dtype):
    """The backbone with a linear head of ``num_outputs`` logits per token (layers x classes)."""
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification.from_pretrained(base_path, num_labels=num_outputs, dtype=dtype)


def fit_token_head(cfg: TrainConfig, setup: TrainingSetup, data: Datasets, *, layers: int, classes: int):
    """Train the backbone with a per-token head of ``layers`` x ``classes`` logits (LoRA + head, or full FT) on
    examples whose labels are one code per layer per token; resumable from ``cfg.checkpoint_dir``. Returns the
    trainer and the training record for the manifest. Shared by the tagger and the pair classifier."""
    import torch
    from transformers import Trainer

    last = checkpoint_to_resume(cfg, data.train)  # before the model loads: a wrong folder fails in seconds
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and cfg.dtype != "float32" else torch.float32
    model = load_token_head(setup.base_path, layers * classes, dtype)
    model.config.pad_token_id = setup.tokenizer.pad_token_id
    if cfg.mode == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.TOKEN_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules, modules_to_save=[HEAD]))
    params = count_params(model)
    print(f"trainable parameters {params[0]:,} of {params[1]:,} ({100 * params[0] / params[1]:.2f} %)", flush=True)
    weight = None
    if cfg.class_weighting == "balanced":
        data.plan["class_weights"] = balanced_class_weights(data.train, classes)
        print(f"class weights {data.plan['class_weights']}", flush=True)
        weight = torch.tensor(data.plan["class_weights"], dtype=torch.float32)

    class LayeredTrainer(Trainer):
        # compute_loss returns each micro-batch's mean, so Trainer must divide it by the accumulation steps; it
        # does not when the model's forward takes **kwargs (it then expects a loss already normalised by
        # num_items_in_batch), and the loss it logs and the gradient would be the sum over grad_accum micro-batches.
        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            codes = inputs.pop("labels")
            outputs = model(**inputs)
            loss = layered_loss(outputs.logits, codes,
                                weight=None if weight is None else weight.to(outputs.logits.device,
                                                                             outputs.logits.dtype))
            return (loss, outputs) if return_outputs else loss

    trainer = LayeredTrainer(model=model, args=head_arguments(cfg, data.plan["steps"], dtype),
                             train_dataset=ExampleDataset(data.train),
                             eval_dataset=ExampleDataset(data.val) if data.val else None,
                             data_collator=PadCollator(setup.tokenizer.pad_token_id, layers))
    run = run_trainer(trainer, cfg, last)
    val_loss = trainer.evaluate()["eval_loss"] if data.val else None
    return trainer, run.record(cfg, setup, data, params, val_loss)


def head_arguments(cfg: TrainConfig, steps: int, dtype):
    """``TrainingArguments`` of a per-token head: ``cfg``'s recipe, no evaluation during training (the validation
    loss is taken once at the end)."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(cfg.checkpoint_dir), max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=1, gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_every, save_total_limit=cfg.keep_checkpoints,
        eval_strategy="no", seed=cfg.seed, data_seed=cfg.seed, use_cpu=not torch.cuda.is_available(),
        bf16=dtype == torch.bfloat16, dataloader_num_workers=0, report_to="none", disable_tqdm=True,
        include_num_input_tokens_seen="all", remove_unused_columns=False, label_names=["labels"],
        prediction_loss_only=True, train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
    )


@dataclass(frozen=True)
class HeadKind:
    """What a per-token head learns: the tagger's BIO layers, or the pair classifier's yes/no layers."""

    kind: str  # the manifest's kind is ``<kind>-<mode>``
    note_examples: Callable  # (tokenizer, task, record, window_chars, counts) -> a note's examples
    layer_labels: Callable[[Task], list[str]]  # one layer per label
    layer_name: str  # what the data plan calls the layers
    classes: int  # per layer
    derive_task: Callable | None = None  # (task, train_notes) -> (the task the head learns, stats): see build_head_datasets


def train_head(cfg: TrainConfig, head: HeadKind, *, dry_run: bool = False, extra_plan: dict[str, Any] | None = None,
               extra_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a per-token head end to end (the tagger, or the pair classifier): weights and a manifest of kind
    ``<kind>-<mode>`` into ``cfg.output_dir``; ``extra_plan`` joins the data plan, ``extra_manifest`` the manifest.
    Returns the manifest (or ``{"plan": <data plan>}`` when ``dry_run``)."""
    from notelake.models.adapters import write_adapter_manifest
    from notelake.models.base_model import model_sha256

    setup = setup_training(cfg)
    task, train_ex, val_ex, stats = build_head_datasets(cfg, setup.tokenizer, head.note_examples, head.derive_task)
    labels = head.layer_labels(task)
    if not labels:
        raise ConfigError(f"task {task.name} has no {head.layer_name} for a {head.kind} to learn")
    steps = planned_steps(cfg, train_ex)
    plan = {**stats, "steps": steps, head.layer_name: len(labels), "window_chars": cfg.tag_window_chars,
            "planned_tokens": int(stats["tokens_train"] * steps * cfg.batch_size * cfg.grad_accum / len(train_ex)),
            **(extra_plan or {})}
    print("data plan: " + json.dumps(plan), flush=True)
    if dry_run:
        return {"plan": plan}
    trainer, record = fit_token_head(cfg, setup, Datasets(train_ex, val_ex, plan), layers=len(labels),
                                     classes=head.classes)
    tmp = stage_weights(cfg, trainer.model, setup.tokenizer)  # LoRA + head, or the full model with its tokenizer
    manifest = write_adapter_manifest(
        tmp, name=cfg.name, kind=f"{head.kind}-{cfg.mode}", mode=cfg.mode, base_model=BASE_MODEL_NAME,
        base_model_sha256=model_sha256(setup.base_path), tasks=[task.name], label_sets={task.name: labels},
        task_definition=task.model_dump(mode="json"), tag_window_chars=cfg.tag_window_chars, training=record,
        data_fingerprint=data_fingerprint(train_ex), dev_scores={}, **(extra_manifest or {}))
    publish(tmp, Path(cfg.output_dir))
    del trainer
    gc.collect()
    return manifest


def train_tagger(cfg: TrainConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """Train one tagger config end to end; returns the manifest (or the data plan when ``dry_run``)."""
    return train_head(cfg, HeadKind(KIND, note_tag_examples, labels_of, "labels", len(LAYER_TAGS)), dry_run=dry_run)


class TrainedHead:
    """A folder written by :func:`fit_token_head` (a tagger or a pair classifier), loaded for inference: its
    manifest, task, tokenizer and model (LoRA merged into the weights), and batched forward passes."""

    kind = KIND
    classes = len(LAYER_TAGS)  # per layer: O/B/I

    def __init__(self, folder: str | Path, threads: int | None = None):
        import torch
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.manifest = self.checked_manifest(self.folder)
        if threads:
            torch.set_num_threads(threads)
        self.task = Task.model_validate(self.manifest["task_definition"])  # the folder is self-contained
        self.labels = self.manifest["label_sets"][self.task.name]
        self.window_chars = int(self.manifest["tag_window_chars"])
        base_path = resolve_base(BASE_MODEL_NAME)
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        outputs = len(self.labels) * self.classes
        if self.manifest["mode"] == "lora":
            from peft import PeftModel

            model = load_token_head(base_path, outputs, torch.float32)
            model = PeftModel.from_pretrained(model, str(self.folder)).merge_and_unload()
        else:
            model = load_token_head(self.folder, outputs, torch.float32)
        self.model = model.eval()

    @classmethod
    def checked_manifest(cls, folder: str | Path) -> dict:
        """The folder's manifest; a :class:`ConfigError` unless it is one of this class's kind."""
        manifest = cls.manifest_of(folder)
        if not str(manifest.get("kind", "")).startswith(cls.kind):
            raise ConfigError(f"{folder}: not a {cls.kind} folder (manifest kind {cls.kind}-lora / {cls.kind}-full)")
        return manifest

    @staticmethod
    def manifest_of(folder: str | Path) -> dict:
        from notelake.models.base_model import read_manifest

        return read_manifest(Path(folder)) or {}

    def decisions(self, sequences: list[list[int]], batch_size: int = 8):
        """Yields (index into ``sequences``, per-token list of per-layer class codes), shortest first, batched."""
        import torch

        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        collate = PadCollator(self.tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                batch = order[b:b + batch_size]
                logits = self.model(**collate([{"input_ids": sequences[i]} for i in batch])).logits
                codes = logits.view(len(batch), logits.shape[1], len(self.labels), self.classes).argmax(-1)
                for row, i in enumerate(batch):
                    yield i, codes[row, :len(sequences[i])].tolist()


class Tagger(TrainedHead):
    """A trained tagger folder, loaded for inference: ``predict(texts)`` -> concepts with character offsets."""

    def predict(self, texts: list[str], batch_size: int = 8) -> tuple[list[list[dict]], dict]:
        """Concepts per text (label, start, end, text; offsets into the text) and counts (windows, tokens, s)."""
        items = [(k, c) for k, text in enumerate(texts) for c in windows(text, self.window_chars)]
        encoded = [self.tokenizer(c.text, return_offsets_mapping=True, add_special_tokens=False) for _, c in items]
        out: list[list[dict]] = [[] for _ in texts]
        t0 = time.monotonic()
        for i, codes in self.decisions([e["input_ids"] for e in encoded], batch_size):
            note, chunk = items[i]
            for concept in decode_layers(chunk.text, encoded[i]["offset_mapping"], codes, self.labels):
                out[note].append({**concept, "start": concept["start"] + chunk.start,
                                  "end": concept["end"] + chunk.start})
        tokens = sum(len(e["input_ids"]) for e in encoded)
        return out, {"windows": len(items), "tokens": tokens, "wall_s": time.monotonic() - t0}


def predicted_items(record: dict, concepts: list[dict]) -> NoteItems:
    """A head's predicted concepts of one gold record as the scorer's items (assertion: present)."""
    assert all(record["text"][c["start"]:c["end"]] == c["text"] for c in concepts)  # grounded by construction
    pred = NoteItems(record["note_id"], [Mention(c["label"], ((c["start"], c["end"]),)) for c in concepts])
    for m in pred.concepts:
        pred.assertions[(m.label, m.spans)] = "present"
    return pred


def evaluate_tagger(tagger: Tagger, records: list[dict], *, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The tagger on gold records, scored by the generative rows' scorer (concepts; no relations)."""
    predicted, counts = tagger.predict([r["text"] for r in records])
    pairs = [(predicted_items(record, concepts), gold_items(tagger.task, record))
             for record, concepts in zip(records, predicted)]
    scores = score_notes(tagger.task, pairs, resamples=resamples, seed=seed)
    for key in ("cre", "per_relation"):  # concepts only: a relation F1 of 0 would read as a measured result
        scores.pop(key, None)
    return head_report(scores, len(records), counts["windows"], counts["tokens"], counts["wall_s"])


def head_report(scores: dict, notes: int, passes: int, tokens: int, wall: float) -> dict[str, Any]:
    """``scores`` with the generative report's other keys, so one report layout serves both: a classification
    head has no parse step or answer tokens; its "prompts" are its forward passes."""
    scores.update(invalid_output_rate=0.0, engine_error_rate=0.0, error_types={},
                  parser={"warnings": 0, "ungrounded_mentions": 0, "dropped_relations": 0})
    scores["throughput"] = {"notes": notes, "prompts": passes, "wall_s": round(wall, 1),
                            "prompts_per_s": round(passes / wall, 3) if wall else None,
                            "notes_per_s": round(notes / wall, 3) if wall else None,
                            "prompt_tokens": tokens, "output_tokens": 0, "output_tokens_per_s": None,
                            "tokens_per_s": round(tokens / wall, 1) if wall else None,
                            "truncated_outputs": 0}
    return scores


class TaggerEngine:
    """``engine.backend: tagger``: the job's engine interface over a trained tagger (``engine.adapter`` = its
    folder). Each request's chunk text is tagged; a result carries the chunk's concepts as ``spans`` (label, start,
    end), grounded by construction, and no answer text; with ``engine.pairs`` (a pair classifier of the same task,
    models/pairs.py) also its relations between them as ``relations`` (label, head index, tail index). The chat
    prompt is not used."""

    backend = "tagger"
    merged = False

    def __init__(self, cfg):
        import threading

        from notelake.models.adapters import load_head
        from notelake.models.base_model import model_sha256, resolve_model

        if not cfg.adapter:
            raise ConfigError("engine.backend tagger needs engine.adapter: a tagger folder (a training run with "
                              "objective: tag, e.g. conf/train/tagger-phee-lora.yaml)")
        t0 = time.monotonic()
        self.cfg = cfg
        self.model_path = resolve_model(cfg.model)
        self.model_sha256 = model_sha256(self.model_path)
        manifest_task = (Tagger.manifest_of(cfg.adapter).get("tasks") or [""])[0]
        self.info = load_head(cfg.adapter, self.model_sha256, manifest_task)
        self.tagger = Tagger(self.info.path)
        self.pairs = None
        if cfg.pairs:
            from notelake.models.pairs import PairClassifier

            self.pairs_info = load_head(cfg.pairs, self.model_sha256, manifest_task, kind="pairs")
            self.pairs = PairClassifier(self.pairs_info.path)
        self._lock = threading.Lock()
        self.load_seconds = round(time.monotonic() - t0, 1)

    def generate(self, requests: list, on_result=None) -> list:
        """Tags of every request's text; a call's requests finish together (one batched pass), so ``on_result``
        gets them all at the end of the call."""
        from notelake.models.engine import GenerationResult, error_result, report_each

        missing = [r for r in requests if r.text is None]
        if missing:
            return report_each([error_result(r.request_id, "engine_error: the tagger needs the chunk text "
                                             "(request.text)") for r in requests], on_result)
        texts = [r.text for r in requests]
        with self._lock:  # one forward pass at a time per engine
            predicted, _ = self.tagger.predict(texts)
            related = self.pairs.predict(texts, predicted)[0] if self.pairs else [None] * len(requests)
        results = [GenerationResult(request_id=r.request_id, text=None, error=None,
                                    prompt_tokens=self.count_tokens(r.text), output_tokens=0, finish_reason="stop",
                                    spans=tuple((c["label"], c["start"], c["end"]) for c in concepts),
                                    relations=None if relations is None else tuple(
                                        (rel["label"], _index(concepts, rel["head"]), _index(concepts, rel["tail"]))
                                        for rel in relations))
                   for r, concepts, relations in zip(requests, predicted, related)]
        return report_each(results, on_result)

    def count_tokens(self, text: str) -> int:
        return len(self.tagger.tokenizer.encode(text, add_special_tokens=False))

    def describe(self) -> dict:
        from notelake.models.engine import versions

        return {"backend": self.backend, "model": self.cfg.model, "model_path": str(self.model_path),
                "model_sha256": self.model_sha256, "adapter": self.info.name, "adapter_path": str(self.info.path),
                "adapter_sha256": self.info.sha256, "dtype": "float32", "guided_decoding": "n/a (tags)",
                "pairs": self.pairs_info.name if self.pairs else None,
                "pairs_sha256": self.pairs_info.sha256 if self.pairs else None,
                "load_seconds": self.load_seconds, "versions": versions()}


def _index(items: list, item) -> int:
    """Position of ``item`` itself (not an equal copy) in ``items``."""
    return next(k for k, x in enumerate(items) if x is item)
