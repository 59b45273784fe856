"""Assertion per class (present / negated / speculated / hypothetical) on dev, on concepts matched to gold: the
shipped model's markers against ConText (medspaCy) over the same spans, and their combinations.

Predictions are saved once and every comparison scores the same ones:

    # 1. the product's extraction path (chunk -> prompt -> vLLM, grounded grammar -> parse + ground; the code of
    #    `notelake evaluate`) over a dev file: each window's answer in answers.jsonl, and the usual report (heavy)
    flock /tmp/notelake-heavy.lock .venv/bin/python -m bench.assertion predict --task maccrobat \
        --gold ../shared/data/maccrobat/dev.jsonl --adapter models/adapters/notelake-mt --out runs/assertion/mac
    # 2. rebuild the concept rows from the saved answers, assign assertions by each method, score (light);
    #    `bench.runaway --plain --keep-outputs FILE` answers (the job's engine settings) are read the same way
    .venv/bin/python -m bench.assertion score --task maccrobat --gold ../shared/data/maccrobat/dev.jsonl \
        --answers runs/assertion/mac/answers.jsonl --report runs/assertion/mac/report.json --out runs/assertion/mac
    # the labels that take an assertion (a task's `assertion_labels`), from training data
    .venv/bin/python -m bench.assertion labels --task maccrobat --train ../shared/data/maccrobat/train.jsonl

Matching (models.evaluation.match_concepts, one-to-one): ``strict`` = same label and the same spans;
``lenient`` = same label and overlapping characters. Per class c over the matched pairs: precision = pairs
predicted c whose gold is c / pairs predicted c; recall = the same / pairs whose gold is c; bootstrap 95 % CI of
F1 over notes (models.evaluation.bootstrap_f1). ``gold`` spans rows assign assertions to the gold concepts
themselves: the assertion step alone, with perfect spans. Never prints note text or model output text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from notelake.udfs.answer import ASSERTIONS

if TYPE_CHECKING:
    from notelake.models.evaluation import Counts

#: One line per window, in text order per note: note_id, start, end (the window's offsets in the note), the
#: answer's text, error and finish_reason; `bench.runaway --keep-outputs` writes the same fields.
ANSWERS = "answers.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# 1. predictions
# ----------------------------------------------------------------------------------------------------------------


def predict(argv: list[str]) -> int:
    """Run ``notelake evaluate``'s path over ``--gold`` and keep every window's answer in ``--out``."""
    from notelake.conf import load_settings
    from notelake.conf.task import load_task
    from notelake.jobs.evaluate import build_parser, run_evaluation, write_reports
    from notelake.models.engine import make_engine
    from notelake.models.evaluation import read_gold, select_slice
    from notelake.udfs.chunking import chunk_text

    args = build_parser().parse_args(argv)
    args._argv = argv
    if len(args.adapter) != 1:
        raise SystemExit("predict: one --adapter")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = load_settings(args.settings)
    # The engine settings of `notelake evaluate` (jobs/evaluate.py main): same slice, prompts and decoding.
    settings = settings.with_overrides(engine={"adapter": None, "enable_lora": True, "max_model_len": args.max_model_len,
                                               "max_num_seqs": args.max_num_seqs, "temperature": 0.0})
    engine = make_engine(settings.engine)
    desc = engine.describe()
    kept: list = []

    def generate(requests: list) -> list:
        results = engine.generate(requests)
        kept.extend(results)
        return results

    report = run_evaluation(args, generate, settings.engine.model, desc["model_sha256"], desc, args.adapter[0])
    write_reports(report, out, [])
    task = load_task(args.task)
    records = select_slice(read_gold(args.gold), args.limit, args.seed)
    by_id = {r.request_id: r for r in kept}  # "<record index in the slice>:<chunk index>" (models.evaluation)
    with (out / ANSWERS).open("w", encoding="utf-8") as fh:
        for k, rec in enumerate(records):
            for c in chunk_text(rec["text"], task.max_chunk_chars, report["engine"]["chunk_overlap_chars"]):
                r = by_id[f"{k}:{c.index}"]
                fh.write(json.dumps({"note_id": rec["note_id"], "start": c.start, "end": c.end, "text": r.text,
                                     "error": r.error, "finish_reason": r.finish_reason}) + "\n")
    print(f"kept {len(kept)} answers in {out / ANSWERS}")
    return 0



# ----------------------------------------------------------------------------------------------------------------
# 2. scores
# ----------------------------------------------------------------------------------------------------------------

#: Rules measured beside the shipped methods (models.assertion.ASSERTION_METHODS): (model marker, ConText's) -> one.
EXPERIMENTS = {
    "negated when either says so": lambda m, c: "negated" if "negated" in (m, c) else (m if m != "present" else c),
    "negated only when both say so": lambda m, c: "negated" if m == c == "negated" else
    (m if m != "negated" else "present"),
}
MODES = ("strict", "lenient")


def predicted_rows(task, records: list[dict], answers: Path) -> list[list[dict]]:
    """Each record's concept rows, assembled (udfs.assemble.assemble_note, as the job and models.evaluation do)
    from the saved answers of its windows."""
    from datetime import datetime, timezone

    from notelake.udfs.assemble import assemble_note
    from notelake.udfs.chunking import Chunk

    windows: dict[str, list[dict]] = {}
    with answers.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            windows.setdefault(row["note_id"], []).append(row)
    lineage = {"run_id": "assertion-bench", "model": "saved answers", "adapter": None, "adapter_sha256": None,
               "prompt_version": "bench", "fingerprint": "bench", "extracted_at": datetime.now(timezone.utc)}
    rows = []
    for rec in records:
        outs = windows[rec["note_id"]]
        chunks = [Chunk(i, o["start"], o["end"], rec["text"][o["start"]:o["end"]]) for i, o in enumerate(outs)]
        res = assemble_note(note_id=rec["note_id"], text=rec["text"], task=task, chunks=chunks,
                            outputs=[o["text"] for o in outs], output_errors=[o.get("error") for o in outs],
                            truncated=[o["finish_reason"] == "length" for o in outs], lineage=lineage)
        rows.append(res.concepts)
    return rows


def gold_rows(task, record: dict) -> list[dict]:
    """The record's gold concepts of the task as concept rows (offsets only), assertion not yet assigned."""
    return [{"label": c["label"], "spans": [{"start": s, "end": e} for s, e in c["spans"]], "assertion": "present"}
            for c in record["concepts"] if c["label"] in task.concepts]


