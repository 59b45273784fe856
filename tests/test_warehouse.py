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


# -- schema evolution (a pass-through column added to, or gone from, an existing output) ---------------------------

PATIENT = pa.schema([*SCHEMA, ("patient_id", pa.string())])


def with_patient(*items):
    """Rows of SCHEMA plus a patient_id (the last item of each)."""
    return pa.Table.from_pylist([dict(zip(PATIENT.names, (*i[:4], note_bucket(i[0], BUCKETS), i[4]))) for i in items],
                                schema=PATIENT)


def concepts_with_patient(wh):
    return sorted((r["note_id"], r["concept_id"], r["patient_id"]) for r in read_delta_arrow(wh.path("concepts"),
                                                                                             opts=wh.storage_options)
                  .to_pylist())


def test_a_passthrough_column_added_to_an_existing_output_becomes_a_column(tmp_path):
    """The input gains patient_id after the output was created: the replace of a known note, the append of a
    first-time note and the refresh of an unchanged one all write it (older rows null) instead of failing."""
    wh = Warehouse(tmp_path, {})
    replace(wh, rows(("n1", "a", "phee", "Drug"), ("n2", "b", "phee", "Drug")), "phee", ["n1", "n2"])
    replace(wh, with_patient(("n1", "a2", "phee", "Drug", "P1")), "phee", ["n1"])
    wh.append("concepts", with_patient(("n3", "c", "phee", "Drug", "P3")))
    assert concepts_with_patient(wh) == [("n1", "a2", "P1"), ("n2", "b", None), ("n3", "c", "P3")]

    # a refresh that brings a column the table has never had (note_type) adds it rather than dropping the values
    refresh = pa.table({"note_id": ["n2"], "patient_id": ["P2"], "note_type": ["discharge"]})
    wh.update_columns("concepts", refresh, "phee", buckets_of("n2"), ["patient_id", "note_type"])
    types = {r["note_id"]: (r["patient_id"], r["note_type"]) for r in read_delta_arrow(wh.path("concepts")).to_pylist()}
    assert types == {"n1": ("P1", None), "n2": ("P2", "discharge"), "n3": ("P3", None)}

    # an input without the optional column again: the rows land, null in it
    replace(wh, rows(("n3", "c2", "phee", "Drug")), "phee", ["n3"])
    assert ("n3", "c2", None) in concepts_with_patient(wh)


def test_a_ledger_written_by_an_older_release_takes_rows_with_new_columns(tmp_path):
    """commit_ledger (replace for known notes, append for new ones) over a ledger lacking a column added since."""
    old = pa.schema([f for f in schemas.LEDGER_SCHEMA if f.name != "passthrough_sha256"])

    def ledger_row(note_id: str, status: str, schema: pa.Schema) -> dict:
        row = {f.name: None for f in schema}
        row.update(note_id=note_id, task="phee", note_bucket=note_bucket(note_id, BUCKETS), text_sha256="t",
                   fingerprint="f", run_id="r", status=status, attempts=1, has_output=True, n_chunks=1,
                   n_concepts=1, n_relations=0, n_warnings=0, n_ungrounded=0, n_dropped_relations=0,
                   n_truncated_chunks=0, processed_at=datetime(2026, 11, 1, tzinfo=timezone.utc))
        return {k: v for k, v in row.items() if k in schema.names}

    wh = Warehouse(tmp_path, {})
    wh.commit_ledger(schemas.rows_to_table([ledger_row("n1", "failed", old)], old), "phee", [], buckets_of("n1"))
    new = [{**ledger_row(n, "succeeded", schemas.LEDGER_SCHEMA), "passthrough_sha256": f"h-{n}"} for n in ("n1", "n2")]
    wh.commit_ledger(schemas.rows_to_table(new, schemas.LEDGER_SCHEMA), "phee", ["n1"], buckets_of("n1", "n2"))
    ledger = {r["note_id"]: (r["status"], r["passthrough_sha256"]) for r in read_delta_arrow(wh.path("ledger")).to_pylist()}
    assert ledger == {"n1": ("succeeded", "h-n1"), "n2": ("succeeded", "h-n2")}


