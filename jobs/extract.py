"""The nightly extraction job: note table -> Spark -> Ray vLLM actors -> Delta tables.

    spark-submit jobs/extract.py --conf conf/local.yaml --input <note table> --output <warehouse dir> \\
        --task phee[,maccrobat] [--adapter models/adapters/notelake-mt] [--limit N | --max-notes N] \\
        [--max-runtime 6h] [--full-refresh] [--propagate-deletes] [--dry-run] [--verbose]

Also ``python -m notelake.jobs.extract`` and ``notelake extract``, with the same flags. This file is the entry
point only: the job is the package :mod:`notelake.jobs.extraction`, one module per stage (read, plan, rounds,
stage, commit, report; the command line in its ``cli`` module).

Exit codes: 0 success; 1 error rate above ``job.max_error_rate``; 2 bad config, flags or input table; 3 another
run holds the output's lock; 4 an output table could not be written (the ledger is not advanced past the last
committed round: a rerun redoes the rest); 5 any other failure. After the rounds the job links and publishes the
OMOP tables (omop.link, omop.publish); a failure there keeps the committed extraction and exits 2, 4 or 5 by the
same rules (jobs/extraction/publish.py), the next run completing it.
"""

from __future__ import annotations

import sys

from notelake.jobs.extraction.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
