"""Plot the write-path check of ``bench.rows rounds``: seconds per round and commit seconds per round, one line per
corpus size, against the round number (flat lines = a write path that does not grow with the tables).

    .venv/bin/python -m bench.plot_rounds runs/rounds.json docs/benchmarks-rounds.svg
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source, target = (argv if argv is not None else sys.argv[1:])[:2]
    rows = json.loads(open(source, encoding="utf-8").read())["rows"]
    fig, (total, commit) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for row in rows:
        rounds = row["rounds"]
        x = [r["round"] for r in rounds]
        label = f"{row['notes']:,} notes"
        total.plot(x, [r["seconds"] for r in rounds], marker=".", label=label)
        commit.plot(x, [r["commit_s"] for r in rounds], marker=".", label=label)
    total.set(title="seconds per round (10,000 notes)", xlabel="round", ylabel="s", ylim=(0, None))
    commit.set(title="Delta commit seconds per round", xlabel="round", ylabel="s", ylim=(0, None))
    for ax in (total, commit):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("notelake job, REPLAY engine, 2 CPU cores: per-round cost as the tables grow")
    fig.tight_layout()
    fig.savefig(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
