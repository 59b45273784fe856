"""Per-chunk model outputs of one note -> concept, relation and error rows (the job and the evaluation
harness both use this, so a note is assembled the same way everywhere).

Per chunk: parse the output, ground the concepts inside the chunk's text (arguments next to their anchor),
resolve reference items to the grounded concept with that mention nearest the head, shift offsets by the chunk's
start. Across chunks: a concept found twice (overlap) with the same (label, spans) becomes one row (lowest
chunk index wins); an ungrounded concept is merged with another ungrounded one of the same (label, text).
Relations come from one chunk (both ends), are mapped onto the merged rows and deduplicated on
(label, head id, tail id). A chunk whose generation or parse failed contributes one error row and nothing
else.

A grounded row's ``text`` is the note's text at its spans (fragments joined by one space), so it matches
the offsets even when grounding was case/whitespace-insensitive or fuzzy; an ungrounded row keeps the
model's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from notelake.conf.task import Task
from notelake.udfs.chunking import Chunk
from notelake.udfs.grounding import ground_mentions
from notelake.udfs.hashing import concept_id, relation_id, sha256_text
from notelake.udfs.parsing import ParseFailure, parse_answer
from notelake.udfs.schemas import LINEAGE_COLUMNS, concepts_schema, error_row, relations_schema

_MAX_ENGINE_MESSAGE = 500
_ROW_COLUMNS = {f.name for f in concepts_schema()} | {f.name for f in relations_schema()}


@dataclass
class NoteResult:
    concepts: list[dict] = field(default_factory=list)
    relations: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    n_chunks: int = 0
    warnings: int = 0  # parser warnings (dropped lines, items, labels)
    ungrounded: int = 0  # emitted mentions not found in the text
    dropped_relations: int = 0  # reference items with no matching concept, or a label pair the task forbids
    truncated_chunks: int = 0  # outputs cut at max_tokens


def _lineage_columns(lineage: dict, text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in LINEAGE_COLUMNS:
        if name in lineage:
            out[name] = lineage[name]
        elif name == "text_sha256":
            out[name] = sha256_text(text)
        elif name in ("adapter", "adapter_sha256"):
            out[name] = None
        else:
            raise KeyError(f"lineage lacks {name!r}")
    return out


def _resolve_reference(concepts: list, groundings: list, head: int, mention: str) -> int | None:
    """Index of the concept a reference item names: same mention (exact, else case-insensitive), the one
    grounded nearest the head; None when the answer has no such concept."""
    for same in (lambda c: " ".join(c.text.split()) == mention,
                 lambda c: " ".join(c.text.split()).casefold() == mention.casefold()):
        found = [k for k, c in enumerate(concepts) if k != head and same(c)]
        if found:
            origin = groundings[head].start
            return min(found, key=lambda k: (groundings[k].start is None, abs((groundings[k].start or 0) - (origin or 0))))
    return None


def assemble_note(  # keyword-only, one argument per per-window input a backend produces (reason for their number)
    *,
    note_id: str,
    text: str,
    task: Task,
    chunks: list[Chunk],
    outputs: list[str | None],
    output_errors: list[str | None] | None = None,
    truncated: list[bool] | None = None,
    tagged: list[tuple | None] | None = None,
    tag_relations: list[tuple | None] | None = None,
    heads: list[tuple[Chunk, Any]] | None = None,
    lineage: dict,
    passthrough: dict | None = None,
    note_bucket: int | None = None,
    fuzzy: bool = False,
    cut_final: bool = False,
) -> NoteResult:
    """Rows of one note from its chunks' raw outputs. See the module docstring for the rules.

    ``output_errors[i]`` non-None means the engine failed on chunk i (an error row of stage ``generate``,
    error_type ``engine_error``, the string as message: it must carry no note text). ``truncated[i]``: chunk i's
    output hit max_tokens (its last, possibly partial, line is dropped). ``tagged[i]`` (the tagger backend):
    chunk i's concepts as ``(label, start, end)`` in the chunk's text, taken as they are (grounded by
    construction; no answer to parse), and ``tag_relations[i]`` its relations as ``(label, head, tail)``, indexes
    into ``tagged[i]`` (the pair classifier; pairs the task does not allow are dropped and counted).
    ``heads``: the note tagged in the tagger's own windows, ``(window, result)`` with the result's ``spans`` /
    ``relations`` / ``error`` as above (models/extractors.py): the note's concepts are the tagger's, each answer's
    relations anchored on them (``add_anchored``), its own mentions not written.
    ``cut_final``: cut windows were already extracted again in smaller pieces (``udfs.windows.extract_windows``),
    so an answer still cut before any complete line gives this window no answer and a warning, not an error row:
    the same request would be cut again.
    """
    n = len(chunks)
    for name, values in (("outputs", outputs), ("output errors", output_errors), ("truncated", truncated),
                         ("tagged", tagged), ("tag relations", tag_relations)):
        if values is not None and len(values) != n:
            raise ValueError(f"{n} chunks but {len(values)} {name}")
    extra = dict(passthrough or {})
    clash = sorted(set(extra) & (_ROW_COLUMNS | set(LINEAGE_COLUMNS)))
    if clash:
        raise ValueError(f"passthrough columns {clash} collide with output columns")
    merger = _NoteMerger(note_id, text, task, lineage, n)
    tag_keys: list[tuple] = []
    for window, result in heads or ():
        if result.error is not None:
            merger.fail(window.index, "generate", "engine_error", str(result.error)[:_MAX_ENGINE_MESSAGE])
        else:
            tag_keys += merger.add_tagged(window, result.spans or (), result.relations)
    for pos, (chunk, raw) in enumerate(zip(chunks, outputs)):
        engine_error = output_errors[pos] if output_errors is not None else None
        if engine_error is not None:
            merger.fail(chunk.index, "generate", "engine_error", str(engine_error)[:_MAX_ENGINE_MESSAGE])
        elif heads is not None:
            merger.add_anchored(chunk, raw, bool(truncated[pos]) if truncated is not None else False, tag_keys,
                                fuzzy=fuzzy, cut_final=cut_final)
        elif tagged is not None and tagged[pos] is not None:
            merger.add_tagged(chunk, tagged[pos], tag_relations[pos] if tag_relations is not None else None)
        else:
            merger.add_answer(chunk, raw, bool(truncated[pos]) if truncated is not None else False,
                              fuzzy=fuzzy, cut_final=cut_final)
    return merger.rows(note_bucket, extra)


def _overlapping(keys: list[tuple], label: str, spans, shift: int) -> tuple | None:
    """The key among grounded ``keys`` whose span overlaps ``spans`` (window offsets, moved by ``shift``) most,
    one of ``label`` first; None when ``spans`` is None or nothing overlaps."""
    if spans is None:
        return None
    start, end = spans[0][0] + shift, spans[-1][1] + shift
    best, best_rank = None, None
    for key in keys:
        (k_start, _), (_, k_end) = key[2][0], key[2][-1]
        overlap = min(end, k_end) - max(start, k_start)
        rank = (key[1] == label, overlap)
        if overlap > 0 and (best_rank is None or rank > best_rank):
            best, best_rank = key, rank
    return best


class _NoteMerger:
    """One note's concepts and relations merged across its windows (module docstring), then its rows."""

    def __init__(self, note_id: str, text: str, task: Task, lineage: dict, n_chunks: int):
        self.note_id, self.text, self.task, self.lineage = note_id, text, task, lineage
        self.lineage_cols = _lineage_columns(lineage, text)
        self.result = NoteResult(n_chunks=n_chunks)
        # key -> record; key = ("g", label, spans) grounded, ("u", label, text) ungrounded
        self.merged: dict[tuple, dict[str, Any]] = {}
        # relations before id assignment: (label, head key, tail key) -> chunk index
        self.pending_relations: dict[tuple[str, tuple, tuple], int] = {}

    def fail(self, chunk_index: int, stage: str, error_type: str, message: str) -> None:
        cols = self.lineage_cols
        self.result.errors.append(error_row(
            run_id=cols["run_id"], task=self.task.name, stage=stage, error_type=error_type, message=message,
            note_id=self.note_id, chunk_index=chunk_index, text_sha256=cols["text_sha256"],
            attempt=int(self.lineage.get("attempt", 1)), created_at=cols["extracted_at"]))

    def _relate(self, label: str, head: tuple, tail: tuple, chunk_index: int) -> None:
        self.pending_relations.setdefault((label, head, tail), chunk_index)

    def add_tagged(self, chunk: Chunk, tagged: tuple, relations: tuple | None) -> list[tuple]:
        """A tagger's spans (grounded by construction) and its pair classifier's relations; the spans' keys."""
        keys = []
        for label, start, end in tagged:
            spans = ((start + chunk.start, end + chunk.start),)
            keys.append(("g", label, spans))
            self.merged.setdefault(keys[-1], {
                "label": label, "text": self.text[spans[0][0]:spans[0][1]], "spans": spans, "assertion": "present",
                "method": "tagger", "score": 1.0, "chunk_index": chunk.index})
        for label, h, t in relations or ():
            head, tail = keys[h], keys[t]
            if head == tail or not self.task.allows(label, head[1], tail[1]):
                self.result.dropped_relations += 1
                continue
            self._relate(label, head, tail, chunk.index)
        return keys

    def _parsed(self, chunk: Chunk, raw: str | None, cut: bool, cut_final: bool):
        """The parsed answer and its mentions' groundings in the window, or None (an error row or a warning)."""
        self.result.truncated_chunks += cut
        parsed = parse_answer(raw, self.task, truncated=cut)
        if isinstance(parsed, ParseFailure):
            if cut_final and parsed.error_type == "truncated_output":
                self.result.warnings += 1
            else:
                self.fail(chunk.index, "parse", parsed.error_type, parsed.message)
            return None
        self.result.warnings += len(parsed.warnings)
        return parsed

    def _relate_answer(self, parsed, groundings: list, keys: list[tuple | None], labels: list[str | None],
                       chunk: Chunk) -> None:
        """The answer's relations between the concepts ``keys`` (one per answer mention, None: none) of ``labels``."""
        for rel in parsed.relations:
            tail_index = rel.tail if isinstance(rel.tail, int) else _resolve_reference(
                parsed.concepts, groundings, rel.head, rel.tail)
            head = keys[rel.head]
            tail = keys[tail_index] if tail_index is not None else None
            if head is None or tail is None or not self.task.allows(rel.label, labels[rel.head], labels[tail_index]):
                self.result.dropped_relations += 1
                continue
            if head != tail:  # two mentions merged into one concept: no self-loop
                self._relate(rel.label, head, tail, chunk.index)

    def add_answer(self, chunk: Chunk, raw: str | None, cut: bool, *, fuzzy: bool, cut_final: bool) -> None:
        """A generated answer: parsed, its mentions grounded in the window, its relations mapped onto them."""
        parsed = self._parsed(chunk, raw, cut, cut_final)
        if parsed is None:
            return
        groundings = ground_mentions(chunk.text, [(c.label, c.text, c.anchor) for c in parsed.concepts], fuzzy=fuzzy)
        keys = [self._add_mention(chunk, concept, g) for concept, g in zip(parsed.concepts, groundings)]
        self._relate_answer(parsed, groundings, keys, [c.label for c in parsed.concepts], chunk)

    def add_anchored(self, chunk: Chunk, raw: str | None, cut: bool, tag_keys: list[tuple], *, fuzzy: bool,
                     cut_final: bool) -> None:
        """A generated answer's relations anchored on the tagger's concepts ``tag_keys``: each answer mention goes to
        the tagger concept its grounded span overlaps most (one of its own label first), and gives it its assertion
        marker; the answer's own mentions are not written, and a relation with an end on no tagger concept is
        dropped (counted)."""
        parsed = self._parsed(chunk, raw, cut, cut_final)
        if parsed is None:
            return
        groundings = ground_mentions(chunk.text, [(c.label, c.text, c.anchor) for c in parsed.concepts], fuzzy=fuzzy)
        anchors = [_overlapping(tag_keys, concept.label, g.spans, chunk.start) for concept, g in
                   zip(parsed.concepts, groundings)]
        for concept, key in zip(parsed.concepts, anchors):
            record = self.merged.get(key) if key is not None else None
            if record is not None and record["assertion"] == "present":
                record["assertion"] = concept.assertion
        self._relate_answer(parsed, groundings, anchors, [k[1] if k else None for k in anchors], chunk)

    def _add_mention(self, chunk: Chunk, concept, grounding) -> tuple:
        self.result.ungrounded += grounding.spans is None
        if grounding.spans is not None:
            spans = tuple((s + chunk.start, e + chunk.start) for s, e in grounding.spans)
            key: tuple = ("g", concept.label, spans)
            mention = " ".join(self.text[s:e] for s, e in spans)
        else:
            spans, key, mention = None, ("u", concept.label, concept.text), concept.text
        if key not in self.merged:  # chunks are visited in order: the first sighting has the lowest index
            self.merged[key] = {"label": concept.label, "text": mention, "spans": spans,
                                "assertion": concept.assertion, "method": grounding.method,
                                "score": grounding.score, "chunk_index": chunk.index}
        return key

    def rows(self, note_bucket: int | None, extra: dict) -> NoteResult:
        """The note's concept rows (an ordinal among rows sharing label, offsets and text) and relation rows."""
        ordinals: dict[tuple, int] = {}
        id_of: dict[tuple, str] = {}
        common = {"note_id": self.note_id, "task": self.task.name, "note_bucket": note_bucket}
        ordered = sorted(self.merged.items(), key=lambda kv: (kv[1]["spans"] is None, kv[1]["spans"] or (),
                                                              kv[1]["chunk_index"], kv[1]["label"], kv[1]["text"]))
        for key, rec in ordered:
            spans = rec["spans"]
            start, end = (spans[0][0], spans[-1][1]) if spans else (None, None)
            ident = (rec["label"], start, end, rec["text"])
            ordinals[ident] = ordinals.get(ident, 0) + 1
            id_of[key] = concept_id(self.note_id, self.task.name, rec["label"], start, end, rec["text"],
                                    ordinals[ident] - 1)
            self.result.concepts.append({
                **common, "concept_id": id_of[key], "label": rec["label"], "text": rec["text"],
                "start": start, "end": end, "spans": [{"start": s, "end": e} for s, e in spans] if spans else None,
                "assertion": rec["assertion"], "grounded": spans is not None, "grounding_method": rec["method"],
                "grounding_score": float(rec["score"]), "chunk_index": rec["chunk_index"],
                **self.lineage_cols, **extra})
        for (label, head, tail), chunk_index in self.pending_relations.items():
            head_id, tail_id = id_of[head], id_of[tail]
            self.result.relations.append({
                **common, "relation_id": relation_id(self.note_id, self.task.name, label, head_id, tail_id),
                "label": label, "head_concept_id": head_id, "tail_concept_id": tail_id,
                "head_label": self.merged[head]["label"], "head_text": self.merged[head]["text"],
                "tail_label": self.merged[tail]["label"], "tail_text": self.merged[tail]["text"],
                "chunk_index": chunk_index, **self.lineage_cols, **extra})
        return self.result
