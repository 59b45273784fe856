from datetime import datetime, timezone

import pyarrow as pa
import pytest

from notelake.conf.task import load_task
from notelake.udfs.assemble import NoteResult, assemble_note
from notelake.udfs.chunking import Chunk, chunk_text
from notelake.udfs.hashing import sha256_text
from notelake.udfs.schemas import ERRORS_SCHEMA, concepts_schema, relations_schema, rows_to_table

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
PASSTHROUGH_SCHEMA = pa.schema([pa.field("patient_id", pa.string()), pa.field("note_date", pa.date32())])


def lineage(text: str) -> dict:
    return {"run_id": "run-1", "model": "smollm2-135m-instruct", "adapter": "phee-lora", "adapter_sha256": "a" * 64,
            "prompt_version": "t1-abc", "fingerprint": "f" * 32, "text_sha256": sha256_text(text), "extracted_at": NOW}


@pytest.fixture(scope="module")
def phee():
    return load_task("phee")


@pytest.fixture(scope="module")
def maccrobat():
    return load_task("maccrobat")


TEXT = ("A 54-year-old man developed hypoglycemia after insulin. "
        "Later, insulin-induced lipoatrophy was noted; insulin was stopped.")


def test_single_chunk_rows_match_schema(phee):
    answer = ("ADE_trigger: developed | Subject_age: 54-year-old | Treatment: insulin | Drug: insulin | "
              "Effect: hypoglycemia | Effect(speculated): hallucinated effect\n"
              "ADE_trigger: induced | Drug: insulin | Effect: lipoatrophy")
    chunks = chunk_text(TEXT, phee.max_chunk_chars)
    res = assemble_note(note_id="n1", text=TEXT, task=phee, chunks=chunks, outputs=[answer],
                        lineage=lineage(TEXT), passthrough={"patient_id": "p9", "note_date": None})
    assert isinstance(res, NoteResult) and res.n_chunks == 1 and res.errors == [] and res.warnings == 0
    assert len(res.concepts) == 9 and len(res.relations) == 10
    assert res.ungrounded == 1 and res.dropped_relations == 0 and res.truncated_chunks == 0
    by = {(c["label"], c["start"]): c for c in res.concepts}
    i = TEXT.index("insulin")
    drug1, treat1 = by[("Drug", i)], by[("Treatment", i)]
    assert drug1["spans"] == treat1["spans"] == [{"start": i, "end": i + 7}]
    assert drug1["concept_id"] != treat1["concept_id"]
    drug2 = by[("Drug", TEXT.index("insulin-induced"))]  # the insulin next to its own trigger
    assert TEXT[drug2["start"]:drug2["end"]] == "insulin"
    ung = [c for c in res.concepts if not c["grounded"]]
    assert len(ung) == 1 and ung[0]["start"] is None and ung[0]["spans"] is None
    assert ung[0]["grounding_method"] == "none" and ung[0]["assertion"] == "speculated"
    assert all(c["patient_id"] == "p9" and c["run_id"] == "run-1" for c in res.concepts + res.relations)
    ids = {c["concept_id"] for c in res.concepts}
    assert len(ids) == 9 and all(r["head_concept_id"] in ids and r["tail_concept_id"] in ids for r in res.relations)
    assert len({r["relation_id"] for r in res.relations}) == 10
    ae = sorted((r["head_text"], r["head_concept_id"] == drug2["concept_id"], r["tail_text"])
                for r in res.relations if r["label"] == "adverse_effect")
    assert ae == [("insulin", False, "hallucinated effect"), ("insulin", False, "hypoglycemia"),
                  ("insulin", True, "lipoatrophy")]
    ctable = rows_to_table(res.concepts, concepts_schema(PASSTHROUGH_SCHEMA))
    rtable = rows_to_table(res.relations, relations_schema(PASSTHROUGH_SCHEMA))
    assert ctable.num_rows == 9 and rtable.num_rows == 10
    assert ctable.column("spans").to_pylist()[0] == [{"start": 2, "end": 13}]


