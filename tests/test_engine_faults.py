"""Engine faults are the engine's, not the notes' (issue 35 items 2, 4, 7, 14), on the real local stack: Spark, Ray,
the REPLAY engine in a real Ray actor (only the data plane matters here), deltalake.

* An engine actor killed for good mid-run: no note fails or is given up for it; the notes left are recorded as
  engine errors, the run stops with exit 6, and a rerun completes them.
* An engine actor stopped (SIGSTOP) mid-run: its calls time out, it is restarted, and every note succeeds.
* A stopped engine and ``--max-runtime``: the run ends at its wall-clock limit with what was committed.
* Executors stuck outside the engine calls past ``--max-runtime`` and ``job.stop_grace_s``: the round is cancelled
  uncommitted (exit 7), earlier rounds stay, a rerun completes the rest.
* Two jobs at once on one Ray: each pass has its own engine actors.
* A reused Spark Python worker finds engines killed and made again under the same names (not the dead ones).
* The error-rate brake counts new failures over first attempts, with a minimum count; ``--retry-given-up``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from jobkit import assert_no_duplicates, job_settings, rows, sample_notes, table, write_notes

from notelake.jobs.extraction import job
from notelake.jobs.extraction.given_up import GivenUpSelection
from notelake.jobs.extraction.report import ExitCode
from notelake.models.actor import ACTOR_PREFIX, actor_names, engine_config_hash

# too many tokens for a 1 024-token context: the engine refuses the chunk (prompt_too_long), the note's own fault
# (words, not one run of 900 characters: a window without prose gets the empty answer with no model call)
UNPROMPTABLE = " ".join(["鑫淼焱垚"] * 200)


@pytest.fixture(scope="module")
def replay(settings, ray_address, base_model_path):
    """REPLAY settings whose passes start their own engine actors (ray.engine_scope pass), small enough to sit
    beside the session's vLLM actor; rounds of two notes, so a fault can land mid-run."""
    return job_settings(settings, round_notes=2, min_errors_for_rate=1).with_overrides(
        engine={"backend": "replay", "max_model_len": 1024},
        ray={"engine_scope": "pass", "num_cpus_per_actor": 0.25, "batch_size": 2})


def pass_actors(settings) -> list[str]:
    """Names of the live engine actors some pass owns, for ``settings``' engine config."""
    prefix = f"{ACTOR_PREFIX}-{engine_config_hash(settings.engine)}-"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix) and a["name"].count("-") > prefix.count("-") + 1)


