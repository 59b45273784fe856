"""Answer schema v1: the JSON a model emits for one text, and the gold answers rendered in it.

Frozen contract (a change bumps ANSWER_SCHEMA_VERSION, hence every ``prompt_version``, and invalidates
trained adapters)::

    {"concepts": [{"label": "Drug", "text": "lithium", "occurrence": 2, "assertion": "negated"}, ...],
     "relations": [{"label": "adverse_effect", "head": 0, "tail": 3}, ...]}

* ``label``: one of the task's concept labels (an enum in the guided-decoding schema).
* ``text``: the mention copied exactly from the text; a discontinuous mention is its fragments joined by
  one space, in text order (as in the corpora).
* ``occurrence``: optional, 1-based: which occurrence of ``text`` in the prompt's text is meant, given only
  when the text occurs more than once. Omitted = the first occurrence not yet used.
* ``assertion``: optional, default ``present``: ``negated`` / ``speculated`` / ``hypothetical``, so that
  cohorts do not count "denies chest pain" as chest pain.
* ``relations`` (``cre`` tasks only): ``head``/``tail`` are 0-based indexes into ``concepts``.

Concepts are listed in text order; gold answers are rendered by :func:`gold_answer`.
"""

from __future__ import annotations

import json
from typing import Any

from notelake.conf.task import Task

ANSWER_SCHEMA_VERSION = "v1"
ASSERTIONS = ("present", "negated", "speculated", "hypothetical")

# MACCROBAT POLARITY values and PHEE event attributes -> assertion.
_POLARITY_TO_ASSERTION = {"NEG": "negated", "UNCERTAIN": "speculated", "MAYBE_POS": "speculated", "MAYBE_NEG": "speculated"}


def answer_json_schema(task: Task) -> dict[str, Any]:
    """JSON schema of a v1 answer for ``task``: labels as enums, so guided decoding cannot invent one."""
    concept = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": sorted(task.concepts)},
            "text": {"type": "string", "minLength": 1},
            "occurrence": {"type": "integer", "minimum": 1},
            "assertion": {"type": "string", "enum": list(ASSERTIONS[1:])},
        },
        "required": ["label", "text"],
        "additionalProperties": False,
    }
    properties: dict[str, Any] = {"concepts": {"type": "array", "items": concept}}
    required = ["concepts"]
    if task.kind == "cre":
        properties["relations"] = {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "enum": sorted(task.relations)},
                    "head": {"type": "integer", "minimum": 0},
                    "tail": {"type": "integer", "minimum": 0},
                },
                "required": ["label", "head", "tail"],
                "additionalProperties": False,
            },
        }
        required.append("relations")
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def dump_answer(answer: dict[str, Any]) -> str:
    """Compact JSON, as guided decoding emits it with free whitespace off."""
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":"))


def occurrence_index(text: str, mention: str, start: int) -> int:
    """1-based index of the occurrence of ``mention`` that starts at ``start`` (overlapping matches count)."""
    index, pos = 0, text.find(mention)
    while pos != -1 and pos <= start:
        index += 1
        pos = text.find(mention, pos + 1)
    return index


def _concept_assertion(concept: dict, negated_ids: set[str], speculated_ids: set[str]) -> str:
    attrs = concept.get("attributes") or {}
    if attrs.get("Negated") or concept["id"] in negated_ids:
        return "negated"
    polarity = _POLARITY_TO_ASSERTION.get(str(attrs.get("POLARITY", "")))
    if polarity:
        return polarity
    if attrs.get("Speculated") or concept["id"] in speculated_ids:
        return "speculated"
    return "present"


def gold_answer(task: Task, record: dict, window: tuple[int, int] | None = None) -> dict[str, Any]:
    """Render a gold record (shared/data JSONL format) as a v1 answer over ``text[window]``.

    Only concepts lying wholly inside the window are kept, and relations between two kept concepts.
    PHEE event attributes (Negated/Speculated on the trigger) carry over to the event's Effect concepts.
    """
    text = record["text"]
    lo, hi = window or (0, len(text))
    window_text = text[lo:hi]
    concepts = [c for c in record["concepts"] if c["spans"][0][0] >= lo and c["spans"][-1][1] <= hi and c["label"] in task.concepts]
    concepts.sort(key=lambda c: (c["spans"][0][0], c["spans"][-1][1], c["label"]))
    by_id = {c["id"]: c for c in record["concepts"]}
    negated_ids: set[str] = set()
    speculated_ids: set[str] = set()
    for rel in record.get("relations", []):
        trigger_attrs = by_id[rel["head"]].get("attributes") or {}
        if rel["label"] == "Effect":
            if trigger_attrs.get("Negated"):
                negated_ids.add(rel["tail"])
            if trigger_attrs.get("Speculated"):
                speculated_ids.add(rel["tail"])

    rendered, index_of = [], {}
    for c in concepts:
        item: dict[str, Any] = {"label": c["label"], "text": c["text"]}
        first_start = c["spans"][0][0] - lo
        if len(c["spans"]) == 1 and occurrence_index(window_text, c["text"], len(window_text)) > 1:
            item["occurrence"] = occurrence_index(window_text, c["text"], first_start)
        assertion = _concept_assertion(c, negated_ids, speculated_ids)
        if assertion != "present":
            item["assertion"] = assertion
        index_of[c["id"]] = len(rendered)
        rendered.append(item)
    answer: dict[str, Any] = {"concepts": rendered}
    if task.kind == "cre":
        relations = [
            {"label": r["label"], "head": index_of[r["head"]], "tail": index_of[r["tail"]]}
            for r in record.get("relations", [])
            if r["head"] in index_of and r["tail"] in index_of and r["label"] in task.relations
        ]
        relations.sort(key=lambda r: (r["head"], r["tail"], r["label"]))
        answer["relations"] = relations
    return answer
