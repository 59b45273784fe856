"""The output lease (jobs/lease.py) on moto's S3 server and on local disk, with real holder processes: a second run
waits or fails, a killed holder's lease expires and the next run recovers exactly that run, a stalled holder whose
lease was taken over commits nothing, recovery on one output leaves another output's staged rows alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from s3server import BUCKET, s3_server

from notelake.jobs import storage
from notelake.jobs.guards import LockedError, RunLock, output_lock
from notelake.jobs.lease import LEASE_TABLE, LeaseLostError, OutputLease
from notelake.jobs.warehouse import open_warehouse, read_delta_arrow
from notelake.udfs import schemas

CONCEPTS = pa.schema([("note_id", pa.string()), ("concept_id", pa.string()), ("task", pa.string()),
                      ("note_bucket", pa.int32()), ("run_id", pa.string())])

# A run's driver, reduced to what the lease guards: it takes the lease, records itself `running`, commits the
# concepts of a first-time note (no ledger row yet: the worst moment to die), stages a file, then obeys stdin.
HOLDER = r"""
import json, os, sys
from datetime import datetime, timezone
import pyarrow as pa
from notelake.jobs import storage
from notelake.jobs.guards import output_lock
from notelake.jobs.warehouse import open_warehouse
from notelake.udfs import schemas

output, holder, ttl, staging = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] or None
opts = json.loads(os.environ["LEASE_TEST_OPTS"])
concepts = pa.schema([("note_id", pa.string()), ("concept_id", pa.string()), ("task", pa.string()),
                      ("note_bucket", pa.int32()), ("run_id", pa.string())])
with output_lock(output, holder, 0, opts, ttl_s=ttl, mode="lease") as lock:
    wh = open_warehouse(output, {"notelake.run_id": holder}, opts, fence=lock.check)
    row = {f.name: None for f in schemas.RUNS_SCHEMA}
    row.update(run_id=holder, task="phee", fingerprint="f", status="running", model="m", prompt_version="p",
               config_json="{}", table_versions_json="{}", started_at=datetime.now(timezone.utc),
               **{k: 0 for k in ("selected", "succeeded", "failed", "skipped", "rejected", "tokens_in", "tokens_out")})
    wh.upsert("runs", schemas.rows_to_table([row], schemas.RUNS_SCHEMA))
    wh.append("concepts", pa.Table.from_pylist([{"note_id": f"{holder}-n", "concept_id": f"{holder}-c", "task": "phee",
                                                 "note_bucket": 1, "run_id": holder}], schema=concepts))
    storage.write_text(storage.join(wh.staging_root(staging), holder, "round-00001", "part.txt"), "staged", opts)
    print("held", flush=True)
    for command in sys.stdin:
        if command.strip() == "commit":
            try:
                wh.append("concepts", pa.Table.from_pylist([{"note_id": f"{holder}-late", "concept_id": f"{holder}-late",
                                                             "task": "phee", "note_bucket": 2, "run_id": holder}],
                                                           schema=concepts))
                print("committed", flush=True)
            except Exception as exc:
                print(f"refused {type(exc).__name__}", flush=True)
        elif command.strip() == "release":
            break
