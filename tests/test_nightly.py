"""The job over several nights on the real local stack (Spark, Ray, deltalake) with the REPLAY engine: what only
shows up on the second, third or hundredth night (data plane only: REPLAY answers are made up, deterministic per
text, and ground in the text).
"""

from __future__ import annotations

import base64
import json
import random

import pytest
from jobkit import assert_no_duplicates, rows, sample_notes, table, write_notes

from notelake.conf.task import load_task
from notelake.jobs.extraction import job
from notelake.jobs.extraction.identity import describe_extraction
from notelake.jobs.extraction.report import ExitCode
from notelake.jobs.extraction.stage import FAILPOINT
from notelake.jobs.warehouse import OutputLayoutError

# Enough tokens that the tokenizer cannot fit 1 000 characters of it in a 1 024-token context (2 400 tokens):
# generation refuses the chunk (prompt_too_long), so the note fails, deterministically, without touching the engine
# code. Words of four characters, not one run of 900 (a window without prose, answered without a model call).
UNPROMPTABLE = " ".join(["鑫淼焱垚"] * 200)


def runs_of(out):
    return sorted(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])


def concepts_of(out, note_id: str) -> list[tuple]:
    return sorted((c["label"], c["start"], c["end"], c["text_sha256"])
                  for c in table(out, "concepts").to_pylist() if c["note_id"] == note_id)


def bad_rows() -> list[dict]:
    base = {"patient_id": "P9", "note_date": "2026-02-01", "note_type": "x"}
    return [{**base, "note_id": "empty", "text": ""}, {**base, "note_id": "null", "text": None},
            {**base, "note_id": "blank", "text": " \n\t "}, {**base, "note_id": "long", "text": "x" * 5000},
            {**base, "note_id": "dup", "text": "Aspirin."}, {**base, "note_id": "dup", "text": "Heparin."},
            {**base, "note_id": None, "text": "No id."}]


def test_persistent_bad_rows_are_recorded_once_and_do_not_fail_later_nights(tmp_path, spark, replay):
    good = sample_notes(12)
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"max_error_rate": 0.3}, input={"max_text_chars": 4000})
    src = write_notes(tmp_path / "notes", good + bad_rows())
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.ERROR_RATE  # night 1: 7 of 19 rows are new rejects (0.37)
    assert len(rows(out, "errors")) == 7

    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK  # night 2: nothing new
    edited = [dict(n) for n in good]
    edited[3]["text"] += " The dose was halved."
    src = write_notes(tmp_path / "notes", edited + bad_rows())
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK  # night 3: one edit, same bad rows
    nights = runs_of(out)
    assert [(r["status"], r["selected"], r["rejected"]) for r in nights] == [
        ("failed", 12, 7), ("succeeded", 0, 0), ("succeeded", 1, 0)]
    assert len(rows(out, "errors")) == 7  # each rejection recorded once
    ledger = {r["note_id"]: r for r in table(out, "ledger").to_pylist()}
    assert {k for k, r in ledger.items() if r["status"] == "rejected"} == {"empty", "null", "blank", "long", "dup"}
    assert_no_duplicates(out)


def test_failed_notes_are_retried_then_given_up_and_keep_their_rows(tmp_path, spark, replay):
    notes = sample_notes(3)
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"max_attempts": 2})
    src = write_notes(tmp_path / "notes", notes)
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    good_rows = concepts_of(out, notes[0]["note_id"])
    assert good_rows

    broken = [{**notes[0], "text": UNPROMPTABLE}, *notes[1:]]
    src = write_notes(tmp_path / "notes", broken)
    for night in range(3):
        assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
        assert concepts_of(out, notes[0]["note_id"]) == good_rows  # replaced only by a successful extraction
    nights = runs_of(out)[1:]
    assert [(r["selected"], r["retried"], r["failed"], r["given_up"]) for r in nights] == [
        (1, 0, 1, 0), (1, 1, 1, 0), (0, 0, 0, 1)]
    row = next(r for r in table(out, "ledger").to_pylist() if r["note_id"] == notes[0]["note_id"])
    assert (row["status"], row["attempts"], row["has_output"]) == ("failed", 2, True)
    attempts = sorted(e["attempt"] for e in rows(out, "errors") if e["note_id"] == notes[0]["note_id"])
    assert attempts == [1, 2]

    fixed = [{**notes[0], "text": notes[0]["text"] + " Resolved."}, *notes[1:]]
    assert job.run(cfg, write_notes(tmp_path / "notes", fixed), str(out), spark=spark) == ExitCode.OK
    new_rows = concepts_of(out, notes[0]["note_id"])
    assert new_rows and new_rows != good_rows
    assert_no_duplicates(out)


