"""Golden round trip on the real dev sets: gold answer -> v2 lines -> parse -> ground -> assemble.

What answer schema v2 can carry must come back: gold concepts with exactly their label and spans, relations of
the task's labels, and few relations that gold does not have (derived event relations over-generate where
several events share one trigger). MACCROBAT notes are chunked as the job chunks them and the gold answer is
rendered per chunk, so this also exercises overlap merging and offset shifting.
"""

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from notelake.conf.task import load_task
from notelake.udfs.answer import gold_answer
from notelake.udfs.assemble import assemble_note
from notelake.udfs.chunking import Chunk, chunk_text
from notelake.udfs.hashing import sha256_text
from notelake.udfs.schemas import concepts_schema, relations_schema, rows_to_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_data() -> Path:
    for candidate in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if (candidate / "phee" / "dev.jsonl").exists():
            return candidate
    pytest.skip("shared/data (gold corpora) not available beside the repository")


def round_trip(corpus: str, data: Path) -> dict:
    task = load_task(corpus)
    records = [json.loads(line) for line in (data / corpus / "dev.jsonl").read_text(encoding="utf-8").splitlines() if line]
    stats = dict(concepts=0, concepts_ok=0, multi=0, multi_ok=0, relations=0, relations_ok=0, chunks=0, emitted=0)
    for rec in records:
        text = rec["text"]
        chunks = chunk_text(text, task.max_chunk_chars) if corpus == "maccrobat" else [Chunk(0, 0, len(text), text)]
        outputs = [gold_answer(task, rec, window=(c.start, c.end)) for c in chunks]
        lineage = {"run_id": "golden", "model": "gold", "adapter": None, "adapter_sha256": None, "prompt_version": "gold",
                   "fingerprint": "0" * 32, "text_sha256": sha256_text(text), "extracted_at": datetime.now(timezone.utc)}
        res = assemble_note(note_id=rec["note_id"], text=text, task=task, chunks=chunks, outputs=outputs, lineage=lineage)
        assert res.errors == [] and res.warnings == 0
        stats["chunks"] += len(chunks)
        rows_to_table(res.concepts, concepts_schema())
        rows_to_table(res.relations, relations_schema())
        for row in res.concepts:
            if row["grounded"]:
                assert " ".join(text[s["start"]:s["end"]] for s in row["spans"]) == row["text"]
        found = {(c["label"], tuple((s["start"], s["end"]) for s in c["spans"] or ())): c["concept_id"] for c in res.concepts}
        id_of = {}
        for c in rec["concepts"]:
            key = (c["label"], tuple(map(tuple, c["spans"])))
            multi = len(c["spans"]) > 1
            stats["concepts"] += 1
            stats["multi"] += multi
            if key in found:
                stats["concepts_ok"] += 1
                stats["multi_ok"] += multi
                id_of[c["id"]] = found[key]
        got = {(r["label"], r["head_concept_id"], r["tail_concept_id"]) for r in res.relations}
        stats["emitted"] += len(got)
        for r in rec["relations"]:
            if r["label"] not in task.relations:
                continue
            stats["relations"] += 1
            if r["head"] in id_of and r["tail"] in id_of and (r["label"], id_of[r["head"]], id_of[r["tail"]]) in got:
                stats["relations_ok"] += 1
    print(f"\n[golden {corpus}/dev] notes={len(records)} chunks={stats['chunks']} "
          f"concepts {stats['concepts_ok']}/{stats['concepts']} = {stats['concepts_ok'] / stats['concepts']:.4f} "
          f"(multi-span {stats['multi_ok']}/{stats['multi']}) "
          f"relations {stats['relations_ok']}/{stats['relations']} = {stats['relations_ok'] / stats['relations']:.4f}, "
          f"precision {stats['relations_ok']}/{stats['emitted']} = {stats['relations_ok'] / stats['emitted']:.4f}")
    return stats


def test_golden_phee(shared_data):
    s = round_trip("phee", shared_data)
    assert s["concepts_ok"] >= 0.985 * s["concepts"]  # lost: an argument repeated in its sentence, gold on the far copy
    assert s["multi_ok"] >= 0.95 * s["multi"]
    assert s["relations_ok"] >= 0.96 * s["relations"]
    assert s["relations_ok"] >= 0.96 * s["emitted"]


def test_golden_maccrobat(shared_data):
    s = round_trip("maccrobat", shared_data)
    assert s["concepts_ok"] >= 0.99 * s["concepts"]
    # relations whose ends never share a chunk cannot come back; the rest must
    assert s["relations_ok"] >= 0.95 * s["relations"]
    assert s["relations_ok"] >= 0.96 * s["emitted"]