def test_reference_items_resolve_to_the_nearest_concept(maccrobat):
    text = "Severe chest pain at rest and mild chest pain on effort."
    answer = ("Severity: Severe | MODIFY: chest pain\nSign_symptom: chest pain\n"
              "Severity: mild | MODIFY: chest pain\nSign_symptom: chest pain | MODIFY: nowhere")
    res = assemble_note(note_id="n6", text=text, task=maccrobat, chunks=chunk_text(text, 400), outputs=[answer],
                        lineage=lineage(text))
    pain = {c["concept_id"]: c["start"] for c in res.concepts if c["label"] == "Sign_symptom"}
    got = sorted((r["head_text"], pain[r["tail_concept_id"]]) for r in res.relations)
    assert got == [("Severe", 7), ("mild", 35)]
    assert res.dropped_relations == 1 and res.errors == []


def test_truncated_output_loses_only_its_last_line(phee):
    text = "Lithium caused tremor and ataxia."
    res = assemble_note(note_id="n7", text=text, task=phee, chunks=chunk_text(text, 1000),
                        outputs=["ADE_trigger: caused | Drug: Lithium | Effect: tremor\nADE_trigger: cau"],
                        truncated=[True], lineage=lineage(text))
    assert sorted(c["text"] for c in res.concepts) == ["Lithium", "caused", "tremor"]
    assert res.truncated_chunks == 1 and res.warnings == 1 and res.errors == []


def test_overlapping_chunks_merge_and_keep_lowest_chunk(phee):
    text = "Lithium caused tremor. Lithium was stopped and tremor resolved later."
    chunks = [Chunk(0, 0, 22, text[0:22]), Chunk(1, 15, len(text), text[15:])]
    assert chunks[0].text == "Lithium caused tremor." and chunks[1].text.startswith("tremor.")
    out0 = "ADE_trigger: caused | Drug: Lithium | Effect: tremor"
    out1 = "Effect: tremor\nDrug: Lithium\nEffect: tremor"
    res = assemble_note(note_id="n2", text=text, task=phee, chunks=chunks, outputs=[out0, out1], lineage=lineage(text))
    spans = sorted((c["label"], c["start"], c["end"], c["chunk_index"]) for c in res.concepts)
    assert spans == [("ADE_trigger", 8, 14, 0), ("Drug", 0, 7, 0), ("Drug", 23, 30, 1), ("Effect", 15, 21, 0),
                     ("Effect", 47, 53, 1)]
    # chunk 1's first tremor is chunk 0's (merged, chunk 0 kept); its second one comes after "Lithium" (the cursor)
    rels = sorted((r["label"], r["head_text"], r["tail_text"], r["chunk_index"]) for r in res.relations)
    assert rels == [("Drug", "caused", "Lithium", 0), ("Effect", "caused", "tremor", 0),
                    ("adverse_effect", "Lithium", "tremor", 0)]
    assert all(text[c["start"]:c["end"]] == c["text"] for c in res.concepts)


def test_failed_chunks_give_error_rows_and_others_still_count(phee):
    text = "Insulin caused hypoglycemia. " * 3
    chunks = [Chunk(0, 0, 29, text[:29]), Chunk(1, 29, 58, text[29:58]), Chunk(2, 58, 87, text[58:87])]
    res = assemble_note(note_id="n3", text=text, task=phee, chunks=chunks,
                        outputs=["Drug: Insulin", "Insulin caused hypoglycemia, I think.", None],
                        output_errors=[None, None, "EngineDeadError"], lineage=lineage(text))
    assert [c["start"] for c in res.concepts] == [0]
    assert [(e["stage"], e["error_type"], e["chunk_index"]) for e in res.errors] == [
        ("parse", "no_answer_lines", 1), ("generate", "engine_error", 2)]
    for e in res.errors:
        assert e["note_id"] == "n3" and e["text_sha256"] == sha256_text(text) and "Insulin" not in e["message"]
    assert rows_to_table(res.errors, ERRORS_SCHEMA).num_rows == 2


def test_ungrounded_duplicates_get_unique_ids_and_ordinals(phee):
    text = "No drug here."
    raw = "Drug: aspirin\nDrug: aspirin\nDrug: ibuprofen"
    res = assemble_note(note_id="n4", text=text, task=phee, chunks=chunk_text(text, 100), outputs=[raw], lineage=lineage(text))
    assert sorted(c["text"] for c in res.concepts) == ["aspirin", "ibuprofen"]  # repeated hallucination merged
    assert len({c["concept_id"] for c in res.concepts}) == 2 and not any(c["grounded"] for c in res.concepts)


