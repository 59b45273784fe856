"""Parse a model's raw output (answer schema v2, udfs/answer.py) into concepts and relations. Never raises.

Whatever the model writes, only the task's concept labels, relation labels and allowed (head, tail) label pairs
come out; everything else is dropped with a warning. Warnings and failure messages carry counts, line numbers and
task label names only, never the raw output or note text (PHI).

An answer cut at ``max_tokens`` loses its last (partial) item and the loop that ran it out of budget: from the
first line that repeats an earlier one, the rest; in a line, from the first item that repeats an earlier item of
that line, the rest of the line (greedy decoding that runs out of budget is looping: measured on PHEE and
MACCROBAT dev). A line that reached the task's item bound (``udfs.answer.line_items_bound``: the grammar ended it)
with an item in it three times loses its repeated items the same way, cut or not.

A concept is returned with the index of its event's anchor (arguments are grounded next to their anchor); a
relation's tail is a concept index, or, for a reference item, the mention text to resolve against the answer's
grounded concepts (udfs/assemble.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from notelake.conf.task import Task
from notelake.udfs.answer import ASSERTIONS, ITEM_SEP, NONE, line_items_bound, reference_relations

#: Version of the parsing rules and of what happens to a window around them (udfs/windows.py: no model call for a
#: window without prose, a cut window extracted again in pieces): part of the extraction fingerprint.
PARSER_VERSION = "p3"

ERROR_TYPES = ("empty_output", "not_text", "no_answer_lines", "truncated_output")

_SEP = ITEM_SEP.strip()
_ITEM = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_-]*)\s*(?:\(\s*([A-Za-z]+)\s*\))?\s*:\s*(.*?)\s*$", re.DOTALL)


@dataclass(frozen=True)
class ParsedConcept:
    label: str
    text: str
    assertion: str = "present"
    anchor: int | None = None  # index of the concept anchoring this argument's event


@dataclass(frozen=True)
class ParsedRelation:
    label: str
    head: int
    tail: int | str  # concept index, or the mention of a reference item (resolved after grounding)


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


def _parse_item(raw_item: str) -> tuple[str, str, str] | None:
    """(label, assertion, mention) of ``Label[(assertion)]: mention``, or None."""
    m = _ITEM.match(raw_item)
    if not m or not m.group(3):
        return None
    assertion = (m.group(2) or "present").lower()
    return m.group(1), assertion, m.group(3)


class _Builder:
    def __init__(self, task: Task):
        self.task = task
        self.anchors = set(task.events.anchors) if task.events else set()
        self.references = set(reference_relations(task))
        self.concepts: list[ParsedConcept] = []
        self.relations: list[ParsedRelation] = []
        self.seen: set[tuple[str, int, int | str]] = set()
        self.warnings: list[str] = []

    def concept(self, line_no: int, label: str, assertion: str, mention: str, anchor: int | None = None) -> int | None:
        if assertion not in ASSERTIONS:
            self.warnings.append(f"line {line_no} ({label}): invalid assertion, read as present")
            assertion = "present"
        self.concepts.append(ParsedConcept(label, mention, assertion, anchor))
        return len(self.concepts) - 1

    def relation(self, label: str, head: int, tail: int | str) -> None:
        if (label, head, tail) not in self.seen:
            self.seen.add((label, head, tail))
            self.relations.append(ParsedRelation(label, head, tail))

    def line(self, line_no: int, raw_line: str) -> None:
        items = [_parse_item(part) for part in raw_line.split(_SEP)]
        if items[0] is None or items[0][0] not in self.task.concepts:
            self.warnings.append(f"line {line_no}: no concept label at its start, dropped")
            return
        label, assertion, mention = items[0]
        head = self.concept(line_no, label, assertion, mention)
        event = label in self.anchors
        members = [head]
        for k, parsed in enumerate(items[1:], start=2):
            if parsed is None:
                self.warnings.append(f"line {line_no} item {k}: not 'Label: mention', dropped")
                continue
            item_label, item_assertion, item_mention = parsed
            if item_label in self.task.concepts:
                if not event:
                    self.warnings.append(f"line {line_no} item {k} ({item_label}): concept after a line's first "
                                         "item outside an event, kept without relation")
                    self.concept(line_no, item_label, item_assertion, item_mention)
                    continue
                relations = self.task.argument_relations(label, item_label)
                if not relations:
                    self.warnings.append(f"line {line_no} item {k}: {label} takes no {item_label} argument, dropped")
                    continue
                arg = self.concept(line_no, item_label, item_assertion, item_mention, anchor=head)
                members.append(arg)
                self.relation(relations[0], head, arg)
            elif item_label in self.references:
                self.relation(item_label, head, " ".join(item_mention.split()))
            else:
                self.warnings.append(f"line {line_no} item {k}: unknown label, dropped")
        if event:
            self._derive(label, members)

    def _derive(self, anchor_label: str, members: list[int]) -> None:
        for d in self.task.events.derived:
            if d.anchor is not None and d.anchor != anchor_label:
                continue
            heads = [i for i in members if self.concepts[i].label == d.head]
            tails = [i for i in members if self.concepts[i].label == d.tail]
            for h in heads:
                for t in tails:
                    if h != t:
                        self.relation(d.relation, h, t)


def _cut_loop(lines: list[tuple[int, str]], warnings: list[str]) -> list[tuple[int, str]]:
    """The part of a cut answer's lines worth keeping. Its last line was cut: its last (partial) item is dropped.
    A small model that runs out of budget is repeating itself (measured on PHEE and MACCROBAT dev): from the first
    line equal to an earlier one on, the rest is the loop; within a line, from the first item equal to an earlier
    item of the line on."""
    *complete, (last_no, last) = lines
    kept = last.split(_SEP)[:-1]
    lines = [*complete, (last_no, _SEP.join(kept))] if kept else complete
    warnings.append("output cut at max_tokens: its last item dropped")
    seen: set[str] = set()
    for k, (_, line) in enumerate(lines):
        if line in seen:
            warnings.append(f"output cut at max_tokens: {len(lines) - k} line(s) from the first repeated line on "
                            "dropped")
            lines = lines[:k]
            break
        seen.add(line)
    return [(n, _until_repeat(n, line, warnings, "output cut at max_tokens")) for n, line in lines]


def _end_runaway_line(line_no: int, line: str, bound: int, warnings: list[str]) -> str:
    """A line that reached the grammar's item bound was ended by the grammar, not by the model. When one of its items
    stands there a third time it was looping (PHEE dev: events that repeat their arguments; in the gold answers of
    PHEE train and dev one line in 3,989 holds an item three times, 48 hold one twice): its repeated items go as a
    cut line's do."""
    items = [item.strip() for item in line.split(_SEP)]
    if len(items) < bound or max(Counter(items).values()) < 3:
        return line
    return _until_repeat(line_no, line, warnings, "line ran into its item bound")


