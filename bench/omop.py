"""The OMOP publish stage at size: a synthetic warehouse (concepts with a person and a date, their concept_links,
the demo vocabulary) published three times -- first publish, a rerun with nothing changed, and a nightly in which
a fraction of the notes were re-linked -- with the seconds and rows of each. Synthetic rows (no model): this
measures the data plane of jobs/omop/, not extraction.

    .venv/bin/python -m bench.omop --notes 20000 --concepts 8 --buckets 16 --changed 0.01
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DEMO_VOCABULARY = Path(__file__).resolve().parents[1] / "data" / "vocab" / "demo"
# (omop concept, domain, label) of the synthetic mentions: drugs and conditions of the demo vocabulary
TARGETS = [(2000001001, "Drug", "Drug"), (2000001009, "Drug", "Drug"), (2000003002, "Condition", "Effect"),
           (2000003004, "Condition", "Effect"), (0, None, "Effect")]
ASSERTIONS = ["present", "present", "present", "negated", "speculated"]


def synthetic_tables(notes: int, per_note: int, buckets: int, seed: int = 0) -> dict[str, pa.Table]:
    """concepts and concept_links rows of ``notes`` notes with ``per_note`` mentions each."""
    from notelake.udfs import schemas

    rng = np.random.default_rng(seed)
    n = notes * per_note
    note = np.repeat(np.arange(notes), per_note)
    note_ids = pa.array([f"N{i:09d}" for i in note])
    concept_ids = pa.array([f"c{i:012d}" for i in range(n)])
    bucket = pa.array(note % buckets, pa.int32())
    target = rng.integers(0, len(TARGETS), n)
    start = rng.integers(0, 5000, n)
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    passthrough = pa.schema([("person_id", pa.int64()), ("note_date", pa.date32())])
    columns = {
        "note_id": note_ids, "concept_id": concept_ids, "task": pa.array(["phee"] * n), "note_bucket": bucket,
        "label": pa.array([TARGETS[t][2] for t in target]), "text": pa.array([f"mention {t}" for t in target]),
        "start": pa.array(start), "end": pa.array(start + 9),
        "spans": pa.nulls(n, schemas.concepts_schema().field("spans").type),
        "assertion": pa.array([ASSERTIONS[i] for i in rng.integers(0, len(ASSERTIONS), n)]),
        "grounded": pa.array([True] * n), "grounding_method": pa.array(["exact"] * n),
        "grounding_score": pa.array([1.0] * n), "chunk_index": pa.array([0] * n, pa.int32()),
        "run_id": pa.array(["run-1"] * n), "model": pa.array(["smollm2-135m-instruct"] * n),
        "adapter": pa.array(["notelake-mt"] * n), "adapter_sha256": pa.array(["ab" * 32] * n),
        "prompt_version": pa.array(["v2"] * n), "fingerprint": pa.array(["fp"] * n), "text_sha256": pa.array(["t"] * n),
        "extracted_at": pa.array([at] * n, schemas.TIMESTAMP), "person_id": pa.array(note // 3 + 1),
        "note_date": pa.array([date(2026, 1, 1) + timedelta(days=int(d)) for d in note % 365], pa.date32()),
    }
    concepts = pa.table(columns, schema=schemas.concepts_schema(passthrough))
    omop_ids = pa.array([TARGETS[t][0] for t in target], pa.int32())
    links = pa.table({
        "concept_id": concept_ids, "note_id": note_ids, "task": columns["task"], "note_bucket": bucket,
        "label": columns["label"], "omop_concept_id": omop_ids, "source_concept_id": omop_ids,
        "vocabulary_id": pa.array(["Notelake Demo" if TARGETS[t][0] else None for t in target]),
        "domain_id": pa.array([TARGETS[t][1] for t in target]),
        "match_type": pa.array(["exact" if TARGETS[t][0] else "none" for t in target]),
        "match_score": pa.array([1.0] * n), "link_fingerprint": pa.array(["lf"] * n),
        "vocabulary_version": pa.array(["demo"] * n), "linked_at": columns["extracted_at"]})
    return {"concepts": concepts, "concept_links": links}


def _relink(wh, fraction: float) -> int:
    """Set a new concept on the links of ``fraction`` of the notes (one commit): what a vocabulary fix does."""
    from deltalake import DeltaTable, write_deltalake

    links = DeltaTable(wh.path("concept_links")).to_pyarrow_table()
    notes = sorted(set(links["note_id"].to_pylist()))
    chosen = pa.array(notes[:: max(1, round(1 / fraction))])
    part = links.filter(pc.is_in(links["note_id"], chosen))
    part = part.set_column(part.schema.get_field_index("omop_concept_id"), "omop_concept_id",
                           pa.array([2000003006] * part.num_rows, pa.int32()))
    part = part.set_column(part.schema.get_field_index("domain_id"), "domain_id",
                           pa.array(["Condition"] * part.num_rows))
    ids = ", ".join(f"'{n}'" for n in chosen.to_pylist())
    write_deltalake(wh.path("concept_links"), part, mode="overwrite", predicate=f"note_id IN ({ids})")
    return len(chosen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.omop", description=__doc__.split("\n\n")[0])
    p.add_argument("--notes", type=int, default=20000)
    p.add_argument("--concepts", type=int, default=8, help="mentions per note")
    p.add_argument("--buckets", type=int, default=16)
    p.add_argument("--changed", type=float, default=0.01, help="fraction of notes re-linked before the nightly")
    args = p.parse_args(argv)

    from deltalake import write_deltalake

    from notelake.conf import load_settings
    from notelake.jobs.extraction.session import start_spark
    from notelake.jobs.omop import publish_omop
    from notelake.jobs.vocab import load_athena
    from notelake.jobs.warehouse import open_warehouse

    settings = load_settings().with_overrides(omop={"domain_tables": True})
    spark = start_spark(settings, app_name="bench-omop")
    with tempfile.TemporaryDirectory(prefix="bench-omop-") as tmp:
        wh = open_warehouse(Path(tmp) / "warehouse", {"notelake.operation": "bench"})
        tables = synthetic_tables(args.notes, args.concepts, args.buckets)
        for name, table in tables.items():
            write_deltalake(wh.path(name), table, partition_by=["task", "note_bucket"])
        load_athena(str(DEMO_VOCABULARY), str(Path(tmp) / "warehouse" / "vocabulary"))
        timings, relinked = [], 0
        for label in ("first publish", "rerun, nothing changed", "nightly, re-linked notes"):
            if label.startswith("nightly"):
                relinked = _relink(wh, args.changed)
            start = time.perf_counter()
            stats = publish_omop(spark, wh, settings, ["phee"])
            timings.append((label, time.perf_counter() - start, stats))
    spark.stop()
    print(f"notes {args.notes}, mentions {args.notes * args.concepts}, buckets {args.buckets}, "
          f"publish_buckets_per_pass {settings.omop.publish_buckets_per_pass}, spark {settings.spark.master}, "
          f"re-linked before the nightly: {relinked} notes")
    print(f"{'publish':<28} {'buckets':>7} {'notes':>7} {'note_nlp rows':>13} {'derived rows':>12} {'seconds':>8} "
          f"{'mentions/s':>10}")
    for label, seconds, s in timings:
        derived = s.drug_exposure_rows + s.condition_occurrence_rows
        print(f"{label:<28} {s.buckets_visited:>7} {s.notes_published:>7} {s.note_nlp_rows:>13} {derived:>12} "
              f"{seconds:>8.1f} {s.note_nlp_rows / seconds if s.note_nlp_rows else 0:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
