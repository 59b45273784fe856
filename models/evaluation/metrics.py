"""Scores of predicted against gold concepts and relations (CCE / CRE, strict and lenient).

* CCE strict: a predicted concept is right when its label and its exact spans equal a gold concept's.
* CCE lenient: same label and the character ranges overlap. Matching is one-to-one (a gold concept is
  credited once), exact pairs first, then by largest overlap.
* CRE end-to-end: a predicted relation is right when its label is right and both arguments match the gold
  relation's arguments (label + spans) by the strict, resp. lenient, rule; one-to-one.
* micro P/R/F1 over the slice, per label too; bootstrap 95 % CI over notes (default 1000 resamples) and the
  bootstrap standard error of F1.
* grounding rate (emitted concepts that were found in the text) and assertion accuracy on strict matches.

Items carry labels and offsets only, never text.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from notelake.conf.task import Task

Spans = tuple[tuple[int, int], ...]


# ----------------------------------------------------------------------------------------------------------------
# Gold / predicted items
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mention:
    label: str
    spans: Spans | None  # None = ungrounded prediction (never matches)

    @property
    def extent(self) -> tuple[int, int] | None:
        return (self.spans[0][0], self.spans[-1][1]) if self.spans else None


@dataclass(frozen=True)
class Rel:
    label: str
    head: Mention
    tail: Mention


@dataclass
class NoteItems:
    note_id: str
    concepts: list[Mention] = field(default_factory=list)
    relations: list[Rel] = field(default_factory=list)
    assertions: dict[tuple[str, Spans], str] = field(default_factory=dict)


def gold_items(task: Task, record: dict) -> NoteItems:
    """Gold concepts/relations of one record restricted to the task's labels."""
    from notelake.udfs.answer import concept_assertion, event_assertions  # the gold answers' assertion rule

    by_id: dict[str, Mention] = {}
    items = NoteItems(record["note_id"])
    negated, speculated = event_assertions(record)
    for c in record["concepts"]:
        if c["label"] not in task.concepts:
            continue
        m = Mention(c["label"], tuple((int(s), int(e)) for s, e in c["spans"]))
        by_id[c["id"]] = m
        items.concepts.append(m)
        items.assertions[(m.label, m.spans)] = concept_assertion(c, negated, speculated)
    if task.kind == "cre":
        for r in record.get("relations", []):
            if r["label"] in task.relations and r["head"] in by_id and r["tail"] in by_id:
                items.relations.append(Rel(r["label"], by_id[r["head"]], by_id[r["tail"]]))
    return items


def predicted_items(note_id: str, concept_rows: list[dict], relation_rows: list[dict]) -> NoteItems:
    """Predicted items from assemble_note's concept and relation rows."""
    items = NoteItems(note_id)
    by_cid: dict[str, Mention] = {}
    for row in concept_rows:
        spans = row.get("spans")
        if row.get("grounded") and spans:
            sp: Spans | None = tuple((int(s["start"]), int(s["end"])) for s in spans)
        else:
            sp = None
        m = Mention(row["label"], sp)
        by_cid[row["concept_id"]] = m
        items.concepts.append(m)
        if sp is not None:
            items.assertions[(m.label, sp)] = row.get("assertion") or "present"
    for row in relation_rows:
        head, tail = by_cid.get(row["head_concept_id"]), by_cid.get(row["tail_concept_id"])
        if head is not None and tail is not None:
            items.relations.append(Rel(row["label"], head, tail))
    return items


# ----------------------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------------------


def _chars(spans: Spans) -> set[int]:
    return {i for s, e in spans for i in range(s, e)}


def overlap(a: Mention, b: Mention) -> int:
    """Characters shared by two mentions' fragments (0 when either is ungrounded)."""
    if a.spans is None or b.spans is None:
        return 0
    ea, eb = a.extent, b.extent
    if ea[1] <= eb[0] or eb[1] <= ea[0]:
        return 0
    return len(_chars(a.spans) & _chars(b.spans))


def strict_match(pred: Mention, gold: Mention) -> bool:
    return pred.spans is not None and pred.label == gold.label and pred.spans == gold.spans


def lenient_match(pred: Mention, gold: Mention) -> bool:
    return pred.label == gold.label and overlap(pred, gold) > 0