print("released", flush=True)
"""


@pytest.fixture(scope="module")
def s3_opts():
    with s3_server() as opts:
        yield opts


def s3_output() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex}/warehouse"


class Holder:
    """A holder process (HOLDER above) on ``output``; ``staging``: a shared ``storage.staging`` or None."""

    def __init__(self, output: str, name: str, ttl_s: float, opts: dict, staging: str | None = None):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, output, name, str(ttl_s), staging or ""],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "LEASE_TEST_OPTS": json.dumps(opts)})
        assert self.proc.stdout.readline().strip() == "held"

    def send(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def staged(output: str, name: str, opts: dict, staging: str | None = None) -> bool:
    wh = open_warehouse(output, {}, opts)
    return storage.exists(storage.join(wh.staging_root(staging), name, "round-00001", "part.txt"), opts)


def run_row(run_id: str, status: str) -> dict:
    row = {f.name: None for f in schemas.RUNS_SCHEMA}
    row.update(run_id=run_id, task="phee", fingerprint="f", status=status, model="m", prompt_version="p",
               config_json="{}", table_versions_json="{}", started_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
               ended_at=datetime(2026, 1, 1, 1, tzinfo=timezone.utc),
               **{k: 0 for k in ("selected", "succeeded", "failed", "skipped", "rejected", "tokens_in", "tokens_out")})
    return row


def test_a_second_run_waits_then_fails_while_the_first_renews_its_lease(s3_opts):
    """Two runs on one s3:// output: the second waits job.lock_timeout_s (longer than the lease's ttl: only the
    first run's renewals keep it out) and fails with LockedError, touching nothing of the first run; once the first
    releases, a waiting run takes the lease at once, with nothing to recover."""
    output = s3_output()
    first = Holder(output, "pass-1", ttl_s=4.0, opts=s3_opts)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockedError, match="another run holds the lease .* run pass-1"):
            OutputLease(output, "pass-2", timeout_s=9.0, ttl_s=4.0, poll_s=0.2, storage_options=s3_opts).acquire()
        assert time.monotonic() - t0 >= 9.0
        assert staged(output, "pass-1", s3_opts)  # nothing of the first run's staging removed
        assert first.send("commit") == "committed"  # and the first run still holds its output

        second = OutputLease(output, "pass-2", timeout_s=30.0, ttl_s=2.0, poll_s=0.2, storage_options=s3_opts)
        waiter = threading.Thread(target=second.acquire)
        waiter.start()
        time.sleep(1.0)
        assert first.send("release") == "released"
        waiter.join(timeout=30)
        assert second.held and second.taken_over is None  # a released lease: no dead run to recover
        second.release()
    finally:
        first.close()


def test_a_killed_holders_lease_expires_and_the_next_run_recovers_exactly_that_run(s3_opts):
    """SIGKILL a run that committed a first-time note's concepts but not its ledger row. Until its lease expires
    the next run is refused and nothing is touched; then the next run takes the lease over, learns which run died,
    and its recovery abandons that run, removes its rows and its staging -- and leaves the earlier runs' rows and
    another output's staging (same shared storage.staging) alone."""
    root = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    output, other, staging = f"{root}/warehouse", f"{root}/other", f"{root}/staging"
    wh = open_warehouse(output, {}, s3_opts)
    wh.upsert("runs", schemas.rows_to_table([run_row("earlier", "succeeded"), run_row("older", "abandoned")],
                                            schemas.RUNS_SCHEMA))
    wh.append("concepts", pa.Table.from_pylist([{"note_id": "kept", "concept_id": "kept-c", "task": "phee",
                                                 "note_bucket": 1, "run_id": "earlier"}], schema=CONCEPTS))
    neighbour = Holder(other, "other-pass", ttl_s=30.0, opts=s3_opts, staging=staging)
    dead = Holder(output, "dead-pass", ttl_s=5.0, opts=s3_opts, staging=staging)
    try:
        os.kill(dead.proc.pid, signal.SIGKILL)
        dead.close()
        with pytest.raises(LockedError):  # the lease outlives its holder by up to ttl_s
            OutputLease(output, "next-pass", timeout_s=0, ttl_s=5.0, storage_options=s3_opts).acquire()
        assert staged(output, "dead-pass", s3_opts, staging)

        with OutputLease(output, "next-pass", timeout_s=30.0, ttl_s=5.0, poll_s=0.2,
                         storage_options=s3_opts) as lease:
            assert lease.taken_over is not None and lease.taken_over.holder == "dead-pass"
            wh = open_warehouse(output, {"notelake.run_id": "next-pass"}, s3_opts, fence=lease.check)
            abandoned, repaired = wh.recover(wh.staging_root(staging))
        assert (abandoned, repaired) == (["dead-pass"], 1)
        status = {r["run_id"]: r["status"] for r in read_delta_arrow(wh.path("runs"), opts=s3_opts).to_pylist()}
        assert status == {"earlier": "succeeded", "older": "abandoned", "dead-pass": "abandoned"}
        concepts = read_delta_arrow(wh.path("concepts"), opts=s3_opts).to_pylist()
        assert [r["note_id"] for r in concepts] == ["kept"]
        assert not staged(output, "dead-pass", s3_opts, staging)
        assert staged(other, "other-pass", s3_opts, staging)  # the other output's run keeps its staged rows
        assert neighbour.send("commit") == "committed"
    finally:
        neighbour.close()


