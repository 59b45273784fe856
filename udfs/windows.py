"""The windows of a batch of notes -> their answers, so that no window costs its note a failure.

* A window without prose (:func:`udfs.chunking.prose_pieces`: whitespace from a template, a separator line, a run
  of one character, an embedded base64 or RTF blob) gets the empty answer with no model call; a window with prose
  beside such a blob is sent as its prose only.
* A window whose answer was cut at ``max_tokens`` is extracted again in smaller pieces
  (:func:`udfs.chunking.split_chunk`: about half its length, overlapping, exact offsets into the note), each
  piece again when it is cut too, down to pieces shorter than ``2 * min_window_chars`` or ``max_rounds`` rounds;
  the pieces' answers replace the cut one (keeping the cut answer's lines beside them measured 0.001 to 0.005
  lower F1 on PHEE and MACCROBAT dev: the lines before a loop hold the loop's first, wrong, lines). Decoding is
  greedy: the same request would be cut the same way again, a smaller window is a different request that can
  succeed. An answer still cut at the smallest size keeps its complete lines and items up to its loop
  (udfs/parsing.py); one with nothing complete gives its window no answer and a parser warning
  (``assemble_note(..., cut_final=True)``), never a failed note.

:func:`extract_windows` does this for a whole batch: one ``generate`` call for its first pass and one per round of
re-extraction, each over the windows of every note of the batch. Nothing here imports an engine: ``generate`` is
the caller's (the job's engine pool, the evaluation harness, a test).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from notelake.conf.task import Task
from notelake.udfs.answer import NONE, answer_guide
from notelake.udfs.chunking import Chunk, chunk_text, prose_pieces, split_chunk
from notelake.udfs.prompts import build_messages

#: Pieces are not split below this many characters (a clause or two: a PHEE sentence averages 137).
MIN_WINDOW_CHARS = 48
#: Rounds of re-extraction at most (a 400-character window: pieces of ~250, ~160, ~100 characters).
MAX_SPLIT_ROUNDS = 3


@dataclass(frozen=True)
class Window:
    """One model call's text: ``chunk`` of note ``note`` (its position in the batch) for ``task``."""

    note: int
    task: Task
    chunk: Chunk


@dataclass(frozen=True)
class NoProseAnswer:
    """The answer of a window without prose, made without a model call; read like an engine's result."""

    text: str = NONE
    error: str | None = None
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    output_tokens: int = 0
    spans: tuple | None = None
    relations: tuple | None = None


@dataclass
class NoteWindows:
    """The windows of one note after extraction, in text order (``index`` = position), and their answers."""

    chunks: list[Chunk] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    no_prose: int = 0  # windows answered without a model call (no prose in them)
    split: int = 0  # windows whose cut answer was replaced by their pieces' answers

    def assemble_inputs(self) -> dict[str, Any]:
        """The keyword arguments of ``udfs.assemble.assemble_note`` that describe this note's windows."""
        outs = self.outputs
        return {"chunks": self.chunks, "outputs": [o.text for o in outs], "output_errors": [o.error for o in outs],
                "truncated": [o.finish_reason == "length" for o in outs], "tagged": [o.spans for o in outs],
                "tag_relations": [o.relations for o in outs], "cut_final": True}


# generate(windows) -> one result per window, in order; a result has the fields of models.engine.GenerationResult
Generate = Callable[[list[Window]], Sequence[Any]]


def request_fields(window: Window, guided_decoding: str, max_tokens: int | None = None) -> dict[str, Any]:
    """The engine request of ``window`` (``models.engine.GenerationRequest(**fields)``): its prompt, its answer
    grammar (``guided_decoding``: grounded, labels or off), its text, and ``max_tokens`` (default: the task's)."""
    chunk, task = window.chunk, window.task
    return {"request_id": f"{window.note}:{chunk.start}-{chunk.end}", "messages": build_messages(task, chunk.text),
            "guide": answer_guide(task, chunk.text, guided_decoding), "text": chunk.text,
            "max_tokens": max_tokens or task.max_tokens}


def tag_windows(text: str, heads: Mapping[str, Any]) -> list[Chunk]:
    """The windows a task's tagger reads ``text`` in: its own size (``heads["window_chars"]``), cut at sentence
    ends, without overlap, as it was trained (``models.extractors.ExtractorChoice.heads``)."""
    return chunk_text(text, int(heads["window_chars"]), 0)


def tag_request_fields(note: int, chunk: Chunk, heads: Mapping[str, Any]) -> dict[str, Any]:
    """The engine request that tags ``chunk`` of note ``note`` with the heads ``heads`` names (no prompt)."""
    return {"request_id": f"{note}:tag:{chunk.start}-{chunk.end}", "messages": [], "text": chunk.text,
            "max_tokens": 1, "tagger": heads["tagger"], "pairs": heads.get("pairs")}


def extract_windows(tasks: Sequence[Task], chunked: Sequence[Sequence[Chunk]], generate: Generate, *,
                    min_window_chars: int = MIN_WINDOW_CHARS, max_rounds: int = MAX_SPLIT_ROUNDS) -> list[NoteWindows]:
    """Answers for the chunks of each note (``tasks[k]`` is note k's task), per note in text order: no model call
    for a window without prose, a cut window extracted again in pieces (module docstring). An exception of
    ``generate`` propagates (the engine's fault, not the notes')."""
    if len(tasks) != len(chunked):
        raise ValueError(f"{len(tasks)} tasks but {len(chunked)} notes")
    notes = [NoteWindows() for _ in chunked]
    done: list[list[tuple[Chunk, Any]]] = [[] for _ in chunked]  # (window, its answer)
    pending = _with_prose([Window(k, tasks[k], c) for k, chunks in enumerate(chunked) for c in chunks], notes, done)
    for round_no in range(max_rounds + 1):
        if not pending:
            break
        results = list(generate(pending))
        if len(results) != len(pending):
            raise ValueError(f"generate returned {len(results)} results for {len(pending)} windows")
        pieces: list[Window] = []
        for window, result in zip(pending, results):
            cut = result.finish_reason == "length" and round_no < max_rounds
            split = split_chunk(window.chunk, min_window_chars) if cut else []
            if split:
                notes[window.note].split += 1
                pieces += [Window(window.note, window.task, piece) for piece in split]
            else:
                done[window.note].append((window.chunk, result))
        pending = _with_prose(pieces, notes, done)
    for note, answered in zip(notes, done):
        answered.sort(key=lambda item: (item[0].start, item[0].end))
        note.chunks = [Chunk(i, c.start, c.end, c.text) for i, (c, _) in enumerate(answered)]
        note.outputs = [result for _, result in answered]
    return notes


def _with_prose(windows: list[Window], notes: list[NoteWindows], done: list[list[tuple[Chunk, Any]]]) -> list[Window]:
    """The windows to send: each window's prose (itself, or its parts beside a blob); a window without any is
    answered (empty) in ``done`` right away."""
    send = []
    for window in windows:
        pieces = prose_pieces(window.chunk)
        if not pieces:
            notes[window.note].no_prose += 1
            done[window.note].append((window.chunk, NoProseAnswer()))
        send += [Window(window.note, window.task, piece) for piece in pieces]
    return send
