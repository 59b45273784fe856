"""Relation pairs for the classification-head baseline (#14): which concept pairs the pair classifier decides, and
the per-token targets that encode its decisions. Pure functions (no torch): offsets come in as ``(start, end)``.

The classifier reads one window of text per head concept, with the head written before the text
(:func:`head_prefix`), and decides every candidate tail at the window's token that ends the tail: a causal
backbone's representation there has seen the head, the tail and the text between them. One forward pass per head
decides all its tails (a pass per pair would pay for the window's tokens once per pair).

The decision is one yes/no layer per relation label, like the tagger's one BIO layer per concept label: nested
concepts often end on the same token (PHEE's Treatment "insulin" and Drug "insulin", Subject "women of
reproductive age" and Subject_age "reproductive age"), and a tail's relation is read only from the layers its
label pair allows (``Task.allows``), so two such tails of different relations stay apart. Candidates are the
concept pairs some relation of the task allows: PHEE's trigger -> argument, Drug -> Effect and
Combination_trigger -> Drug; MACCROBAT's schema allows any pair, which makes a pass per concept over its whole
window with every other concept as a tail (7.44M tokens an epoch). Two optional limits, both learnt or set at
training and kept with the classifier: the label pairs seen in the training relations (:func:`with_seen_pairs`)
and a largest gap between head and tail (:func:`within`); with the gap set, a head's pass reads only the text from
the first to the last of it and its tails (:func:`pass_span`).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

from notelake.conf.task import Task

IGNORE = -100


def allowed_relations(task: Task, head_label: str, tail_label: str) -> list[str]:
    return [r for r in task.relations if task.allows(r, head_label, tail_label)]


def head_prefix(label: str, text: str) -> str:
    """The line written before the window: the head's label and mention (the classifier's "question")."""
    return f"{label}: {text}\n"


def _same_concept(a: Mapping, b: Mapping) -> bool:
    return (a["start"], a["end"], a["label"]) == (b["start"], b["end"], b["label"])


def gap(a: Mapping, b: Mapping) -> int:
    """Characters between two concepts (0 when they touch or overlap)."""
    return max(0, b["start"] - a["end"], a["start"] - b["end"])


def within(head: Mapping, tail: Mapping, max_gap: int | None) -> bool:
    return max_gap is None or gap(head, tail) <= max_gap


def candidate_tails(task: Task, head: Mapping, concepts: Sequence[Mapping],
                    max_gap: int | None = None) -> list[Mapping]:
    """The concepts (``{"label", "start", "end", ...}``: first and last character) some relation allows as a
    tail of ``head`` (no more than ``max_gap`` characters away from it, when given)."""
    return [c for c in concepts if not _same_concept(c, head) and within(head, c, max_gap)
            and allowed_relations(task, head["label"], c["label"])]


def pass_span(head: Mapping, tails: Sequence[Mapping]) -> tuple[int, int]:
    """The characters a head's pass must read: from the first to the last character of the head and its tails."""
    ends = [head, *tails]
    return min(c["start"] for c in ends), max(c["end"] for c in ends)


def seen_pairs(task: Task, records: Iterable[Mapping]) -> Counter:
    """How often each (relation, head label, tail label) holds among the gold relations of ``records`` (the data
    format's notes: concepts with ids, relations naming them)."""
    counts: Counter = Counter()
    for record in records:
        label_of = {c["id"]: c["label"] for c in record["concepts"]}
        for r in record.get("relations", []):
            if r["label"] in task.relations and r["head"] in label_of and r["tail"] in label_of:
                counts[(r["label"], label_of[r["head"]], label_of[r["tail"]])] += 1
    return counts


