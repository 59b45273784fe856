"""Publish the concepts as OMOP CDM v5.4 tables (``note_nlp``, ``note_nlp_relation``, NLP-derived rows).

    notelake omop --output <warehouse> [--conf conf/local.yaml] [--task phee[,maccrobat]]"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from notelake.conf import Settings
from notelake.jobs.cli_common import configure_command_logging, locked_output, run_command
from notelake.jobs.omop.publish import publish_omop
from notelake.jobs.omop.state import OMOP_STAGE_VERSION, OmopError, OmopStats


def run(settings: Settings, output: str, tasks: list[str], spark=None) -> OmopStats:
    """Publish ``tasks`` of ``output`` holding the output's lock (its fence checked before every commit); raises
    ConfigError, OmopError, LockedError, OutputWriteError."""
    with locked_output(settings, output, "omop", {"notelake.omop_stage": OMOP_STAGE_VERSION}, spark) as (
            warehouse, spark):
        return publish_omop(spark, warehouse, settings, tasks)


def main(argv: list[str] | None = None) -> int:
    """``notelake omop``: exit 0 when published, 2 for a configuration or input to fix, 3 when another run holds
    the output, 4 when a table cannot be written, 5 for any other failure (logged as one line without note text)."""
    p = argparse.ArgumentParser(prog="notelake omop", description="publish the concepts as OMOP CDM v5.4 tables "
                                                                  "(note_nlp, note_nlp_relation, derived rows)")
    p.add_argument("--output", required=True, help="warehouse written by the extract job")
    p.add_argument("--conf", default=None, help="settings YAML (omop section; default conf/local.yaml)")
    p.add_argument("--task", default=None, help="task(s), comma-separated (default: job.task of the settings)")
    args = p.parse_args(argv)
    from notelake.conf import load_settings

    configure_command_logging()

    def publish() -> dict:
        settings = load_settings(args.conf)
        stats = run(settings, args.output, (args.task or settings.job.task).split(","))
        return {k: v for k, v in asdict(stats).items() if k != "fingerprint"}

    return run_command("omop publish", publish, usage_errors=(OmopError,))


if __name__ == "__main__":
    sys.exit(main())
