"""Answers that run away: windows cut at ``max_tokens``, notes failed, and F1, on a gold JSONL through the job's own
extraction path (chunk -> prompt -> vLLM with the job's engine settings, shipped adapter merged -> assemble):

    .venv/bin/python -m bench.runaway --task phee --gold ../shared/data/phee/dev.jsonl --out runs/runaway/phee
    .venv/bin/python -m bench.runaway --task maccrobat --gold ../shared/data/maccrobat/dev.jsonl \
        --out runs/runaway/maccrobat
    ... --plain        # the path without window recovery: every window generated once, assembled as it came

By default the windows go through :func:`notelake.udfs.windows.extract_windows` (no model call for a window
without prose, a cut window extracted again in smaller pieces), as the job does. Scores are those of
``notelake evaluate`` (models/evaluation.py ``score_notes``). Prints one table and writes ``report.json`` into
``--out``: counts, rates and scores only, never note or output text.

``--keep-outputs FILE`` also writes every window's raw answer (JSONL) for inspection: model output copies note
text, so on clinical notes that file holds PHI: keep it local, never commit or share it. ``--rescore FILE`` scores
such a file again with the parser and assembler of this checkout, without an engine (greedy answers do not change
when only parsing does): ``... --rescore runs/runaway/phee.answers.jsonl --out runs/runaway/phee-rescored``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.runaway", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--gold", required=True, help="gold JSONL (shared/data format)")
    p.add_argument("--limit", type=int, default=None, help="notes in the fixed slice (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default=None, help="settings YAML (default conf/local.yaml: the job's engine)")
    p.add_argument("--plain", action="store_true", help="no window recovery (the path before it)")
    p.add_argument("--batch", type=int, default=256, help="windows per engine call (the job's ray.batch_size)")
    p.add_argument("--keep-outputs", default=None, metavar="FILE",
                   help="write every window's raw answer here (holds note text: local inspection only)")
    p.add_argument("--rescore", default=None, metavar="FILE",
                   help="no engine: score the answers of a --keep-outputs file with this checkout's parsing")
    p.add_argument("--out", required=True)
    return p


def _generate_in_batches(engine, windows: list, guided: str, max_tokens: int | None, batch: int) -> list:
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.windows import request_fields

    out: list = []
    for b in range(0, len(windows), batch):
        out += engine.generate([GenerationRequest(**request_fields(w, guided, max_tokens))
                                for w in windows[b:b + batch]])
    return out


def run(args) -> dict:
    from notelake.conf import load_settings
    from notelake.conf.task import load_task
    from notelake.models.engine import make_engine
    from notelake.models.evaluation import read_gold, select_slice
    from notelake.udfs.chunking import chunk_text
    from notelake.udfs.windows import NoteWindows, Window, extract_windows

    settings = load_settings(args.settings)
    task = load_task(args.task)
    records = select_slice(read_gold(args.gold), args.limit, args.seed)
    engine = make_engine(settings.engine)
    desc = engine.describe()
    guided, max_tokens = settings.engine.guided_decoding, settings.engine.max_tokens
    overlap = task.overlap(settings.job.chunk_overlap_chars)
    chunked = [chunk_text(r["text"], task.max_chunk_chars, overlap) for r in records]
    calls: list[dict] = []  # per engine call (first pass, then each round of re-extraction): windows, cut

    def generate(windows: list) -> list:
        results = _generate_in_batches(engine, windows, guided, max_tokens, args.batch)
        calls.append({"windows": len(windows), "cut": sum(r.finish_reason == "length" for r in results),
                      "output_tokens": sum(r.output_tokens for r in results)})
        return results

    t0 = time.monotonic()
    if args.plain:
        outputs = iter(generate([Window(k, task, c) for k, chunks in enumerate(chunked) for c in chunks]))
        notes = [NoteWindows(list(c), [next(outputs) for _ in c]) for c in chunked]
    else:
        notes = extract_windows([task] * len(records), chunked, generate)
    wall_s = time.monotonic() - t0
    if args.keep_outputs:
        _keep_outputs(args.keep_outputs, records, notes)

    first = calls[0] if calls else {"windows": 0, "cut": 0}
    n_windows = sum(len(c) for c in chunked)
    out_tokens = [o.output_tokens for n in notes for o in n.outputs]
    report = {
        "task": task.name, "gold": args.gold, "notes": len(records), "plain": args.plain,
        "command": "python -m bench.runaway " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engine": {k: desc.get(k) for k in ("backend", "dtype", "guided_decoding", "model_sha256", "versions")},
        "adapter": str(settings.engine.adapter), "merged": settings.engine.merge_adapter,
        "windows": n_windows, "no_prose": sum(n.no_prose for n in notes), "split": sum(n.split for n in notes),
        "cut_first_pass": first["cut"], "cut_first_pass_rate": round(first["cut"] / max(1, n_windows), 4),
        "reextraction_calls": calls[1:],
        "output_tokens": sum(c["output_tokens"] for c in calls),
        "output_tokens_p50_p99_max": _quantiles(out_tokens),
        "wall_s": round(wall_s, 1), "notes_per_s": round(len(records) / wall_s, 3),
        "output_tokens_per_s": round(sum(c["output_tokens"] for c in calls) / wall_s, 1),
    }
    report["scores"] = _score(task, records, notes, cut_final=not args.plain)
    return report


def _score(task, records: list[dict], notes: list, *, cut_final: bool) -> dict:
    """Assemble every note as the job does and score it as ``notelake evaluate`` does; failures and cut windows."""
    from notelake.models.evaluation import gold_items, predicted_items, score_notes
    from notelake.udfs.assemble import assemble_note

    lineage = {"run_id": "bench-runaway", "model": "bench", "model_sha256": None, "adapter": None,
               "adapter_sha256": None, "prompt_version": "bench", "fingerprint": "bench",
               "extracted_at": datetime.now(timezone.utc)}
    pairs, failed, error_types, cut, warnings = [], 0, Counter(), 0, 0
    for rec, note in zip(records, notes):
        res = assemble_note(note_id=rec["note_id"], text=rec["text"], task=task, lineage=lineage,
                            **{**note.assemble_inputs(), "cut_final": cut_final})
        failed += bool(res.errors)
        error_types.update(str(e["error_type"]) for e in res.errors)
        cut += res.truncated_chunks
        warnings += res.warnings
        pairs.append((predicted_items(rec["note_id"], res.concepts, res.relations), gold_items(task, rec)))
    scores = score_notes(task, pairs, resamples=1000, seed=0)
    return {"notes_failed": failed, "error_types": dict(error_types), "windows_cut_assembled": cut,
            "parser_warnings": warnings, "cce_lenient": _f1(scores["cce"]["lenient"]),
            "cce_strict": _f1(scores["cce"]["strict"]), "cre_lenient": _f1(scores.get("cre", {}).get("lenient")),
            "cre_strict": _f1(scores.get("cre", {}).get("strict")), "grounding_rate": scores["grounding_rate"]}


def _keep_outputs(path: str, records: list[dict], notes: list) -> None:
    rows = [{"note_id": rec["note_id"], "start": c.start, "end": c.end, "finish_reason": o.finish_reason,
             "output_tokens": o.output_tokens, "text": o.text}
            for rec, note in zip(records, notes) for c, o in zip(note.chunks, note.outputs)]
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _quantiles(values: list[int]) -> list[int]:
    if not values:
        return [0, 0, 0]
    ordered = sorted(values)
    return [int(statistics.median(ordered)), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], ordered[-1]]


def _f1(row: dict | None) -> dict | None:
    return None if row is None else {"f1": row["f1"], "ci95": row.get("ci95"), "tp": row["tp"],
                                     "n_pred": row["n_pred"], "n_gold": row["n_gold"]}


def rescore(args) -> dict:
    """The scores of the answers kept by an earlier run (``--keep-outputs``), parsed and assembled again."""
    from notelake.conf.task import load_task
    from notelake.models.evaluation import read_gold, select_slice
    from notelake.udfs.chunking import Chunk
    from notelake.udfs.windows import NoteWindows

    task = load_task(args.task)
    records = select_slice(read_gold(args.gold), args.limit, args.seed)
    kept: dict[str, list[dict]] = {}
    with open(args.rescore, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            kept.setdefault(row["note_id"], []).append(row)
    notes = []
    for rec in records:
        rows = kept.get(rec["note_id"], [])
        notes.append(NoteWindows(
            [Chunk(i, r["start"], r["end"], rec["text"][r["start"]:r["end"]]) for i, r in enumerate(rows)],
            [_KeptAnswer(r["text"], r["finish_reason"], r["output_tokens"]) for r in rows]))
    return {"task": task.name, "gold": args.gold, "notes": len(records), "rescored": args.rescore,
            "command": "python -m bench.runaway " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "windows": sum(len(n.chunks) for n in notes),
            "output_tokens": sum(o.output_tokens for n in notes for o in n.outputs),
            "scores": _score(task, records, notes, cut_final=not args.plain)}


class _KeptAnswer:
    """An answer read back from a --keep-outputs file, shaped like an engine result."""

    error = spans = relations = None

    def __init__(self, text: str, finish_reason: str, output_tokens: int):
        self.text, self.finish_reason, self.output_tokens = text, finish_reason, output_tokens


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = rescore(args) if args.rescore else run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
