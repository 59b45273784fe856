from datetime import datetime, timezone

import pyarrow as pa
import pytest

from notelake.conf.task import load_task
from notelake.udfs.answer import dump_answer
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


TEXT = ("A 54-year-old man developed hypoglycemia after insulin. "
        "Later, insulin-induced lipoatrophy was noted; insulin was stopped.")


def test_single_chunk_rows_match_schema(phee):
    answer = {
        "concepts": [
            {"label": "Subject_age", "text": "54-year-old"},
            {"label": "ADE_trigger", "text": "developed"},
            {"label": "Effect", "text": "hypoglycemia"},
            {"label": "Drug", "text": "insulin"},
            {"label": "Treatment", "text": "insulin"},
            {"label": "Drug", "text": "insulin", "occurrence": 2},
            {"label": "Effect", "text": "hallucinated effect", "assertion": "speculated"},
        ],
        "relations": [
            {"label": "Subject_age", "head": 1, "tail": 0},
            {"label": "Effect", "head": 1, "tail": 2},
            {"label": "Drug", "head": 1, "tail": 3},
            {"label": "Treatment", "head": 1, "tail": 4},
            {"label": "adverse_effect", "head": 3, "tail": 2},
            {"label": "adverse_effect", "head": 3, "tail": 6},
        ],
    }
    chunks = chunk_text(TEXT, phee.max_chunk_chars)
    res = assemble_note(note_id="n1", text=TEXT, task=phee, chunks=chunks, outputs=[dump_answer(answer)],
                        lineage=lineage(TEXT), passthrough={"patient_id": "p9", "note_date": None})
    assert isinstance(res, NoteResult) and res.n_chunks == 1 and res.errors == [] and res.warnings == 0
    assert len(res.concepts) == 7 and len(res.relations) == 6
    by = {(c["label"], c["start"]): c for c in res.concepts}
    drug1, treat1 = by[("Drug", TEXT.index("insulin"))], by[("Treatment", TEXT.index("insulin"))]
    i = TEXT.index("insulin")
    assert drug1["spans"] == treat1["spans"] == [{"start": i, "end": i + 7}]
    assert drug1["concept_id"] != treat1["concept_id"]
    drug2 = by[("Drug", TEXT.index("insulin", 50))]
    assert TEXT[drug2["start"]:drug2["end"]] == "insulin"
    ung = [c for c in res.concepts if not c["grounded"]]
    assert len(ung) == 1 and ung[0]["start"] is None and ung[0]["spans"] is None
    assert ung[0]["grounding_method"] == "none" and ung[0]["assertion"] == "speculated"
    assert all(c["patient_id"] == "p9" and c["run_id"] == "run-1" for c in res.concepts + res.relations)
    ids = {c["concept_id"] for c in res.concepts}
    assert len(ids) == 7 and all(r["head_concept_id"] in ids and r["tail_concept_id"] in ids for r in res.relations)
    assert len({r["relation_id"] for r in res.relations}) == 6
    ae = [r for r in res.relations if r["label"] == "adverse_effect" and r["tail_text"] == "hypoglycemia"]
    assert ae and ae[0]["head_label"] == "Drug" and ae[0]["head_text"] == "insulin"
    ctable = rows_to_table(res.concepts, concepts_schema(PASSTHROUGH_SCHEMA))
    rtable = rows_to_table(res.relations, relations_schema(PASSTHROUGH_SCHEMA))
    assert ctable.num_rows == 7 and rtable.num_rows == 6
    assert ctable.column("spans").to_pylist()[0] == [{"start": 2, "end": 13}]


