"""The executor side of the job (jobs/extraction/stage.py) on the REPLAY engine: batches are sent ahead of parsing, and the
deadline stops new batches but finishes those already sent. No Spark or Ray: the stage is plain Python."""

from __future__ import annotations

import base64
import random
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from notelake.conf import EngineConfig
from notelake.conf.task import load_task
from notelake.jobs.extraction.identity import describe_extraction
from notelake.jobs.extraction.stage import StageContext, extract_batches
from notelake.models.engine import make_engine
from notelake.udfs.hashing import sha256_text

TEXTS = [
    "A 67-year-old man developed acute kidney injury after starting ibuprofen for knee pain.",
    "Severe hepatotoxicity was observed in a woman treated with isoniazid.",
    "Rash resolved after amoxicillin was stopped.",
    "She had a seizure two days after bupropion was started.",
    "Warfarin was associated with gastrointestinal bleeding.",
    "Lisinopril caused angioedema in a 54-year-old patient.",
]
BATCH = 2


@pytest.fixture(scope="module")
def engine(base_model_path):
    return make_engine(EngineConfig(backend="replay", max_num_seqs=4))


def context(settings, staging, ahead: int, deadline: float | None = None, task: str = "phee") -> StageContext:
    task = load_task(task)
    cfg = settings.with_overrides(engine={"backend": "replay"}, ray={"batches_ahead": ahead})
    lineage = describe_extraction(cfg, task).lineage("r1")
    return StageContext(settings=cfg, tasks={task.name: task}, lineages={task.name: lineage},
                        staging_dir=str(staging), passthrough=(), deadline=deadline)


def one_batch(texts: list[str], task: str) -> pa.RecordBatch:
    """Notes ``n0``, ``n1``, ... of ``task``, new to the output, as the stage receives them."""
    n = len(texts)
    return pa.record_batch({
        "note_id": [f"n{i}" for i in range(n)], "text": texts, "text_sha256": [sha256_text(t) for t in texts],
        "note_bucket": pa.array([0] * n, pa.int32()), "passthrough_sha256": pa.nulls(n, pa.string()),
        "attempt": pa.array([1] * n, pa.int32()), "task": [task] * n, "has_output": [False] * n,
        "in_ledger": [False] * n,
    })


def note_batches(events: list, pause_before: int | None = None):
    notes = pa.Table.from_batches([one_batch(TEXTS, "phee")])
    for k, batch in enumerate(notes.to_batches(max_chunksize=BATCH)):
        if k == pause_before:
            time.sleep(3)
        events.append(("read", k))
        yield batch


def expected_order(n_batches: int, ahead: int) -> list[tuple[str, int]]:
    order, parsed = [], 0
    for k in range(n_batches):
        order.append(("read", k))
        if k - parsed >= ahead:
            order.append(("parsed", parsed))
            parsed += 1
    return order + [("parsed", k) for k in range(parsed, n_batches)]


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_batches_are_sent_before_the_one_in_front_is_parsed(tmp_path, settings, engine, ahead):
    events: list = []
    outcomes = []
    for seq, outcome in extract_batches(note_batches(events), context(settings, tmp_path, ahead), lambda: engine):
        events.append(("parsed", seq))
        outcomes.append(outcome)
    n_batches = len(TEXTS) // BATCH
    assert events == expected_order(n_batches, ahead)
    rows = pa.Table.from_batches(outcomes).to_pylist()
    assert [r["note_id"] for r in rows] == [f"n{i}" for i in range(len(TEXTS))]  # every note once, in order
    assert sum(r["n_concepts"] for r in rows) > 0
    staged = pq.read_table(tmp_path / "ledger").to_pylist()
    assert sorted(r["note_id"] for r in staged) == sorted(r["note_id"] for r in rows)


def test_after_the_deadline_batches_already_sent_are_finished_and_no_new_one_is_sent(tmp_path, settings, engine):
    events: list = []
    ctx = context(settings, tmp_path, ahead=1, deadline=time.time() + 1.5)
    outcomes = [s for _, s in extract_batches(note_batches(events, pause_before=2), ctx, lambda: engine)]
    rows = pa.Table.from_batches(outcomes).to_pylist()
    # batches 0 and 1 went out before the deadline; batch 2 was read after it and never sent
    assert [r["note_id"] for r in rows] == ["n0", "n1", "n2", "n3"]
    assert sorted(r["note_id"] for r in pq.read_table(tmp_path / "ledger").to_pylist()) == ["n0", "n1", "n2", "n3"]