def test_text_a_b_a_and_a_note_turned_bad_leave_no_stale_rows(tmp_path, spark, replay):
    notes = sample_notes(3)
    out = tmp_path / "warehouse"
    first = notes[0]["note_id"]
    a = notes[0]["text"]
    b = "A 61-year-old woman developed angioedema after starting enalapril for hypertension."

    def night(text_of_first: str | None) -> None:
        data = [{**notes[0], "text": text_of_first}, *notes[1:]]
        assert job.run(replay, write_notes(tmp_path / "notes", data), str(out), spark=spark) == ExitCode.OK

    night(a)
    rows_a = concepts_of(out, first)
    night(b)
    assert concepts_of(out, first) != rows_a
    night(a)  # back to A: re-extracted, B's rows gone
    assert concepts_of(out, first) == rows_a
    night("")  # the note's text becomes empty: its rows leave the cohort tables
    assert concepts_of(out, first) == []
    assert not [r for r in table(out, "relations").to_pylist() if r["note_id"] == first]
    assert runs_of(out)[-1]["stale_removed"] == 1
    night(a)  # and come back when the text does
    assert concepts_of(out, first) == rows_a
    assert_no_duplicates(out)


def test_changed_passthrough_columns_are_refreshed_without_the_model(tmp_path, spark, replay):
    notes = sample_notes(3)
    out = tmp_path / "warehouse"
    assert job.run(replay, write_notes(tmp_path / "notes", notes), str(out), spark=spark) == ExitCode.OK
    merged = [{**notes[0], "patient_id": "P-MERGED"}, *notes[1:]]  # an MRN merge
    assert job.run(replay, write_notes(tmp_path / "notes", merged), str(out), spark=spark) == ExitCode.OK
    last = runs_of(out)[-1]
    assert (last["selected"], last["refreshed"], last["tokens_out"]) == (0, 1, 0)
    for name in ("concepts", "relations"):
        got = {r["patient_id"] for r in rows(out, name) if r["note_id"] == notes[0]["note_id"]}
        assert got in ({"P-MERGED"}, set()), name
    assert {r["patient_id"] for r in table(out, "concepts").to_pylist() if r["note_id"] == notes[1]["note_id"]} \
        == {notes[1]["patient_id"]}
    assert job.run(replay, write_notes(tmp_path / "notes", merged), str(out), spark=spark) == ExitCode.OK
    assert runs_of(out)[-1]["refreshed"] == 0


def test_engine_backend_is_part_of_the_fingerprint(settings, replay):
    task = load_task("phee")
    assert describe_extraction(settings, task).fingerprint != \
        describe_extraction(replay, task).fingerprint


def test_vllm_args_that_change_answers_are_part_of_the_fingerprint(settings):
    """Scheduling arguments keep every note's ledger key (no re-extraction for tuning); an argument that changes
    what the model computes (quantization, the KV cache's dtype) re-selects every note."""
    task = load_task("phee")

    def fp(**vllm_args):
        return describe_extraction(settings.with_overrides(engine={"vllm_args": vllm_args}), task).fingerprint

    plain = fp()
    assert fp(max_num_batched_tokens=512, async_scheduling=True,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4}) == plain
    assert fp(kv_cache_dtype="fp8") != plain
    assert fp(quantization="fp8", max_num_seqs=64) == fp(quantization="fp8") != plain


def test_a_task_attempt_lost_after_staging_duplicates_and_loses_nothing(tmp_path, spark, replay, caplog):
    """Partition 0's first attempt stages its first batch and its Python worker dies (a lost executor); Spark
    retries the task (local[2,2]: 2 attempts). Its orphaned file must not reach the tables."""
    notes = sample_notes(12)
    cfg = replay.with_overrides(spark={"arrow_batch_size": 3})
    src = write_notes(tmp_path / "notes", notes)
    assert job.run(cfg, src, str(tmp_path / "reference"), spark=spark) == ExitCode.OK
    spark.sparkContext.setLocalProperty(FAILPOINT, "exit_after_first_staged_batch")
    try:
        with caplog.at_level("WARNING", logger="notelake.extract"):
            assert job.run(cfg, src, str(tmp_path / "faulted"), spark=spark) == ExitCode.OK
    finally:
        spark.sparkContext.setLocalProperty(FAILPOINT, None)
    assert "ignored 2 staged file(s)" in caplog.text  # the lost attempt's concepts and ledger files
    for name in ("concepts", "relations", "ledger"):
        key = {"concepts": "concept_id", "relations": "relation_id", "ledger": "note_id"}[name]
        assert sorted(r[key] for r in rows(tmp_path / "faulted", name)) == \
            sorted(r[key] for r in rows(tmp_path / "reference", name)), name
    assert_no_duplicates(tmp_path / "faulted")
    assert not list((tmp_path / "faulted" / "_staging").glob("*"))


