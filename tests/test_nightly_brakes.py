"""Brakes and side paths of the nightly job on the real local stack (Spark, Ray, deltalake) with the REPLAY engine
(data plane only): --propagate-deletes refuses an empty or mostly missing input, rejections and pass-through
refreshes are committed round by round like extraction rounds, a pass-through column the conf names must be in
the input and one added later becomes a column of the output, and outputs sharing storage.staging keep apart."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from jobkit import assert_no_duplicates, rows, sample_notes, table, write_notes

from notelake.jobs import storage
from notelake.jobs.extraction import job
from notelake.jobs.extraction.plan import DeleteBrakeError
from notelake.jobs.extraction.read import InputError
from notelake.jobs.extraction.report import ExitCode
from notelake.jobs.warehouse import open_warehouse
from notelake.udfs.hashing import note_bucket

NOTES_SCHEMA = pa.schema([("note_id", pa.string()), ("patient_id", pa.string()), ("note_date", pa.string()),
                          ("note_type", pa.string()), ("text", pa.string())])


def last_run(out) -> dict:
    return max(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])


def ledger_ids(out) -> list[str]:
    return sorted(table(out, "ledger")["note_id"].to_pylist())


def test_propagate_deletes_refuses_an_empty_input_and_stops_above_max_delete_fraction(tmp_path, spark, replay):
    notes = sample_notes(5)
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"propagate_deletes": True, "max_delete_fraction": 0.2})
    assert job.run(cfg, write_notes(tmp_path / "notes", notes), str(out), spark=spark) == ExitCode.OK

    # 1 of 5 gone: at the fraction, deleted
    assert job.run(cfg, write_notes(tmp_path / "notes", notes[1:]), str(out), spark=spark) == ExitCode.OK
    assert last_run(out)["deleted"] == 1 and ledger_ids(out) == sorted(n["note_id"] for n in notes[1:])
    runs_before = len(rows(out, "runs"))

    # a half-loaded input: 2 of 4 gone (50 % > 20 %), nothing deleted or written
    half = write_notes(tmp_path / "notes", notes[3:])
    with pytest.raises(DeleteBrakeError, match=r"would delete 2 of the 4 notes of task phee \(50.0%\).*"
                                                r"job.max_delete_fraction 0.5"):
        job.run(cfg, half, str(out), spark=spark)
    # an empty input never deletes, whatever the fraction
    empty = write_notes(tmp_path / "notes", [], NOTES_SCHEMA)
    for fraction in (0.2, 1.0):
        with pytest.raises(DeleteBrakeError, match="input holds no note id.* 4 notes of task phee"):
            job.run(cfg.with_overrides(job={"max_delete_fraction": fraction}), empty, str(out), spark=spark)
    assert isinstance(DeleteBrakeError("x"), InputError)  # the CLI's exit 2
    assert len(rows(out, "runs")) == runs_before
    assert ledger_ids(out) == sorted(n["note_id"] for n in notes[1:])

    # the operator confirms a real deletion by raising the fraction for one run
    half = write_notes(tmp_path / "notes", notes[3:])
    assert job.run(cfg.with_overrides(job={"max_delete_fraction": 0.5}), half, str(out), spark=spark) == ExitCode.OK
    assert last_run(out)["deleted"] == 2 and ledger_ids(out) == sorted(n["note_id"] for n in notes[3:])
    assert_no_duplicates(out)


def commits(out, name: str, run_id: str, operation: str) -> int:
    return sum(1 for h in DeltaTable(str(out / name)).history()
               if h.get("notelake.run_id") == run_id and h.get("notelake.operation") == operation)


def test_rejections_and_refreshes_are_committed_round_by_round(tmp_path, spark, replay):
    """job.round_notes 1: two notes turned empty and two with a new patient_id are each committed in rounds of
    whole buckets (one ledger commit per round, never one commit naming every bucket), with the right result."""
    notes = [sample_notes(8)[k] for k in (0, 4, 2, 6)]
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"round_notes": 1})
    assert job.run(cfg, write_notes(tmp_path / "notes", notes), str(out), spark=spark) == ExitCode.OK
    emptied, merged = notes[:2], notes[2:]
    night = [{**n, "text": " "} for n in emptied] + [{**n, "patient_id": "P-MERGED"} for n in merged]
    assert job.run(cfg, write_notes(tmp_path / "notes", night), str(out), spark=spark) == ExitCode.OK

    run = last_run(out)
    assert (run["selected"], run["rejected"], run["refreshed"]) == (0, 2, 2)

    def rounds_of(group: list[dict]) -> int:  # rounds hold whole buckets: bucket mod the number of rounds
        n_rounds = math.ceil(len(group) / cfg.job.round_notes)
        return len({note_bucket(n["note_id"], cfg.job.note_buckets) % n_rounds for n in group})

    assert rounds_of(emptied) == rounds_of(merged) == 2  # the notes were picked so that each group needs two rounds
    assert commits(out, "ledger", run["run_id"], "replace_notes") == rounds_of(emptied)  # rejected ledger rows
    assert commits(out, "ledger", run["run_id"], "update_columns") == rounds_of(merged)  # refreshed hashes
    assert commits(out, "errors", run["run_id"], "append") == rounds_of(emptied)

    ledger = {r["note_id"]: r for r in table(out, "ledger").to_pylist()}
    assert {ledger[n["note_id"]]["status"] for n in emptied} == {"rejected"}
    concepts = table(out, "concepts").to_pylist()
    assert not {c["note_id"] for c in concepts} & {n["note_id"] for n in emptied}  # stale rows removed
    assert {c["patient_id"] for c in concepts if c["note_id"] in {n["note_id"] for n in merged}} <= {"P-MERGED"}
    assert sorted(r["note_id"] for r in rows(out, "errors")) == sorted(n["note_id"] for n in emptied)
    assert_no_duplicates(out)


def test_passthrough_columns_named_in_the_conf_are_required_and_a_new_one_becomes_a_column(tmp_path, spark, replay):
    notes = [{k: v for k, v in n.items() if k != "note_type"} for n in sample_notes(3)]
    out = tmp_path / "warehouse"
    # the defaults are optional: an input without note_type runs
    assert job.run(replay, write_notes(tmp_path / "notes", notes), str(out), spark=spark) == ExitCode.OK
    assert "note_type" not in table(out, "concepts").schema.names

    named = replay.with_overrides(input={"passthrough_columns": ["patient_id", "note_date", "ward"]})
    with pytest.raises(InputError, match=r"lacks the pass-through column\(s\) \['ward'\]"):
        job.run(named, write_notes(tmp_path / "notes", notes), str(out), spark=spark)

    wards = {n["note_id"]: f"ward-{k}" for k, n in enumerate(notes)}
    edited = [{**n, "ward": wards[n["note_id"]]} for n in notes]
    edited[0]["text"] += " The dose was halved."  # re-extracted; the others' rows only refreshed (no model call)
    assert job.run(named, write_notes(tmp_path / "notes-with-ward", edited), str(out), spark=spark) == ExitCode.OK
    run = last_run(out)
    # every note with rows gets the new column before the rounds, the re-extracted one too
    assert (run["status"], run["selected"], run["refreshed"]) == ("succeeded", 1, 3)
    for name in ("concepts", "relations"):
        assert "ward" in table(out, name).schema.names, name
        assert all(r["ward"] == wards[r["note_id"]] for r in rows(out, name)), name
    assert_no_duplicates(out)


def test_outputs_sharing_storage_staging_leave_each_others_staged_rows_alone(tmp_path, spark, replay):
    """A run on one output recovers (wipes) only its own staging folder under a shared storage.staging: the rows
    another output's run has staged there stay."""
    shared = str(tmp_path / "staging")
    cfg = replay.with_overrides(storage={"staging": shared})
    other = open_warehouse(tmp_path / "other", {})
    in_flight = storage.join(other.staging_root(shared), "pass-other", "round-00000", "part.parquet")
    storage.write_text(in_flight, "staged")

    out = tmp_path / "warehouse"
    assert job.run(cfg, write_notes(tmp_path / "notes", sample_notes(2)), str(out), spark=spark) == ExitCode.OK
    mine = open_warehouse(out, {}).staging_root(shared)
    assert mine.startswith(shared + "/warehouse-") and mine != other.staging_root(shared)
    assert storage.exists(in_flight)
    assert storage.list_dirs(mine) == []  # this run's staged rows are gone


def test_propagate_deletes_reads_the_input_ids_at_the_version_its_notes_were_read(tmp_path, spark, replay):
    """input.watermark delta_version: the ids --propagate-deletes compares with are those of the version the run
    read its notes at, not of a later commit."""
    from notelake.jobs.extraction.read import read_note_ids

    src = write_notes(tmp_path / "notes", sample_notes(3), NOTES_SCHEMA)
    first = DeltaTable(src).version()
    DeltaTable(src).delete("note_id = 'N0001'")
    cfg = replay.with_overrides(input={"watermark": "delta_version"})
    ids = {r["note_id"] for r in read_note_ids(spark, cfg, src, first).collect()}
    assert ids == {"N0001", "N0002", "N0003"}
    assert {r["note_id"] for r in read_note_ids(spark, cfg, src).collect()} == {"N0002", "N0003"}
