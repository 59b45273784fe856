"""One run at a time on an output that lives on an object store: a heartbeat lease in a small Delta table.

``<output>/_notelake_lease`` holds one row: which run holds the output (its pass id, host and pid), since when,
and until when (``expires_at``). Every change -- taking the lease, each renewal, the release -- rewrites that row
in a commit made from the version just read with **no commit retries**: delta-rs writes the next log entry with
a put-if-absent (S3 ``If-None-Match: *``, GCS and Azure preconditions, an atomic link on local disk), so of two
writers that read the same version exactly one commits and the other gets ``CommitFailedError``. The lease is a
compare-and-swap on the Delta log: it needs no other client, credentials or service than the output tables'
own, and it is exactly as safe as their commits on that store.

* :meth:`OutputLease.acquire` takes the lease when nobody holds it, its holder released it, or it expired (the
  holder died or stalled); otherwise it polls until ``timeout_s`` and raises :class:`LockedError` (exit 3).
  After taking over an expired lease, :attr:`OutputLease.taken_over` names the run that held it (dead: the
  caller recovers it).
* A daemon thread renews the lease every ``ttl_s / 4``. A renewal that finds another holder's row marks the
  lease lost.
* :meth:`OutputLease.check` is the fence the output tables call before each commit: it raises
  :class:`LeaseLostError` once the lease was taken over, or once the holder's own clock says the last renewal is
  older than ``ttl_s - ttl_s / 4`` (a stalled holder stops committing before another run may take the lease,
  given host clocks closer than ``ttl_s / 4``). A commit under way when the lease is lost is not undone.
* :meth:`OutputLease.release` marks the row released (the next run takes it at once) after vacuuming the files
  older renewals left.

The table checkpoints every 50 commits and drops log entries older than a day, so a lease renewed all night stays
a handful of small files.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

import pyarrow as pa

from notelake.jobs.guards import LockedError

log = logging.getLogger("notelake.lease")

LEASE_TABLE = "_notelake_lease"
DEFAULT_TTL_S = 120.0
_TIMESTAMP = pa.timestamp("us", tz="UTC")
LEASE_SCHEMA = pa.schema([
    pa.field("holder", pa.string(), nullable=False),  # the run's pass id
    pa.field("owner", pa.string(), nullable=False),  # host:pid, for an operator
    pa.field("acquired_at", _TIMESTAMP, nullable=False),
    pa.field("expires_at", _TIMESTAMP, nullable=False),
    pa.field("renewals", pa.int64(), nullable=False),
    pa.field("released", pa.bool_(), nullable=False),
])
_TABLE_CONFIGURATION = {"delta.checkpointInterval": "50", "delta.logRetentionDuration": "interval 1 days"}


class LeaseLostError(LockedError):
    """The run no longer holds its output's lease (taken over after it expired): it must not commit anything."""


@dataclass(frozen=True)
class LeaseRecord:
    """The lease row: who holds the output and until when."""

    holder: str
    owner: str
    acquired_at: datetime
    expires_at: datetime
    renewals: int = 0
    released: bool = False

    def free(self, now: datetime) -> bool:
        """True when another run may take the lease: released, or not renewed before it expired."""
        return self.released or self.expires_at <= now

    def describe(self) -> str:
        return f"run {self.holder} on {self.owner} (until {self.expires_at:%Y-%m-%dT%H:%M:%S}Z)"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _unsafe_commits(opts: dict[str, str]) -> bool:
    """True when the options turn off delta-rs's put-if-absent on S3: commits (and so the lease) may then
    overwrite each other."""
    return str(opts.get("AWS_S3_ALLOW_UNSAFE_RENAME", "")).strip().lower() in ("1", "true", "yes", "on")