def test_a_stalled_holder_whose_lease_was_taken_over_commits_nothing(s3_opts):
    """A holder stopped (SIGSTOP: a long pause, a partition) past its lease's expiry is replaced; when it wakes,
    its next commit is refused by the fence, and the new holder keeps the lease."""
    output = s3_output()
    stalled = Holder(output, "stalled-pass", ttl_s=2.0, opts=s3_opts)
    try:
        os.kill(stalled.proc.pid, signal.SIGSTOP)
        with OutputLease(output, "next-pass", timeout_s=30.0, ttl_s=20.0, poll_s=0.2,
                         storage_options=s3_opts) as lease:
            assert lease.taken_over.holder == "stalled-pass"
            os.kill(stalled.proc.pid, signal.SIGCONT)
            assert stalled.send("commit") == "refused LeaseLostError"
            lease.check()  # still ours
        concepts = read_delta_arrow(storage.join(output, "concepts"), opts=s3_opts)
        assert "stalled-pass-late" not in concepts["note_id"].to_pylist()
    finally:
        stalled.close()


def test_of_runs_starting_together_exactly_one_takes_the_lease(s3_opts):
    """Four runs race for a fresh output's lease (the lease table does not exist yet): the put-if-absent commit
    lets exactly one in."""
    output = s3_output()
    leases = [OutputLease(output, f"pass-{i}", timeout_s=0, ttl_s=30.0, storage_options=s3_opts) for i in range(4)]
    start, outcome = threading.Barrier(4), {}

    def race(lease: OutputLease) -> None:
        start.wait()
        try:
            lease.acquire()
            outcome[lease.holder] = "held"
        except LockedError:
            outcome[lease.holder] = "locked"

    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert sorted(outcome.values()) == ["held", "locked", "locked", "locked"]
    finally:
        for lease in leases:
            lease.release()


def test_a_local_output_keeps_the_flock_and_a_uri_takes_the_lease(tmp_path):
    assert isinstance(output_lock(str(tmp_path), "p"), RunLock)
    assert isinstance(output_lock("s3://bucket/wh", "p"), OutputLease)
    assert isinstance(output_lock(str(tmp_path), "p", mode="lease"), OutputLease)
    with output_lock(str(tmp_path), "p") as lock:
        lock.check()  # the flock's fence: never lost
        assert lock.taken_over is None


def test_a_lease_renewed_many_times_leaves_two_data_files_after_release(tmp_path):
    """Renewals rewrite the row; the release vacuums the files they left, so the table stays small."""
    with OutputLease(str(tmp_path), "busy", ttl_s=0.4) as lease:
        time.sleep(2.0)  # ~20 renewals
        lease.check()
    files = [p for p in (tmp_path / LEASE_TABLE).rglob("*.parquet")]
    assert len(files) == 2  # the last renewal's row (the vacuum keeps it) and the released row written after
    with OutputLease(str(tmp_path), "next", ttl_s=30.0) as lease:  # released: taken at once, nobody to recover
        assert lease.taken_over is None


def test_a_lease_not_renewed_in_time_fences_its_holder(tmp_path):
    """The holder's own clock stops it before anyone may take the lease: no renewal for ttl - ttl/4 seconds and
    check() refuses (here the heartbeat thread is stopped, as if the store were unreachable)."""
    lease = OutputLease(str(tmp_path), "quiet", ttl_s=1.0).acquire()
    lease._stop.set()
    lease._thread.join()
    time.sleep(0.8)
    with pytest.raises(LeaseLostError, match="not renewed"):
        lease.check()
    wh = open_warehouse(Path(tmp_path), {}, fence=lease.check)
    with pytest.raises(LeaseLostError):
        wh.append("concepts", pa.Table.from_pylist([{"note_id": "n", "concept_id": "c", "task": "phee",
                                                     "note_bucket": 1, "run_id": "quiet"}], schema=CONCEPTS))
    assert wh.version("concepts") is None


def test_a_lease_that_cannot_be_written_is_an_error_not_a_wait(tmp_path):
    """A lease table that cannot be read or written (here a file stands in its place) is an error for the run,
    never taken for another run's lease and waited on or retried forever."""
    (tmp_path / LEASE_TABLE).write_text("not a table")
    outcome = []

    def take() -> None:
        try:
            OutputLease(str(tmp_path), "p", timeout_s=0).acquire()
            outcome.append("held")
        except LockedError:
            outcome.append("locked")
        except Exception as exc:  # noqa: BLE001 - the point: an error surfaces
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and outcome and outcome[0] not in ("held", "locked")
