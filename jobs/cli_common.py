"""What every ``notelake`` command shares: its log lines, one JSON result line, and the job's exit codes
(:class:`notelake.jobs.extraction.report.ExitCode`) for its failures, each logged as one line without note text.

Below the commands in the import order: it imports no command module (the extraction job imports the link and
publish stages, whose commands use this).
"""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

from notelake.conf import ConfigError
from notelake.jobs.extraction.report import ExitCode

log = logging.getLogger("notelake")


def describe_failure(exc: BaseException, with_message: bool = False) -> str:
    """The exception type and where it was raised; its message (which may quote note text) only on request."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    if with_message:
        return f"{type(exc).__name__}{where}\n" + "".join(traceback.format_exception(exc))
    return f"{type(exc).__name__}{where} (message withheld: may contain PHI; set job.log_phi to see it)"


def failure_exit(exc: Exception, what: str, usage_errors: tuple[type[Exception], ...] = ()) -> ExitCode:
    """Log ``exc`` as one line and return its exit code: USAGE for a ConfigError or one of ``usage_errors``,
    LOCKED, WRITE_FAILED, else FAILED. The messages of those classes name settings, paths and tables (logged
    whole); any other failure is logged as its type and location only (a Spark error may quote a mention)."""
    from notelake.jobs.guards import LockedError
    from notelake.jobs.warehouse import OutputWriteError

    for classes, code in (((ConfigError, *usage_errors), ExitCode.USAGE), ((LockedError,), ExitCode.LOCKED),
                          ((OutputWriteError,), ExitCode.WRITE_FAILED)):
        if isinstance(exc, classes):
            log.error("%s: %s", what, exc)
            return code
    log.error("%s failed: %s", what, describe_failure(exc))
    return ExitCode.FAILED


def run_command(what: str, action: Callable[[], dict], usage_errors: tuple[type[Exception], ...] = ()) -> int:
    """Run a command's ``action`` and print its result as one JSON line (exit 0), or log its failure as one line
    and return the failure's exit code (:func:`failure_exit`)."""
    try:
        result = action()
    except Exception as exc:  # noqa: BLE001 - every failure becomes one PHI-safe line and an exit code
        return failure_exit(exc, what, usage_errors)
    print(json.dumps(result, sort_keys=True, default=str))
    return ExitCode.OK


def configure_command_logging() -> None:
    """notelake's own lines at INFO, every library's at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("notelake").setLevel(logging.INFO)


@contextlib.contextmanager
def locked_output(settings, output: str, operation: str, properties: dict[str, str], spark=None):
    """The warehouse at ``output`` for ``notelake <operation>``, held under the output's lock (a lease on an object
    store, its fence checked before every commit), and a Spark session (``spark``, or one started for it)."""
    from notelake.jobs import storage
    from notelake.jobs.guards import output_lock, resolve_output, restrictive_umask
    from notelake.jobs.warehouse import open_warehouse

    out = resolve_output(output, settings.job.output_root)
    opts = storage.settings_options(settings)
    with restrictive_umask(settings.job.umask), output_lock(
            out, f"{operation}-{uuid.uuid4().hex}", settings.job.lock_timeout_s, opts,
            ttl_s=settings.job.lease_ttl_s) as lock:
        warehouse = open_warehouse(out, {"notelake.operation": operation, **properties}, opts, fence=lock.check)
        if spark is None:
            from notelake.jobs.extraction.session import start_spark

            spark = start_spark(settings, app_name=f"notelake-{operation}")
        yield warehouse, spark
