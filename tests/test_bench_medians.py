"""bench.medians: the ratios of several benchmark runs as median, min and max, judged on the median."""

from __future__ import annotations

import json

from bench import medians


def _run(started: str, **values) -> dict:
    return {"started_at": started, "ratios": [
        {"ratio": "job / bare vLLM (same engine args)", "value": values.get("job"), "target": ">= 0.95"},
        {"ratio": "rerun / first run wall", "value": values.get("rerun"), "target": "<= 0.1"},
    ]}


def test_median_min_max_and_target(tmp_path):
    runs = [_run("a", job=0.90, rerun=0.02), _run("b", job=1.01, rerun=None), _run("c", job=0.97, rerun=0.2)]
    for k, run in enumerate(runs):
        (tmp_path / f"run-{k}").mkdir()
        (tmp_path / f"run-{k}" / "results.json").write_text(json.dumps(run))
    entries = medians.summarize(medians.load_runs([str(tmp_path / f"run-{k}") for k in range(3)]))
    job, rerun = entries
    assert (job["runs"], job["median"], job["min"], job["max"], job["met"]) == (3, 0.97, 0.9, 1.01, True)
    # a run that did not measure a ratio is left out of it; the median of two is their mean
    assert (rerun["runs"], rerun["median"], rerun["met"]) == (2, 0.11, False)
    table = medians.markdown(entries, runs)
    assert "| job / bare vLLM (same engine args) | 3 | 0.970 | 0.900 | 1.010 | >= 0.95 | yes |" in table
