"""The link stage: every concepts row linked to a standard concept of the site's OMOP vocabulary (``concept_links``).

    notelake link --output <warehouse> [--conf conf/local.yaml] [--task phee[,maccrobat]] [--vocabulary URI]

Exit codes: 0 linked (or nothing to link); 2 bad config or flags, or a configured vocabulary that is not
there; 3 another run holds the output's lock; 4 the link table could not be written; 5 any other failure."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from notelake.conf import Settings
from notelake.jobs.cli_common import configure_command_logging, locked_output, run_command
from notelake.jobs.linking.driver import link_concepts
from notelake.jobs.linking.lexicon import LINKER_VERSION, LinkStats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notelake link", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="warehouse written by the extraction job")
    p.add_argument("--conf", default=None, help="settings YAML (default: conf/local.yaml)")
    p.add_argument("--task", default=None, help="task(s) to link, comma-separated (default: job.task)")
    p.add_argument("--vocabulary", default=None, help="vocabulary tables' location (default: omop.vocabulary, "
                                                      "else <output>/vocabulary)")
    return p


def run(settings: Settings, output: str, spark=None) -> LinkStats:
    """Link ``settings.job.tasks`` in ``output`` holding the output's lock (its fence checked before every
    commit); raises ConfigError, LockedError, OutputWriteError."""
    from notelake.conf.task import load_task

    with locked_output(settings, output, "link", {"notelake.linker": LINKER_VERSION}, spark) as (warehouse, spark):
        return link_concepts(spark, warehouse, settings, [load_task(name) for name in settings.job.tasks])


def main(argv: list[str] | None = None) -> int:
    """``notelake link``: exit codes as in the module docstring; the stats as one JSON line."""
    from notelake.conf import load_settings

    configure_command_logging()
    args = build_parser().parse_args(argv)

    def link() -> dict:
        settings = load_settings(args.conf).with_overrides(
            job={"task": args.task} if args.task else {},
            omop={"vocabulary": args.vocabulary} if args.vocabulary else {})
        return dataclasses.asdict(run(settings, args.output))

    return run_command("link", link)


if __name__ == "__main__":
    sys.exit(main())