def test_multi_span_concept_row(phee):
    text = "She developed renal and hepatic failure after cisplatin."
    raw = "Effect: renal failure\nEffect: hepatic failure"
    res = assemble_note(note_id="n5", text=text, task=phee, chunks=chunk_text(text, 1000), outputs=[raw], lineage=lineage(text))
    renal = next(c for c in res.concepts if c["text"] == "renal failure")
    assert renal["spans"] == [{"start": 14, "end": 19}, {"start": 32, "end": 39}]
    assert (renal["start"], renal["end"]) == (14, 39) and renal["grounding_method"] == "exact"


def test_mismatched_lengths_and_passthrough_clash_raise(phee):
    with pytest.raises(ValueError):
        assemble_note(note_id="n", text="x", task=phee, chunks=chunk_text("x", 10), outputs=[], lineage=lineage("x"))
    with pytest.raises(ValueError):
        assemble_note(note_id="n", text="x", task=phee, chunks=chunk_text("x", 10), outputs=["none"], lineage=lineage("x"),
                      passthrough={"label": "y"})


def test_tagger_spans_and_pair_relations(phee):
    """The tagger backend's rows: concepts from (label, start, end) in the chunk, relations as indexes into them;
    a pair the task does not allow is dropped and counted, a self-loop is dropped."""
    chunks = chunk_text(TEXT, phee.max_chunk_chars)

    def span(label: str, word: str) -> tuple:
        start = TEXT.index(word)
        return (label, start, start + len(word))

    tagged = (span("Drug", "insulin"), span("Effect", "hypoglycemia"), span("ADE_trigger", "developed"))
    relations = (("adverse_effect", 0, 1), ("Effect", 2, 1), ("adverse_effect", 1, 0), ("Drug", 0, 0))
    res = assemble_note(note_id="n1", text=TEXT, task=phee, chunks=chunks, outputs=[None], tagged=[tagged],
                        tag_relations=[relations], lineage=lineage(TEXT))
    assert not res.errors and {(c["label"], c["text"], c["grounding_method"]) for c in res.concepts} == {
        ("Drug", "insulin", "tagger"), ("Effect", "hypoglycemia", "tagger"), ("ADE_trigger", "developed", "tagger")}
    assert {(r["label"], r["head_text"], r["tail_text"]) for r in res.relations} == {
        ("adverse_effect", "insulin", "hypoglycemia"), ("Effect", "developed", "hypoglycemia")}
    ids = {c["concept_id"] for c in res.concepts}
    assert all(r["head_concept_id"] in ids and r["tail_concept_id"] in ids for r in res.relations)
    assert res.dropped_relations == 2  # Effect -> Drug is not an allowed pair; Drug -> itself is a self-loop


def test_tagger_concepts_anchor_the_answers_relations(phee):
    """Tagger concepts (the note tagged in its own windows) with the generated answer's relations
    (models/extractors.py): each answer mention goes to the tagger concept it overlaps, its assertion marker with
    it; the answer's own mentions are not written, and a relation with an end on no tagger concept is dropped."""
    from types import SimpleNamespace

    chunks = chunk_text(TEXT, phee.max_chunk_chars)
    start = TEXT.index("hypoglycemia")
    tagged = (("Drug", TEXT.index("insulin"), TEXT.index("insulin") + 7), ("Effect", start, start + 7))
    answer = ("ADE_trigger: developed | Drug: insulin | Effect(negated): hypoglycemia\n"
              "ADE_trigger: induced | Drug: insulin | Effect: lipoatrophy")
    tag_window = SimpleNamespace(spans=tagged, relations=None, error=None)
    res = assemble_note(note_id="n1", text=TEXT, task=phee, chunks=chunks, outputs=[answer],
                        heads=[(Chunk(0, 0, len(TEXT), TEXT), tag_window)], lineage=lineage(TEXT))
    assert not res.errors
    assert {(c["label"], c["text"], c["grounding_method"], c["assertion"]) for c in res.concepts} == {
        ("Drug", "insulin", "tagger", "present"), ("Effect", "hypogly", "tagger", "negated")}
    assert {(r["label"], r["head_text"], r["tail_text"]) for r in res.relations} == {
        ("adverse_effect", "insulin", "hypogly")}
    assert res.dropped_relations >= 1  # insulin -> lipoatrophy: the tagger found no lipoatrophy
