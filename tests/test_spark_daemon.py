"""Spark's Python workers fork from notelake's preloading daemon (jobs/spark_daemon.py), which stays a single thread,
and falls back to Spark's plain daemon when it cannot preload safely."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys


def test_preloading_starts_no_thread():
    """What the daemon imports before it forks must not start threads (a library upgrade that does turns the
    preload off at run time; this test says so first)."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from notelake.jobs import spark_daemon as d; d.preload('pyspark.worker'); "
         "print(d.threads(), 'notelake.jobs.extraction.stage' in sys.modules, 'pyspark.worker' in sys.modules, "
         "'ray' in sys.modules)"],
        capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "True", "True", "False"]


def test_spark_workers_fork_from_the_preloading_daemon(spark):
    def report(batches):
        import pyarrow as pa

        for _ in batches:
            parent = os.getppid()
            with open(f"/proc/{parent}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
            yield pa.RecordBatch.from_pylist([{"daemon": cmd, "threads": len(os.listdir(f"/proc/{parent}/task"))}])

    rows = spark.range(2, numPartitions=2).mapInArrow(report, "daemon string, threads bigint").collect()
    assert rows and all("-m notelake.jobs.spark_daemon pyspark.worker" in r["daemon"] for r in rows)
    assert all(r["threads"] == 1 for r in rows)  # the daemon forks from a single thread


def test_daemon_with_a_thread_replaces_itself_with_sparks_plain_daemon():
    """An environment whose start-up code leaves a thread running: the daemon does not fork from it, it execs
    ``pyspark.daemon`` with the same arguments, and Spark gets a working daemon (its port on stdout)."""
    code = ("import runpy, sys, threading, time; threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
            "sys.argv = ['spark_daemon', 'pyspark.worker']; runpy.run_module('notelake.jobs.spark_daemon', "
            "run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        port = struct.unpack("!i", proc.stdout.read(4))[0]  # what Spark's JVM reads from a started daemon
        assert 0 < port < 65536
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[1:4] == [b"-m", b"pyspark.daemon", b"pyspark.worker"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "no preload (RuntimeError: 2 threads after importing notelake.jobs.extraction.stage" in err.decode()
