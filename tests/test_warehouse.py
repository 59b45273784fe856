"""Delta write semantics of the output tables (deltalake, real tables in tmp)."""

from __future__ import annotations

import pyarrow as pa

from notelake.jobs.warehouse import Warehouse, read_delta_arrow

SCHEMA = pa.schema([("note_id", pa.string()), ("concept_id", pa.string()), ("task", pa.string()),
                    ("label", pa.string())])


def rows(*items):
    return pa.Table.from_pylist([dict(zip(SCHEMA.names, i)) for i in items], schema=SCHEMA)


def snapshot(wh):
    return sorted(tuple(r.values()) for r in read_delta_arrow(wh.path("concepts")).to_pylist())


def test_replace_notes_is_scoped_to_batch_notes_and_task(tmp_path):
    wh = Warehouse(tmp_path, {"notelake.run_id": "r1"})
    wh.replace_notes("concepts", rows(("n1", "a", "phee", "Drug"), ("n1", "b", "phee", "Effect"),
                                      ("n2", "c", "phee", "Drug")), "phee", ["n1", "n2"])
    wh.replace_notes("concepts", rows(("n1", "x", "other", "drug")), "other", ["n1"])
    # n1 re-extracted for phee: "b" disappears, "d" appears; n2 and n1's other-task rows are untouched.
    wh.replace_notes("concepts", rows(("n1", "a", "phee", "Drug"), ("n1", "d", "phee", "Subject")), "phee", ["n1"])
    assert snapshot(wh) == sorted([("n1", "a", "phee", "Drug"), ("n1", "d", "phee", "Subject"),
                                   ("n2", "c", "phee", "Drug"), ("n1", "x", "other", "drug")])
    # A note whose new output is empty loses its old rows.
    wh.replace_notes("concepts", SCHEMA.empty_table(), "phee", ["n2"])
    assert ("n2", "c", "phee", "Drug") not in snapshot(wh)


def test_commits_carry_run_metadata(tmp_path):
    from deltalake import DeltaTable

    wh = Warehouse(tmp_path, {"notelake.run_id": "r42"})
    wh.replace_notes("concepts", rows(("n1", "a", "phee", "Drug")), "phee", ["n1"])
    wh.replace_notes("concepts", rows(("n1", "b", "phee", "Drug")), "phee", ["n1"])
    history = DeltaTable(wh.path("concepts")).history()
    assert all(h.get("notelake.run_id") == "r42" for h in history)
    assert history[0]["notelake.operation"] == "replace_notes"
