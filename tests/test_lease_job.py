"""Two jobs at once on one s3:// output (moto's S3 server), each its own `python -m notelake.jobs.extract` process on
the test session's Ray with the REPLAY engine (data plane only): the second job is kept out by the first one's
lease -- it exits 3 without touching anything, or waits and then finds nothing left to do -- and no note is lost
or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from jobkit import job_settings, sample_notes, write_notes
from s3server import BUCKET, s3_server

from notelake.jobs.extraction.report import ExitCode
from notelake.jobs import storage
from notelake.jobs.warehouse import read_delta_arrow


@pytest.fixture(scope="module")
def replay(settings, ray_address, base_model_path):
    from notelake.models.actor import EnginePool

    cfg = job_settings(settings).with_overrides(engine={"backend": "replay", "max_model_len": 1024},
                                                ray={"address": ray_address, "namespace": "notelake-lease-job"})
    pool = EnginePool.get_or_create(cfg)
    pool.ready()
    yield cfg
    pool.shutdown()


def write_conf(path, settings, opts: dict, **job) -> str:
    """Settings as a YAML file with the storage options in clear (a dump masks them, as secrets)."""
    data = settings.model_dump(mode="json")
    data["storage"]["options"] = opts
    data["job"].update(job)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def start_job(conf: str, src: str, output: str, log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "notelake.jobs.extract", "--conf", conf, "--input", src,
                                 "--output", output], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def test_two_jobs_on_one_s3_output_lose_and_duplicate_nothing(tmp_path, replay):
    notes = sample_notes(8)
    src = write_notes(tmp_path / "notes", notes)
    with s3_server() as opts:
        output = f"s3://{BUCKET}/{uuid.uuid4().hex}/warehouse"
        settings = replay.with_overrides(job={"round_notes": 1})
        conf = write_conf(tmp_path / "first.yaml", settings, opts)
        patient = write_conf(tmp_path / "waiting.yaml", settings, opts, lock_timeout_s=600)

        procs = [start_job(conf, src, output, tmp_path / "first.log")]
        first = procs[0]
        try:
            deadline = time.monotonic() + 300
            while first.poll() is None and time.monotonic() < deadline:  # the first job is under way
                if read_delta_arrow(storage.join(output, "runs"), opts=opts) is not None:
                    break
                time.sleep(0.5)
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            # Hold the first driver still (alive, its lease valid) while the others start: a scheduler's retry.
            first.send_signal(signal.SIGSTOP)
            refused = start_job(conf, src, output, tmp_path / "refused.log")
            waiting = start_job(patient, src, output, tmp_path / "waiting.log")
            procs += [refused, waiting]
            assert refused.wait(timeout=300) == ExitCode.LOCKED, (tmp_path / "refused.log").read_text()[-3000:]
            first.send_signal(signal.SIGCONT)
            assert first.wait(timeout=600) == ExitCode.OK, (tmp_path / "first.log").read_text()[-3000:]
            assert waiting.wait(timeout=600) == ExitCode.OK, (tmp_path / "waiting.log").read_text()[-3000:]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                    proc.wait()
        assert "another run holds the lease" in (tmp_path / "refused.log").read_text()

        def table(name: str) -> list[dict]:
            return read_delta_arrow(storage.join(output, name), opts=opts).to_pylist()

        runs = sorted(table("runs"), key=lambda r: r["started_at"])
        # the refused job wrote no runs row and abandoned nothing; the waiting one found every note done
        assert [(r["status"], r["selected"]) for r in runs] == [("succeeded", len(notes)), ("succeeded", 0)]
        ledger = sorted(r["note_id"] for r in table("ledger"))
        assert ledger == sorted(n["note_id"] for n in notes)  # every note once
        concepts = table("concepts")
        assert len({c["concept_id"] for c in concepts}) == len(concepts)  # no row twice
        assert {c["run_id"] for c in concepts} == {runs[0]["run_id"]}
        assert storage.list_dirs(storage.join(output, "_staging"), opts) == []


def test_a_killed_job_on_s3_is_recovered_once_its_lease_expires(tmp_path, replay, spark):
    """The driver dies (os._exit) between round 2's row commits and its ledger commit on an s3:// output. Its lease
    outlives it: a run started at once is refused (exit 3) and touches nothing; a run that waits takes the expired
    lease over, marks the dead run abandoned, removes the round's unacknowledged rows and the dead run's staging,
    and extracts the rest: every note once."""
    from notelake.jobs.extraction import job
    from notelake.jobs.guards import LockedError
    from notelake.jobs.warehouse import FAILPOINT_ENV

    notes = sample_notes(6)
    src = write_notes(tmp_path / "notes", notes)
    with s3_server() as opts:
        output = f"s3://{BUCKET}/{uuid.uuid4().hex}/warehouse"
        settings = replay.with_overrides(job={"round_notes": 2, "lease_ttl_s": 20})
        conf = write_conf(tmp_path / "conf.yaml", settings, opts)
        killed = subprocess.run([sys.executable, "-m", "notelake.jobs.extract", "--conf", conf, "--input", src,
                                 "--output", output], capture_output=True, text=True, timeout=600,
                                env={**os.environ, FAILPOINT_ENV: "exit_before_ledger_commit:2"})
        assert killed.returncode == 9, killed.stderr[-3000:]

        def table(name: str) -> list[dict]:
            return read_delta_arrow(storage.join(output, name), opts=opts).to_pylist()

        acked = {r["note_id"] for r in table("ledger")}
        assert 0 < len(acked) < len(notes) and {r["note_id"] for r in table("concepts")} - acked
        assert storage.list_dirs(storage.join(output, "_staging"), opts)  # the dead run's staged rows

        cfg = settings.with_overrides(storage={"options": opts})
        with pytest.raises(LockedError, match="another run holds the lease"):
            job.run(cfg, src, output, spark=spark)
        assert [r["status"] for r in table("runs")] == ["running"]

        assert job.run(cfg.with_overrides(job={"lock_timeout_s": 60}), src, output, spark=spark) == ExitCode.OK
        runs = sorted(table("runs"), key=lambda r: r["started_at"])
        assert [(r["status"], r["selected"]) for r in runs] == [("abandoned", 0),
                                                                 ("succeeded", len(notes) - len(acked))]
        assert sorted(r["note_id"] for r in table("ledger")) == sorted(n["note_id"] for n in notes)
        concepts = table("concepts")
        assert len({c["concept_id"] for c in concepts}) == len(concepts)
        owners: dict[str, set] = {}
        for c in concepts:
            owners.setdefault(c["note_id"], set()).add(c["run_id"])
        assert all(len(r) == 1 for r in owners.values())  # no note's rows from two runs
        assert storage.list_dirs(storage.join(output, "_staging"), opts) == []
