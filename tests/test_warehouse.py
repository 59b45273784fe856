"""Delta write semantics of the output tables (deltalake, real tables in tmp)."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from notelake.jobs.warehouse import Warehouse, open_warehouse, read_delta_arrow
from notelake.udfs import schemas
from notelake.udfs.hashing import note_bucket

SCHEMA = pa.schema([("note_id", pa.string()), ("concept_id", pa.string()), ("task", pa.string()),
                    ("label", pa.string()), ("note_bucket", pa.int32())])
BUCKETS = 4


def rows(*items):
    return pa.Table.from_pylist([dict(zip(SCHEMA.names, (*i, note_bucket(i[0], BUCKETS)))) for i in items],
                                schema=SCHEMA)


def buckets_of(*ids):
    return {note_bucket(i, BUCKETS) for i in ids}


def replace(wh, data, task, ids):
    wh.replace_notes("concepts", data, task, list(ids), buckets_of(*ids))


def snapshot(wh):
    return sorted(tuple(r[k] for k in SCHEMA.names[:4])
                  for r in read_delta_arrow(wh.path("concepts")).to_pylist())


def test_replace_notes_is_scoped_to_batch_notes_and_task(tmp_path):
    wh = Warehouse(tmp_path, {"notelake.run_id": "r1"})
    replace(wh, rows(("n1", "a", "phee", "Drug"), ("n1", "b", "phee", "Effect"), ("n2", "c", "phee", "Drug")),
            "phee", ["n1", "n2"])
    wh.append("concepts", rows(("n1", "x", "other", "drug")))
    # n1 re-extracted for phee: "b" disappears, "d" appears; n2 and n1's other-task rows are untouched.
    replace(wh, rows(("n1", "a", "phee", "Drug"), ("n1", "d", "phee", "Subject")), "phee", ["n1"])
    assert snapshot(wh) == sorted([("n1", "a", "phee", "Drug"), ("n1", "d", "phee", "Subject"),
                                   ("n2", "c", "phee", "Drug"), ("n1", "x", "other", "drug")])
    # A note whose new output is empty loses its old rows.
    replace(wh, SCHEMA.empty_table(), "phee", ["n2"])
    assert ("n2", "c", "phee", "Drug") not in snapshot(wh)


def test_a_replace_touches_only_its_buckets_files(tmp_path):
    """The write path does not grow with the table: replacing a note reads and rewrites only the files of its
    (task, note_bucket) partition; every other bucket's files stay as they are."""
    from deltalake import DeltaTable

    wh = Warehouse(tmp_path, {})
    ids = [f"n{i}" for i in range(40)]
    for i in range(0, 40, 10):  # four commits: several files per bucket
        wh.append("concepts", rows(*[(n, f"{n}-a", "phee", "Drug") for n in ids[i:i + 10]]))
    before = set(DeltaTable(wh.path("concepts")).file_uris())
    target = "n7"
    replace(wh, rows((target, f"{target}-b", "phee", "Effect")), "phee", [target])
    after = set(DeltaTable(wh.path("concepts")).file_uris())
    removed, added = before - after, after - before
    bucket = f"note_bucket={note_bucket(target, BUCKETS)}"
    assert removed and all(bucket in f for f in removed | added)
    assert len(removed) == 1  # only the file that held n7's rows
    metrics = DeltaTable(wh.path("concepts")).history(1)[0]["operationMetrics"]
    assert metrics["num_removed_files"] == 1 and metrics["num_added_files"] == 1


def test_commits_carry_run_metadata(tmp_path):
    from deltalake import DeltaTable

    wh = Warehouse(tmp_path, {"notelake.run_id": "r42"})
    replace(wh, rows(("n1", "a", "phee", "Drug")), "phee", ["n1"])
    replace(wh, rows(("n1", "b", "phee", "Drug")), "phee", ["n1"])
    history = DeltaTable(wh.path("concepts")).history()
    assert all(h.get("notelake.run_id") == "r42" for h in history)
    assert history[0]["notelake.operation"] == "replace_notes"


