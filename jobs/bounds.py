"""Learn a task's answer-grammar bounds from its training data and record them in the task YAML:

    notelake bounds --task phee --gold ../shared/data/phee/train.jsonl            # print them
    notelake bounds --task phee --gold ../shared/data/phee/train.jsonl --write    # and write conf/tasks/phee.yaml

Per concept label, the longest mention the grounded grammar admits (``max_mention_tokens``: the ``--quantile`` of
the gold mentions' length in word/punctuation tokens); the most items on one answer line (``max_line_items``) and
the most answer lines per 100 characters of a window (``max_lines_per_100_chars``): the same quantile over the gold
answers of the job's chunks. See udfs/answer.py ``learn_bounds``. ``--write``
replaces the block between the markers below (or adds it after ``max_chunk_chars``); the rest of the file, comments
included, is kept. A change of bounds changes the task's ``prompt_version``, hence the extraction fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

BEGIN = "# >>> answer grammar bounds"
END = "# <<< answer grammar bounds"


def render_block(bounds: dict, source: str, quantile: float, task_name: str) -> str:
    """The YAML lines of the bounds, between their markers."""
    return "\n".join([
        f"{BEGIN} (`notelake bounds --task {task_name} --gold {source} --quantile {quantile} --write`;",
        "# do not edit by hand)",
        f"max_line_items: {bounds['max_line_items']}",
        f"max_lines_per_100_chars: {bounds['max_lines_per_100_chars']}",
        "max_mention_tokens:",
        *(f"  {label}: {n}" for label, n in bounds["max_mention_tokens"].items()),
        END,
    ]) + "\n"


def replace_block(yaml_text: str, block: str) -> str:
    """``yaml_text`` with its bounds block replaced by ``block`` (added after the ``max_chunk_chars`` line, else at
    the end, when it has none)."""
    lines = yaml_text.splitlines(keepends=True)
    begin = next((i for i, line in enumerate(lines) if line.startswith(BEGIN)), None)
    if begin is not None:
        end = next(i for i in range(begin, len(lines)) if lines[i].startswith(END))
        return "".join(lines[:begin]) + block + "".join(lines[end + 1:])
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("max_chunk_chars:")), len(lines))
    return "".join(lines[:at]) + block + "".join(lines[at:])


def learned_bounds(task, gold: str | os.PathLike, quantile: float = 0.999) -> dict:
    """``learn_bounds`` over the records of ``gold`` for ``task``, items per line counted on the job's chunks."""
    from notelake.conf import load_settings
    from notelake.udfs.answer import learn_bounds
    from notelake.udfs.chunking import chunk_text

    overlap = task.overlap(load_settings().job.chunk_overlap_chars)
    with open(gold, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return learn_bounds(task, records, quantile,
                        lambda text: [(c.start, c.end) for c in chunk_text(text, task.max_chunk_chars, overlap)])


def main(argv: list[str] | None = None) -> int:
    import yaml

    from notelake.conf.task import Task, load_task, task_path

    p = argparse.ArgumentParser(prog="notelake bounds", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help="task name (conf/tasks/<name>.yaml) or a task YAML path")
    p.add_argument("--gold", required=True, help="training JSONL (shared/data format)")
    p.add_argument("--quantile", type=float, default=0.999)
    p.add_argument("--write", action="store_true", help="record the bounds in the task YAML")
    args = p.parse_args(argv)
    if not 0 < args.quantile <= 1:
        p.error("--quantile must be in (0, 1]")
    task = load_task(args.task)
    block = render_block(learned_bounds(task, args.gold, args.quantile), args.gold, args.quantile, task.name)
    print(block, end="")
    if args.write:
        path = task_path(args.task)
        updated = replace_block(path.read_text(encoding="utf-8"), block)
        Task.model_validate({"name": path.stem, **yaml.safe_load(updated)})  # never write a file that won't load
        path.write_text(updated, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