def test_output_of_an_older_release_is_refused_with_a_clear_error(tmp_path, spark, replay):
    from deltalake import write_deltalake
    import pyarrow as pa

    out = tmp_path / "warehouse"
    write_deltalake(str(out / "ledger"), pa.table({"note_id": ["n1"], "task": ["phee"]}))
    src = write_notes(tmp_path / "notes", sample_notes(1))
    with pytest.raises(OutputLayoutError, match="older notelake"):
        job.run(replay, src, str(out), spark=spark)


def test_dry_run_reports_the_nightly_plan(tmp_path, spark, replay, capsys):
    notes = sample_notes(4)
    out = tmp_path / "warehouse"
    assert job.run(replay, write_notes(tmp_path / "notes", notes + bad_rows()[:1]), str(out), spark=spark) == 0
    changed = [{**notes[0], "text": "Changed."}, {**notes[1], "patient_id": "P-NEW"}, *notes[2:]]
    src = write_notes(tmp_path / "notes", changed + bad_rows()[:2])
    assert job.run(replay, src, str(out), spark=spark, dry_run=True) == ExitCode.OK
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: plan[k] for k in ("selected", "unchanged", "to_refresh", "rejected_new", "rejected_known")} == \
        {"selected": 1, "unchanged": 2, "to_refresh": 1, "rejected_new": 1, "rejected_known": 1}


def test_driver_killed_between_row_and_ledger_commits_leaves_no_duplicates(tmp_path, spark, replay, ray_address):
    """The worst moment to die: round 2's concepts are appended (first-time notes) but its ledger commit never
    happens. The next run removes those rows (their notes are extracted again) and finishes without duplicates."""
    import os
    import subprocess
    import sys

    from jobkit import write_conf

    from notelake.jobs.warehouse import FAILPOINT_ENV

    notes = sample_notes(6)
    src = write_notes(tmp_path / "notes", notes)
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"round_notes": 2})
    conf = write_conf(tmp_path / "conf.yaml", cfg.with_overrides(ray={"address": ray_address}))
    proc = subprocess.run([sys.executable, "-m", "notelake.jobs.extract", "--conf", conf, "--input", src,
                           "--output", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, FAILPOINT_ENV: "exit_before_ledger_commit:2"})
    assert proc.returncode == 9, proc.stderr[-2000:]
    acked = {r["note_id"] for r in table(out, "ledger").to_pylist()}
    orphaned = {r["note_id"] for r in table(out, "concepts").to_pylist()} - acked
    assert 0 < len(acked) < len(notes) and orphaned  # round 1 committed; round 2's rows landed, not its ledger

    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    runs = runs_of(out)
    assert runs[0]["status"] == "abandoned"
    assert (runs[-1]["status"], runs[-1]["selected"]) == ("succeeded", len(notes) - len(acked))
    assert sorted(r["note_id"] for r in table(out, "ledger").to_pylist()) == sorted(n["note_id"] for n in notes)
    assert_no_duplicates(out)
    assert {r["note_id"] for r in table(out, "concepts").to_pylist()} == {n["note_id"] for n in notes}


def night_of(out) -> dict:
    """The latest run's row."""
    return runs_of(out)[-1]


