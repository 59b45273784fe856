"""Guards around a run's output directory: path confinement, file permissions and one run at a time.

* :func:`resolve_output` resolves ``--output`` (symlinks followed) and, when ``job.output_root`` is set, refuses
  any output outside it, so a config or flag can never point the job's writes elsewhere.
* :func:`restrictive_umask` applies ``job.umask`` (default 077: files 0600, folders 0700) to everything the
  process writes -- Delta tables on the driver, staged Parquet on the executors -- because the tables hold PHI.
* :class:`RunLock` is an exclusive ``flock`` on ``<output>/_notelake.lock``: a second run on the same output
  waits up to ``job.lock_timeout_s`` and then fails cleanly, before it reads or writes anything. Delta commits
  stay safe without it (optimistic concurrency, retried); the lock avoids two runs extracting the same notes.
  ``flock`` holds on local and NFSv4 file systems; an object-store output gets no lock (the scheduler must
  serialise runs on it; Delta's optimistic concurrency still keeps every commit whole).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

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

    def __init__(self, output: Path, timeout_s: float = 0.0, poll_s: float = 0.5):
        self.path = Path(output) / LOCK_FILE
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._fh = None

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
