"""What a pass tells its operator: each task's run record (the ``runs`` table), its counts, progress lines while
the rounds run, the dry-run report, and the exit code. Counts, ids and rates only: never note text."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import TYPE_CHECKING

from notelake.jobs.extraction.faults import DEFERRED, ENGINE_ERROR, LEDGER_OUTCOMES
from notelake.udfs import schemas

if TYPE_CHECKING:
    from notelake.conf.settings import JobConfig
    from notelake.jobs.extraction.identity import ExtractionIdentity
    from notelake.jobs.extraction.plan import TaskPlan
    from notelake.jobs.warehouse import Warehouse

log = logging.getLogger("notelake.extract")

#: how often the progress thread asks the engines for their counters until they have answered a first prompt
FIRST_ANSWER_POLL_S = 0.5


class ExitCode(IntEnum):
    """The job's exit status (README, "Exit codes")."""

    OK = 0
    ERROR_RATE = 1  # a task's error rate above job.max_error_rate
    USAGE = 2  # bad config, flags, input table, model or adapter
    LOCKED = 3  # another run holds the output's lock
    WRITE_FAILED = 4  # an output table could not be written
    FAILED = 5  # any other failure
    ENGINE_ERRORS = 6  # the engines failed more than job.max_engine_error_rate of the notes: the run stopped
    TIMED_OUT = 7  # a round still running job.stop_grace_s after job.max_runtime_s was cancelled, uncommitted


@dataclass
class TaskCounts:
    """What a task's run did with its notes: the runs table's count columns, and the rounds' figures."""

    selected: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    rejected: int = 0  # rejected rows not recorded before
    tokens_in: int = 0
    tokens_out: int = 0
    deleted: int = 0
    retried: int = 0
    given_up: int = 0
    refreshed: int = 0
    stale_removed: int = 0
    no_concept: int = 0  # succeeded notes that got no concept
    windows_no_prose: int = 0  # windows answered without a model call (no prose in them)
    windows_split: int = 0  # windows whose cut answer was replaced by the answers of smaller pieces
    retry_failed: int = 0  # of ``failed``: retries of a known failure that failed again (not new failures)
    engine_errors: int = 0  # notes left for the next run because the engines failed them (not their attempts)
    retry_attempted: int = field(default=0, metadata={"column": False})  # retries that got an outcome
    deferred: int = field(default=0, metadata={"column": False})  # notes cut by the run's wall-clock limit
    rounds: list[dict] = field(default_factory=list, metadata={"column": False})  # per round: notes, seconds, ...

    def add(self, outcomes: list[dict]) -> None:
        """Count the note outcomes of a round (the stage's rows for this task)."""
        self.succeeded += sum(1 for r in outcomes if r["status"] == "succeeded")
        self.failed += sum(1 for r in outcomes if r["status"] == "failed")
        self.no_concept += sum(1 for r in outcomes if r["status"] == "succeeded" and not r["n_concepts"])
        self.tokens_in += sum(r["tokens_in"] for r in outcomes)
        self.tokens_out += sum(r["tokens_out"] for r in outcomes)
        self.windows_no_prose += sum(r["n_no_prose"] for r in outcomes)
        self.windows_split += sum(r["n_split"] for r in outcomes)
        self.engine_errors += sum(1 for r in outcomes if r["status"] == ENGINE_ERROR)
        self.deferred += sum(1 for r in outcomes if r["status"] == DEFERRED)
        retries = [r for r in outcomes if r["retry"] and r["status"] in LEDGER_OUTCOMES]
        self.retry_attempted += len(retries)
        self.retry_failed += sum(1 for r in retries if r["status"] == "failed")

    @property
    def no_concept_share(self) -> float:
        """Succeeded notes that got no concept, over the notes this run succeeded on."""
        return self.no_concept / self.succeeded if self.succeeded else 0.0

    @property
    def new_errors(self) -> int:
        """Notes that failed on their first attempt at this text and fingerprint, and newly rejected rows."""
        return self.failed - self.retry_failed + self.rejected

    @property
    def error_rate(self) -> float:
        """:attr:`new_errors` over the notes attempted for the first time and the newly rejected rows: retries of
        known failures count in neither (a quiet night that retries one known-bad note is not a failing system)."""
        total = self.succeeded + self.failed - self.retry_attempted + self.rejected
        return self.new_errors / total if total else 0.0

    @property
    def engine_error_rate(self) -> float:
        """Notes the engines failed, over the notes sent to them that got an outcome."""
        total = self.succeeded + self.failed + self.engine_errors
        return self.engine_errors / total if total else 0.0

    @property
    def left(self) -> int:
        """Selected notes this run did not extract (engine faults, the wall-clock limit, rounds not run)."""
        return self.selected - self.succeeded - self.failed

    def columns(self) -> dict[str, int]:
        """The runs table's count columns."""
        return {name: getattr(self, name) for name in COUNT_COLUMNS}


