"""bench.measure.ProcessTreeUsage: CPU seconds of a row's process tree by part of the stack, exited children
included (and never negative when a parent ignores SIGCHLD), and its peak memory."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from bench.measure import ProcessTreeUsage

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_cpu_by_kind_counts_exited_and_running_children():
    with ProcessTreeUsage(interval_s=0.2) as usage:
        # runs and exits inside the block: counted through this process's reaped-children counters
        subprocess.run([sys.executable, "-c", BURN.format(s=0.5)], check=True)
        # still running at the end; its command line names pyspark, as Spark's Python workers' do
        running = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.6) + "time.sleep(60)", "pyspark.daemon"])
        deadline = time.monotonic() + 30
        while sum(psutil.Process(running.pid).cpu_times()[:2]) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.1)
    running.kill()
    running.wait()
    assert usage.cpu_s["row process"] >= 0.5
    assert usage.cpu_s["Spark Python"] >= 0.6
    assert "vLLM engine" not in usage.cpu_s
    assert usage.cpu_s_beside_vllm >= 1.1
    assert usage.peak_gib > 0


def test_a_worker_whose_parent_ignores_sigchld_never_counts_negative():
    """pyspark's daemon ignores SIGCHLD: a worker that used CPU before the block and exits inside it leaves no
    counters behind, so its kind must not lose the seconds it used before the block."""
    parent = subprocess.Popen([sys.executable, "-c",
                               "import signal, subprocess, sys, time\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
                               f"subprocess.Popen([sys.executable, '-c', {BURN.format(s=0.5) + 'time.sleep(60)'!r}, "
                               "'pyspark.daemon'])\ntime.sleep(60)\n"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = psutil.Process(parent.pid).children()
            if workers and sum(workers[0].cpu_times()[:2]) >= 0.5:
                break
            time.sleep(0.1)
        worker = workers[0]
        with ProcessTreeUsage(interval_s=0.2) as usage:
            worker.kill()
            psutil.wait_procs([worker], timeout=10)
        assert not worker.is_running()
    finally:
        parent.kill()
        parent.wait()
    assert usage.cpu_s.get("Spark Python", 0.0) >= 0.0  # counting it as -0.5 s was the bug
    assert all(seconds >= 0.0 for seconds in usage.cpu_s.values())