def test_overlapping_chunks_merge_and_keep_lowest_chunk(phee):
    text = "Lithium caused tremor. Lithium was stopped and tremor resolved later."
    chunks = [Chunk(0, 0, 22, text[0:22]), Chunk(1, 15, len(text), text[15:])]
    assert chunks[0].text == "Lithium caused tremor." and chunks[1].text.startswith("tremor.")
    out0 = {"concepts": [{"label": "Drug", "text": "Lithium"}, {"label": "ADE_trigger", "text": "caused"},
                         {"label": "Effect", "text": "tremor"}],
            "relations": [{"label": "adverse_effect", "head": 0, "tail": 2}, {"label": "Effect", "head": 1, "tail": 2}]}
    out1 = {"concepts": [{"label": "Effect", "text": "tremor"}, {"label": "Drug", "text": "Lithium"},
                         {"label": "Effect", "text": "tremor", "occurrence": 2}, {"label": "Effect", "text": "tremor"}],
            "relations": [{"label": "adverse_effect", "head": 1, "tail": 2}, {"label": "adverse_effect", "head": 1, "tail": 3}]}
    res = assemble_note(note_id="n2", text=text, task=phee, chunks=chunks,
                        outputs=[dump_answer(out0), dump_answer(out1)], lineage=lineage(text))
    spans = sorted((c["label"], c["start"], c["end"], c["chunk_index"]) for c in res.concepts)
    assert spans == [("ADE_trigger", 8, 14, 0), ("Drug", 0, 7, 0), ("Drug", 23, 30, 1), ("Effect", 15, 21, 0), ("Effect", 47, 53, 1)]
    # chunk 1's second "tremor" mention without a hint is the first unused one: the merged 15..21
    rels = sorted((r["label"], r["head_text"], r["tail_text"], r["chunk_index"]) for r in res.relations)
    assert len(rels) == 4  # (Drug@23 -> tremor@47) and (Drug@23 -> tremor@15) from chunk 1, two from chunk 0
    assert all(text[c["start"]:c["end"]] == c["text"] for c in res.concepts)


def test_failed_chunks_give_error_rows_and_others_still_count(phee):
    text = "Insulin caused hypoglycemia. " * 3
    chunks = [Chunk(0, 0, 29, text[:29]), Chunk(1, 29, 58, text[29:58]), Chunk(2, 58, 87, text[58:87])]
    good = dump_answer({"concepts": [{"label": "Drug", "text": "Insulin"}], "relations": []})
    res = assemble_note(note_id="n3", text=text, task=phee, chunks=chunks,
                        outputs=[good, '{"concepts":[{"label":"Drug","te', None],
                        output_errors=[None, None, "EngineDeadError"], lineage=lineage(text))
    assert [c["start"] for c in res.concepts] == [0]
    assert [(e["stage"], e["error_type"], e["chunk_index"]) for e in res.errors] == [
        ("parse", "truncated_json", 1), ("generate", "engine_error", 2)]
    for e in res.errors:
        assert e["note_id"] == "n3" and e["text_sha256"] == sha256_text(text) and "Insulin" not in e["message"]
    assert rows_to_table(res.errors, ERRORS_SCHEMA).num_rows == 2


def test_ungrounded_duplicates_get_unique_ids_and_ordinals(phee):
    text = "No drug here."
    raw = dump_answer({"concepts": [{"label": "Drug", "text": "aspirin"}, {"label": "Drug", "text": "aspirin"},
                                    {"label": "Drug", "text": "ibuprofen"}], "relations": []})
    res = assemble_note(note_id="n4", text=text, task=phee, chunks=chunk_text(text, 100), outputs=[raw], lineage=lineage(text))
    assert sorted(c["text"] for c in res.concepts) == ["aspirin", "ibuprofen"]  # repeated hallucination merged
    assert len({c["concept_id"] for c in res.concepts}) == 2 and not any(c["grounded"] for c in res.concepts)


def test_multi_span_concept_row(phee):
    text = "She developed renal and hepatic failure after cisplatin."
    raw = dump_answer({"concepts": [{"label": "Effect", "text": "renal failure"}, {"label": "Effect", "text": "hepatic failure"}],
                       "relations": []})
    res = assemble_note(note_id="n5", text=text, task=phee, chunks=chunk_text(text, 1000), outputs=[raw], lineage=lineage(text))
    renal = next(c for c in res.concepts if c["text"] == "renal failure")
    assert renal["spans"] == [{"start": 14, "end": 19}, {"start": 32, "end": 39}]
    assert (renal["start"], renal["end"]) == (14, 39) and renal["grounding_method"] == "exact"


def test_mismatched_lengths_and_passthrough_clash_raise(phee):
    with pytest.raises(ValueError):
        assemble_note(note_id="n", text="x", task=phee, chunks=chunk_text("x", 10), outputs=[], lineage=lineage("x"))
    with pytest.raises(ValueError):
        assemble_note(note_id="n", text="x", task=phee, chunks=chunk_text("x", 10), outputs=["{}"], lineage=lineage("x"),
                      passthrough={"label": "y"})
