"""The job's command line: flags, settings overrides, exit codes, and failures reported without note text."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from notelake.conf import ConfigError, Settings, load_settings
from notelake.jobs.cli_common import describe_failure
from notelake.jobs.extraction.given_up import GivenUpSelection
from notelake.jobs.extraction.job import run
from notelake.jobs.extraction.read import InputError
from notelake.jobs.extraction.report import ExitCode
from notelake.jobs.extraction.session import configure_logging

log = logging.getLogger("notelake.extract")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notelake extract",
                                description="The nightly extraction job: note table -> Spark -> Ray vLLM actors -> "
                                            "Delta tables.")
    p.add_argument("--conf", default=None, help="settings YAML (default: conf/local.yaml)")
    p.add_argument("--input", required=True, help="note table: Delta path, Parquet path/glob, JSONL, or catalog table")
    p.add_argument("--output", required=True, help="warehouse directory for the Delta output tables")
    p.add_argument("--task", default=None, help="task name (conf/tasks/<name>.yaml) or a task YAML path; several, "
                                                "comma-separated, run in one pass (--task phee,maccrobat)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder; 'none' = base model")
    p.add_argument("--limit", "--max-notes", dest="limit", type=int, default=None,
                   help="process at most N selected notes (a backfill slice)")
    p.add_argument("--max-runtime", type=parse_duration, default=None, metavar="DURATION",
                   help="start no new round after this long (e.g. 90m, 6h, 3600); the rest waits for the next run")
    p.add_argument("--propagate-deletes", action="store_true",
                   help="remove the output rows of notes no longer in the input (the input must be the full table)")
    p.add_argument("--full-refresh", action="store_true", help="ignore the ledger (and the watermark): reprocess all")
    p.add_argument("--dry-run", action="store_true", help="print the notes selected and an estimate; change nothing")
    p.add_argument("--retry-given-up", type=parse_given_up, default=None, metavar="all|error_type=TYPE|ID,ID,...",
                   help="select given-up notes again (their ledger attempts reset to 0): all of them, those whose "
                        "last attempt failed with an error type (error_type=truncated_output), or the listed note ids")
    p.add_argument("--verbose", action="store_true", help="Spark's and Ray's INFO lines too (default: warnings)")
    return p


def parse_duration(text: str) -> float:
    """'90m', '6h', '45s' or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90m, 6h, 3600)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return value


def parse_given_up(text: str) -> GivenUpSelection:
    """``--retry-given-up``'s value as a :class:`GivenUpSelection`."""
    try:
        return GivenUpSelection.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve_settings(args: argparse.Namespace) -> Settings:
    """``--conf`` with the flags that override settings (adapter, tasks, max runtime, deletes)."""
    settings = load_settings(args.conf)
    engine, job = {}, {}
    if args.adapter:
        engine["adapter"] = None if args.adapter.lower() == "none" else str(Path(args.adapter).resolve())
    if args.task:
        job["task"] = args.task
    if args.max_runtime is not None:
        job["max_runtime_s"] = args.max_runtime
    if args.propagate_deletes:
        job["propagate_deletes"] = True
    return settings.with_overrides(engine=engine, job=job)


def main(argv: list[str] | None = None) -> int:
    """Run the job with command-line flags; returns the exit code (:class:`ExitCode`), one error line per failure."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from notelake.jobs.guards import LockedError
    from notelake.jobs.warehouse import OutputLayoutError, OutputWriteError
    from notelake.models.actor import EngineStartError
    from notelake.models.adapters import AdapterError
    from notelake.models.base_model import ModelIntegrityError

    settings = None
    try:
        settings = resolve_settings(args)
        return run(settings, args.input, args.output, limit=args.limit, full_refresh=args.full_refresh,
                   dry_run=args.dry_run, retry_given_up=args.retry_given_up)
    except (ConfigError, InputError, OutputLayoutError, AdapterError, ModelIntegrityError, EngineStartError) as exc:
        log.error("%s", exc)  # these messages name settings, paths, models and actors: never note text
        return ExitCode.USAGE
    except LockedError as exc:
        log.error("%s", exc)
        return ExitCode.LOCKED
    except OutputWriteError as exc:
        log.error("%s; the ledger was not advanced past the last committed round: a rerun redoes the rest", exc)
        return ExitCode.WRITE_FAILED
    except Exception as exc:  # noqa: BLE001 - one clear line, PHI-safe, instead of a traceback that may quote text
        log.error("run failed: %s", describe_failure(exc, with_message=bool(settings and settings.job.log_phi)))
        return ExitCode.FAILED

