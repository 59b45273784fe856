"""Output guards without Spark or an engine: run lock, path confinement, umask, PHI-safe failure lines."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
from jobkit import write_conf

from notelake.conf import ConfigError
from notelake.jobs.extraction import cli, job
from notelake.jobs.extraction.report import ExitCode
from notelake.jobs.guards import LOCK_FILE, LockedError, RunLock, resolve_output, restrictive_umask

HOLD_LOCK = """
import sys, time
from pathlib import Path
from notelake.jobs.guards import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(out, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_fails_cleanly_while_another_holds_the_output(tmp_path, settings):
    out = tmp_path / "warehouse"
    holder = hold_lock(out, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockedError, match="another run holds"):
            job.run(settings.with_overrides(job={"lock_timeout_s": 1.0}), str(tmp_path / "notes"), str(out))
        assert time.monotonic() - t0 >= 1.0  # it waited lock_timeout_s first
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing read or written

        conf = write_conf(tmp_path / "conf.yaml", settings)
        assert cli.main(["--conf", conf, "--input", str(tmp_path / "notes"), "--output", str(out)]) == ExitCode.LOCKED
    finally:
        holder.kill()
        holder.wait()


def test_waiting_run_gets_the_lock_when_the_holder_finishes(tmp_path):
    holder = hold_lock(tmp_path, 1.5)
    t0 = time.monotonic()
    with RunLock(tmp_path, timeout_s=30, poll_s=0.1):
        waited = time.monotonic() - t0
    holder.wait()
    assert 0.5 < waited < 30


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = hold_lock(tmp_path, 60)
    holder.kill()
    holder.wait()
    with RunLock(tmp_path, timeout_s=0):  # a SIGKILLed run leaves no stale lock behind
        pass


def test_output_outside_output_root_is_refused(tmp_path, settings):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "link").symlink_to(elsewhere)
    assert resolve_output(root / "a" / "wh", str(root)) == str((root / "a" / "wh").resolve())
    assert resolve_output(f"file://{root}/b", str(root)) == str(root / "b")
    assert resolve_output("s3://bucket/wh/", None) == "s3://bucket/wh"
    with pytest.raises(ConfigError, match="object-store URI"):
        resolve_output("s3://bucket/wh", str(root))
    for bad in (elsewhere / "wh", root / ".." / "elsewhere" / "wh", root / "link" / "wh"):
        with pytest.raises(ConfigError, match="outside job.output_root"):
            resolve_output(bad, str(root))
    with pytest.raises(ConfigError, match="outside job.output_root"):
        job.run(settings.with_overrides(job={"output_root": str(root)}), "unused", str(root / "link"))
    assert list(elsewhere.iterdir()) == []


def test_restrictive_umask_applies_and_restores(tmp_path):
    before = os.umask(0o022)
    try:
        with restrictive_umask("077"):
            (tmp_path / "d").mkdir()
            (tmp_path / "d" / "f").write_text("x")
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "d" / "f").stat().st_mode & 0o777 == 0o600
        assert os.umask(0o022) == 0o022  # restored
    finally:
        os.umask(before)


def test_failure_line_withholds_the_message_unless_log_phi():
    try:
        raise ValueError("note text: CANARY-7731 patient took warfarin")
    except ValueError as exc:
        safe = cli.describe_failure(exc)
        debug = cli.describe_failure(exc, with_message=True)
    assert "ValueError at test_guards.py:" in safe and "CANARY-7731" not in safe
    assert "CANARY-7731" in debug


def test_log_phi_warns(tmp_path, settings, caplog):
    with caplog.at_level(logging.WARNING, logger="notelake.extract"), RunLock(tmp_path):
        with pytest.raises(LockedError):  # the lock stops the run before any work; the warning comes first
            job.run(settings.with_overrides(job={"log_phi": True}), "unused", str(tmp_path))
    assert any("job.log_phi is on" in r.getMessage() for r in caplog.records)
