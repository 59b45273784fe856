"""bench.measure.ProcessTreeUsage: CPU seconds of a row's process tree by part of the stack, exited children
included, and its peak memory."""

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
