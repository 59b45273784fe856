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


def assemble_note(
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
    ``cut_final``: cut windows were already extracted again in smaller pieces (``udfs.windows.extract_windows``),
    so an answer still cut before any complete line gives this window no answer and a warning, not an error row:
    the same request would be cut again.
    """
    if len(outputs) != len(chunks):
        raise ValueError(f"{len(chunks)} chunks but {len(outputs)} outputs")
    if output_errors is not None and len(output_errors) != len(chunks):
        raise ValueError(f"{len(chunks)} chunks but {len(output_errors)} output errors")
    lineage_cols = _lineage_columns(lineage, text)
    extra = dict(passthrough or {})
    clash = sorted(set(extra) & (_ROW_COLUMNS | set(LINEAGE_COLUMNS)))
    if clash:
        raise ValueError(f"passthrough columns {clash} collide with output columns")
    run_id, text_sha = lineage_cols["run_id"], lineage_cols["text_sha256"]
    result = NoteResult(n_chunks=len(chunks))

    def fail(chunk_index: int, stage: str, error_type: str, message: str) -> None:
        result.errors.append(
            error_row(
                run_id=run_id, task=task.name, stage=stage, error_type=error_type, message=message,
                note_id=note_id, chunk_index=chunk_index, text_sha256=text_sha,
                attempt=int(lineage.get("attempt", 1)), created_at=lineage_cols["extracted_at"],
            )
        )

    # merged concepts: key -> record; key = ("g", label, spans) grounded, ("u", label, text) ungrounded
    merged: dict[tuple, dict[str, Any]] = {}
    # relations before id assignment: (label, head key, tail key) -> chunk index
    pending_relations: dict[tuple[str, tuple, tuple], int] = {}

    for pos, (chunk, raw) in enumerate(zip(chunks, outputs)):
        i = chunk.index
        engine_error = output_errors[pos] if output_errors is not None else None
        if engine_error is not None:
            fail(i, "generate", "engine_error", str(engine_error)[:_MAX_ENGINE_MESSAGE])
            continue
        if tagged is not None and tagged[pos] is not None:
            tag_keys = []
            for label, start, end in tagged[pos]:
                spans = ((start + chunk.start, end + chunk.start),)
                tag_keys.append(("g", label, spans))
                merged.setdefault(tag_keys[-1], {
                    "label": label, "text": text[spans[0][0]:spans[0][1]], "spans": spans, "assertion": "present",
                    "method": "tagger", "score": 1.0, "chunk_index": i})
            relations = tag_relations[pos] if tag_relations is not None else None
            for label, h, t in relations or ():
                head, tail = tag_keys[h], tag_keys[t]
                if head == tail or not task.allows(label, head[1], tail[1]):
                    result.dropped_relations += 1
                    continue
                pending_relations.setdefault((label, head, tail), i)
            continue
        cut = bool(truncated[pos]) if truncated is not None else False
        result.truncated_chunks += cut
        parsed = parse_answer(raw, task, truncated=cut)
        if isinstance(parsed, ParseFailure) and cut_final and parsed.error_type == "truncated_output":
            result.warnings += 1
            continue
        if isinstance(parsed, ParseFailure):
            fail(i, "parse", parsed.error_type, parsed.message)
            continue
        result.warnings += len(parsed.warnings)
        groundings = ground_mentions(
            chunk.text, [(c.label, c.text, c.anchor) for c in parsed.concepts], fuzzy=fuzzy
        )
        keys: list[tuple] = []
        for concept, g in zip(parsed.concepts, groundings):
            result.ungrounded += g.spans is None
            if g.spans is not None:
                spans = tuple((s + chunk.start, e + chunk.start) for s, e in g.spans)
                key: tuple = ("g", concept.label, spans)
                mention = " ".join(text[s:e] for s, e in spans)
            else:
                spans = None
                key = ("u", concept.label, concept.text)
                mention = concept.text
            keys.append(key)
            if key not in merged:  # chunks are visited in order: the first sighting has the lowest index
                merged[key] = {
                    "label": concept.label, "text": mention, "spans": spans, "assertion": concept.assertion,
                    "method": g.method, "score": g.score, "chunk_index": i,
                }
        for rel in parsed.relations:
            tail_index = rel.tail if isinstance(rel.tail, int) else _resolve_reference(
                parsed.concepts, groundings, rel.head, rel.tail)
            if tail_index is None or not task.allows(
                    rel.label, parsed.concepts[rel.head].label, parsed.concepts[tail_index].label):
                result.dropped_relations += 1
                continue
            head, tail = keys[rel.head], keys[tail_index]
            if head == tail:
                continue  # two mentions merged into one concept: no self-loop
            pending_relations.setdefault((rel.label, head, tail), i)

    # concept rows, with an ordinal among rows sharing (label, start, end, text)
    ordinals: dict[tuple, int] = {}
    id_of: dict[tuple, str] = {}
    ordered = sorted(
        merged.items(),
        key=lambda kv: (kv[1]["spans"] is None, kv[1]["spans"] or (), kv[1]["chunk_index"], kv[1]["label"], kv[1]["text"]),
    )
    for key, rec in ordered:
        spans = rec["spans"]
        start, end = (spans[0][0], spans[-1][1]) if spans else (None, None)
        ident = (rec["label"], start, end, rec["text"])
        ordinal = ordinals.get(ident, 0)
        ordinals[ident] = ordinal + 1
        cid = concept_id(note_id, task.name, rec["label"], start, end, rec["text"], ordinal)
        id_of[key] = cid
        result.concepts.append(
            {
                "note_id": note_id, "concept_id": cid, "task": task.name, "note_bucket": note_bucket,
                "label": rec["label"],
                "text": rec["text"], "start": start, "end": end,
                "spans": [{"start": s, "end": e} for s, e in spans] if spans else None,
                "assertion": rec["assertion"], "grounded": spans is not None,
                "grounding_method": rec["method"], "grounding_score": float(rec["score"]),
                "chunk_index": rec["chunk_index"], **lineage_cols, **extra,
            }
        )

    for (label, head, tail), chunk_index in pending_relations.items():
        head_id, tail_id = id_of[head], id_of[tail]
        result.relations.append(
            {
                "note_id": note_id, "relation_id": relation_id(note_id, task.name, label, head_id, tail_id),
                "task": task.name, "note_bucket": note_bucket, "label": label, "head_concept_id": head_id, "tail_concept_id": tail_id,
                "head_label": merged[head]["label"], "head_text": merged[head]["text"],
                "tail_label": merged[tail]["label"], "tail_text": merged[tail]["text"],
                "chunk_index": chunk_index, **lineage_cols, **extra,
            }
        )
    return result