COUNT_COLUMNS = tuple(f.name for f in dataclasses.fields(TaskCounts) if f.metadata.get("column", True))


def error_brake(errors: int, rate: float, max_rate: float, min_errors: int) -> bool:
    """Whether an error rate stops the run: above ``max_rate`` and from at least ``min_errors`` errors."""
    return errors >= min_errors and rate > max_rate


def engine_brake(plans: list[TaskPlan], job) -> bool:
    """Whether the engines failed too many of the pass's notes (``job``: the JobConfig), over every task."""
    counts = [plan.counts for plan in plans]
    errors = sum(c.engine_errors for c in counts)
    sent = sum(c.succeeded + c.failed + c.engine_errors for c in counts)
    return error_brake(errors, errors / sent if sent else 0.0, job.max_engine_error_rate, job.min_errors_for_rate)


@dataclass
class RunRecord:
    """A task's row of the runs table: written ``running`` (all counts 0) when the run starts, and again when it
    ends (succeeded, failed) with its counts."""

    run_id: str
    task: str
    fingerprint: str
    model: str
    adapter: str | None
    adapter_sha256: str | None
    prompt_version: str
    git_sha: str | None
    config_json: str
    started_at: datetime
    status: str = "running"
    ended_at: datetime | None = None
    watermark: datetime | None = None  # the input.updated_at_column high-water mark this run read up to
    source_version: int | None = None  # the Delta input's version this run read up to (input.watermark delta_version)
    table_versions_json: str = "{}"
    rounds_json: str | None = None
    omop_json: str | None = None  # the pass's link and OMOP publish stats (jobs/extraction/publish.py)
    warnings_json: str | None = None  # what the run warned of (e.g. no_concept_share), a JSON list; None = nothing
    extractors_json: str | None = None  # who wrote the concepts and relations, and the figures compared
    counts: TaskCounts = field(default_factory=TaskCounts)

    @classmethod
    def start(cls, run_id: str, task: str, identity: ExtractionIdentity, git_sha: str | None, config_json: str,
              started_at: datetime) -> "RunRecord":
        """The record of a run that starts now."""
        return cls(run_id=run_id, task=task, fingerprint=identity.fingerprint, model=identity.model,
                   adapter=identity.adapter, adapter_sha256=identity.adapter_sha256,
                   prompt_version=identity.prompt_version, git_sha=git_sha, config_json=config_json,
                   started_at=started_at, extractors_json=json.dumps(identity.extractors.describe()))

    @classmethod
    def from_row(cls, row: dict) -> "RunRecord":
        """A record read back from the runs table (count columns an older table lacks read as 0)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "counts"]
        return cls(**{n: row.get(n) for n in names if n in row},
                   counts=TaskCounts(**{n: row.get(n) or 0 for n in COUNT_COLUMNS}))

    def row(self) -> dict:
        """The runs table's row (:data:`schemas.RUNS_SCHEMA`)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "counts"}
        return {**fields, **self.counts.columns()}

    def end(self, status: str, counts: TaskCounts) -> None:
        """The run ended with ``status`` and ``counts``."""
        self.status, self.ended_at, self.counts = status, schemas.utc_now(), counts


def write_records(warehouse: Warehouse, records: list[RunRecord]) -> None:
    """Insert or update the records' rows of the runs table (keyed by run id)."""
    warehouse.upsert("runs", schemas.rows_to_table([r.row() for r in records], schemas.RUNS_SCHEMA))


