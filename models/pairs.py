"""The relation pair classifier of the classification-head baseline (#14): relations over a tagger's concepts.

For each concept that can head a relation, one forward pass over its window with the head written first
(``udfs/pairs.py``): at the token that ends each candidate tail, one yes/no layer per relation label says whether
the head holds that relation to the tail. Same backbone, LoRA or full fine-tuning, note split, windows and
training machinery as the tagger (``models/tagger.py``: :func:`fit_token_head`), trained on gold concepts and
applied end to end to the tagger's predicted concepts, so relation F1 is scored end to end (a relation counts
only when both its concepts were found) by the generative rows' scorer.

What it cannot do: relations between concepts in different windows (counted in training as ``cross_window``),
and a discontinuous concept is placed by its first and last character. The causal backbone reads a tail before
any text after it, like the tagger.

Nothing here logs note text: counts, losses and timings only.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from notelake.conf.task import Task
from notelake.models.tagger import (TrainedHead, Tagger, build_head_datasets, fit_token_head, start_training,
                                    windows)
from notelake.models.training import (BASE_MODEL_NAME, Example, TrainConfig, data_fingerprint, planned_steps,
                                      publish, stage_weights)
from notelake.udfs.pairs import (IGNORE, allowed_relations, candidate_tails, decode_tails, encode_targets,
                                 head_prefix, same_concept)

KIND = "pairs"
YES_NO = 2  # classes per relation layer


def gold_concepts(task: Task, record: dict) -> list[dict]:
    """The record's concepts of the task's labels: id, label, first and last character, text."""
    return [{"id": c["id"], "label": c["label"], "start": min(s for s, _ in c["spans"]),
             "end": max(e for _, e in c["spans"]), "text": c["text"]}
            for c in record["concepts"] if c["label"] in task.concepts]


def window_inputs(tokenizer, head: dict, window_enc) -> tuple[list[int], int]:
    """Token ids of the head line + the window, and the head line's length in tokens."""
    prefix = tokenizer(head_prefix(head["label"], head["text"]), add_special_tokens=False)["input_ids"]
    return list(prefix) + list(window_enc["input_ids"]), len(prefix)


def note_pair_examples(tokenizer, task: Task, record: dict, window_chars: int, counts: dict) -> list[Example]:
    """One example per (window, head with candidate tails) of a gold note: ids, and per token one code per
    relation (IGNORE but at candidate tails' end tokens)."""
    relations = list(task.relations)
    concepts = gold_concepts(task, record)
    gold: dict[tuple[str, str], set[str]] = {}
    for r in record.get("relations", []):
        if r["label"] in task.relations:
            gold.setdefault((r["head"], r["tail"]), set()).add(r["label"])
    counts["gold_relations"] = counts.get("gold_relations", 0) + sum(len(v) for v in gold.values())
    covered: set[tuple[str, str]] = set()
    out = []
    for chunk in windows(record["text"], window_chars):
        inside = [{**c, "start": c["start"] - chunk.start, "end": c["end"] - chunk.start} for c in concepts
                  if chunk.start <= c["start"] and c["end"] <= chunk.end]
        enc = tokenizer(chunk.text, return_offsets_mapping=True, add_special_tokens=False)
        for head in inside:
            tails = candidate_tails(task, head, inside)
            if not tails:
                continue
            codes = [(t["end"], {r: int(r in gold.get((head["id"], t["id"]), ()))
                                 for r in allowed_relations(task, head["label"], t["label"])}) for t in tails]
            covered.update((head["id"], t["id"]) for t in tails)
            ids, n_prefix = window_inputs(tokenizer, head, enc)
            labels = [[IGNORE] * len(relations)] * n_prefix + encode_targets(enc["offset_mapping"], relations, codes)
            counts["pairs"] = counts.get("pairs", 0) + len(tails)
            counts["positive"] = counts.get("positive", 0) + sum(sum(c.values()) for _, c in codes)
            out.append(Example(f"{task.name}:{record['note_id']}#{chunk.index}:{head['id']}", task.name, ids, labels))
    # gold relations no window offers as a candidate pair (their ends in different windows): never learnt
    counts["not_candidates"] = counts.get("not_candidates", 0) + sum(
        len(labels) for pair, labels in gold.items() if pair not in covered)
    return out


