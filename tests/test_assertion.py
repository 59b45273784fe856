"""Assertion by ConText (models/assertion.py) on concept rows the real parser and grounding assembled from an
answer, on a short case-report text: offsets untouched, cue phrases read, the task's label scope honoured."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from notelake.conf.settings import ConfigError, load_settings
from notelake.conf.task import Task, load_task
from notelake.models.assertion import (SEGMENT_CHARS, assertion_fingerprint, assign_assertions, context_assertions,
                                      segments)
from notelake.udfs.assemble import assemble_note
from notelake.udfs.chunking import chunk_text

NOTE = ("A 54-year-old man presented with fever and a productive cough. He denies chest pain. "
        "Chest X-ray showed no evidence of pneumonia. Possible pneumothorax on the left. "
        "The pleural effusion resolved. The rash cleared after two days. There was no tenderness in the abdomen.")
# What the extractor wrote: the rash that cleared negated (MACCROBAT's convention), the cough speculated.
ANSWER = "\n".join([
    "Sign_symptom: fever", "Sign_symptom(speculated): productive cough", "Sign_symptom: chest pain",
    "Diagnostic_procedure: Chest X-ray", "Disease_disorder: pneumonia", "Sign_symptom: pneumothorax",
    "Sign_symptom: pleural effusion", "Sign_symptom(negated): rash", "Sign_symptom: tenderness", "Biological_structure: abdomen",
    "Sign_symptom: hiccups",  # not in the text: an ungrounded row
])
LINEAGE = {"run_id": "r", "model": "m", "adapter": None, "adapter_sha256": None, "prompt_version": "p",
           "fingerprint": "f", "extracted_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}


@pytest.fixture(scope="module")
def task() -> Task:
    return load_task("maccrobat")


@pytest.fixture(scope="module")
def rows(task) -> list[dict]:
    chunks = chunk_text(NOTE, 1000, 0)
    result = assemble_note(note_id="n1", text=NOTE, task=task, chunks=chunks, outputs=[ANSWER], lineage=LINEAGE)
    assert not result.errors
    return result.concepts


def by_text(rows: list[dict]) -> dict[str, str]:
    return {r["text"]: r["assertion"] for r in rows}


def test_context_reads_the_cues_and_keeps_rows_and_offsets(rows, task):
    judged = assign_assertions(NOTE, rows, "context", task.assertion_labels)
    assert [{k: v for k, v in r.items() if k != "assertion"} for r in judged] == \
        [{k: v for k, v in r.items() if k != "assertion"} for r in rows]
    for r in judged:
        if r["grounded"]:
            assert NOTE[r["start"]:r["end"]] == r["text"]
    got = by_text(judged)
    assert got["chest pain"] == "negated"  # "denies"
    assert got["pneumonia"] == "negated"  # "no evidence of"
    assert got["pneumothorax"] == "speculated"  # "possible"
    assert got["tenderness"] == "negated"  # "no"
    assert got["fever"] == got["productive cough"] == "present"  # the model's marker is replaced
    assert got["pleural effusion"] == "negated"  # "resolved" (models.assertion.EXTRA_RULES)
    assert got["rash"] == "present"  # ConText has no cue "cleared"
    assert got["hiccups"] == "present" and not next(r for r in judged if r["text"] == "hiccups")["grounded"]


def test_combined_negation_from_context_speculation_from_the_model(rows, task):
    got = by_text(assign_assertions(NOTE, rows, "combined", task.assertion_labels))
    assert got["chest pain"] == got["pneumonia"] == got["pleural effusion"] == "negated"  # ConText's
    assert got["rash"] == "present"  # the model's negation, which ConText does not confirm
    assert got["productive cough"] == "speculated"  # the model's
    assert got["pneumothorax"] == "present"  # ConText's speculation is not taken
    assert got["fever"] == "present"


def test_label_scope(rows, task):
    """In the scope of "no" sit the test and the body part too; the task's assertion_labels leave them present."""
    scoped = by_text(assign_assertions(NOTE, rows, "context", task.assertion_labels))
    assert scoped["Chest X-ray"] == scoped["abdomen"] == "present"
    unscoped = by_text(assign_assertions(NOTE, rows, "context", None))
    assert unscoped["abdomen"] == "negated"


def test_model_method_and_bad_method(rows):
    assert assign_assertions(NOTE, rows, "model") == rows
    with pytest.raises(ValueError, match="assertion method 'negex'"):
        assign_assertions(NOTE, rows, "negex")


def test_a_long_note_is_read_in_segments_with_the_same_assertions():
    """A note many segments long: cut between sentences, never inside a concept, each segment bounded; every
    concept gets the assertion it gets in its own short note."""
    sentences = ["He denies chest pain.", "Possible pneumothorax on the left.", "The rash was noted.\n"]
    text = " ".join(sentences[i % 3] for i in range(3000))
    words = ("chest pain", "pneumothorax", "rash")
    extents = sorted((text.index(w, k * 2000), text.index(w, k * 2000) + len(w)) for k in range(30) for w in words)
    extents.append((SEGMENT_CHARS - 3, SEGMENT_CHARS + 40))  # a long concept across the first natural cut
    cuts = segments(text, extents)
    assert cuts[0][0] == 0 and cuts[-1][1] == len(text) and len(cuts) > 5
    assert all(a < b <= a + SEGMENT_CHARS + 60 and b == c for (a, b), (c, _) in zip(cuts, cuts[1:]))
    assert not [(s, e) for s, e in extents for a, b in cuts if s < b < e]
    alone = dict(zip(words, context_assertions(" ".join(sentences), [(" ".join(sentences).index(w),
                                                                     " ".join(sentences).index(w) + len(w))
                                                                    for w in words])))
    assert alone == {"chest pain": "negated", "pneumothorax": "speculated", "rash": "present"}
    got = context_assertions(text, extents[:-1])
    assert got == [alone[text[s:e]] for s, e in extents[:-1]]


def test_extents_widen_to_tokens():
    text = "No fever.   Cough."
    assert context_assertions(text, [(3, 8), (4, 6), (12, 17), (30, 35)]) == ["negated", "negated", "present",
                                                                               "present"]


def test_assertion_labels_and_setting_are_validated(tmp_path):
    spec = load_task("maccrobat").model_dump()
    with pytest.raises(ValueError, match="assertion_labels: 'Symptom' is not a concept label"):
        Task(**{**spec, "assertion_labels": ["Symptom"]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("job:\n  assertion: negex\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="job.assertion"):
        load_settings(bad)


def test_fingerprint_names_method_labels_and_rules_release(task):
    assert assertion_fingerprint("model", task.assertion_labels) is None
    fp = assertion_fingerprint("combined", task.assertion_labels)
    assert {k: v for k, v in fp.items() if k != "rules_sha256"} == {
        "method": "combined", "labels": sorted(task.assertion_labels), "medspacy": "1.3.1"}
    assert len(fp["rules_sha256"]) == 12
    assert assertion_fingerprint("context", None)["labels"] is None