def test_a_date_watermark_rereads_its_day_so_a_same_day_edit_is_picked_up(tmp_path, spark, replay):
    """input.updated_at_column is a date: the night's run reads notes dated today and stores today; a note edited
    later today is also dated today and must be read by the next night (no lookback: the day itself is re-read)."""
    from datetime import date

    today = date(2026, 11, 5)
    notes = [{**n, "updated_on": today if i < 2 else date(2026, 11, 4)} for i, n in enumerate(sample_notes(3))]
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(input={"updated_at_column": "updated_on", "watermark_lookback_s": 0})
    assert job.run(cfg, write_notes(tmp_path / "notes", notes), str(out), spark=spark) == ExitCode.OK
    assert night_of(out)["watermark"].date() == today
    before = concepts_of(out, notes[1]["note_id"])

    edited = [notes[0], {**notes[1], "text": "A 52-year-old man developed angioedema after lisinopril."}, notes[2]]
    assert edited[1]["updated_on"] == today  # the same day as the stored watermark
    src = write_notes(tmp_path / "notes", edited)
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    night = night_of(out)
    # the day's notes are read again; the unchanged one costs no model call
    assert (night["selected"], night["succeeded"] + night["failed"], night["skipped"]) == (1, 1, 1)
    assert concepts_of(out, notes[1]["note_id"]) != before
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    night = night_of(out)
    assert (night["selected"], night["skipped"], night["tokens_in"], night["tokens_out"]) == (0, 2, 0, 0)
    assert_no_duplicates(out)


def test_a_late_row_older_than_the_watermark_is_read_within_the_lookback(tmp_path, spark, replay):
    """Timestamps: a row committed after the night's run with an updated_at below the stored watermark (CDC lag)
    is read the next night when it lags by less than input.watermark_lookback_s; a row stamped in the future
    cannot carry the watermark past the run's start."""
    from datetime import datetime, timedelta, timezone

    mark = datetime(2026, 11, 5, 1, 30, tzinfo=timezone.utc)
    notes = sample_notes(4)
    first = [{**notes[0], "updated_at": mark - timedelta(hours=5)}, {**notes[1], "updated_at": mark}]
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(input={"updated_at_column": "updated_at", "watermark_lookback_s": 6 * 3600})
    assert job.run(cfg, write_notes(tmp_path / "notes", first), str(out), spark=spark) == ExitCode.OK
    assert night_of(out)["watermark"] == mark

    late = {**notes[2], "updated_at": mark - timedelta(hours=2)}  # stamped before the mark, committed after it
    src = write_notes(tmp_path / "notes", [*first, late])
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    night = night_of(out)
    assert (night["selected"], night["skipped"], night["tokens_out"] > 0) == (1, 2, True)
    assert night["watermark"] == mark
    assert late["note_id"] in table(out, "ledger")["note_id"].to_pylist()

    future = {**notes[3], "updated_at": datetime(2099, 1, 1, tzinfo=timezone.utc)}  # a clock gone wrong upstream
    assert job.run(cfg, write_notes(tmp_path / "notes", [*first, late, future]), str(out), spark=spark) == 0
    night = night_of(out)
    assert night["selected"] == 1 and night["watermark"] == night["started_at"]
    assert_no_duplicates(out)


