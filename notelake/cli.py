"""``notelake`` command line: one entry point for the jobs (same flags as their spark-submit forms)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "extract": ("notelake.jobs.extract", "run the extraction job (same flags as spark-submit jobs/extract.py)"),
    "train": ("notelake.jobs.train", "train a LoRA adapter or a full fine-tune"),
    "evaluate": ("notelake.jobs.evaluate", "score extraction against a gold JSONL"),
    "bounds": ("notelake.jobs.bounds", "learn a task's answer-grammar bounds from training data (--write: into its YAML)"),
    "sql": ("notelake.jobs.cohort", "run a cohort query over the output tables"),
    "vocab": ("notelake.jobs.vocab", "load: an OMOP vocabulary export (Athena files) into Delta tables"),
    "link": ("notelake.jobs.linking", "link the concepts to the OMOP vocabulary (concept_links table)"),
    "omop": ("notelake.jobs.omop", "publish the concepts as OMOP CDM v5.4 tables (note_nlp, derived rows)"),
    "sample-table": ("notelake.jobs.sample", "write the shipped synthetic notes as a Delta note table"),
    "models": ("notelake.models.base_model", "fetch-base: fetch and convert the embedded base model"),
    "docs": ("notelake.conf.reference", "config: regenerate docs/configuration.md from the settings models"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: notelake <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<13} {help_text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