def class_counts(pred, gold, mode: str) -> dict[str, "Counts"]:
    """Per assertion class over the concepts matched by ``mode``: (both c, predicted c, gold c)."""
    from notelake.models.evaluation import Counts, match_concepts

    out = {a: Counts() for a in ASSERTIONS}
    for i, j in match_concepts(pred.concepts, gold.concepts, mode):
        p = pred.assertions.get((pred.concepts[i].label, pred.concepts[i].spans), "present")
        g = gold.assertions.get((gold.concepts[j].label, gold.concepts[j].spans), "present")
        out[p].n_pred += 1
        out[g].n_gold += 1
        out[p].tp += p == g
    return out


def table_rows(name: str, per_note: list[dict[str, "Counts"]], resamples: int, seed: int) -> list[dict]:
    from notelake.models.evaluation import summarize

    rows = []
    for a in ASSERTIONS:
        s = summarize([n[a] for n in per_note], resamples, seed)
        rows.append({"method": name, "assertion": a, **s})
    matched = sum(n[a].n_gold for n in per_note for a in ASSERTIONS)
    agree = sum(n[a].tp for n in per_note for a in ASSERTIONS)
    rows.append({"method": name, "assertion": "accuracy", "matched": matched, "agree": agree,
                 "accuracy": round(agree / matched, 4) if matched else None})
    return rows


def judged(rows: list[dict], model: list[str], context: list[str], rule, scope) -> list[dict]:
    """``rows`` with each assertion from ``rule(model, context)``; a row outside ``scope`` (a set of labels, or
    None for every label) keeps the model's, as models.assertion.assign_assertions does."""
    return [{**r, "assertion": rule(m, c) if scope is None or r["label"] in scope else m}
            for r, m, c in zip(rows, model, context)]


