"""Data-plane benchmark rows: the whole job with the REPLAY engine (made-up answers after a simulated latency,
models/replay.py) at corpus sizes the real engine cannot reach here: scaling with reruns (row 6), the write path
round by round as the tables grow, and a nightly sequence of full, unchanged and edited corpora."""

from __future__ import annotations

import json
import logging
import random
import resource
import time
from pathlib import Path

import pyarrow as pa

from bench.corpus import synthetic_notes, write_note_table
from bench.job_rows import JobStack, runs_row, start_job_stack, timed_job
from bench.workload import TASK, bench_settings

log = logging.getLogger("bench")


def _replay_stack(args, work: Path, **job) -> tuple:
    """The bench's settings with REPLAY engine actors (a simulated 2-GPU node: two Spark partitions feeding two
    actors) and ``job`` overrides, and Spark, Ray and the actors started: (settings, stack)."""
    from notelake.conf.task import load_task

    # a 4 GiB driver heap: Spark's local-mode default (1 GiB) runs out reading and caching 10^6 notes
    settings = bench_settings(args, engine={"backend": "replay", "enable_lora": False, "max_num_seqs": 256},
                              job={"round_notes": args.round_notes, **job}, ray={"num_actors": 2},
                              spark={"extra": {"spark.driver.memory": "4g"}})
    return settings, start_job_stack(settings, load_task(TASK), work)


def row_replay(args) -> dict:
    """Row 6 (data plane): the whole job with two REPLAY engine actors (a simulated 2-GPU node) on each corpus size
    of --scaling (on one Spark/Ray start), each followed by its rerun."""
    from notelake.conf.task import load_task
    from notelake.jobs.warehouse import read_delta_arrow

    work = Path(args.work)
    settings = bench_settings(args, engine={"backend": "replay", "enable_lora": False, "max_num_seqs": 256},
                              job={"round_notes": args.round_notes}, ray={"num_actors": 2})
    stack: JobStack = start_job_stack(settings, load_task(TASK), work)
    replay = stack.pool.describe()
    rows = []
    for n in args.scaling:
        t0 = time.monotonic()
        source = write_note_table(synthetic_notes(n, args.seed), work / f"replay-notes-{n}")
        table_s = round(time.monotonic() - t0, 1)
        output = work / f"wh-replay-{n}"
        out = timed_job(f"job with REPLAY engine, {n} notes", stack, settings, source, str(output), probe=False,
                        note_table_write_s=table_s, round_notes=args.round_notes,
                        replay={k: replay[k] for k in ("replay_decode_step_s", "replay_prefill_s_per_token")})
        concepts = read_delta_arrow(output / "concepts", columns=["grounded"])
        out["concept_rows"] = concepts.num_rows
        out["grounded_share"] = round(sum(concepts["grounded"].to_pylist()) / max(1, concepts.num_rows), 3)
        rows += [out, timed_job(f"job incremental rerun, unchanged corpus of {n} notes", stack, settings, source,
                                str(output), probe=False)]
    stack.shutdown()
    return {"rows": rows, "fixed": {"job (replay engine)": stack.fixed}}


def row_rounds(args) -> dict:
    """The write-path check (data plane): one full run per corpus size of --scaling in --round-notes rounds, with
    each round's seconds and commit seconds (the runs table's rounds_json) and the driver's peak RSS: flat rounds =
    a write path that does not grow with the tables."""
    work = Path(args.work)
    settings, stack = _replay_stack(args, work)
    rows = []
    for n in args.scaling:
        source = write_note_table(synthetic_notes(n, args.seed), work / f"rounds-notes-{n}")
        output = work / f"wh-rounds-{n}"
        out = timed_job(f"job with REPLAY engine, {n} notes in rounds of {args.round_notes}", stack, settings,
                        source, str(output), probe=False, round_notes=args.round_notes)
        rounds = json.loads(runs_row(str(output))["rounds_json"])
        out["rounds"] = rounds
        out["driver_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        out["first_round_s"], out["last_round_s"] = rounds[0]["seconds"], rounds[-1]["seconds"]
        out["first_commit_s"], out["last_commit_s"] = rounds[0]["commit_s"], rounds[-1]["commit_s"]
        rows.append(out)
    stack.shutdown()
    return {"rows": rows, "fixed": {"job (replay engine)": stack.fixed}}


def nightly_corpora(n: int, seed: int) -> tuple[list[dict], list[dict], dict]:
    """Night 1's (and 2's) notes, and night 3's: 1 % of the notes edited, 0.1 % deleted, one changed patient_id and
    10 bad rows (blank texts); with those counts."""
    notes = synthetic_notes(n, seed).to_pylist()
    rng = random.Random(f"nightly:{seed}")
    edited = rng.sample(range(n), n // 100)
    deleted = set(rng.sample([i for i in range(n) if i not in set(edited)], n // 1000))
    third = [dict(r) for r in notes]
    for i in edited:
        third[i]["text"] += " The dose was reduced."
    moved = next(i for i in range(n) if i not in deleted and i not in set(edited))
    third[moved]["patient_id"] = "P-MERGED"
    third = [r for i, r in enumerate(third) if i not in deleted]
    third += [{**notes[0], "note_id": f"bad-{k}", "text": " " * k} for k in range(10)]
    return notes, third, {"edited": len(edited), "deleted": len(deleted), "bad_rows": 10, "patient_id_changed": 1}


def row_nightly(args) -> dict:
    """The nightly sequence on --scaling[0] notes (REPLAY engine, --propagate-deletes): night 1 full, night 2
    unchanged, night 3 with 1 % of the notes edited, 0.1 % deleted, 10 bad rows and one changed patient_id. Each
    night's exit code and the exact counts of its runs row."""
    from notelake.jobs.extraction.job import run

    work = Path(args.work)
    settings, stack = _replay_stack(args, work, propagate_deletes=True)
    n = args.scaling[0]
    notes, third, changes = nightly_corpora(n, args.seed)
    source, output = work / f"nightly-notes-{n}", work / f"wh-nightly-{n}"
    nights = []
    for night, table in ((1, notes), (2, notes), (3, third)):
        write_note_table(pa.Table.from_pylist(table, schema=synthetic_notes(1, args.seed).schema), source)
        t0 = time.monotonic()
        code = run(settings, str(source), str(output), spark=stack.spark)
        wall = round(time.monotonic() - t0, 1)
        r = runs_row(str(output))
        nights.append({"night": night, "exit_code": code, "wall_s": wall, "tokens_out": r["tokens_out"],
                       **{k: r[k] for k in ("status", "selected", "succeeded", "failed", "skipped", "rejected",
                                           "deleted", "refreshed", "retried", "given_up", "stale_removed")}})
        log.info("night %d: exit %d in %.1f s: %s", night, code, wall, nights[-1])
    stack.shutdown()
    return {"rows": [{"row": f"nightly sequence, {n} notes (REPLAY)", "notes": n, "nights": nights, **changes}],
            "fixed": {"job (replay engine)": stack.fixed}}