def succeeded_runs(warehouse: Warehouse, task: str, fingerprint: str) -> list[RunRecord]:
    """Succeeded runs of ``task`` under ``fingerprint`` (the runs table's small rows), oldest first."""
    from notelake.jobs.warehouse import read_delta_arrow

    runs = read_delta_arrow(warehouse.path("runs"), opts=warehouse.storage_options)
    if runs is None:
        return []
    rows = [r for r in runs.to_pylist()
            if r["status"] == "succeeded" and r["task"] == task and r["fingerprint"] == fingerprint]
    return [RunRecord.from_row(r) for r in sorted(rows, key=lambda r: r["started_at"])]


def estimate_seconds(history: list[RunRecord], notes: int) -> float | None:
    """ETA for ``notes`` at the notes/s of the latest succeeded run that extracted any (None without one)."""
    for record in reversed(history):
        wall = (record.ended_at - record.started_at).total_seconds() if record.ended_at else 0
        attempted = record.counts.succeeded + record.counts.failed
        if attempted > 0 and wall > 0:
            return round(notes * wall / attempted, 1)
    return None


def log_plan(plan: TaskPlan, max_attempts: int, propagate_deletes: bool) -> None:
    """One line per task before any work: what the pass will do with its notes."""
    summary = plan.summary
    log.info("run %s task=%s: %d valid notes%s: %d selected (%d retried), %d unchanged, %d given up after %d "
             "attempts, %d to refresh; %d rows rejected (%d recorded before)%s", plan.run_id, plan.name,
             summary.valid, f" (watermark {plan.since:%Y-%m-%dT%H:%M:%S}Z)" if plan.since else "", plan.selected,
             summary.actions["retry"], summary.actions["unchanged"], summary.actions["given_up"], max_attempts,
             summary.passthrough_stale, summary.rejected + summary.rejected_known, summary.rejected_known,
             f", {len(plan.gone)} deleted at the source" if propagate_deletes else "")


def dry_run_report(plan: TaskPlan, max_tokens: int | None) -> dict:
    """What a run of ``plan``'s task would do: counts, estimated prompts, output tokens and seconds."""
    summary, prompts = plan.summary, plan.prompts
    return {"run_id": plan.run_id, "task": plan.name, "selected": plan.selected, "retried": summary.actions["retry"],
            "unchanged": summary.actions["unchanged"], "given_up": summary.actions["given_up"],
            "to_refresh": summary.passthrough_stale, "rejected_new": summary.rejected,
            "rejected_known": summary.rejected_known, "stale_to_remove": summary.stale, "to_delete": len(plan.gone),
            "updated_after": plan.since.isoformat() if plan.since else None, "estimated_prompts": prompts,
            "estimated_output_tokens": prompts * (max_tokens or plan.task.max_tokens),
            "estimated_seconds": estimate_seconds(plan.history, plan.selected)}


def end_runs(plans: list[TaskPlan], finished: bool, table_versions_json: str, job: JobConfig) -> ExitCode:
    """The exit decision, once the rounds ran (``job``: the JobConfig). Each task's run ends failed when its new
    errors passed ``job.max_error_rate`` (:func:`error_brake`; retries of known failures apart), or when the
    engines failed too many of the pass's notes (:func:`engine_brake`), else succeeded, with its counts, rounds and
    watermark (:meth:`TaskPlan.next_watermark`; ``finished``: no ``--max-runtime`` stop; the watermark holds while
    notes are left for the next run). Logs a result line per task, and a warning (also in the run's
    ``warnings_json``) when at least ``job.warn_no_concept_share`` of its succeeded notes got no concept. Returns
    TIMED_OUT when the hard wall-clock limit cancelled a round, else ENGINE_ERRORS for the engines' fault, else
    ERROR_RATE when a task failed, else OK."""
    code = ExitCode.OK
    engines_failed = engine_brake(plans, job)
    for plan in plans:
        counts, record = plan.counts, plan.record
        failed = error_brake(counts.new_errors, counts.error_rate, job.max_error_rate, job.min_errors_for_rate)
        record.end("failed" if failed or engines_failed else "succeeded", counts)
        complete = finished and not counts.engine_errors and not counts.deferred
        record.watermark, record.source_version = plan.next_watermark(complete), plan.next_source_version(complete)
        record.rounds_json, record.table_versions_json = json.dumps(counts.rounds), table_versions_json
        log.info("run %s %s: %d succeeded (%d with no concept), %d failed (%d new, %d retries of known failures; "
                 "%d given up before), %d left for the next run (%d by engine faults), %d newly rejected, "
                 "%d refreshed, %d stale removed, error rate %.3f (max %.3f), engine error rate %.3f (max %.3f); "
                 "%d windows without prose, %d windows split after a cut answer", plan.run_id, record.status,
                 counts.succeeded, counts.no_concept, counts.failed, counts.failed - counts.retry_failed,
                 counts.retry_failed, counts.given_up, counts.left, counts.engine_errors, counts.rejected,
                 counts.refreshed, counts.stale_removed, counts.error_rate, job.max_error_rate,
                 counts.engine_error_rate, job.max_engine_error_rate, counts.windows_no_prose, counts.windows_split)
        record.warnings_json = warn_no_concepts(plan, job.warn_no_concept_share)
        if failed:
            log.error("task %s: error rate %.3f (%d new errors) exceeds job.max_error_rate %.3f", plan.name,
                      counts.error_rate, counts.new_errors, job.max_error_rate)
            code = ExitCode.ERROR_RATE
    if engines_failed:
        log.error("the engines failed %d notes (job.max_engine_error_rate %.3f): the notes wait for the next run",
                  sum(plan.counts.engine_errors for plan in plans), job.max_engine_error_rate)
        code = ExitCode.ENGINE_ERRORS
    if any(r.get("cancelled") for plan in plans for r in plan.counts.rounds):
        code = ExitCode.TIMED_OUT
    return code