def test_concurrent_writers_are_retried_not_corrupted(tmp_path):
    """Two writers committing rounds at once on one table: optimistic-concurrency conflicts are retried;
    the final table holds every row exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    def writer(name: str) -> None:
        wh = Warehouse(tmp_path, {"notelake.run_id": name})
        for i in range(6):
            note = f"{name}-n{i}"
            replace(wh, rows((note, f"{note}-a", "phee", "Drug"), (note, f"{note}-b", "phee", "Effect")), "phee",
                    [note])

    replace(Warehouse(tmp_path, {}), rows(("seed", "seed-a", "phee", "Drug")), "phee", ["seed"])
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(writer, ["w1", "w2"]))
    ids = [r[1] for r in snapshot(Warehouse(tmp_path, {}))]
    expected = ["seed-a"] + [f"w{w}-n{i}-{s}" for w in (1, 2) for i in range(6) for s in "ab"]
    assert sorted(ids) == sorted(expected)  # 0 missing, 0 duplicated


def test_unwritable_table_is_a_clear_write_error(tmp_path):
    import pytest

    from notelake.jobs.warehouse import OutputWriteError

    (tmp_path / "concepts").write_text("not a directory")  # any write below it fails, even for root
    with pytest.raises(OutputWriteError, match=r"cannot write table concepts at .*concepts"):
        replace(Warehouse(tmp_path, {}), rows(("n1", "a", "phee", "Drug")), "phee", ["n1"])


def test_runs_table_of_an_older_release_gains_the_new_columns(tmp_path):
    """A runs table written before schema 2 (no deleted / watermark columns) takes the new rows."""
    old_schema = pa.schema([f for f in schemas.RUNS_SCHEMA if f.name not in ("deleted", "watermark")])
    wh = open_warehouse(tmp_path / "out", {"notelake.run_id": "r"})
    row = {f.name: None for f in schemas.RUNS_SCHEMA}
    row.update(run_id="old", task="phee", fingerprint="f", status="succeeded", model="m", prompt_version="p",
               config_json="{}", table_versions_json="{}", started_at=datetime(2026, 11, 1, tzinfo=timezone.utc),
               **{k: 0 for k in ("selected", "succeeded", "failed", "skipped", "rejected", "tokens_in", "tokens_out")})
    wh.upsert("runs", schemas.rows_to_table([{k: v for k, v in row.items() if k in old_schema.names}], old_schema))
    new = {**row, "run_id": "new", "deleted": 2, "watermark": datetime(2026, 11, 2, tzinfo=timezone.utc)}
    wh.upsert("runs", schemas.rows_to_table([new], schemas.RUNS_SCHEMA))
    runs = {r["run_id"]: r for r in read_delta_arrow(tmp_path / "out" / "runs").to_pylist()}
    assert (runs["old"]["deleted"], runs["old"]["watermark"]) == (None, None)
    assert (runs["new"]["deleted"], runs["new"]["watermark"]) == (2, datetime(2026, 11, 2, tzinfo=timezone.utc))


def test_delete_notes_is_scoped_to_task_and_ids(tmp_path):
    wh = Warehouse(tmp_path, {"notelake.run_id": "r1"})
    replace(wh, rows(("n1", "a", "phee", "Drug"), ("n2", "b", "phee", "Drug"), ("it's", "c", "phee", "Drug")),
            "phee", ["n1", "n2", "it's"])
    wh.append("concepts", rows(("n1", "x", "other", "drug")))
    # quotes escaped; tables without rows (relations, ledger) are skipped
    wh.delete_notes("phee", {i: note_bucket(i, BUCKETS) for i in ("n1", "it's", "never-seen")})
    assert snapshot(wh) == sorted([("n2", "b", "phee", "Drug"), ("n1", "x", "other", "drug")])