# An image pasted into a note as MIME base64 (76-character lines, 57 bytes each): no prose, no model call.
BLOB = base64.encodebytes(random.Random(7).randbytes(57 * 53)).decode()
NEGATED = "Patient denies nausea after heparin."
# Longer than spaCy's max_length (1 000 000 characters): ConText reads it in segments, so it lands like any note.
HUGE = NEGATED + "\n" + base64.encodebytes(random.Random(8).randbytes(750_000)).decode() + "\nHeparin was stopped."
# A note whose assertion step raises (a fault planted in ConText for notes holding this sentence: nothing in the
# packages fails this way on admitted text).
POISON = "A fever, a cough and a rash developed after aspirin; the patient denies nausea, pain and dyspnea."


@pytest.fixture
def poisoned_context(monkeypatch):
    from notelake.models import assertion

    judge = assertion._context_of

    def raising(text, extents, labels):
        if POISON in text:
            raise ValueError("a planted fault")
        return judge(text, extents, labels)

    monkeypatch.setattr(assertion, "_context_of", raising)


def blob_note(prose_before: str = "Patient developed a rash after amoxicillin.",
              prose_after: str = "The rash resolved after amoxicillin was stopped.") -> tuple[str, tuple[int, int]]:
    """Prose, an embedded base64 blob, prose; and the blob's extent."""
    start = len(prose_before) + 1
    return f"{prose_before}\n{BLOB}{prose_after}", (start, start + len(BLOB))


def staged(folder, table: str) -> list[dict]:
    return pq.read_table(folder / table).to_pylist() if (folder / table).exists() else []


def test_a_blob_note_negated_concepts_and_a_note_that_raises_in_one_batch(tmp_path, settings, engine,
                                                                         poisoned_context):
    """One batch: a negated finding (REPLAY answers carry no assertion marker: the model says present), a note with
    a base64 blob between its prose, a note over spaCy's 1 000 000 characters, and a note whose assertion step
    raises. The first gets ConText's ``negated``, the second its prose's concepts with no model call for the blob,
    the third its concepts, the fourth fails alone."""
    text, (blob_start, blob_end) = blob_note()
    for method in ("combined", "model"):
        out = tmp_path / method
        ctx = context(settings.with_overrides(job={"assertion": method}), out, ahead=1, task="maccrobat")
        outcomes = [o for _, o in extract_batches([one_batch([NEGATED, text, HUGE, POISON], "maccrobat")], ctx,
                                                  lambda: engine)]
        rows = {r["note_id"]: r for r in pa.Table.from_batches(outcomes).to_pylist()}
        concepts = staged(out, "concepts")
        nausea = next(c for c in concepts if c["note_id"] == "n0" and c["text"] == "nausea")
        assert nausea["assertion"] == ("negated" if method == "combined" else "present")
        assert (rows["n1"]["status"], rows["n1"]["n_errors"]) == ("succeeded", 0)
        assert rows["n1"]["n_no_prose"] >= 1
        found = [c for c in concepts if c["note_id"] == "n1"]
        assert {c["start"] < blob_start for c in found} == {True, False}  # concepts on both sides of the blob
        assert all(c["end"] <= blob_start or c["start"] >= blob_end for c in found)
        assert all(text[c["start"]:c["end"]] == c["text"] for c in found)
        huge = [c for c in concepts if c["note_id"] == "n2"]
        assert rows["n2"]["status"] == "succeeded" and huge
        assert all(HUGE[c["start"]:c["end"]] == c["text"] for c in huge)
        if method == "model":  # ConText never runs: the poisoned note succeeds
            assert rows["n3"]["status"] == "succeeded"
            continue
        assert [rows[n]["status"] for n in ("n0", "n1", "n2", "n3")] == ["succeeded"] * 3 + ["failed"]
        (error,) = staged(out, "errors")
        assert (error["note_id"], error["stage"], error["error_type"]) == ("n3", "assertion", "exception")
        assert error["message"].startswith("ValueError at tests/test_stage.py")
        assert "planted" not in error["message"] and "aspirin" not in error["message"].lower()
        ledger = {r["note_id"]: r["status"] for r in staged(out, "ledger")}
        assert ledger == {"n0": "succeeded", "n1": "succeeded", "n2": "succeeded", "n3": "failed"}
        assert not [c for c in concepts if c["note_id"] == "n3"]