"""The link stage: every concepts row linked to a standard concept of the site's OMOP vocabulary (``concept_links``).

    notelake link --output <warehouse> [--conf conf/local.yaml] [--task phee[,maccrobat]] [--vocabulary URI]

Exit codes: 0 linked (or nothing to link); 2 bad config or flags, or a configured vocabulary that is not
there; 3 another run holds the output's lock; 4 the link table could not be written; 5 any other failure."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import uuid


from notelake.conf import Settings
from notelake.jobs import storage
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
    from notelake.jobs.guards import output_lock, resolve_output, restrictive_umask
    from notelake.jobs.warehouse import open_warehouse

    tasks = [load_task(name) for name in settings.job.tasks]
    out = resolve_output(output, settings.job.output_root)
    opts = storage.settings_options(settings)
    with restrictive_umask(settings.job.umask):
        with output_lock(out, f"link-{uuid.uuid4().hex}", settings.job.lock_timeout_s, opts,
                         ttl_s=settings.job.lease_ttl_s) as lock:
            warehouse = open_warehouse(out, {"notelake.operation": "link", "notelake.linker": LINKER_VERSION},
                                       opts, fence=lock.check)
            if spark is None:
                from notelake.jobs.extraction.session import start_spark

                spark = start_spark(settings, app_name="notelake-link")
            return link_concepts(spark, warehouse, settings, tasks)


def main(argv: list[str] | None = None) -> int:
    """``notelake link``: exit codes as in the module docstring; the stats as one JSON line."""
    from notelake.conf import load_settings
    from notelake.jobs.cli_common import configure_command_logging, run_command

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
