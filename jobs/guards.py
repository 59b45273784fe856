"""Guards around a run's output: path confinement, file permissions and one run at a time.

* :func:`resolve_output` resolves ``--output`` (symlinks followed) and, when ``job.output_root`` is set, refuses
  any output outside it, so a config or flag can never point the job's writes elsewhere.
* :func:`restrictive_umask` applies ``job.umask`` (default 077: files 0600, folders 0700) to everything the
  process writes -- Delta tables on the driver, staged Parquet on the executors -- because the tables hold PHI.
* :func:`output_lock` keeps a second run off an output for the length of a run: it waits up to
  ``job.lock_timeout_s`` and then raises :class:`LockedError` (exit 3) before the run reads or writes anything.
  Delta commits stay whole without it (optimistic concurrency, retried); the lock keeps two runs from extracting
  the same notes and from recovering each other's rounds as if their driver had died.

  - A local output takes :class:`RunLock`, an exclusive ``flock`` on ``<output>/_notelake.lock``: the kernel drops
    it the moment the holder dies, so the run after a crash starts at once, and nothing is written while it is
    held. ``flock`` holds on local and NFSv4 file systems (``mode="lease"`` takes the lease on other ones).
  - An object-store output takes the heartbeat lease of :mod:`notelake.jobs.lease` (a compare-and-swap on a small
    Delta table's log): a dead holder blocks the output until its lease expires (``ttl_s``), and a run whose lease
    was taken over is fenced off the output tables (:meth:`OutputLease.check` before each commit).

  Both give the same interface: a context manager with ``holder`` (the run's pass id), ``check()`` (the commit
  fence; a no-op for the flock, which cannot be lost) and ``taken_over`` (the lease record of a run that died
  holding it, else None).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator, Literal

from notelake.conf import ConfigError

LOCK_FILE = "_notelake.lock"


class LockedError(RuntimeError):
    """Another run holds the output directory's lock."""


def resolve_output(output: str | os.PathLike, output_root: str | None) -> str:
    """The output location: an object-store URI as given, or the absolute, symlink-free local path; ConfigError
    when a local path lies outside ``output_root`` (a URI cannot be confined, so it is refused when one is set)."""
    from notelake.jobs import storage

    if storage.is_uri(str(output)):
        if output_root is not None:
            raise ConfigError(f"--output {output} is an object-store URI but job.output_root {output_root} confines "
                              "outputs to a local directory: unset job.output_root to write to object storage")
        return str(output).rstrip("/")
    resolved = Path(storage.join(str(output))).expanduser().resolve()
    if output_root is not None:
        root = Path(output_root).expanduser().resolve()
        if not resolved.is_relative_to(root):
            raise ConfigError(f"--output {output} resolves to {resolved}, outside job.output_root {root}")
    return str(resolved)


@contextlib.contextmanager
def restrictive_umask(umask: str) -> Iterator[None]:
    """Set the process umask for the block (restored after, so a test process is left as it was)."""
    previous = os.umask(int(umask, 8))
    try:
        yield
    finally:
        os.umask(previous)


class RunLock:
    """Exclusive lock on an output directory for the length of a run (released when the process dies)."""

    taken_over = None  # a flock dies with its holder: there is never an expired one to take over

    def __init__(self, output: Path, timeout_s: float = 0.0, poll_s: float = 0.5, holder: str = ""):
        self.path = Path(output) / LOCK_FILE
        self.holder = holder  # the run's pass id (as OutputLease.holder)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._fh = None

    def check(self) -> None:
        """The commit fence of :func:`output_lock`'s interface: a held flock cannot be lost."""

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.close()
                    raise LockedError(f"another run holds {self.path} (waited {self.timeout_s:.0f} s; "
                                      "raise job.lock_timeout_s to wait longer)") from None
                time.sleep(self.poll_s)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")  # who holds it, for an operator; the lock itself is the flock
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def output_lock(output: str, holder: str, timeout_s: float = 0.0, storage_options: dict[str, str] | None = None,
                *, ttl_s: float | None = None, mode: Literal["auto", "lease"] = "auto"):
    """The exclusive hold of run ``holder`` (its pass id) on ``output`` (as :func:`resolve_output` returned it):
    :class:`RunLock` for a local path, an :class:`~notelake.jobs.lease.OutputLease` for an object-store URI (or
    everywhere with ``mode="lease"``). Enter it before reading the output; :class:`LockedError` after
    ``timeout_s``. ``ttl_s``: the lease's expiry after its last renewal (default
    :data:`~notelake.jobs.lease.DEFAULT_TTL_S`)."""
    from notelake.jobs import storage
    from notelake.jobs.lease import DEFAULT_TTL_S, OutputLease

    if mode == "auto" and storage.is_local(output):
        return RunLock(Path(output), timeout_s, holder=holder)
    return OutputLease(output, holder, timeout_s=timeout_s, ttl_s=ttl_s or DEFAULT_TTL_S,
                       storage_options=storage_options)