def match_concepts(pred: Sequence[Mention], gold: Sequence[Mention], mode: str) -> list[tuple[int, int]]:
    """One-to-one (pred index, gold index) pairs: exact pairs first, then (lenient) by largest overlap."""
    pairs: list[tuple[int, int]] = []
    used_p, used_g = set(), set()
    gold_index: dict[tuple[str, Spans], list[int]] = defaultdict(list)
    for j, g in enumerate(gold):
        gold_index[(g.label, g.spans)].append(j)
    for i, p in enumerate(pred):
        if p.spans is None:
            continue
        for j in gold_index.get((p.label, p.spans), []):
            if j not in used_g:
                pairs.append((i, j))
                used_p.add(i)
                used_g.add(j)
                break
    if mode == "strict":
        return pairs
    cands = []
    for i, p in enumerate(pred):
        if i in used_p or p.spans is None:
            continue
        for j, g in enumerate(gold):
            if j in used_g or g.label != p.label:
                continue
            ov = overlap(p, g)
            if ov > 0:
                cands.append((-ov, i, j))
    for _, i, j in sorted(cands):
        if i not in used_p and j not in used_g:
            pairs.append((i, j))
            used_p.add(i)
            used_g.add(j)
    return pairs


def match_relations(pred: Sequence[Rel], gold: Sequence[Rel], mode: str) -> int:
    """Number of one-to-one matches: relation label equal, both arguments matched by the ``mode`` rule."""
    rule = strict_match if mode == "strict" else lenient_match
    used: set[int] = set()
    tp = 0
    # exact argument matches first so a lenient near-miss does not steal a gold relation
    order = sorted(range(len(pred)), key=lambda i: not any(
        g.label == pred[i].label and strict_match(pred[i].head, g.head) and strict_match(pred[i].tail, g.tail)
        for g in gold))
    for i in order:
        p = pred[i]
        for j, g in enumerate(gold):
            if j in used or g.label != p.label:
                continue
            if rule(p.head, g.head) and rule(p.tail, g.tail):
                used.add(j)
                tp += 1
                break
    return tp


# ----------------------------------------------------------------------------------------------------------------
# Counting and scores
# ----------------------------------------------------------------------------------------------------------------

METRICS = ("strict", "lenient")


@dataclass
class Counts:
    tp: int = 0
    n_pred: int = 0
    n_gold: int = 0

    def add(self, other: "Counts") -> None:
        self.tp += other.tp
        self.n_pred += other.n_pred
        self.n_gold += other.n_gold


def prf(tp: float, n_pred: float, n_gold: float) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def note_counts(pred: NoteItems, gold: NoteItems) -> dict[str, Any]:
    """Per-note counts: concepts (overall and per label) and relations, strict and lenient."""
    out: dict[str, Any] = {"note_id": gold.note_id}
    for mode in METRICS:
        pairs = match_concepts(pred.concepts, gold.concepts, mode)
        out[f"cce_{mode}"] = Counts(len(pairs), len(pred.concepts), len(gold.concepts))
        per_label: dict[str, Counts] = defaultdict(Counts)
        for p in pred.concepts:
            per_label[p.label].n_pred += 1
        for g in gold.concepts:
            per_label[g.label].n_gold += 1
        for i, _ in pairs:
            per_label[pred.concepts[i].label].tp += 1
        out[f"cce_{mode}_by_label"] = dict(per_label)
        if mode == "strict":
            agree = sum(1 for i, j in pairs
                        if pred.assertions.get((pred.concepts[i].label, pred.concepts[i].spans), "present")
                        == gold.assertions.get((gold.concepts[j].label, gold.concepts[j].spans), "present"))
            out["assertion"] = Counts(agree, len(pairs), len(pairs))
        out[f"cre_{mode}"] = Counts(match_relations(pred.relations, gold.relations, mode),
                                    len(pred.relations), len(gold.relations))
        rel_by_label: dict[str, Counts] = defaultdict(Counts)
        for lab in {r.label for r in pred.relations} | {r.label for r in gold.relations}:
            pr = [r for r in pred.relations if r.label == lab]
            gr = [r for r in gold.relations if r.label == lab]
            rel_by_label[lab] = Counts(match_relations(pr, gr, mode), len(pr), len(gr))
        out[f"cre_{mode}_by_label"] = dict(rel_by_label)
    out["grounded"] = sum(1 for c in pred.concepts if c.spans is not None)
    out["emitted"] = len(pred.concepts)
    return out


