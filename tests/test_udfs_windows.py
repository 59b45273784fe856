"""udfs/windows.py: a window without prose gets no model call; a cut window is extracted again in pieces with exact
offsets into the note, a bounded number of times; one window never costs its note a failure.

``generate`` here is a scripted model (the contract is one result per window, in order): it answers one line per
drug name of the window and runs away (a line that never ends, cut at max_tokens) on windows longer than a limit.
tests/test_windows_engine.py runs the same path on the real engine.
"""

from __future__ import annotations

import base64

import pytest

from notelake.conf.task import load_task
from notelake.models.engine import GenerationResult, error_result
from notelake.udfs.assemble import assemble_note
from notelake.udfs.chunking import chunk_text
from notelake.udfs.windows import MIN_WINDOW_CHARS, NoProseAnswer, Window, extract_windows
from test_udfs_assemble import lineage

DRUGS = ("aspirin", "warfarin", "ibuprofen", "naproxène", "амоксициллин")


class ScriptedModel:
    """Answers ``Drug: <name>`` lines; a window longer than ``runs_away_over`` characters gets a cut answer."""

    def __init__(self, runs_away_over: int, complete_lines_before_loop: bool = False,
                 loop: str = "Drug: aspirin | Drug: aspirin | Dr"):
        self.runs_away_over = runs_away_over
        self.complete_lines_before_loop = complete_lines_before_loop
        self.loop = loop
        self.calls: list[list[Window]] = []

    def __call__(self, windows: list[Window]) -> list[GenerationResult]:
        self.calls.append(list(windows))
        out = []
        for w in windows:
            lines = [f"Drug: {d}" for d in DRUGS if d in w.chunk.text]
            if len(w.chunk.text) > self.runs_away_over:
                head = "\n".join(lines) + "\n" if self.complete_lines_before_loop and lines else ""
                out.append(GenerationResult(f"{w.note}:{w.chunk.start}", head + self.loop,
                                            None, 10, 64, "length"))
            else:
                out.append(GenerationResult(f"{w.note}:{w.chunk.start}", "\n".join(lines) or "none", None, 10, 8,
                                            "stop"))
        return out


@pytest.fixture(scope="module")
def phee():
    return load_task("phee")


def assemble(task, note_id: str, text: str, note) -> object:
    return assemble_note(note_id=note_id, text=text, task=task, lineage=lineage(text), **note.assemble_inputs())


def test_cut_windows_are_extracted_again_in_pieces_with_exact_offsets(phee):
    text = ("Der Patient nahm aspirin und naproxène 😀 ein. " * 2 + "Пациент получал амоксициллин и warfarin. "
            + "Später ibuprofen, dann Übelkeit. " * 2)
    chunked = [chunk_text(text, 160, 40)]
    model = ScriptedModel(runs_away_over=70)
    (note,) = extract_windows([phee], chunked, model)
    assert len(model.calls) >= 2 and len(model.calls) <= 4  # the first pass, then rounds of pieces
    assert note.split >= 2 and all(o.finish_reason == "stop" for o in note.outputs)  # pieces replaced cut windows
    assert [c.index for c in note.chunks] == list(range(len(note.chunks)))
    assert all(text[c.start:c.end] == c.text for c in note.chunks)  # exact over emoji, accents, Cyrillic
    assert all(len(c.text) <= 70 for c, o in zip(note.chunks, note.outputs) if o.finish_reason == "stop")
    res = assemble(phee, "n1", text, note)
    assert res.errors == []
    found = {(c["text"], c["start"]) for c in res.concepts}
    for drug in DRUGS:
        at = text.find(drug)
        while at >= 0:
            assert (drug, at) in found  # every occurrence, grounded at its own offsets in the note
            at = text.find(drug, at + 1)


def test_windows_without_prose_get_no_model_call(phee):
    blob = base64.encodebytes(bytes(range(256)) * 2).decode()
    rtf = r"{\rtf1\ansi\deff0{\fonttbl{\f0\fnil\fcharset0 Calibri;}}{\pict\pngblip " + "89504e470d0a1a0a" * 30 + "}"
    text = "Then aspirin was given. " + " " * 300 + "=" * 300 + "\n" + blob + rtf + "\nLater warfarin was stopped."
    chunked = [chunk_text(text, 200, 0)]
    model = ScriptedModel(runs_away_over=10_000)
    (note,) = extract_windows([phee], chunked, model)
    sent = [w.chunk for call in model.calls for w in call]
    assert note.no_prose >= 5 and len(model.calls) == 1
    # what reaches the model is the prose and nothing else, at its own offsets in the note
    assert " ".join(c.text for c in sent).split() == "Then aspirin was given. Later warfarin was stopped.".split()
    assert all(text[c.start:c.end] == c.text for c in sent)
    assert sum(isinstance(o, NoProseAnswer) for o in note.outputs) == note.no_prose
    res = assemble(phee, "n2", text, note)
    assert res.errors == [] and {c["text"] for c in res.concepts} == {"aspirin", "warfarin"}


def test_recursion_is_bounded_and_a_window_cut_at_the_smallest_size_keeps_its_complete_lines(phee):
    text = "Aspirin and warfarin were given for pain. " * 6
    model = ScriptedModel(runs_away_over=0, complete_lines_before_loop=True)  # every answer runs away
    (note,) = extract_windows([phee], [chunk_text(text, 400, 100)], model, max_rounds=2)
    assert len(model.calls) == 3  # the first pass and two rounds, no more
    assert note.split >= 2 and note.split + len(note.chunks) == sum(map(len, model.calls))  # split, or answered
    assert all(o.finish_reason == "length" for o in note.outputs)  # cut at the smallest size, kept as they are
    res = assemble(phee, "n3", text, note)
    assert res.errors == [] and res.truncated_chunks == len(note.chunks)
    assert {c["text"] for c in res.concepts} == {"Aspirin", "warfarin"}  # each cut answer's complete lines


def test_a_cut_answer_with_nothing_complete_costs_a_warning_not_the_note(phee):
    text = "Aspirin was given."  # shorter than two smallest pieces: it cannot be split
    assert len(text) < 2 * MIN_WINDOW_CHARS
    (note,) = extract_windows([phee], [chunk_text(text, 400)], ScriptedModel(runs_away_over=0, loop="Drug: Aspi"))
    res = assemble(phee, "n4", text, note)
    assert res.errors == [] and res.concepts == [] and res.warnings >= 1 and res.truncated_chunks == 1
    plain = assemble_note(note_id="n4", text=text, task=phee, lineage=lineage(text),
                          **{**note.assemble_inputs(), "cut_final": False})
    assert [e["error_type"] for e in plain.errors] == ["truncated_output"]  # without pieces it is still an error


def test_engine_errors_pass_through_and_batches_stay_aligned(phee):
    notes = ["Aspirin was given for headache today.", "Warfarin was stopped after bleeding began."]

    def generate(windows):
        return [error_result("x", "engine_error: RuntimeError") if w.note == 0 else
                GenerationResult("y", "Drug: Warfarin", None, 5, 5, "stop") for w in windows]

    first, second = extract_windows([phee, phee], [chunk_text(t, 400) for t in notes], generate)
    assert assemble(phee, "a", notes[0], first).errors[0]["error_type"] == "engine_error"
    assert [c["text"] for c in assemble(phee, "b", notes[1], second).concepts] == ["Warfarin"]
    with pytest.raises(ValueError, match="2 windows"):
        extract_windows([phee, phee], [chunk_text(t, 400) for t in notes], lambda windows: [])
