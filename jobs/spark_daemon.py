"""Spark's Python daemon with the job's modules imported once, before it forks workers.

Spark forks the executors' Python workers (the job's ``mapInArrow`` tasks) from a daemon, ``python -m
<spark.python.daemon.module> <worker module>``; a fresh worker then imports what its task needs (pyarrow, pandas,
pydantic, the job's stage). Spark ends workers idle for a minute, so a run pays those imports again for each worker
it starts; workers forked from this daemon inherit them (what that saves per round: docs/benchmarks.md).
:func:`start_spark <notelake.jobs.extraction.session.start_spark>` sets this module as
``spark.python.daemon.module``. (The planners of Python data sources fork from pyspark's own daemon whatever the
setting.)

Fork safety: pyspark's own daemon imports nothing before it forks, because numpy's BLAS and pyarrow's jemalloc start
threads when loaded, and a fork copies only the forking thread. Both are asked not to (one BLAS thread, no jemalloc
background thread: neither is used by the job's workers), and :func:`preload` checks that the daemon is still a
single thread: if an import fails or starts a thread, the process replaces itself with Spark's plain daemon (a
warning on stderr), so a speed-up never stops a job. Ray is not imported here: its client connects after the fork,
in the worker. ``spark.extra: {spark.python.daemon.module: pyspark.daemon}`` turns the preload off.
"""

from __future__ import annotations

import importlib
import os
import sys

#: what the job's workers import (the stage brings staging, commit, storage, conf and pyarrow; the rest it imports
#: inside functions); pyspark's worker module (argv[1]) is added per daemon
PRELOAD = ("notelake.jobs.extraction.stage", "notelake.udfs.assemble", "notelake.udfs.answer",
           "notelake.udfs.prompts", "notelake.udfs.chunking", "notelake.models.engine")


def threads() -> int:
    """Threads of this process (Linux)."""
    return len(os.listdir("/proc/self/task"))


def preload(worker_module: str | None) -> None:
    """Import the workers' modules in this process; raises if the process is not a single thread afterwards."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")
    names = PRELOAD + ((worker_module,) if worker_module and worker_module.startswith("pyspark") else ())
    for name in names:
        importlib.import_module(name)
    if threads() > 1:
        raise RuntimeError(f"{threads()} threads after importing {', '.join(names)}: forking is unsafe")


def main() -> None:
    worker_module = sys.argv[1] if len(sys.argv) > 1 else None
    if sys.platform.startswith("linux"):  # elsewhere (no /proc to check threads) Spark's daemon runs as is
        try:
            preload(worker_module)
        except Exception as exc:  # a speed-up must not stop a job: restart as Spark's plain daemon
            print(f"notelake.jobs.spark_daemon: no preload ({type(exc).__name__}: {exc}); running pyspark.daemon",
                  file=sys.stderr, flush=True)
            os.execv(sys.executable, [sys.executable, "-m", "pyspark.daemon", *sys.argv[1:]])
    from pyspark import daemon

    daemon.manager()


if __name__ == "__main__":
    main()