def bootstrap_f1(per_note: Sequence[Counts], resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Bootstrap over notes of micro F1: 95 % percentile CI and standard error."""
    import numpy as np

    n = len(per_note)
    if n == 0:
        return {"ci95": [0.0, 0.0], "se": 0.0}
    arr = np.array([[c.tp, c.n_pred, c.n_gold] for c in per_note], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    sums = arr[idx].sum(axis=1)  # (resamples, 3)
    tp, npred, ngold = sums[:, 0], sums[:, 1], sums[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(npred > 0, tp / npred, 0.0)
        r = np.where(ngold > 0, tp / ngold, 0.0)
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    lo, hi = np.percentile(f, [2.5, 97.5])
    return {"ci95": [round(float(lo), 4), round(float(hi), 4)], "se": round(float(f.std(ddof=1)), 4)}


def summarize(per_note: Sequence[Counts], resamples: int, seed: int) -> dict[str, Any]:
    total = Counts()
    for c in per_note:
        total.add(c)
    p, r, f = prf(total.tp, total.n_pred, total.n_gold)
    out = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4),
           "tp": total.tp, "n_pred": total.n_pred, "n_gold": total.n_gold}
    if resamples:
        out.update(bootstrap_f1(per_note, resamples, seed))
    return out


def _label_table(notes: list[dict], key: str) -> dict[str, dict[str, Any]]:
    totals: dict[str, Counts] = defaultdict(Counts)
    for n in notes:
        for lab, c in n[key].items():
            totals[lab].add(c)
    out = {}
    for lab in sorted(totals):
        c = totals[lab]
        p, r, f = prf(c.tp, c.n_pred, c.n_gold)
        out[lab] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4),
                    "tp": c.tp, "n_pred": c.n_pred, "n_gold": c.n_gold}
    return out


def score_notes(task: Task, pairs: Iterable[tuple[NoteItems, NoteItems]], *, resamples: int = 1000,
                seed: int = 0) -> dict[str, Any]:
    """Scores of (pred, gold) note pairs: CCE/CRE strict+lenient micro P/R/F1 with CIs, per label."""
    notes = [note_counts(p, g) for p, g in pairs]
    out: dict[str, Any] = {"n_notes": len(notes)}
    out["cce"] = {m: summarize([n[f"cce_{m}"] for n in notes], resamples, seed) for m in METRICS}
    out["per_label"] = {}
    for m in METRICS:
        for lab, row in _label_table(notes, f"cce_{m}_by_label").items():
            out["per_label"].setdefault(lab, {})[m] = row
    if task.kind == "cre":
        out["cre"] = {m: summarize([n[f"cre_{m}"] for n in notes], resamples, seed) for m in METRICS}
        out["per_relation"] = {}
        for m in METRICS:
            for lab, row in _label_table(notes, f"cre_{m}_by_label").items():
                out["per_relation"].setdefault(lab, {})[m] = row
    # per-note counts (numbers only) so a prefix of the slice can be rescored without generating again
    out["per_note"] = [
        {"note_id": n["note_id"], **{k: [n[k].tp, n[k].n_pred, n[k].n_gold] for k in
                                     ("cce_strict", "cce_lenient", "cre_strict", "cre_lenient")},
         "grounded": n["grounded"], "emitted": n["emitted"]}
        for n in notes
    ]
    emitted = sum(n["emitted"] for n in notes)
    out["grounding_rate"] = round(sum(n["grounded"] for n in notes) / emitted, 4) if emitted else None
    a = Counts()
    for n in notes:
        a.add(n["assertion"])
    out["assertion_accuracy"] = round(a.tp / a.n_pred, 4) if a.n_pred else None
    return out


def rescore_prefix(scores: dict, n_notes: int, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Micro P/R/F1 (+ bootstrap CI/SE) of the first ``n_notes`` notes of a scored slice, from per-note counts.

    ``select_slice(records, n)`` is a prefix of ``select_slice(records, m)`` for n < m, so this gives the scores
    of the smaller fixed slice (e.g. the CI gate slice) from one larger run.
    """
    notes = scores["per_note"][:n_notes]
    out: dict[str, Any] = {"n_notes": len(notes), "note_ids_sha256": hashlib.sha256(
        "\n".join(n["note_id"] for n in notes).encode()).hexdigest()}
    for key in ("cce_strict", "cce_lenient", "cre_strict", "cre_lenient"):
        out[key] = summarize([Counts(*n[key]) for n in notes], resamples, seed)
    emitted = sum(n["emitted"] for n in notes)
    out["grounding_rate"] = round(sum(n["grounded"] for n in notes) / emitted, 4) if emitted else None
    return out


def f1_gate(report: dict, baseline: dict) -> tuple[bool, str]:
    """CI gate: lenient F1 must be >= baseline F1 - 2 x baseline SE."""
    f1 = report["scores"]["cce"]["lenient"]["f1"]
    floor = baseline["lenient_f1"] - 2 * baseline["lenient_f1_se"]
    ok = f1 >= floor
    return ok, (f"lenient F1 {f1:.4f} {'>=' if ok else '<'} floor {floor:.4f} "
                f"(baseline {baseline['lenient_f1']:.4f} - 2 x SE {baseline['lenient_f1_se']:.4f})")