def when_first_round_committed(out, settings, timeout_s: float = 120):
    """The handle of the pass's engine actor, once the run committed its first round."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = pass_actors(settings)
        if names and (out / "ledger" / "_delta_log").is_dir():
            return ray.get_actor(names[0], namespace=settings.ray.namespace)
        time.sleep(0.2)
    raise AssertionError("the run committed no round in time")


@contextlib.contextmanager
def stopped(pid: int, wake_after_s: float = 120):
    """SIGSTOP ``pid`` for the block. A run that never gives up on the stopped engine would hang: the process is
    woken after ``wake_after_s`` so that the test fails on its timing instead."""
    os.kill(pid, signal.SIGSTOP)
    waker = threading.Timer(wake_after_s, lambda: os.path.exists(f"/proc/{pid}") and os.kill(pid, signal.SIGCONT))
    waker.start()
    try:
        yield
    finally:
        waker.cancel()


def ledger_statuses(out) -> dict[str, tuple[str, int]]:
    return {r["note_id"]: (r["status"], r["attempts"]) for r in table(out, "ledger").to_pylist()}


def test_killed_engine_actor_leaves_notes_for_the_next_run(tmp_path, spark, replay):
    notes = sample_notes(12)
    src, out = write_notes(tmp_path / "notes", notes), tmp_path / "warehouse"
    with ThreadPoolExecutor(1) as pool:
        night = pool.submit(job.run, replay, src, str(out), spark=spark)
        ray.kill(when_first_round_committed(out, replay), no_restart=True)  # lost for good, like its node
        assert night.result(timeout=300) == ExitCode.ENGINE_ERRORS

    ledger = ledger_statuses(out)
    assert 1 <= len(ledger) < 12 and set(ledger.values()) == {("succeeded", 1)}  # no note failed or given up
    engine_errors = [e for e in rows(out, "errors") if e["stage"] == "engine"]
    assert engine_errors and {e["error_type"] for e in engine_errors} == {"engine_unavailable"}
    assert {e["note_id"] for e in engine_errors}.isdisjoint(ledger)
    (run,) = table(out, "runs").to_pylist()
    assert (run["status"], run["failed"], run["given_up"]) == ("failed", 0, 0)
    assert run["engine_errors"] == len({e["note_id"] for e in engine_errors}) >= 1
    assert not pass_actors(replay)  # the pass stopped its own actors

    assert job.run(replay, src, str(out), spark=spark) == ExitCode.OK  # a fresh pass, fresh actors
    assert ledger_statuses(out) == {n["note_id"]: ("succeeded", 1) for n in notes}
    assert_no_duplicates(out)


def test_stopped_engine_actor_is_restarted_and_no_note_fails(tmp_path, spark, replay):
    notes = sample_notes(12)
    src, out = write_notes(tmp_path / "notes", notes), tmp_path / "warehouse"
    cfg = replay.with_overrides(ray={"call_timeout_s": 3})
    with ThreadPoolExecutor(1) as pool:
        night = pool.submit(job.run, cfg, src, str(out), spark=spark)
        pid = ray.get(when_first_round_committed(out, cfg).pid.remote())
        with stopped(pid):
            t0 = time.monotonic()
            assert night.result(timeout=300) == ExitCode.OK
            assert time.monotonic() - t0 < 100
    assert not os.path.exists(f"/proc/{pid}")  # the stopped process was killed and the actor restarted
    assert ledger_statuses(out) == {n["note_id"]: ("succeeded", 1) for n in notes}
    assert not [e for e in rows(out, "errors") if e["stage"] == "engine"]  # the retries succeeded
    assert_no_duplicates(out)


def test_max_runtime_ends_a_run_whose_engine_hangs(tmp_path, spark, replay):
    """The engine stops and never times out (ray.call_timeout_s 600): --max-runtime still ends the run, cleanly."""
    notes = sample_notes(12)
    src, out = write_notes(tmp_path / "notes", notes), tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"max_runtime_s": 15, "round_notes": 1})
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        night = pool.submit(job.run, cfg, src, str(out), spark=spark)
        pid = ray.get(when_first_round_committed(out, cfg).pid.remote())
        with stopped(pid):
            assert night.result(timeout=300) == ExitCode.OK  # a --max-runtime stop: the rest waits
            assert time.monotonic() - t0 < 100
    ledger = ledger_statuses(out)
    assert 1 <= len(ledger) < 12 and set(ledger.values()) == {("succeeded", 1)}
    assert not [e for e in rows(out, "errors") if e["stage"] == "engine"]  # cut by the limit: no error
    (run,) = table(out, "runs").to_pylist()
    assert (run["status"], run["failed"], run["engine_errors"]) == ("succeeded", 0, 0)

    assert job.run(replay, src, str(out), spark=spark) == ExitCode.OK
    assert ledger_statuses(out) == {n["note_id"]: ("succeeded", 1) for n in notes}
    assert_no_duplicates(out)


def spark_python_workers() -> list[int]:
    """The Python workers of this process's Spark: children of the Python daemon (``notelake.jobs.spark_daemon``)
    that the JVM this process started runs."""
    parents, daemons = {}, set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if b"notelake.jobs.spark_daemon" in f.read():
                    daemons.add(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return [pid for pid in daemons if parents[pid] in daemons and parents.get(parents[parents[pid]]) == os.getpid()]


@contextlib.contextmanager
def frozen_python_workers():
    """SIGSTOP every Python worker of this process's Spark, and each one forked later, until the block ends: tasks
    stuck in their Python code (the daemon that forks them, and kills them for Spark, keeps running)."""
    frozen, done = set(), threading.Event()

    def freeze() -> None:
        while not done.is_set():
            for pid in set(spark_python_workers()) - frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    frozen.add(pid)
            time.sleep(0.02)

    freezer = threading.Thread(target=freeze, daemon=True)
    freezer.start()
    try:
        yield
    finally:
        done.set()
        freezer.join()
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_a_round_stuck_past_max_runtime_and_its_grace_is_cancelled_uncommitted(tmp_path, spark, replay):
    """The executors' Python processes stop mid-round (no engine call left to time out): job.stop_grace_s after
    --max-runtime the round is cancelled, nothing of it committed (exit 7); the next run extracts what is left."""
    notes = sample_notes(12)
    src, out = write_notes(tmp_path / "notes", notes), tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"max_runtime_s": 20, "stop_grace_s": 2, "round_notes": 1})
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        night = pool.submit(job.run, cfg, src, str(out), spark=spark)
        when_first_round_committed(out, cfg)
        with frozen_python_workers():
            assert night.result(timeout=120) == ExitCode.TIMED_OUT
            assert time.monotonic() - t0 < 60
    ledger = ledger_statuses(out)
    assert 1 <= len(ledger) < 12 and set(ledger.values()) == {("succeeded", 1)}
    (run,) = table(out, "runs").to_pylist()
    assert run["status"] == "succeeded" and run["rounds_json"].count('"cancelled": true') == 1
    assert {r["note_id"] for r in rows(out, "concepts")} <= set(ledger)  # the cancelled round left no row

    assert job.run(replay, src, str(out), spark=spark) == ExitCode.OK
    assert ledger_statuses(out) == {n["note_id"]: ("succeeded", 1) for n in notes}
    assert_no_duplicates(out)


def test_a_reused_worker_finds_engines_made_again_under_the_same_names(replay):
    """An executor's Python worker keeps its engine handle between passes; when the actors are killed and made
    again under the same names, the next pass's handle reaches the new actors, not the dead ones."""
    from notelake.jobs.extraction.stage import StageContext, _executor_pool
    from notelake.models.actor import EnginePool, ensure_ray
    from notelake.models.engine import GenerationRequest

    cfg = replay.with_overrides(ray={"namespace": "notelake-remade-engines", "engine_scope": "cluster"})
    gcs_address = ensure_ray(cfg.ray)
    request = GenerationRequest("r1", [{"role": "user", "content": "Aspirin caused a rash."}], max_tokens=16)

    def answer(pool) -> str | None:
        ctx = StageContext(settings=cfg, tasks={}, lineages={}, staging_dir="", passthrough=(),
                           gcs_address=gcs_address, engine_actor_ids=pool.actor_ids())
        (result,) = _executor_pool(ctx).generate([request])
        return result.error

    first = EnginePool.get_or_create(cfg).ready()
    assert answer(first) is None
    first_ids = first.actor_ids()
    first.shutdown()
    second = EnginePool.get_or_create(cfg).ready()
    try:
        assert second.names == actor_names(cfg) and second.actor_ids() != first_ids
        assert answer(second) is None  # a handle to the first pool's actors would answer engine_unavailable
    finally:
        second.shutdown()


