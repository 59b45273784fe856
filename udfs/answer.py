"""Answer schema v2: the terse line format a model writes for one text, and gold answers rendered in it.

Designed for a 135M decoder (ablation in docs/results.md): one line per concept or per event, every mention
copied from the text, relations anchored by mention text, never by index::

    ADE_trigger: induced | Drug: lithium | Effect(speculated): seizure    an event (task with `events:`)
    Severity: severe | MODIFY: pain                                       a concept and an outgoing relation
    Sign_symptom: pain
    none                                                                  nothing to extract

* A line is items joined by ``" | "``; an item is ``Label[(assertion)]: mention``. The mention is copied from
  the text; a discontinuous mention is its fragments joined by one space (as in the corpora).
* The first item of a line is a concept. In an event task a line that starts with an anchor label (PHEE: the
  trigger) is an event: each following concept item is an argument, linked anchor -> argument by the task's one
  relation whose pairs allow (anchor label, argument label), and the task's derived relations are added per
  event (PHEE: every Drug -> every Effect as ``adverse_effect`` in an ADE event).
* An item whose label is a relation label (not a concept label) is a reference: a relation from the line's first
  concept to the concept of the same answer with that mention (the one nearest the head when repeated).
* ``assertion``: ``(negated)``, ``(speculated)`` or ``(hypothetical)`` after the label; absent = present, so
  cohorts do not count "denies chest pain" as chest pain.
* Lines are in text order of their first mention, arguments in text order; grounding relies on it (repeated
  mentions ground in order, arguments next to their anchor).

Gold answers are rendered by :func:`gold_answer`; :func:`answer_grammar` is the guided-decoding grammar (labels as
enums, argument labels per anchor, and optionally every mention restricted to the text's own word n-grams).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from notelake.conf.task import Task

ANSWER_SCHEMA_VERSION = "v2"
ASSERTIONS = ("present", "negated", "speculated", "hypothetical")
NONE = "none"
ITEM_SEP = " | "
#: Longest mention (in word/punctuation tokens) the grounded grammar admits for a label its task does not bound
#: (``Task.max_mention_tokens``): covers 99.8 % of PHEE and MACCROBAT train mentions (docs/results.md).
MAX_MENTION_TOKENS = 24
#: Most items on one line for a task that does not bound them (``Task.max_line_items``): a line that keeps
#: growing ends and the answer goes on with complete lines.
MAX_LINE_ITEMS = 24
#: Longest text token (characters) a grounded mention may hold: the longest in a gold mention of PHEE and
#: MACCROBAT train is 26; longer ones are blobs (base64, hex, URLs) that a mention must not copy.
MAX_TOKEN_CHARS = 40
#: Version of the answer grammar's construction (bounds, usable tokens): part of ``prompt_version``.
GRAMMAR_VERSION = "g2"

# MACCROBAT POLARITY values and PHEE event attributes -> assertion.
_POLARITY_TO_ASSERTION = {"NEG": "negated", "UNCERTAIN": "speculated", "MAYBE_POS": "speculated", "MAYBE_NEG": "speculated"}
_TOKEN = re.compile(r"\w+|[^\w\s]")


def concept_assertion(concept: dict, negated_ids: set[str], speculated_ids: set[str]) -> str:
    """Assertion of a gold concept: its own attributes, or (PHEE) those of the event it is the Effect of."""
    attrs = concept.get("attributes") or {}
    if attrs.get("Negated") or concept["id"] in negated_ids:
        return "negated"
    polarity = _POLARITY_TO_ASSERTION.get(str(attrs.get("POLARITY", "")))
    if polarity:
        return polarity
    if attrs.get("Speculated") or concept["id"] in speculated_ids:
        return "speculated"
    return "present"


def event_assertions(record: dict) -> tuple[set[str], set[str]]:
    """Ids of PHEE Effect concepts whose event is negated, resp. speculated (the trigger's attributes)."""
    by_id = {c["id"]: c for c in record["concepts"]}
    negated: set[str] = set()
    speculated: set[str] = set()
    for rel in record.get("relations", []):
        if rel["label"] != "Effect":
            continue
        attrs = by_id[rel["head"]].get("attributes") or {}
        if attrs.get("Negated"):
            negated.add(rel["tail"])
        if attrs.get("Speculated"):
            speculated.add(rel["tail"])
    return negated, speculated


def one_line(mention: str) -> str:
    """A mention as written in an answer: whitespace runs (newlines included) become one space."""
    return " ".join(mention.split())


def render_item(label: str, mention: str, assertion: str = "present") -> str:
    marker = f"({assertion})" if assertion != "present" else ""
    return f"{label}{marker}: {one_line(mention)}"


def gold_answer(task: Task, record: dict, window: tuple[int, int] | None = None) -> str:
    """Render a gold record (shared/data JSONL format) as a v2 answer over ``text[window]``.

    Only concepts lying wholly inside the window are kept, and relations between two kept concepts. Relations
    that the format cannot carry (a non-derived relation between two arguments of an event task) are left out:
    the golden round-trip test measures what survives.
    """
    text = record["text"]
    lo, hi = window or (0, len(text))
    concepts = [c for c in record["concepts"]
                if c["spans"][0][0] >= lo and c["spans"][-1][1] <= hi and c["label"] in task.concepts]
    concepts.sort(key=lambda c: (c["spans"][0][0], c["spans"][-1][1], c["label"]))
    if not concepts:
        return NONE
    kept = {c["id"]: c for c in concepts}
    negated, speculated = event_assertions(record)
    relations = [r for r in record.get("relations", [])
                 if r["head"] in kept and r["tail"] in kept and r["label"] in task.relations]

    def item(c: dict) -> str:
        return render_item(c["label"], c["text"], concept_assertion(c, negated, speculated))

    anchors = set(task.events.anchors) if task.events else set()
    arguments: dict[str, list[dict]] = {}
    placed: set[str] = set()
    for c in concepts:
        if c["label"] in anchors:
            args = [kept[r["tail"]] for r in relations if r["head"] == c["id"]
                    and r["label"] in task.argument_relations(c["label"], kept[r["tail"]]["label"])]
            arguments[c["id"]] = sorted({a["id"]: a for a in args}.values(), key=lambda a: a["spans"][0][0])
            placed.update(a["id"] for a in args)
    refs: dict[str, list[str]] = {}
    referable = set(reference_relations(task))
    for r in relations:
        if r["label"] in referable:  # a reference item on the head's line
            refs.setdefault(r["head"], []).append(f"{r['label']}: {one_line(kept[r['tail']]['text'])}")
    lines = []
    for c in concepts:
        if c["id"] in placed and c["id"] not in arguments:
            continue  # written as an argument of its event
        items = [item(c), *(item(a) for a in arguments.get(c["id"], [])), *dict.fromkeys(refs.get(c["id"], []))]
        lines.append(ITEM_SEP.join(items))
    return "\n".join(lines)


def reference_relations(task: Task) -> list[str]:
    """Relation labels written as reference items: neither an event argument's relation nor a derived one."""
    anchors = task.events.anchors if task.events else []
    covered = {d.relation for d in task.events.derived} if task.events else set()
    covered |= {r for a in anchors for c in task.concepts for r in task.argument_relations(a, c)}
    return [r for r in task.relations if r not in covered and r not in task.concepts]


# ---------------------------------------------------------------------------------------------------------------
# Guided decoding
# ---------------------------------------------------------------------------------------------------------------


def _literal(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a GBNF string literal uses JSON's escapes


def _alternatives(values: list[str]) -> str:
    return " | ".join(_literal(v) for v in values)


def _text_tokens(text: str) -> list[tuple[str, str | None]]:
    """Word/punctuation tokens of ``text`` with the separator to the next one: "" (adjacent), " " (whitespace
    between), or None where a mention cannot continue (a line break or an item separator in between, or a token
    that cannot be in a mention next). A token that cannot be in a mention (an item separator, or longer than
    ``MAX_TOKEN_CHARS``: a base64 run, a URL) is returned with separator None and is never a mention's start."""
    spans = [(m.start(), m.end()) for m in _TOKEN.finditer(text)]
    usable = [_usable(text[start:end]) for start, end in spans]
    out = []
    for k, (start, end) in enumerate(spans):
        sep: str | None = None
        if k + 1 < len(spans) and usable[k] and usable[k + 1]:
            gap = text[end:spans[k + 1][0]]
            sep = None if ("\n" in gap or "\r" in gap) else (" " if gap else "")
        out.append((text[start:end], sep))
    return out


def _usable(token: str) -> bool:
    return token != "|" and len(token) <= MAX_TOKEN_CHARS


def mention_ngrams(text: str, max_tokens: int = MAX_MENTION_TOKENS) -> list[str]:
    """Mentions the grounded grammar admits for a label bounded to ``max_tokens`` tokens: runs of word/punctuation
    tokens of ``text`` as they appear there (whitespace runs as one space) that hold no line break, no item
    separator and no token longer than ``MAX_TOKEN_CHARS``."""
    tokens = _text_tokens(text)
    out: dict[str, None] = {}
    for i in range(len(tokens)):
        if not _usable(tokens[i][0]):
            continue
        span = ""
        for j in range(i, min(len(tokens), i + max_tokens)):
            span += tokens[j][0]
            out[span] = None
            if tokens[j][1] is None:
                break
            span += tokens[j][1]
    return list(out)


def _mention_rules(text: str, bounds: set[int]) -> tuple[dict[str, str], dict[int, str]]:
    """Grammar rules admitting exactly the contiguous token runs of ``text`` of at most b tokens, for each b in
    ``bounds``, and the name of the rule of each bound (``m<b>``). ``t<k>`` is a mention that starts at token k and
    may run to the end of its line; ``t<k>_<r>`` one of at most r tokens (a bound at least as long as the run left
    from token k is the unbounded rule). Rules are shared between bounds: their number is at most the text's tokens
    times its largest bound below its runs' length (an alternation of every n-gram compiles ~10x slower on a
    400-character chunk)."""
    tokens = _text_tokens(text)
    run = [0] * (len(tokens) + 1)  # run[k]: tokens in the longest mention starting at token k
    for k in reversed(range(len(tokens))):
        run[k] = 1 + (run[k + 1] if tokens[k][1] is not None else 0)

    def name(k: int, r: int) -> str:
        return f"t{k}" if r >= run[k] else f"t{k}_{r}"

    rules: dict[str, str] = {}
    starts = [k for k, (token, _) in enumerate(tokens) if _usable(token)]
    names: dict[int, str] = {}
    for bound in sorted(bounds):
        for k in starts:
            j, r = k, bound
            while name(j, r) not in rules:
                token, sep = tokens[j]
                more = sep is not None and r > 1
                tail = "" if not more else (f" {name(j + 1, r - 1)}?" if sep == "" else
                                            f' (" " {name(j + 1, r - 1)})?')
                rules[name(j, r)] = _literal(token) + tail
                if not more:
                    break
                j, r = j + 1, r - 1
        names[bound] = f"m{bound}"
        rules[names[bound]] = " | ".join(name(k, bound) for k in starts) if starts else '"-"'
    return rules, names


def mention_bound(task: Task, label: str) -> int:
    """Longest mention of ``label`` (word/punctuation tokens) the grounded grammar admits."""
    return task.max_mention_tokens.get(label, MAX_MENTION_TOKENS)


def line_items_bound(task: Task) -> int:
    """Most items on one answer line the grammar admits."""
    return task.max_line_items or MAX_LINE_ITEMS


def answer_lines_bound(task: Task, text: str) -> int | None:
    """Most lines an answer over ``text`` may hold: one more than the task's lines per 100 characters times the
    text's length (a short sentence may hold two events); None when the task sets no density."""
    if task.max_lines_per_100_chars is None:
        return None
    return _lines_allowed(round(100 * task.max_lines_per_100_chars), len(text))


def _lines_allowed(hundredths: int, chars: int) -> int:
    return 1 + -(-hundredths * chars // 10_000)  # 1 + ceil(density x chars / 100), in integers


def grammar_signature(task: Task) -> dict[str, Any]:
    """What the answer grammar of ``task`` depends on besides the text (part of ``prompt_version``)."""
    return {"version": GRAMMAR_VERSION, "max_token_chars": MAX_TOKEN_CHARS, "max_line_items": line_items_bound(task),
            "max_lines_per_100_chars": task.max_lines_per_100_chars,
            "max_mention_tokens": {label: mention_bound(task, label) for label in task.concepts}}


def answer_grammar(task: Task, text: str | None = None) -> str:
    """GBNF grammar of a v2 answer for ``task`` (vLLM structured outputs, ``grammar``).

    Labels are enums; an event line admits only the argument labels its anchor has a relation for; reference
    items only relation labels; a line holds at most ``line_items_bound(task)`` items. With ``text``, a mention of
    a label can only be one of ``mention_ngrams(text, mention_bound(task, label))``: every emitted mention is then
    grounded by construction (discontinuous mentions cannot be written), and none runs longer than the task's
    training data ever wrote one; and the answer holds at most ``answer_lines_bound(task, text)`` lines, so a model
    that repeats lines instead of stopping is stopped at as many lines as the densest training windows hold.
    """
    marker = '("(" ("negated" | "speculated" | "hypothetical") ")")?'
    anchors = list(task.events.anchors) if task.events else []
    plain = [c for c in task.concepts if c not in anchors]
    references = reference_relations(task)
    more_items = line_items_bound(task) - 1
    repeat = f"{{0,{more_items}}}"
    max_lines = answer_lines_bound(task, text) if text is not None else None
    more_lines = "*" if max_lines is None else f"{{0,{max_lines - 1}}}"
    rules = {"root": f'"{NONE}" | line ("\\n" line){more_lines}'}
    bounds = {mention_bound(task, label) for label in task.concepts}
    if text is None:
        mention_rules, mention_of = {"mention": "[^|\\n ] [^|\\n]*"}, {b: "mention" for b in bounds}
    else:
        mention_rules, mention_of = _mention_rules(text, bounds)

    def items(labels: list[str]) -> str:
        """``Label[(assertion)]: mention`` for any of ``labels``, each with its own mention bound."""
        by_bound: dict[str, list[str]] = {}
        for label in labels:
            by_bound.setdefault(mention_of[mention_bound(task, label)], []).append(label)
        return " | ".join(f'({_alternatives(group)}) {marker} ": " {rule}' for rule, group in by_bound.items())

    line_kinds = []
    if plain:
        rules["concept"] = items(plain)
        line_kinds.append("concept")
    for k, anchor in enumerate(anchors):
        args = [c for c in task.concepts if task.argument_relations(anchor, c)]
        body = items([anchor])
        if args and more_items:
            rules[f"arg{k}"] = items(args)
            body = f'({body}) (" | " arg{k}){repeat}'
        rules[f"event{k}"] = body
        line_kinds.append(f"event{k}")
    if references and more_items:
        rules["reference"] = f'({_alternatives(references)}) ": " {mention_of[max(bounds)]}'
        line_kinds = [f'{kind} (" | " reference){repeat}' for kind in line_kinds]
    rules["line"] = " | ".join(f"({kind})" for kind in line_kinds)
    rules.update(mention_rules)
    return "\n".join(f"{name} ::= {body}" for name, body in rules.items())


def answer_guide(task: Task, text: str, mode: str) -> dict[str, Any] | None:
    """The structured-output constraint of one request: ``grounded`` (mentions from ``text`` only), ``labels``
    (labels as enums, free mentions) or ``off``."""
    if mode == "off":
        return None
    return {"grammar": answer_grammar(task, text if mode == "grounded" else None)}


# ---------------------------------------------------------------------------------------------------------------
# Bounds learned from training data
# ---------------------------------------------------------------------------------------------------------------


def _quantile(values: list[int], q: float) -> int:
    """Nearest-rank quantile: the smallest value with at least a share ``q`` of ``values`` at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def learn_bounds(task: Task, records: Iterable[dict], quantile: float = 0.999,
                 windows: Callable[[str], Iterable[tuple[int, int]]] | None = None) -> dict[str, Any]:
    """The answer grammar's bounds for ``task`` from gold records (shared/data JSONL format). Per concept label, the
    ``quantile`` of its mentions' length in word/punctuation tokens; over the gold answers of the ``windows`` of each
    record ((start, end) pairs, the job's chunks; default the whole text), the ``quantile`` of the items per line,
    and the fewest lines per 100 characters (in steps of 0.01) at which the answers would lose at most a share
    ``1 - quantile`` of their lines (a share of lines, not of windows: a model that loops instead of stopping fills
    every window to its bound, so the bound is set as low as the answers allow). A label with no mention in
    ``records`` is left out (it gets ``MAX_MENTION_TOKENS``)."""
    lengths: dict[str, list[int]] = {}
    items: list[int] = []
    answers: list[tuple[int, int]] = []  # (window characters, answer lines)
    for record in records:
        for concept in record["concepts"]:
            if concept["label"] in task.concepts:
                lengths.setdefault(concept["label"], []).append(len(_TOKEN.findall(concept["text"])))
        for start, end in (windows or (lambda text: [(0, len(text))]))(record["text"]):
            answer = gold_answer(task, record, (start, end))
            lines = [] if answer == NONE else answer.splitlines()
            items += [line.count(ITEM_SEP) + 1 for line in lines]
            answers.append((max(1, end - start), len(lines)))
    if not items:
        raise ValueError(f"no gold answer line for task {task.name!r}: are these records of its corpus?")
    return {"max_mention_tokens": {label: _quantile(lengths[label], quantile) for label in task.concepts
                                   if label in lengths},
            "max_line_items": _quantile(items, quantile),
            "max_lines_per_100_chars": _lines_density(answers, 1 - quantile)}


def _lines_density(answers: list[tuple[int, int]], lost_share: float) -> float:
    """The fewest lines per 100 characters (a multiple of 0.01) at which ``answers`` ((window characters, lines)
    pairs) lose at most ``lost_share`` of their lines to ``answer_lines_bound``."""
    budget = lost_share * sum(lines for _, lines in answers)

    def lost(hundredths: int) -> int:
        return sum(max(0, lines - _lines_allowed(hundredths, chars)) for chars, lines in answers)

    lo, hi = 1, max(-(-10_000 * lines // chars) for chars, lines in answers) or 1  # hi loses nothing
    while lo < hi:  # lost() only falls as the density rises
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if lost(mid) <= budget else (mid + 1, hi)
    return lo / 100