def context_of_rows(records: list[dict], rows_per_note: list[list[dict]]) -> tuple[list[list[str]], dict]:
    """ConText's assertion of every row (every label; an ungrounded row keeps its own), and its throughput."""
    from notelake.models.assertion import context_assertions, context_pipeline

    t0 = time.perf_counter()
    context_pipeline()
    load_s = time.perf_counter() - t0
    out, n_concepts, t0 = [], 0, time.perf_counter()
    for rec, rows in zip(records, rows_per_note):
        grounded = [r for r in rows if r.get("spans")]
        n_concepts += len(grounded)
        found = iter(context_assertions(rec["text"], [(r["spans"][0]["start"], r["spans"][-1]["end"])
                                                      for r in grounded], [r["label"] for r in grounded]))
        out.append([next(found) if r.get("spans") else r["assertion"] for r in rows])
    wall = time.perf_counter() - t0
    return out, {"pipeline_load_s": round(load_s, 2), "concepts": n_concepts, "notes": len(records),
                 "wall_s": round(wall, 2), "concepts_per_s": round(n_concepts / wall, 1),
                 "notes_per_s": round(len(records) / wall, 2)}


def score(argv: list[str]) -> int:
    from notelake.conf.task import load_task
    from notelake.models.assertion import ASSERTION_METHODS, combine
    from notelake.models.evaluation import gold_items, predicted_items, read_gold, score_notes, select_slice

    p = argparse.ArgumentParser(prog="bench.assertion score")
    p.add_argument("--task", required=True)
    p.add_argument("--gold", required=True)
    p.add_argument("--answers", required=True, help=f"saved answers: `predict`'s {ANSWERS}, or the file of "
                                                    "`bench.runaway --keep-outputs`")
    p.add_argument("--report", required=True, help="the report of the run that wrote them (report.json of "
                                                   "`predict` or of `bench.runaway`): the run's concept scores must "
                                                   "come out again from the rebuilt rows")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    task = load_task(args.task)
    report = json.loads(Path(args.report).read_text(encoding="utf-8"))
    with open(args.answers, encoding="utf-8") as fh:
        note_ids = {json.loads(line)["note_id"] for line in fh}
    records = [r for r in select_slice(read_gold(args.gold), None, args.seed) if r["note_id"] in note_ids]
    golds = [gold_items(task, r) for r in records]
    pred_rows = predicted_rows(task, records, Path(args.answers))
    again = score_notes(task, [(predicted_items(r["note_id"], rows, []), g)
                               for r, rows, g in zip(records, pred_rows, golds)], resamples=0)
    for mode in MODES:
        run = report["scores"]["cce"][mode] if "scores" in report else report[f"cce_{mode}"]
        if [again["cce"][mode][k] for k in ("tp", "n_pred", "n_gold")] != [run[k] for k in ("tp", "n_pred", "n_gold")]:
            raise SystemExit(f"the rows rebuilt from {args.answers} do not give {args.report}'s {mode} concept counts")
    gold_concepts = [[{**row, "concept_id": str(k), "grounded": True} for k, row in enumerate(gold_rows(task, r))]
                     for r in records]
    pred_context, throughput = context_of_rows(records, pred_rows)
    gold_context, _ = context_of_rows(records, gold_concepts)

    rules = {m: (lambda mm, cc, m=m: combine(mm, cc, m)) for m in ASSERTION_METHODS} | EXPERIMENTS
    scopes = {"all labels": None}
    if task.assertion_labels is not None:
        scopes["assertion_labels"] = set(task.assertion_labels)
    scoped = list(scopes)[-1]  # the task's scope, as the job applies it
    # the model's own markers; every rule over the task's scope; ConText on every label too (what the scope changes)
    runs = [("model's", "all labels", "model", rules["model"], pred_rows, pred_context)]
    runs += [("model's", scope, name, rule, pred_rows, pred_context) for scope in scopes
             for name, rule in rules.items() if name != "model" and (scope == scoped or name == "context")]
    runs += [("gold", scope, "context", rules["context"], gold_concepts, gold_context) for scope in scopes]
    table = []
    for mode in MODES:
        for spans, scope, name, rule, rows_per_note, context in runs:
            per_note = [class_counts(predicted_items(r["note_id"], judged(rows, [x["assertion"] for x in rows], ctx,
                                                                          rule, scopes[scope]), []), g, mode)
                        for r, rows, ctx, g in zip(records, rows_per_note, context, golds)]
            table += [{"match": mode, "spans": spans, "scope": scope if name != "model" else "–", **row}
                      for row in table_rows(name, per_note, args.resamples, args.seed)]
    result = {"task": task.name, "gold": args.gold, "answers": args.answers, "n_notes": len(records),
              "adapter": report.get("adapter"), "model_command": report["command"],
              "assertion_labels": task.assertion_labels,
              "command": "python -m bench.assertion score " + " ".join(argv), "created_at": _now(),
              "gold_assertions": dict(Counter(a for g in golds for a in g.assertions.values())),
              "context_throughput": throughput, "table": table}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "assertion.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "assertion.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    t = result["context_throughput"]
    lines = [f"# Assertion on {result['task']} dev ({result['n_notes']} notes): gold {result['gold_assertions']}", "",
             f"- predictions: `{result['model_command']}`", f"- scores: `{result['command']}` ({result['created_at']})",
             f"- ConText: {t['concepts']} concepts of {t['notes']} notes in {t['wall_s']} s = {t['concepts_per_s']} "
             f"concepts/s ({t['notes_per_s']} notes/s), pipeline built once in {t['pipeline_load_s']} s", "",
             "| match | spans | method | ConText on | class | P | R | F1 [95 % CI] | both / pred / gold |",
             "|---|---|---|---|---|---:|---:|---|---|"]
    for r in result["table"]:
        if r["assertion"] == "accuracy":
            lines.append(f"| {r['match']} | {r['spans']} | {r['method']} | {r['scope']} | accuracy | | | {r['accuracy']} | "
                         f"{r['agree']} / {r['matched']} matched |")
        elif r["n_pred"] or r["n_gold"]:
            ci = r.get("ci95") or ["–", "–"]
            lines.append(f"| {r['match']} | {r['spans']} | {r['method']} | {r['scope']} | {r['assertion']} | {r['precision']:.3f} | "
                         f"{r['recall']:.3f} | **{r['f1']:.3f}** [{ci[0]}, {ci[1]}] | {r['tp']} / {r['n_pred']} / "
                         f"{r['n_gold']} |")
    return "\n".join(lines) + "\n"


