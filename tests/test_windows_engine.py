"""The runaway path on the real engine (session fixture ``engine_pool``: vLLM, base model, grounded grammar).

A window whose answer runs to ``max_tokens`` before any complete item fails its note when it is assembled as it
came; through ``udfs.windows.extract_windows`` (as the job extracts) the same window is extracted again in pieces and
the note gets grounded concepts, exact offsets, and no error row. A tight budget stands in for a long runaway line:
the base model is deterministic (greedy), so the cut is the same on every run.
"""

from __future__ import annotations

from datetime import datetime, timezone

from notelake.conf.task import load_task
from notelake.models.engine import GenerationRequest
from notelake.udfs.assemble import assemble_note
from notelake.udfs.chunking import chunk_text
from notelake.udfs.windows import Window, extract_windows, request_fields

TEXT = ("A 54-year-old woman developed severe hepatotoxicity after starting isoniazid for latent tuberculosis. "
        "Two weeks after rifampin was added, she presented with jaundice and a rash, and both drugs were stopped.")
BUDGET = 16  # output tokens: fewer than the base model's first item over the whole window takes


def lineage() -> dict:
    return {"run_id": "t", "model": "m", "adapter": None, "adapter_sha256": None, "prompt_version": "p",
            "fingerprint": "f", "extracted_at": datetime.now(timezone.utc)}


def test_a_window_that_runs_away_gets_grounded_concepts_instead_of_failing_its_note(engine_pool):
    task = load_task("phee")
    chunks = chunk_text(TEXT, task.max_chunk_chars)

    def generate(windows: list[Window]) -> list:
        return engine_pool.generate([GenerationRequest(**request_fields(w, "grounded", BUDGET)) for w in windows])

    (first,) = generate([Window(0, task, chunks[0])])
    assert first.error is None and first.finish_reason == "length"
    as_it_came = assemble_note(note_id="n", text=TEXT, task=task, chunks=chunks, outputs=[first.text],
                               truncated=[True], lineage=lineage())
    assert [e["error_type"] for e in as_it_came.errors] == ["truncated_output"]

    (note,) = extract_windows([task], [chunks], generate)
    assert note.split >= 1 and len(note.chunks) > 1  # the window's answer replaced by its pieces' answers
    assert all(TEXT[c.start:c.end] == c.text for c in note.chunks)
    res = assemble_note(note_id="n", text=TEXT, task=task, lineage=lineage(), **note.assemble_inputs())
    assert res.errors == []
    grounded = [c for c in res.concepts if c["grounded"]]
    assert grounded and len(grounded) == len(res.concepts)
    assert all(TEXT[c["start"]:c["end"]] == c["text"] for c in grounded)