def test_two_jobs_at_once_on_one_ray_have_their_own_engines(tmp_path, spark, replay):
    notes = sample_notes(12)
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(pass_actors(replay))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(job.run, replay, write_notes(tmp_path / "a", notes[:4]), str(tmp_path / "out-a"),
                                spark=spark)
            second = pool.submit(job.run, replay, write_notes(tmp_path / "b", notes), str(tmp_path / "out-b"),
                                 spark=spark)
            assert first.result(timeout=300) == ExitCode.OK  # ends first, stopping its own actors only
            assert second.result(timeout=300) == ExitCode.OK
    finally:
        stop.set()
        watcher.join()
    assert len(seen) == 2  # one actor per pass, named after it
    assert set(ledger_statuses(tmp_path / "out-a").values()) == {("succeeded", 1)}
    assert ledger_statuses(tmp_path / "out-b") == {n["note_id"]: ("succeeded", 1) for n in notes}
    assert not pass_actors(replay)


def test_known_failures_do_not_trip_the_brake_and_given_up_notes_can_be_retried(tmp_path, spark, replay):
    notes = [*sample_notes(3), {"note_id": "bad", "text": UNPROMPTABLE}]
    src, out = write_notes(tmp_path / "notes", notes), tmp_path / "warehouse"
    cfg = replay.with_overrides(job={"max_error_rate": 0.1, "max_attempts": 2, "min_errors_for_rate": 2})
    # night 1: one new failure of four (0.25 > 0.1), but fewer than job.min_errors_for_rate: a few bad notes
    assert job.run(cfg, src, str(out), spark=spark) == ExitCode.OK
    strict = cfg.with_overrides(job={"min_errors_for_rate": 1})
    # night 2: only the known failure is retried: nothing new failed, however strict the brake
    assert job.run(strict, src, str(out), spark=spark) == ExitCode.OK
    runs = sorted(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])
    assert [(r["failed"], r["retry_failed"]) for r in runs] == [(1, 0), (1, 1)]
    assert ledger_statuses(out)["bad"] == ("failed", 2)  # given up now
    assert job.run(strict, src, str(out), spark=spark) == ExitCode.OK
    last = max(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])
    assert (last["selected"], last["given_up"]) == (0, 1)

    # --retry-given-up by error type (a refused prompt is recorded as engine_error of stage generate, the note's
    # own): the note is selected again, as a retry of a known failure, fails and is given up again
    by_type = GivenUpSelection.parse("error_type=engine_error")
    assert job.run(strict, src, str(out), spark=spark, retry_given_up=by_type) == ExitCode.OK
    last = max(table(out, "runs").to_pylist(), key=lambda r: r["started_at"])
    assert (last["selected"], last["failed"], last["retry_failed"]) == (1, 1, 1)
    assert ledger_statuses(out)["bad"] == ("failed", 1)
    # a new failing note with a strict brake still fails the run
    new_bad = write_notes(tmp_path / "notes2", [*notes, {"note_id": "bad2", "text": UNPROMPTABLE}])
    assert job.run(strict, new_bad, str(out), spark=spark) == ExitCode.ERROR_RATE