class OutputLease:
    """The exclusive lease of one run (``holder``: its pass id) on ``output`` (a path or URI); a context manager.

    ``timeout_s``: how long :meth:`acquire` waits for another holder; ``ttl_s``: how long the lease outlives its
    last renewal (a killed run blocks the output this long at most); ``poll_s``: how often a waiting run looks.
    """

    def __init__(self, output: str, holder: str, *, timeout_s: float = 0.0, ttl_s: float = DEFAULT_TTL_S,
                 poll_s: float = 1.0, storage_options: dict[str, str] | None = None):
        from notelake.jobs import storage

        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, not {ttl_s}")
        self.output, self.holder = output, holder
        self.path = storage.join(output, LEASE_TABLE)
        self.timeout_s, self.ttl_s, self.poll_s = timeout_s, ttl_s, poll_s
        self.heartbeat_s = ttl_s / 4
        self.storage_options = dict(storage_options or {})  # credentials: never logged
        self.taken_over: LeaseRecord | None = None  # the expired lease this one replaced (a dead run)
        self._record: LeaseRecord | None = None  # the row as this holder last wrote it
        self._valid_until = 0.0  # time.monotonic() after which this holder stops trusting its lease
        self._lost: LeaseRecord | None = None  # the row that replaced ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one writer of the row at a time in this process (heartbeat vs release)

    # ------------------------------------------------------------------------------------------------- public
    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._record is not None and self._lost is None and time.monotonic() < self._valid_until

    def acquire(self) -> "OutputLease":
        """Take the lease (waiting up to ``timeout_s``) and start renewing it; :class:`LockedError` when another
        run still holds it after the wait."""
        if _unsafe_commits(self.storage_options):
            log.warning("AWS_S3_ALLOW_UNSAFE_RENAME is set: Delta commits on %s are not put-if-absent, so the lease "
                        "cannot keep a second run out (the scheduler must)", self.output)
        deadline = time.monotonic() + self.timeout_s
        while True:
            table, current = self._read()
            now = _now()
            if current is None or current.free(now):
                mine = LeaseRecord(self.holder, f"{socket.gethostname()}:{os.getpid()}", now,
                                   now + timedelta(seconds=self.ttl_s))
                if self._swap(table, mine):
                    self.taken_over = current if current is not None and not current.released else None
                    break
                continue  # another run took it between our read and our commit: look again
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockedError(f"another run holds the lease on {self.output}: {current.describe()} (waited "
                                  f"{self.timeout_s:.0f} s; raise job.lock_timeout_s to wait longer)")
            time.sleep(min(self.poll_s, left))
        if self.taken_over is not None:
            log.warning("took over the lease on %s from %s, which expired without a release (that run died or "
                        "stalled)", self.output, self.taken_over.describe())
        self._thread = threading.Thread(target=self._heartbeat, name="notelake-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """The fence before a commit: :class:`LeaseLostError` unless this run still holds the lease."""
        if self._lost is not None:
            raise LeaseLostError(f"the lease on {self.output} was taken over by {self._lost.describe()}: this run "
                                 "commits nothing more")
        if self._record is None:
            raise LeaseLostError(f"run {self.holder} does not hold the lease on {self.output}")
        if time.monotonic() >= self._valid_until:
            raise LeaseLostError(f"the lease on {self.output} was not renewed for {self.ttl_s - self.heartbeat_s:.0f}"
                                 " s (storage unreachable or the process stalled): another run may hold it now, so "
                                 "this run commits nothing more")

    def release(self) -> None:
        """Stop renewing, vacuum the files of earlier renewals and mark the lease released (best effort: a lease
        that cannot be released expires ``ttl_s`` after its last renewal)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        with self._lock:
            if self._record is not None and self._lost is None:
                try:
                    self._vacuum()
                    self._write_next(replace(self._record, released=True, expires_at=_now()))
                except Exception as exc:  # noqa: BLE001 - never mask the run's outcome; the lease expires anyway
                    log.warning("could not release the lease on %s (%s); it expires at %s", self.output,
                                type(exc).__name__, f"{self._record.expires_at:%H:%M:%S}Z")
            self._record = None

    # ------------------------------------------------------------------------------------------------ private
    def _read(self):
        """(the table at its latest version or None, the lease row or None). A read that fails because a
        release vacuumed the files under it is retried."""
        from deltalake import DeltaTable
        from deltalake.exceptions import DeltaError, TableNotFoundError

        for attempt in range(5):
            try:
                table = DeltaTable(self.path, storage_options=self.storage_options or None)
                rows = table.to_pyarrow_table().to_pylist()
            except TableNotFoundError:
                return None, None
            except (OSError, DeltaError):
                if attempt == 4:
                    raise
                time.sleep(0.2)
                continue
            if not rows:
                return table, None
            row = max(rows, key=lambda r: (r["acquired_at"], r["renewals"]))
            return table, LeaseRecord(**row)
        raise AssertionError("unreachable")

    def _swap(self, table, record: LeaseRecord) -> bool:
        """Write ``record`` as the next version after ``table`` (None: create the table); False when another
        writer committed first; the write's own error when nobody did (storage unreachable, permissions). On
        success this run holds the lease as ``record`` says."""
        from deltalake import CommitProperties, write_deltalake
        from deltalake.exceptions import CommitFailedError, DeltaError

        started = time.monotonic()
        base = None if table is None else table.version()
        data = pa.Table.from_pylist([vars(record)], schema=LEASE_SCHEMA)
        no_retry = CommitProperties(custom_metadata={"notelake.lease": record.holder}, max_commit_retries=0)
        try:
            if table is None:  # "error": refuse a table another run created since our read
                write_deltalake(self.path, data, mode="error", configuration=_TABLE_CONFIGURATION,
                                commit_properties=no_retry, storage_options=self.storage_options or None)
            else:
                write_deltalake(table, data, mode="overwrite", commit_properties=no_retry)
        except (CommitFailedError, DeltaError, OSError):
            # a lost race, an answer lost on the way back after the write landed, or a failed write: the table
            # after it says which
            after, now = self._read()
            if now != record:
                if (None if after is None else after.version()) == base:
                    raise  # nobody committed: our write failed on its own
                return False
        self._record = record
        self._valid_until = started + self.ttl_s - self.heartbeat_s
        return True

    def _write_next(self, record: LeaseRecord) -> None:
        """Replace our row with ``record``, provided the row is still ours; marks the lease lost otherwise."""
        for _ in range(3):
            table, current = self._read()
            if current != self._record:
                self._lost = current
                log.error("lost the lease on %s to %s", self.output, current.describe() if current else "nobody")
                return
            if self._swap(table, record):
                return
            # our row, but the version moved (a vacuum commit): read again
        raise RuntimeError(f"lease on {self.output}: the table kept moving under this run's renewal")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                if self._record is None or self._lost is not None:
                    return
                now = _now()
                try:
                    self._write_next(replace(self._record, expires_at=now + timedelta(seconds=self.ttl_s),
                                             renewals=self._record.renewals + 1))
                except Exception as exc:  # noqa: BLE001 - storage hiccup: the next beat tries again, check() guards
                    log.warning("lease renewal on %s failed (%s); retrying in %.0f s", self.output,
                                type(exc).__name__, self.heartbeat_s)
                if self._lost is not None:
                    return

    def _vacuum(self) -> None:
        """Delete the files of earlier renewals (only the current row's file is live)."""
        from deltalake import DeltaTable

        DeltaTable(self.path, storage_options=self.storage_options or None).vacuum(
            retention_hours=0, dry_run=False, enforce_retention_duration=False)