def test_schema_evolution_on_an_object_store():
    from s3server import BUCKET, s3_server

    with s3_server() as opts:
        wh = Warehouse(f"s3://{BUCKET}/wh", {}, opts)
        replace(wh, rows(("n1", "a", "phee", "Drug")), "phee", ["n1"])
        replace(wh, with_patient(("n1", "a2", "phee", "Drug", "P1")), "phee", ["n1"])
        wh.append("concepts", with_patient(("n2", "b", "phee", "Drug", "P2")))
        assert concepts_with_patient(wh) == [("n1", "a2", "P1"), ("n2", "b", "P2")]


# -- bucketed deletes ----------------------------------------------------------------------------------------------

def test_delete_batches_take_whole_buckets_in_order_and_split_a_large_one(monkeypatch):
    from notelake.jobs import warehouse

    monkeypatch.setattr(warehouse, "_DELETE_BUCKETS", 2)
    monkeypatch.setattr(warehouse, "_DELETE_BATCH", 3)
    notes = {"a": 0, "b": 0, "c": 1, "d": 2, "e": 2, "f": 2, "g": 2, "h": 2, "i": 3}
    assert list(warehouse._delete_batches(notes)) == [
        ({0, 1}, ["a", "b", "c"]), ({2}, ["d", "e", "f"]), ({2, 3}, ["g", "h", "i"])]


def test_delete_notes_commits_bucket_by_bucket_each_touching_only_its_buckets_files(tmp_path, monkeypatch):
    """Deleting notes of every bucket: each commit rewrites the files of at most _DELETE_BUCKETS buckets, concepts
    before the ledger in every batch, and exactly the deleted notes' rows are gone."""
    from deltalake import DeltaTable

    from notelake.jobs import warehouse

    monkeypatch.setattr(warehouse, "_DELETE_BUCKETS", 2)
    wh = Warehouse(tmp_path, {})
    ids = [f"n{i}" for i in range(24)]
    for table in ("concepts", "ledger"):
        wh.append(table, rows(*[(n, f"{n}-a", "phee", "Drug") for n in ids]))
    gone = ids[::2]
    assert len({note_bucket(n, BUCKETS) for n in gone}) == BUCKETS
    before = {t: wh.version(t) for t in ("concepts", "ledger")}
    wh.delete_notes("phee", {n: note_bucket(n, BUCKETS) for n in gone}, tables=("concepts", "ledger"))

    assert sorted(r["note_id"] for r in read_delta_arrow(wh.path("concepts")).to_pylist()) == sorted(set(ids) - set(gone))
    commits = {}
    for table in ("concepts", "ledger"):
        path = wh.path(table)
        versions = range(before[table] + 1, wh.version(table) + 1)
        assert len(versions) == BUCKETS // 2  # one commit per two buckets
        for v in versions:
            changed = set(DeltaTable(path, version=v - 1).file_uris()) ^ set(DeltaTable(path, version=v).file_uris())
            assert len({f.split("note_bucket=")[1].split("/")[0] for f in changed}) <= 2
        commits[table] = [h["timestamp"] for h in DeltaTable(path).history()[:len(versions)]][::-1]
    for k, (concepts_at, ledger_at) in enumerate(zip(commits["concepts"], commits["ledger"])):
        assert concepts_at <= ledger_at  # each batch: the ledger after the rows
        if k + 1 < len(commits["concepts"]):
            assert ledger_at <= commits["concepts"][k + 1]


# -- staging per output ----------------------------------------------------------------------------------------------

def test_recovery_on_one_output_leaves_another_outputs_staging(tmp_path):
    """Two outputs sharing one storage.staging: each stages under its own folder, and recovering one removes
    only its own runs' staged files."""
    from notelake.jobs import storage

    shared = str(tmp_path / "staging")
    a, b = open_warehouse(tmp_path / "a" / "wh", {}), open_warehouse(tmp_path / "b" / "wh", {})
    assert a.staging_root() == str(tmp_path / "a" / "wh" / "_staging")
    assert a.staging_root(shared) != b.staging_root(shared)
    assert a.staging_root(shared).startswith(shared + "/wh-")
    for wh, name in ((a, "pass-a"), (b, "pass-b")):
        storage.write_text(storage.join(wh.staging_root(shared), name, "round-00001", "part.txt"), "staged")
    assert b.recover(b.staging_root(shared)) == ([], 0)
    assert storage.exists(storage.join(a.staging_root(shared), "pass-a", "round-00001", "part.txt"))
    assert not storage.exists(b.staging_root(shared))