def test_engine_faults_are_told_from_the_notes_own_errors():
    from notelake.jobs.extraction.faults import DEFERRED, ENGINE_ERROR, deferral
    from notelake.models.engine import engine_fault, error_result

    assert engine_fault("engine_unavailable") == "engine_unavailable"
    assert engine_fault("engine_timeout: no request finished in 600 s") == "engine_timeout"
    assert engine_fault("engine_rejected: EngineDeadError") == "engine_error"  # vLLM's engine died
    assert engine_fault("engine_rejected: ValueError") is None  # vLLM refused this request: the note's
    assert engine_fault("prompt_too_long: 2000 prompt tokens > ...") is None
    assert engine_fault(None) is None
    ok, dead = error_result("a", "x"), error_result("b", "engine_unavailable: ActorDiedError")
    assert deferral([ok]) is None
    assert deferral([ok, dead]) == ENGINE_ERROR
    assert deferral([dead, error_result("c", "deadline_passed")]) == DEFERRED


def test_retry_given_up_selection():
    assert GivenUpSelection.parse("all") == GivenUpSelection()
    assert GivenUpSelection.parse("error_type=truncated_output") == GivenUpSelection(error_type="truncated_output")
    assert GivenUpSelection.parse(" n1, n2,n1 ") == GivenUpSelection(note_ids=("n1", "n2"))
    for bad in ("", " , ", "error_type="):
        with pytest.raises(ValueError):
            GivenUpSelection.parse(bad)


def test_error_brake_needs_a_minimum_count():
    from notelake.jobs.extraction.report import TaskCounts, error_brake

    quiet = TaskCounts(selected=1, failed=1, retry_failed=1, retry_attempted=1)  # one known-bad note retried
    assert quiet.new_errors == 0 and quiet.error_rate == 0.0
    night = TaskCounts(selected=26, succeeded=25, failed=1)
    assert night.error_rate == pytest.approx(1 / 26)
    assert not error_brake(1, 1.0, 0.2, 5) and error_brake(5, 0.25, 0.2, 5)