def test_a_note_over_spacys_limit_lands_and_a_run_of_notes_without_concepts_says_so(tmp_path, spark, replay, caplog):
    """A note the input admits over spaCy's 1 000 000 characters (a base64 blob between two sentences) lands: the
    blob costs no model call and ConText judges the prose in segments. (A note whose step raises fails alone:
    tests/test_stage.py.) Most notes getting no concept (vital signs only: REPLAY finds no word in them) is a
    warning in the log and the runs row."""
    blob = base64.encodebytes(random.Random(1).randbytes(750_000)).decode()
    huge = {"note_id": "huge", "text": f"Patient denies nausea after heparin.\n{blob}\nHeparin was stopped."}
    image = base64.encodebytes(random.Random(2).randbytes(57 * 40)).decode()  # full 76-character lines
    pasted = {"note_id": "pasted", "text": f"Rash developed after amoxicillin.\n{image}Amoxicillin was stopped."}
    image_at = (pasted["text"].index(image), pasted["text"].index(image) + len(image))
    vitals = [{"note_id": f"vitals-{k}", "text": f"BP {110 + k}/70, HR {60 + k}, T 37.{k}."} for k in range(4)]
    base = {"patient_id": "P1", "note_date": "2026-02-01", "note_type": "x"}
    notes = sample_notes(2) + [{**base, **n} for n in [huge, pasted, *vitals]]
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"task": "maccrobat"}, input={"max_text_chars": 1_100_000})
    with caplog.at_level("WARNING", logger="notelake.extract"):
        assert job.run(cfg, write_notes(tmp_path / "notes", notes), str(out), spark=spark) == ExitCode.OK

    ledger = {r["note_id"]: r["status"] for r in table(out, "ledger").to_pylist()}
    assert ledger == {n["note_id"]: "succeeded" for n in notes}
    assert not rows(out, "errors")
    concepts = table(out, "concepts").to_pylist()
    assert {c["note_id"] for c in concepts} == {n["note_id"] for n in notes[:2]} | {"huge", "pasted"}
    for note_id, (start, end) in (("pasted", image_at), ("huge", (37, 37 + len(blob)))):
        around = [c["start"] < start for c in concepts if c["note_id"] == note_id]
        assert set(around) == {True, False}, note_id  # the prose on both sides of the blob, nothing inside it
        assert all(c["end"] <= start or c["start"] >= end for c in concepts if c["note_id"] == note_id)
    (run,) = table(out, "runs").to_pylist()
    assert (run["succeeded"], run["failed"], run["no_concept"]) == (8, 0, 4)
    assert run["windows_no_prose"] > 1000  # the blob's windows: answered without a model call
    (warning,) = json.loads(run["warnings_json"])
    assert (warning["warning"], warning["no_concept"], warning["notes"]) == ("no_concept_share", 4, 8)
    assert any("4 of 8 succeeded notes" in r.getMessage() and "got no concept" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize("change_feed", [True, False], ids=["change_feed", "no_change_feed"])
def test_a_delta_version_watermark_reads_what_moved(tmp_path, spark, replay, change_feed):
    """input.watermark delta_version: a night whose input version did not move reads no note; one that moved reads
    the notes the change data feed names (or, without the feed, every note, the ledger skipping the unchanged)."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    notes = sample_notes(5)
    src, out = str(tmp_path / "notes"), tmp_path / "warehouse"
    write_deltalake(src, pa.Table.from_pylist(notes[:4]),
                    configuration={"delta.enableChangeDataFeed": "true"} if change_feed else None)
    cfg = replay.with_overrides(input={"watermark": "delta_version"})
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    assert (night_of(out)["selected"], night_of(out)["source_version"]) == (4, 0)

    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK  # nothing committed to the input since
    assert (night_of(out)["selected"], night_of(out)["skipped"], night_of(out)["source_version"]) == (0, 0, 0)

    edited = {**notes[1], "text": notes[1]["text"] + " The dose was halved."}
    DeltaTable(src).merge(pa.Table.from_pylist([edited, notes[4]]), "t.note_id = s.note_id", source_alias="s",
                          target_alias="t").when_matched_update_all().when_not_matched_insert_all().execute()
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    night = night_of(out)
    assert (night["selected"], night["skipped"], night["source_version"]) == (2, 0 if change_feed else 3, 1)
    assert sorted(table(out, "ledger")["note_id"].to_pylist()) == sorted(n["note_id"] for n in notes)
    assert_no_duplicates(out)


def test_a_failing_note_does_not_keep_stale_passthrough_values(tmp_path, spark, replay):
    """A wrong-patient correction arrives with a text edit whose extraction fails, then is retried and given up:
    the note's old rows carry the corrected patient_id from the first failed night on, and a later correction of
    the given-up note reaches them too."""
    notes = sample_notes(3)
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"max_attempts": 2})
    assert job.run(cfg, write_notes(tmp_path / "notes", notes), str(out), spark=spark) == ExitCode.OK
    first = notes[0]["note_id"]

    def patients() -> set[str]:
        return {r["patient_id"] for name in ("concepts", "relations") for r in rows(out, name) if r["note_id"] == first}

    assert patients() == {notes[0]["patient_id"]}
    corrected = [{**notes[0], "text": UNPROMPTABLE, "patient_id": "P-CORRECTED"}, *notes[1:]]
    src = write_notes(tmp_path / "notes", corrected)
    for night in range(3):  # fails, is retried and fails, is given up
        assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
        assert patients() == {"P-CORRECTED"}, night
    assert [(r["failed"], r["given_up"], r["refreshed"]) for r in runs_of(out)[1:]] == [(1, 0, 1), (1, 0, 0),
                                                                                       (0, 1, 0)]
    again = [{**corrected[0], "patient_id": "P-AGAIN"}, *notes[1:]]
    assert job.run(cfg, write_notes(tmp_path / "notes", again), str(out), spark=spark) == ExitCode.OK
    assert patients() == {"P-AGAIN"} and night_of(out)["refreshed"] == 1
    assert_no_duplicates(out)