def train_pairs(cfg: TrainConfig, *, dry_run: bool = False) -> dict[str, Any]:
    """Train one pair-classifier config end to end; returns the manifest (or the data plan when ``dry_run``)."""
    t_start = time.time()
    base_path, tokenizer = start_training(cfg)
    task, train_ex, val_ex, stats = build_head_datasets(cfg, tokenizer, note_pair_examples)
    if not task.relations:
        from notelake.conf.settings import ConfigError

        raise ConfigError(f"task {task.name} has no relations: a pair classifier needs kind: cre")
    steps = planned_steps(cfg, train_ex)
    plan = {**stats, "steps": steps, "relations": len(task.relations), "window_chars": cfg.tag_window_chars,
            "planned_tokens": int(stats["tokens_train"] * steps * cfg.batch_size * cfg.grad_accum / len(train_ex))}
    print("data plan: " + json.dumps(plan), flush=True)
    if dry_run:
        return {"plan": plan}
    trainer, record = fit_token_head(cfg, base_path, tokenizer, train_ex, val_ex, layers=len(task.relations),
                                     classes=YES_NO, plan=plan, t_start=t_start)
    from notelake.models.adapters import write_adapter_manifest
    from notelake.models.base_model import model_sha256

    tmp = stage_weights(cfg, trainer.model, tokenizer)
    manifest = write_adapter_manifest(
        tmp, name=cfg.name, kind=f"{KIND}-{cfg.mode}", mode=cfg.mode, base_model=BASE_MODEL_NAME,
        base_model_sha256=model_sha256(base_path), tasks=[task.name], label_sets={task.name: list(task.relations)},
        task_definition=task.model_dump(mode="json"), tag_window_chars=cfg.tag_window_chars, training=record,
        data_fingerprint=data_fingerprint(train_ex), dev_scores={})
    publish(tmp, Path(cfg.output_dir))
    del trainer
    gc.collect()
    return manifest


class PairClassifier(TrainedHead):
    """A trained pair-classifier folder: ``predict(texts, concepts)`` -> relations between the given concepts."""

    kind = KIND
    classes = YES_NO

    def predict(self, texts: list[str], concepts: list[list[dict]], batch_size: int = 8) -> tuple[list[list[dict]], dict]:
        """Relations per text (``{"label", "head", "tail"}``, head and tail being items of ``concepts``: dicts with
        label, start, end, text, offsets into the text) and counts (passes, tokens, s)."""
        passes = []  # (note, head, [(tail, tail in window offsets)], window token offsets, ids, head line tokens)
        for k, (text, found) in enumerate(zip(texts, concepts)):
            for chunk in windows(text, self.window_chars):
                inside = [(c, {**c, "start": c["start"] - chunk.start, "end": c["end"] - chunk.start}) for c in found
                          if chunk.start <= c["start"] and c["end"] <= chunk.end]
                enc = None
                for head, local_head in inside:
                    tails = [(c, local) for c, local in inside if not same_concept(local, local_head)
                             and allowed_relations(self.task, head["label"], c["label"])]
                    if not tails:
                        continue
                    enc = enc or self.tokenizer(chunk.text, return_offsets_mapping=True, add_special_tokens=False)
                    ids, n_prefix = window_inputs(self.tokenizer, head, enc)
                    passes.append((k, head, tails, enc["offset_mapping"], ids, n_prefix))
        out: list[list[dict]] = [[] for _ in texts]
        t0 = time.monotonic()
        for i, codes in self.decisions([p[4] for p in passes], batch_size):
            note, head, tails, offsets, _, n_prefix = passes[i]
            for relation, local in decode_tails(self.task, head, [local for _, local in tails], offsets,
                                                codes[n_prefix:]):
                tail = next(c for c, candidate in tails if candidate is local)
                out[note].append({"label": relation, "head": head, "tail": tail})
        tokens = sum(len(p[4]) for p in passes)
        return out, {"passes": len(passes), "tokens": tokens, "wall_s": time.monotonic() - t0}


def evaluate_end_to_end(tagger: Tagger, pairs: PairClassifier, records: list[dict], *, resamples: int = 1000,
                        seed: int = 0) -> dict[str, Any]:
    """Concepts by the tagger, relations by the pair classifier over them, scored end to end by the generative
    rows' scorer (concepts and relations)."""
    from notelake.models.evaluation import Mention, NoteItems, Rel, gold_items, score_notes
    from notelake.models.tagger import head_report

    if pairs.task.name != tagger.task.name:
        from notelake.conf.settings import ConfigError

        raise ConfigError(f"tagger task {tagger.task.name} != pair classifier task {pairs.task.name}")
    texts = [r["text"] for r in records]
    concepts, tag_counts = tagger.predict(texts)
    relations, pair_counts = pairs.predict(texts, concepts)
    scored = []
    for record, found, related in zip(records, concepts, relations):
        pred = NoteItems(record["note_id"], [Mention(c["label"], ((c["start"], c["end"]),)) for c in found])
        pred.relations = [Rel(r["label"], Mention(r["head"]["label"], ((r["head"]["start"], r["head"]["end"]),)),
                              Mention(r["tail"]["label"], ((r["tail"]["start"], r["tail"]["end"]),)))
                          for r in related]
        for m in pred.concepts:
            pred.assertions[(m.label, m.spans)] = "present"
        scored.append((pred, gold_items(pairs.task, record)))
    scores = score_notes(pairs.task, scored, resamples=resamples, seed=seed)
    wall = tag_counts["wall_s"] + pair_counts["wall_s"]
    return head_report(scores, len(records), tag_counts["windows"] + pair_counts["passes"],
                         tag_counts["tokens"] + pair_counts["tokens"], wall)
