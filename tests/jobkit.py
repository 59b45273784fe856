"""Helpers shared by the job-level tests (input tables, settings, reading the output tables)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import yaml
from deltalake import write_deltalake

from notelake.jobs.warehouse import read_delta_arrow

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "notes.jsonl"


def sample_notes(n: int) -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()[:n]]


def write_notes(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> str:
    write_deltalake(str(path), pa.Table.from_pylist(rows, schema=schema), mode="overwrite")
    return str(path)


def write_conf(path: Path, settings) -> str:
    """Settings as a YAML file for ``--conf`` (a job started as its own process, or through ``main``)."""
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    return str(path)


def job_settings(settings, **job_overrides):
    # The base model runs zero-shot here: a note whose answer fails to parse is a legitimate outcome, so these
    # tests judge the data plane (selection, replacement, lineage), not extraction quality.
    # ray.engine_scope cluster: the job's passes share the session's engine actor (one model load per session)
    return settings.with_overrides(job={"task": "phee", "max_error_rate": 1.0, **job_overrides},
                                   ray={"engine_scope": "cluster"})


def table(out: Path, name: str) -> pa.Table:
    return read_delta_arrow(out / name)


def sorted_rows(t: pa.Table, key: str, drop=("run_id", "extracted_at")) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k not in drop} for r in t.to_pylist()), key=lambda r: r[key])


def offsets_exact(row: dict, text: str) -> bool:
    """A grounded concept's spans cut its text out of the note (whitespace/case-normalised for fuzzy hits)."""
    if " ".join(text[s["start"]:s["end"]] for s in row["spans"]) == row["text"]:
        return True
    return text[row["start"]:row["end"]].lower().split() == row["text"].lower().split()


def rows(out: Path, name: str) -> list[dict]:
    """All rows of an output table; [] when the run never created it (e.g. no errors)."""
    t = read_delta_arrow(out / name)
    return t.to_pylist() if t is not None else []


def assert_no_duplicates(out: Path) -> None:
    """Every concept id once, every note's rows of a task from one run, every (task, note) in the ledger once."""
    concepts = table(out, "concepts").to_pylist()
    assert len({c["concept_id"] for c in concepts}) == len(concepts)
    runs_per_note: dict[tuple[str, str], set] = {}
    for c in concepts:
        runs_per_note.setdefault((c["task"], c["note_id"]), set()).add(c["run_id"])
    assert all(len(r) == 1 for r in runs_per_note.values()), "a note's rows mix two runs"
    ledger = table(out, "ledger").select(["task", "note_id"]).to_pylist()
    assert len(ledger) == len({(r["task"], r["note_id"]) for r in ledger})
