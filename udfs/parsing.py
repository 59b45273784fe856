"""Parse a model's raw output into a validated v1 answer, or a typed failure. Never raises.

Whatever the model emits, only the task's concept labels, relation labels and allowed (head, tail) label
pairs come out; everything else is dropped with a warning. Warnings and failure messages carry counts,
positions, types and task label names only, never the raw output or note text (PHI).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from notelake.conf.task import Task
from notelake.udfs.answer import ASSERTIONS

PARSER_VERSION = "p1"

ERROR_TYPES = ("empty_output", "not_json", "truncated_json", "schema_violation")


@dataclass(frozen=True)
class ParsedConcept:
    label: str
    text: str
    occurrence: int | None
    assertion: str = "present"


@dataclass(frozen=True)
class ParsedRelation:
    label: str
    head: int
    tail: int


@dataclass(frozen=True)
class ParsedAnswer:
    concepts: list[ParsedConcept]
    relations: list[ParsedRelation]
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False


@dataclass(frozen=True)
class ParseFailure:
    error_type: str  # one of ERROR_TYPES
    message: str  # no raw output, no note text


_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*[ \t]*\r?\n?(.*?)\r?\n?```\s*$", re.DOTALL)
_DECODER = json.JSONDecoder()


class _Truncated(Exception):
    """Input ended inside a JSON value."""


class _Malformed(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _skip_ws(s: str, pos: int) -> int:
    n = len(s)
    while pos < n and s[pos] in " \t\r\n":
        pos += 1
    return pos


def _value_end(s: str, pos: int) -> int:
    """End of the JSON value starting at ``pos`` (string-aware bracket matching, iterative).

    Raises _Truncated when the input ends inside the value, _Malformed on a bracket mismatch. The value is
    not validated here beyond its brackets (json decodes it afterwards).
    """
    n = len(s)
    if pos >= n:
        raise _Truncated
    ch = s[pos]
    if ch == '"':
        i = pos + 1
        while i < n:
            c = s[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                return i + 1
            i += 1
        raise _Truncated
    if ch not in "[{":
        # scalar: runs until a delimiter
        i = pos
        while i < n and s[i] not in ",]}: \t\r\n":
            i += 1
        if i == n:
            raise _Truncated  # a number or literal cut at the end may be incomplete
        return i
    stack = [ch]
    i = pos + 1
    while i < n:
        c = s[i]
        if c == '"':
            i += 1
            while i < n and s[i] != '"':
                i += 2 if s[i] == "\\" else 1
            if i >= n:
                raise _Truncated
        elif c in "[{":
            stack.append(c)
        elif c in "]}":
            opener = stack.pop()
            if (opener == "[") != (c == "]"):
                raise _Malformed(f"mismatched bracket at char {i}")
            if not stack:
                return i + 1
        i += 1
    raise _Truncated


def _decode_at(s: str, pos: int) -> tuple[Any, int]:
    """Decode one complete JSON value at ``pos``; _Truncated if the input ends inside it."""
    end = _value_end(s, pos)
    try:
        value, stop = _DECODER.raw_decode(s, pos)
    except json.JSONDecodeError as exc:
        # json's message prefix only ("Invalid \\escape: 'x'" would echo a character of the output)
        raise _Malformed(f"{exc.msg.split(':')[0]} at char {exc.pos}") from None
    if stop != end:
        raise _Malformed(f"unexpected character at char {stop}")
    return value, stop


def _salvage(s: str, start: int) -> tuple[dict[str, list], int]:
    """Walk a top-level object cut short; keep the complete items of its arrays that precede the cut.

    Returns ({key: [complete items]} for array values, number of complete items).
    """
    found: dict[str, list] = {}
    n_items = 0
    pos = _skip_ws(s, start + 1)
    try:
        while True:
            pos = _skip_ws(s, pos)
            if pos >= len(s):
                raise _Truncated
            if s[pos] == "}":
                raise _Malformed("object closed but output did not parse")
            key, pos = _decode_at(s, pos)
            if not isinstance(key, str):
                raise _Malformed(f"object key is not a string at char {pos}")
            pos = _skip_ws(s, pos)
            if pos >= len(s):
                raise _Truncated
            if s[pos] != ":":
                raise _Malformed(f"expected ':' at char {pos}")
            pos = _skip_ws(s, pos + 1)
            if pos >= len(s):
                raise _Truncated
            if s[pos] == "[":
                items = found.setdefault(key, [])
                pos = _skip_ws(s, pos + 1)
                if pos < len(s) and s[pos] == "]":
                    pos += 1
                else:
                    while True:
                        item, pos = _decode_at(s, pos)
                        items.append(item)
                        n_items += 1
                        pos = _skip_ws(s, pos)
                        if pos >= len(s):
                            raise _Truncated
                        if s[pos] == "]":
                            pos += 1
                            break
                        if s[pos] != ",":
                            raise _Malformed(f"expected ',' or ']' at char {pos}")
                        pos = _skip_ws(s, pos + 1)
            else:
                _, pos = _decode_at(s, pos)
            pos = _skip_ws(s, pos)
            if pos >= len(s):
                raise _Truncated
            if s[pos] == ",":
                pos += 1
            elif s[pos] == "}":
                raise _Malformed("object closed but output did not parse")
            else:
                raise _Malformed(f"expected ',' or '}}' at char {pos}")
    except _Truncated:
        return found, n_items


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(obj: dict, task: Task, warnings: list[str], truncated: bool) -> ParsedAnswer | ParseFailure:
    raw_concepts = obj.get("concepts")
    if raw_concepts is None and not truncated:
        return ParseFailure("schema_violation", "answer has no 'concepts' list")
    if raw_concepts is None:
        raw_concepts = []
    if not isinstance(raw_concepts, list):
        return ParseFailure("schema_violation", f"'concepts' is a {type(raw_concepts).__name__}, not a list")
    extra_keys = [k for k in obj if k not in ("concepts", "relations")]
    if extra_keys:
        warnings.append(f"{len(extra_keys)} unknown top-level key(s) ignored")

    concepts: list[ParsedConcept] = []
    new_index: dict[int, int] = {}  # position in the model's list -> position in `concepts`
    for i, item in enumerate(raw_concepts):
        if not isinstance(item, dict):
            warnings.append(f"concept {i}: not an object ({type(item).__name__}), dropped")
            continue
        label, text = item.get("label"), item.get("text")
        if not isinstance(label, str) or label not in task.concepts:
            kind = "unknown label" if isinstance(label, str) else f"label is {type(label).__name__}"
            warnings.append(f"concept {i}: {kind}, dropped")
            continue
        if not isinstance(text, str) or not text.strip():
            warnings.append(f"concept {i} ({label}): missing or empty text, dropped")
            continue
        occurrence = item.get("occurrence")
        if occurrence is not None and not (_is_int(occurrence) and occurrence >= 1):
            warnings.append(f"concept {i} ({label}): invalid occurrence ignored")
            occurrence = None
        assertion = item.get("assertion", "present")
        if assertion is None:
            assertion = "present"
        if isinstance(assertion, str) and assertion.strip().lower() in ASSERTIONS:
            assertion = assertion.strip().lower()
        else:
            warnings.append(f"concept {i} ({label}): invalid assertion value, dropped")
            continue
        extra = [k for k in item if k not in ("label", "text", "occurrence", "assertion")]
        if extra:
            warnings.append(f"concept {i} ({label}): {len(extra)} unknown key(s) ignored")
        new_index[i] = len(concepts)
        concepts.append(ParsedConcept(label=label, text=text.strip(), occurrence=occurrence, assertion=assertion))

    raw_relations = obj.get("relations")
    relations: list[ParsedRelation] = []
    if task.kind == "cce":
        if raw_relations:
            warnings.append("relations ignored: task extracts concepts only")
        raw_relations = []
    elif raw_relations is None:
        if not truncated:
            warnings.append("answer has no 'relations' list")
        raw_relations = []
    elif not isinstance(raw_relations, list):
        warnings.append(f"'relations' is a {type(raw_relations).__name__}, not a list: ignored")
        raw_relations = []

    seen: set[tuple[str, int, int]] = set()
    for j, item in enumerate(raw_relations):
        if not isinstance(item, dict):
            warnings.append(f"relation {j}: not an object ({type(item).__name__}), dropped")
            continue
        label, head, tail = item.get("label"), item.get("head"), item.get("tail")
        if not isinstance(label, str) or label not in task.relations:
            warnings.append(f"relation {j}: unknown label, dropped")
            continue
        if not (_is_int(head) and _is_int(tail)):
            warnings.append(f"relation {j} ({label}): head/tail not integers, dropped")
            continue
        if not (0 <= head < len(raw_concepts) and 0 <= tail < len(raw_concepts)):
            warnings.append(f"relation {j} ({label}): index out of range ({len(raw_concepts)} concepts), dropped")
            continue
        if head == tail:
            warnings.append(f"relation {j} ({label}): self-loop, dropped")
            continue
        if head not in new_index or tail not in new_index:
            warnings.append(f"relation {j} ({label}): refers to a dropped concept, dropped")
            continue
        h, t = new_index[head], new_index[tail]
        head_label, tail_label = concepts[h].label, concepts[t].label
        if not task.allows(label, head_label, tail_label):
            warnings.append(f"relation {j} ({label}): pair {head_label} -> {tail_label} not allowed, dropped")
            continue
        if (label, h, t) in seen:
            warnings.append(f"relation {j} ({label}): duplicate, dropped")
            continue
        seen.add((label, h, t))
        relations.append(ParsedRelation(label=label, head=h, tail=t))
    return ParsedAnswer(concepts=concepts, relations=relations, warnings=warnings, truncated=truncated)


def _parse(raw: Any, task: Task) -> ParsedAnswer | ParseFailure:
    if raw is None:
        return ParseFailure("empty_output", "model output is empty (None)")
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("utf-8", "replace")
    if not isinstance(raw, str):
        return ParseFailure("not_json", f"model output is a {type(raw).__name__}, not a string")
    if not raw.strip():
        return ParseFailure("empty_output", f"model output is empty ({len(raw)} whitespace chars)")

    warnings: list[str] = []
    s = raw
    fenced = _FENCE.match(s)
    if fenced:
        s = fenced.group(1)
        warnings.append("markdown code fence removed")
    elif s.lstrip().startswith("```"):
        # an opening fence whose closing fence was cut off (truncated output)
        s = s.lstrip()[3:]
        s = s[s.find("\n") + 1 :] if "\n" in s else ""

    try:
        obj = json.loads(s)
    except (json.JSONDecodeError, ValueError, RecursionError):
        obj = None
        start = s.find("{")
        if start == -1:
            return ParseFailure("not_json", f"no JSON object in output ({len(raw)} chars)")
        if s[:start].strip():
            warnings.append(f"{start} chars before the JSON object ignored")
        try:
            obj, stop = _decode_at(s, start)
            if s[stop:].strip():
                warnings.append(f"{len(s) - stop} chars after the JSON object ignored")
        except _Malformed as exc:
            return ParseFailure("not_json", f"invalid JSON: {exc.message} ({len(raw)} chars)")
        except _Truncated:
            try:
                found, n_items = _salvage(s, start)
            except _Malformed as exc:
                return ParseFailure("not_json", f"invalid JSON before the cut: {exc.message} ({len(raw)} chars)")
            if n_items == 0:
                return ParseFailure("truncated_json", f"output cut off after {len(raw)} chars; nothing complete to salvage")
            warnings.append(f"output truncated after {len(raw)} chars; salvaged {n_items} complete item(s)")
            return _validate(found, task, warnings, truncated=True)
    if not isinstance(obj, dict):
        return ParseFailure("schema_violation", f"top level is a {type(obj).__name__}, not an object")
    return _validate(obj, task, warnings, truncated=False)


def parse_answer(raw: str | None, task: Task) -> ParsedAnswer | ParseFailure:
    """Parse one model output for ``task``. Never raises; see the module docstring for what is dropped."""
    try:
        return _parse(raw, task)
    except Exception as exc:  # defensive: a parser bug must cost one chunk, not the batch
        return ParseFailure("not_json", f"unparseable output ({type(exc).__name__})")
