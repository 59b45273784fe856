"""Evaluation harness: the real extraction path on a gold JSONL, scored per task and per label.

Path (the same functions the nightly job uses): ``udfs.chunking.chunk_text`` -> ``udfs.prompts.build_messages``
-> the vLLM engine (``models.engine``, guided decoding by ``udfs.answer.answer_guide``) ->
``udfs.assemble.assemble_note`` (parse + ground). Scores:

* CCE strict: a predicted concept is right when its label and its exact spans equal a gold concept's.
* CCE lenient: same label and the character ranges overlap. Matching is one-to-one (a gold concept is
  credited once), exact pairs first, then by largest overlap.
* CRE end-to-end: a predicted relation is right when its label is right and both arguments match the gold
  relation's arguments (label + spans) by the strict, resp. lenient, rule; one-to-one.
* micro P/R/F1 over the slice, per label too; bootstrap 95 % CI over notes (default 1000 resamples) and the
  bootstrap standard error of F1.
* grounding rate (emitted concepts that were found in the text), invalid-output rate (parse failures /
  prompts), engine-error rate, throughput (prompts/s, output tokens/s).

Never logs or reports note text or model output text: only ids, labels, offsets and counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from notelake.conf.task import Task

log = logging.getLogger("notelake.evaluation")

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


# ----------------------------------------------------------------------------------------------------------------
# Dev slices
# ----------------------------------------------------------------------------------------------------------------


def read_gold(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def select_slice(records: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """A fixed dev subsample: the first ``limit`` notes of a seeded shuffle of the notes sorted by note_id."""
    order = sorted(records, key=lambda r: r["note_id"])
    random.Random(f"dev-slice:{seed}").shuffle(order)
    return order[:limit] if limit else order


def slice_fingerprint(records: list[dict]) -> str:
    return hashlib.sha256("\n".join(r["note_id"] for r in records).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Running the real extraction path
# ----------------------------------------------------------------------------------------------------------------

# generate(requests) -> results aligned with requests (models.engine.GenerationResult-like objects)
GenerateFn = Callable[[list], list]


@dataclass
class EvalRun:
    """What a run produced besides the scores: lineage and throughput."""

    prompts: int = 0
    parse_failures: int = 0
    engine_errors: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    warnings: int = 0
    ungrounded: int = 0
    dropped_relations: int = 0
    error_types: Counter = field(default_factory=Counter)


def evaluate_records(
    task: Task,
    records: list[dict],
    generate: GenerateFn,
    *,
    adapter: Any = None,
    max_tokens: int | None = None,
    guided_decoding: str = "grounded",
    chunk_overlap_chars: int = 200,
    lineage: dict | None = None,
    batch_size: int = 64,
    resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Chunk -> prompt -> generate -> assemble -> score for ``records`` (gold JSONL rows)."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.answer import answer_guide
    from notelake.udfs.assemble import assemble_note
    from notelake.udfs.chunking import chunk_text
    from notelake.udfs.prompts import build_messages, prompt_version

    max_tokens = max_tokens or task.max_tokens
    lineage = {
        "run_id": f"eval-{uuid.uuid4().hex[:12]}", "model": "eval", "model_sha256": None,
        "adapter": None, "adapter_sha256": None, "prompt_version": prompt_version(task), "fingerprint": "eval",
        "extracted_at": datetime.now(timezone.utc), **(lineage or {}),
    }
    chunked = [chunk_text(r["text"], task.max_chunk_chars, chunk_overlap_chars) for r in records]
    requests = []
    for k, chunks in enumerate(chunked):
        for c in chunks:
            kwargs = dict(request_id=f"{k}:{c.index}", messages=build_messages(task, c.text),
                          guide=answer_guide(task, c.text, guided_decoding), max_tokens=max_tokens)
            if adapter is not None:
                kwargs["adapter"] = adapter
            requests.append(GenerationRequest(**kwargs))

    run = EvalRun(prompts=len(requests))
    results: list = []
    t0 = time.time()
    for b in range(0, len(requests), batch_size):
        results += list(generate(requests[b:b + batch_size]))
        if progress:
            done = len(results)
            el = time.time() - t0
            out_tok = sum(int(getattr(r, "output_tokens", 0) or 0) for r in results)
            eta = el / done * (len(requests) - done)
            print(f"[eval {task.name}] {done}/{len(requests)} prompts | {out_tok / el:.1f} out tok/s | "
                  f"elapsed {el:.0f}s | ETA {eta:.0f}s", flush=True)
    run.wall_s = time.time() - t0
    if len(results) != len(requests):
        raise RuntimeError(f"engine returned {len(results)} results for {len(requests)} prompts")

    pairs = []
    it = iter(results)
    for rec, chunks in zip(records, chunked):
        outs = [next(it) for _ in chunks]
        for o in outs:
            run.prompt_tokens += int(getattr(o, "prompt_tokens", 0) or 0)
            run.output_tokens += int(getattr(o, "output_tokens", 0) or 0)
            if getattr(o, "finish_reason", None) == "length":
                run.truncated += 1
        res = assemble_note(note_id=rec["note_id"], text=rec["text"], task=task, chunks=chunks,
                            outputs=[o.text for o in outs], output_errors=[o.error for o in outs],
                            truncated=[getattr(o, "finish_reason", None) == "length" for o in outs], lineage=lineage)
        run.warnings += res.warnings
        run.ungrounded += res.ungrounded
        run.dropped_relations += res.dropped_relations
        for e in res.errors:
            if e.get("stage") == "parse":
                run.parse_failures += 1
            else:
                run.engine_errors += 1
            run.error_types[str(e.get("error_type"))] += 1
        pairs.append((predicted_items(rec["note_id"], res.concepts, res.relations), gold_items(task, rec)))

    scores = score_notes(task, pairs, resamples=resamples, seed=seed)
    scores["invalid_output_rate"] = round(run.parse_failures / run.prompts, 4) if run.prompts else None
    scores["engine_error_rate"] = round(run.engine_errors / run.prompts, 4) if run.prompts else None
    scores["error_types"] = dict(run.error_types)
    scores["parser"] = {"warnings": run.warnings, "ungrounded_mentions": run.ungrounded,
                        "dropped_relations": run.dropped_relations}
    scores["throughput"] = {
        "prompts": run.prompts, "notes": len(records), "wall_s": round(run.wall_s, 1),
        "prompts_per_s": round(run.prompts / run.wall_s, 3) if run.wall_s else None,
        "notes_per_s": round(len(records) / run.wall_s, 3) if run.wall_s else None,
        "prompt_tokens": run.prompt_tokens, "output_tokens": run.output_tokens,
        "output_tokens_per_s": round(run.output_tokens / run.wall_s, 2) if run.wall_s else None,
        "truncated_outputs": run.truncated,
    }
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def _f(x: Any) -> str:
    return "–" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _ci(row: dict) -> str:
    ci = row.get("ci95")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "–"


def markdown_report(report: dict, runs: list[dict] | None = None) -> str:
    """Markdown: headline table, per-label F1, per-relation F1, and a comparison table of several runs."""
    s = report["scores"]
    lines = [f"# Evaluation: task `{report['task']}`", ""]
    lines += [f"- gold: `{report['gold']}` — slice: {report['slice']['n_notes']} notes "
              f"(seeded shuffle, seed {report['slice']['seed']}, limit {report['slice']['limit']}), "
              f"{report['slice']['n_gold_concepts']} gold concepts, slice sha256 `{report['slice']['sha256'][:12]}`",
              f"- model: `{report['model']['name']}` (sha256 `{str(report['model']['sha256'])[:12]}`), adapter: "
              + (f"`{report['adapter']['name']}` (sha256 `{report['adapter']['sha256'][:12]}`)"
                 if report.get("adapter") else "none (zero-shot)")
              + (" — **task not in the adapter: zero-shot through it**" if report.get("adapter", {}) and
                 report["adapter"].get("zero_shot") else ""),
              f"- engine: {report['engine']['backend']} {report['engine'].get('dtype')}, greedy={report['engine']['greedy']},"
              f" guided decoding={report['engine'].get('guided_decoding')}, max_tokens={report['engine']['max_tokens']}",
              f"- command: `{report.get('command', '')}`", ""]
    lines += ["| metric | P | R | F1 | 95 % CI | SE | TP / pred / gold |", "|---|---:|---:|---:|---|---:|---|"]
    blocks = [("CCE strict", s["cce"]["strict"]), ("CCE lenient", s["cce"]["lenient"])]
    if "cre" in s:
        blocks += [("CRE strict", s["cre"]["strict"]), ("CRE lenient", s["cre"]["lenient"])]
    for name, row in blocks:
        lines.append(f"| {name} | {_f(row['precision'])} | {_f(row['recall'])} | **{_f(row['f1'])}** | {_ci(row)} |"
                     f" {_f(row.get('se'))} | {row['tp']} / {row['n_pred']} / {row['n_gold']} |")
    t = s["throughput"]
    lines += ["", f"- grounding rate: {_f(s['grounding_rate'])}; invalid-output rate: {_f(s['invalid_output_rate'])}"
              f" ({s['error_types'] or 'no errors'}); engine-error rate: {_f(s['engine_error_rate'])};"
              f" assertion accuracy on strict matches: {_f(s.get('assertion_accuracy'))}",
              f"- throughput: {t['prompts']} prompts in {t['wall_s']} s = {_f(t['prompts_per_s'])} prompts/s, "
              f"{_f(t['output_tokens_per_s'])} output tok/s ({t['output_tokens']} output, {t['prompt_tokens']} prompt "
              f"tokens; {t['truncated_outputs']} outputs hit max_tokens)", ""]
    lines += ["## Per concept label", "", "| label | gold | pred | strict F1 | lenient P | lenient R | lenient F1 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for lab, row in sorted(s["per_label"].items(), key=lambda kv: -kv[1]["lenient"]["n_gold"]):
        le, st = row["lenient"], row["strict"]
        lines.append(f"| {lab} | {le['n_gold']} | {le['n_pred']} | {_f(st['f1'])} | {_f(le['precision'])} | "
                     f"{_f(le['recall'])} | {_f(le['f1'])} |")
    if s.get("per_relation"):
        lines += ["", "## Per relation label (end-to-end)", "",
                  "| relation | gold | pred | strict F1 | lenient F1 |", "|---|---:|---:|---:|---:|"]
        for lab, row in sorted(s["per_relation"].items(), key=lambda kv: -kv[1]["lenient"]["n_gold"]):
            lines.append(f"| {lab} | {row['lenient']['n_gold']} | {row['lenient']['n_pred']} | "
                         f"{_f(row['strict']['f1'])} | {_f(row['lenient']['f1'])} |")
    if runs:
        lines += ["", "## Runs compared", "", comparison_table(runs)]
    return "\n".join(lines) + "\n"


def comparison_table(runs: list[dict]) -> str:
    """One row per report (e.g. a learning curve): adapter, training tokens, lenient/strict F1 with CI."""
    rows = ["| run | adapter | train tokens | CCE lenient F1 (95 % CI) | CCE strict F1 | CRE lenient F1 | grounded | invalid |",
            "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        s = r["scores"]
        le = s["cce"]["lenient"]
        cre = s.get("cre", {}).get("lenient", {}).get("f1")
        ad = r.get("adapter") or {}
        rows.append(f"| {r.get('label') or r.get('run_id')} | {ad.get('name', 'none')} | "
                    f"{_f(ad.get('train_tokens'))} | {_f(le['f1'])} {_ci(le)} | {_f(s['cce']['strict']['f1'])} | "
                    f"{_f(cre)} | {_f(s['grounding_rate'])} | {_f(s['invalid_output_rate'])} |")
    return "\n".join(rows)


def bar_plot(report: dict, path: Path) -> Path | None:
    """Per-label lenient F1 bar plot, only when matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    per = sorted(report["scores"]["per_label"].items(), key=lambda kv: -kv[1]["lenient"]["n_gold"])
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(per)), 4))
    ax.bar([k for k, _ in per], [v["lenient"]["f1"] for _, v in per])
    ax.set_ylabel("lenient F1")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['task']}: per-label lenient F1")
    plt.xticks(rotation=60, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curve_plot(runs: list[dict], path: Path) -> Path | None:
    """Lenient F1 (95 % CI bars) against training tokens, one line per task: a learning curve from several
    reports (the base model counts as 0 tokens). Only when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in sorted({r["task"] for r in runs}):
        pts = sorted(((r.get("adapter") or {}).get("train_tokens") or 0, r["scores"]["cce"]["lenient"])
                     for r in runs if r["task"] == task)
        xs, f1 = [x for x, _ in pts], [le["f1"] for _, le in pts]
        ci = [le.get("ci95") or [le["f1"], le["f1"]] for _, le in pts]
        ax.errorbar(xs, f1, yerr=[[f - lo for f, (lo, _) in zip(f1, ci)], [hi - f for f, (_, hi) in zip(f1, ci)]],
                    marker="o", capsize=3, label=task)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("CCE lenient F1")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("learning curve")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def score_rows(report: dict) -> list[dict]:
    """Flat rows (one per task/level/label/metric) for a Delta table of scores."""
    s = report["scores"]
    base = {"run_id": report["run_id"], "task": report["task"], "created_at": report["created_at"],
            "adapter": (report.get("adapter") or {}).get("name"),
            "adapter_sha256": (report.get("adapter") or {}).get("sha256"),
            "model_sha256": report["model"]["sha256"], "slice_sha256": report["slice"]["sha256"],
            "n_notes": report["slice"]["n_notes"]}
    rows = []

    def add(level: str, label: str, metric: str, row: dict) -> None:
        rows.append({**base, "level": level, "label": label, "metric": metric,
                     "precision": float(row["precision"]), "recall": float(row["recall"]), "f1": float(row["f1"]),
                     "tp": int(row["tp"]), "n_pred": int(row["n_pred"]), "n_gold": int(row["n_gold"]),
                     "ci_low": float(row["ci95"][0]) if row.get("ci95") else None,
                     "ci_high": float(row["ci95"][1]) if row.get("ci95") else None,
                     "se": float(row["se"]) if row.get("se") is not None else None})

    for m in METRICS:
        add("cce", "*", m, s["cce"][m])
        if "cre" in s:
            add("cre", "*", m, s["cre"][m])
        for lab, r in s["per_label"].items():
            add("cce", lab, m, r[m])
        for lab, r in (s.get("per_relation") or {}).items():
            add("cre", lab, m, r[m])
    return rows


def write_delta(report: dict, table_uri: str) -> None:
    """Append the report's score rows to a Delta table (deltalake.write_deltalake)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    schema = pa.schema([
        ("run_id", pa.string()), ("task", pa.string()), ("created_at", pa.string()), ("adapter", pa.string()),
        ("adapter_sha256", pa.string()), ("model_sha256", pa.string()), ("slice_sha256", pa.string()),
        ("n_notes", pa.int64()), ("level", pa.string()), ("label", pa.string()), ("metric", pa.string()),
        ("precision", pa.float64()), ("recall", pa.float64()), ("f1", pa.float64()), ("tp", pa.int64()),
        ("n_pred", pa.int64()), ("n_gold", pa.int64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
        ("se", pa.float64()),
    ])
    write_deltalake(table_uri, pa.Table.from_pylist(score_rows(report), schema=schema), mode="append")


def f1_gate(report: dict, baseline: dict) -> tuple[bool, str]:
    """CI gate: lenient F1 must be >= baseline F1 - 2 x baseline SE."""
    f1 = report["scores"]["cce"]["lenient"]["f1"]
    floor = baseline["lenient_f1"] - 2 * baseline["lenient_f1_se"]
    ok = f1 >= floor
    return ok, (f"lenient F1 {f1:.4f} {'>=' if ok else '<'} floor {floor:.4f} "
                f"(baseline {baseline['lenient_f1']:.4f} - 2 x SE {baseline['lenient_f1_se']:.4f})")


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


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


__all__ = [
    "Mention", "Rel", "NoteItems", "gold_items", "predicted_items", "match_concepts", "match_relations",
    "note_counts", "score_notes", "bootstrap_f1", "select_slice", "evaluate_records", "markdown_report",
    "comparison_table", "write_delta", "f1_gate", "read_gold", "slice_fingerprint", "prf", "rescore_prefix",
]
