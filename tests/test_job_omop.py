"""The nightly job links and publishes its concepts in the same run (jobs/extraction/publish.py), on the real local
stack (Spark, Ray, deltalake) with the REPLAY engine (conftest ``replay``) and the shipped demo vocabulary: data
plane only (REPLAY's mentions are words of the note under made-up labels, so some link and most do not)."""

from __future__ import annotations

import json
from pathlib import Path

from deltalake import DeltaTable
from jobkit import rows, sample_notes, write_notes

from notelake.jobs.extraction import job
from notelake.jobs.extraction.report import ExitCode
from notelake.jobs.vocab import load_athena, vocabulary_root

DEMO_VOCABULARY = Path(__file__).resolve().parents[1] / "data" / "vocab" / "demo"


def last_run(out: Path) -> dict:
    run = max(rows(out, "runs"), key=lambda r: r["started_at"])
    return {**run, "omop": json.loads(run["omop_json"]) if run["omop_json"] else None}


def links_and_note_nlp(out: Path) -> tuple[dict, dict]:
    return ({r["concept_id"]: r for r in rows(out, "concept_links")},
            {r["concept_id"]: r for r in rows(out, "note_nlp")})


def test_the_job_links_and_publishes_what_it_extracted(tmp_path, spark, replay):
    """Run 1 extracts, links every concepts row and publishes it as note_nlp with the link's concept; run 2, with
    nothing new, links and publishes nothing; run 3 extracts an edited note and fails its link stage (exit 2) with
    the extraction committed; run 4 links and publishes what run 3 left."""
    out = tmp_path / "warehouse"
    load_athena(str(DEMO_VOCABULARY), vocabulary_root(str(out)))
    notes = sample_notes(4)
    src = write_notes(tmp_path / "notes", notes)

    assert job.run(replay, src, str(out), spark=spark) == ExitCode.OK
    concepts = rows(out, "concepts")
    links, nlp = links_and_note_nlp(out)
    assert concepts and set(links) == set(nlp) == {c["concept_id"] for c in concepts}
    assert all(nlp[c]["note_nlp_concept_id"] == link["omop_concept_id"] for c, link in links.items())
    assert {r["source_note_id"] for r in rows(out, "note_crosswalk")} == {c["note_id"] for c in concepts}
    first = last_run(out)
    assert first["status"] == "succeeded" and first["omop"]["failed"] is None
    assert first["omop"]["link"]["linked"] == len(links)
    assert sum(first["omop"]["link"]["by_match_type"].values()) == len(links)
    assert first["omop"]["publish"]["note_nlp_rows"] == len(nlp)

    versions = {t: DeltaTable(out / t).version() for t in ("concept_links", "note_nlp")}
    assert job.run(replay, src, str(out), spark=spark) == ExitCode.OK
    second = last_run(out)["omop"]
    assert (second["link"]["linked"], second["publish"]["notes_published"]) == (0, 0)
    assert {t: DeltaTable(out / t).version() for t in versions} == versions

    edited = [dict(n) for n in notes]
    edited[1]["text"] += " Warfarin was stopped after a gastrointestinal bleed."
    src = write_notes(tmp_path / "notes", edited)
    no_vocabulary = replay.with_overrides(omop={"vocabulary": str(tmp_path / "nowhere")})
    assert job.run(no_vocabulary, src, str(out), spark=spark) == ExitCode.USAGE
    third = last_run(out)
    assert (third["status"], third["selected"], third["omop"]) == (
        "succeeded", 1, {"link": None, "publish": None, "failed": "link: ConfigError"})
    # a re-extracted note's unchanged mentions keep their concept ids (and links); its new ones are not linked
    new = {c["concept_id"] for c in rows(out, "concepts") if c["note_id"] == edited[1]["note_id"]} - set(links)
    assert new and not new & set(links_and_note_nlp(out)[0])

    assert job.run(replay, src, str(out), spark=spark) == ExitCode.OK
    fourth = last_run(out)
    assert fourth["selected"] == 0 and fourth["omop"]["link"]["linked"] == len(new)
    links, nlp = links_and_note_nlp(out)
    assert set(links) == set(nlp) == {c["concept_id"] for c in rows(out, "concepts")}
