"""bench.datasize: the data-size curve's table and plot are read from the evaluation reports on disk."""

from __future__ import annotations

import json

import pytest

from bench import datasize


def _report(out, setup: str, fraction: float, task: str, f1: float, tokens: int) -> None:
    name = datasize.point_name(setup, fraction)
    folder = out / "eval" / f"{name}-{task}"
    folder.mkdir(parents=True)
    cre = {"lenient": {"f1": 0.25}} if task == "phee" else None
    (folder / "report.json").write_text(json.dumps({
        "label": name, "task": task, "adapter": {"train_tokens": tokens, "train_wall_s": 600.0},
        "scores": {"cce": {"lenient": {"f1": f1, "ci95": [f1 - 0.05, f1 + 0.05]}, "strict": {"f1": f1 - 0.1}},
                   "cre": cre}}))


def test_rows_table_and_plot(tmp_path):
    _report(tmp_path, "mt", 0.2, "phee", 0.6, 120_000)
    _report(tmp_path, "mt", 0.1, "phee", 0.5, 61_000)
    _report(tmp_path, "phee", 0.1, "phee", 0.45, 28_000)
    _report(tmp_path, "mt", 0.1, "maccrobat", 0.3, 61_000)
    rows = datasize.collect(tmp_path)
    assert [(r["task"], r["setup"], r["percent"]) for r in rows] == [
        ("maccrobat", "mt", 10), ("phee", "mt", 10), ("phee", "mt", 20), ("phee", "phee", 10)]
    table = datasize.table(rows)
    assert "| phee | phee+maccrobat | 20 | 120,000 | 10.0 | 0.600 [0.550, 0.650] | 0.500 | 0.250 |" in table
    assert "| maccrobat | phee+maccrobat | 10 | 61,000 | 10.0 | 0.300 [0.250, 0.350] | 0.200 | – |" in table
    datasize.plot(rows, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_run_refuses_unknown_setups(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        datasize.main(["run", "--setups", "mt,radiology", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "unknown setups ['radiology']" in capsys.readouterr().err


def test_record_keeps_earlier_points_and_takes_new_ones(tmp_path):
    record = tmp_path / "datasize.json"
    _report(tmp_path / "night1", "mt", 0.1, "phee", 0.5, 61_000)
    _report(tmp_path / "night1", "phee", 0.1, "phee", 0.45, 28_000)
    datasize.main(["report", str(tmp_path / "night1"), "--record", str(record)])
    # a later machine without night 1's reports: one new point, one remeasured
    _report(tmp_path / "night2", "phee", 0.1, "phee", 0.47, 28_000)
    _report(tmp_path / "night2", "phee", 1.0, "phee", 0.7, 277_000)
    rows = datasize.merge_record(datasize.collect(tmp_path / "night2"), record)
    assert [(r["setup"], r["percent"], r["lenient_f1"]) for r in rows] == [
        ("mt", 10, 0.5), ("phee", 10, 0.47), ("phee", 100, 0.7)]
    assert json.loads(record.read_text()) == rows