def _now() -> str:
    from notelake.models.evaluation import now_iso

    return now_iso()


# ----------------------------------------------------------------------------------------------------------------
# 3. the labels that take an assertion (a task's `assertion_labels`)
# ----------------------------------------------------------------------------------------------------------------

#: A label takes an assertion when at least this share of its training concepts is not present.
MIN_ASSERTED_SHARE = 0.01


def labels(argv: list[str]) -> int:
    """Print each label's share of training concepts that are not present, and the task's ``assertion_labels``."""
    from notelake.conf.task import load_task
    from notelake.models.evaluation import gold_items, read_gold

    p = argparse.ArgumentParser(prog="bench.assertion labels")
    p.add_argument("--task", required=True)
    p.add_argument("--train", required=True, help="training JSONL (shared/data format)")
    args = p.parse_args(argv)
    task = load_task(args.task)
    total, asserted = Counter(), Counter()
    for record in read_gold(args.train):
        for (label, _), assertion in gold_items(task, record).assertions.items():
            total[label] += 1
            asserted[label] += assertion != "present"
    for label in sorted(total, key=lambda lab: -asserted[lab] / total[lab]):
        if asserted[label]:
            print(f"{label}: {asserted[label]} of {total[label]} not present ({asserted[label] / total[label]:.2%})")
    chosen = sorted(lab for lab in total if asserted[lab] / total[lab] >= MIN_ASSERTED_SHARE)
    print(f"assertion_labels: [{', '.join(chosen)}]")
    return 0

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"predict": predict, "score": score, "labels": labels}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m bench.assertion {{{'|'.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