def with_seen_pairs(task: Task, records: Iterable[Mapping], min_count: int) -> tuple[Task, dict[str, int]]:
    """``task`` with each relation the schema leaves open to any label pair (``pairs: null``) limited to the label
    pairs it holds between at least ``min_count`` times in ``records``, and counts of the relations so limited:
    seen_relations, seen_relations_kept (between a kept label pair), seen_label_pairs (kept). Relations the schema
    already limits keep their pairs."""
    counts = seen_pairs(task, records)
    relations = {}
    for label, spec in task.relations.items():
        if spec.pairs is None:
            spec = spec.model_copy(update={"pairs": sorted((h, t) for (r, h, t), n in counts.items()
                                                           if r == label and n >= min_count)})
        relations[label] = spec
    open_ = {label for label, spec in task.relations.items() if spec.pairs is None}
    stats = {"seen_relations": sum(n for (r, _, _), n in counts.items() if r in open_),
             "seen_relations_kept": sum(n for (r, _, _), n in counts.items() if r in open_ and n >= min_count),
             "seen_label_pairs": sum(len(relations[r].pairs) for r in open_)}
    return task.model_copy(update={"relations": relations}), stats


def with_predicted(gold: Sequence[Mapping], predicted: Sequence[Mapping]) -> tuple[list[dict], dict[str, int]]:
    """The candidate concepts of a training note as the pair classifier meets them at inference: the gold concepts
    (``{"id", "label", "start", "end", ...}``) plus a tagger's ``predicted`` ones that are not a gold concept. A
    predicted concept overlapping gold concepts of its label stands for the one it overlaps most (takes its id, so
    its pairs take that concept's gold relations: lenient scoring credits them); one overlapping none is false (an
    id no relation names: every pair it is in is a "no"). Counts: predicted, exact (already gold), stand_in,
    false."""
    out = [dict(c) for c in gold]
    counts = {"predicted": len(predicted), "exact": 0, "stand_in": 0, "false": 0}
    for k, p in enumerate(predicted):
        same_label = [g for g in gold if g["label"] == p["label"]]
        if any(_same_concept(p, g) for g in same_label):
            counts["exact"] += 1
            continue
        overlaps = [(min(p["end"], g["end"]) - max(p["start"], g["start"]), g) for g in same_label]
        overlap, best = max(overlaps, key=lambda o: o[0], default=(0, None))
        if overlap > 0:
            counts["stand_in"] += 1
            out.append({**p, "id": best["id"]})
        else:
            counts["false"] += 1
            out.append({**p, "id": f"predicted:{k}"})
    return out, counts


def end_token(offsets: Sequence[tuple[int, int]], end: int) -> int | None:
    """Index of the last token holding characters before ``end`` (the token that ends a mention)."""
    last = None
    for i, (s, e) in enumerate(offsets):
        if e > s and s < end:
            last = i
    return last


def encode_targets(offsets: Sequence[tuple[int, int]], relations: Sequence[str],
                   tails: Sequence[tuple[int, Mapping[str, int]]]) -> list[list[int]]:
    """Per token, one code per relation label: IGNORE, except at a candidate tail's end token, where each relation
    its label pair allows gets 1 (the gold has it between the head and this tail) or 0. ``tails``: (end offset,
    {relation: 0 or 1} over the allowed relations). Tails ending on one token share its codes (1 wins)."""
    index = {r: k for k, r in enumerate(relations)}
    targets = [[IGNORE] * len(relations) for _ in offsets]
    for end, codes in tails:
        i = end_token(offsets, end)
        if i is None:
            continue
        for relation, code in codes.items():
            targets[i][index[relation]] = max(targets[i][index[relation]], code)
    return targets


def decode_tails(task: Task, head: Mapping, tails: Sequence[Mapping], offsets: Sequence[tuple[int, int]],
                 decisions: Sequence[Sequence[int]]) -> list[tuple[str, Mapping]]:
    """(relation, tail) for every candidate tail whose end token says yes on a relation its label pair allows.
    ``decisions``: per token, one 0/1 per relation label (the argmax of each layer)."""
    relations = list(task.relations)
    out = []
    for tail in tails:
        i = end_token(offsets, tail["end"])
        if i is None:
            continue
        out += [(r, tail) for r in allowed_relations(task, head["label"], tail["label"])
                if decisions[i][relations.index(r)] == 1]
    return out