def _until_repeat(line_no: int, line: str, warnings: list[str], why: str) -> str:
    """``line`` up to its first item equal to an earlier item of the line."""
    items = [item.strip() for item in line.split(_SEP)]
    first_repeat = next((k for k, item in enumerate(items) if item in items[:k]), len(items))
    if first_repeat < len(items):
        warnings.append(f"{why}: line {line_no}: {len(items) - first_repeat} item(s) from its first repeated item on "
                        "dropped")
    return ITEM_SEP.join(items[:first_repeat])


def _parse(raw: object, task: Task, truncated: bool) -> ParsedAnswer | ParseFailure:
    if raw is None:
        return ParseFailure("empty_output", "model output is empty (None)")
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("utf-8", "replace")
    if not isinstance(raw, str):
        return ParseFailure("not_text", f"model output is a {type(raw).__name__}, not a string")
    if not raw.strip():
        return ParseFailure("empty_output", f"model output is empty ({len(raw)} whitespace chars)")
    lines = [(n, line.strip()) for n, line in enumerate(raw.splitlines(), start=1) if line.strip()]
    lines = [(n, line) for n, line in lines if not line.startswith("```")]
    builder = _Builder(task)
    lines = [(n, _end_runaway_line(n, line, line_items_bound(task), builder.warnings)) for n, line in lines]
    if truncated:
        lines = _cut_loop(lines, builder.warnings)
        if not lines:
            return ParseFailure("truncated_output", f"output cut at max_tokens ({len(raw)} chars) before any "
                                                    "complete item")
    if len(lines) == 1 and lines[0][1].lower() == NONE:
        return ParsedAnswer([], [], builder.warnings, truncated)
    for n, line in lines:
        if line.lower() == NONE:
            builder.warnings.append(f"line {n}: '{NONE}' beside other lines, ignored")
            continue
        builder.line(n, line)
    if not builder.concepts and lines:
        return ParseFailure("no_answer_lines", f"none of {len(lines)} line(s) is an answer line")
    return ParsedAnswer(builder.concepts, builder.relations, builder.warnings, truncated)


def parse_answer(raw: str | None, task: Task, truncated: bool = False) -> ParsedAnswer | ParseFailure:
    """Parse one model output for ``task`` (``truncated``: generation hit max_tokens). Never raises."""
    try:
        return _parse(raw, task, truncated)
    except Exception as exc:  # defensive: a parser bug must cost one chunk, not the batch
        return ParseFailure("not_text", f"unparseable output ({type(exc).__name__})")