def warn_no_concepts(plan: TaskPlan, share: float | None) -> str | None:
    """Warn when at least ``share`` of the notes ``plan``'s run succeeded on got no concept (a label set the model
    does not answer, an adapter that answers "none" to everything): the run's ``warnings_json``, None without."""
    counts = plan.counts
    if share is None or not counts.succeeded or counts.no_concept_share < share:
        return None
    log.warning("run %s task=%s: %d of %d succeeded notes (%.0f %%) got no concept (job.warn_no_concept_share "
                "%.2f): check the task's labels and the engine's adapter", plan.run_id, plan.name, counts.no_concept,
                counts.succeeded, 100 * counts.no_concept_share, share)
    return json.dumps([{"warning": "no_concept_share", "notes": counts.succeeded, "no_concept": counts.no_concept,
                        "share": round(counts.no_concept_share, 4), "threshold": share}])


class Progress:
    """Progress lines while the rounds run: the first as soon as the engines have answered a prompt (their
    counters are polled every :data:`FIRST_ANSWER_POLL_S` until then), then one every ``interval_s``. A line holds
    notes committed / selected, prompts answered against the estimate, prompts/s, output tokens/s, engine errors
    and an ETA; counts and rates only."""

    def __init__(self, pool, interval_s: float, notes: int, prompts: int, counts: list[TaskCounts]):
        self.pool, self.interval_s, self.notes, self.prompts, self.counts = pool, interval_s, notes, prompts, counts
        self.base = pool.counts()
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="notelake-progress", daemon=True)

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def answered(self) -> dict[str, int]:
        """Requests, output tokens and errors the engines answered since this progress began."""
        now = self.pool.counts()
        return {k: now[k] - self.base.get(k, 0) for k in now}

    def _report(self) -> None:
        wait = min(FIRST_ANSWER_POLL_S, self.interval_s)
        while not self._stop.wait(wait):
            done = self.answered()
            if wait < self.interval_s and not (done["requests"] or done["errors"]):
                continue  # no answer yet: a line of zeros says nothing
            wait = self.interval_s
            elapsed = time.monotonic() - self.t0
            rate = done["requests"] / elapsed if elapsed else 0.0
            eta = (self.prompts - done["requests"]) / rate if rate else float("nan")
            failed = sum(c.failed for c in self.counts)
            log.info("progress: %d/%d notes committed, %d/~%d prompts, %.2f prompts/s, %.1f output tok/s, "
                     "%d engine errors, %d notes failed, ETA %.0fs", sum(c.succeeded for c in self.counts) + failed,
                     self.notes, done["requests"], self.prompts, rate, done["output_tokens"] / max(elapsed, 1e-9),
                     done["errors"], failed, max(eta, 0.0))
