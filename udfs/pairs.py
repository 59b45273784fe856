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
Combination_trigger -> Drug; MACCROBAT allows any pair.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from notelake.conf.task import Task

IGNORE = -100


def allowed_relations(task: Task, head_label: str, tail_label: str) -> list[str]:
    return [r for r in task.relations if task.allows(r, head_label, tail_label)]


def head_prefix(label: str, text: str) -> str:
    """The line written before the window: the head's label and mention (the classifier's "question")."""
    return f"{label}: {text}\n"


def _same_concept(a: Mapping, b: Mapping) -> bool:
    return (a["start"], a["end"], a["label"]) == (b["start"], b["end"], b["label"])


def candidate_tails(task: Task, head: Mapping, concepts: Sequence[Mapping]) -> list[Mapping]:
    """The concepts (``{"label", "start", "end", ...}``: first and last character) some relation allows as a
    tail of ``head``."""
    return [c for c in concepts if not _same_concept(c, head) and allowed_relations(task, head["label"], c["label"])]


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
