"""Assertion of extracted concepts by ConText, the rule-based successor of NegEx, as medspaCy ships it.

ConText reads cue phrases ("denies", "no evidence of", "possible", "if") and their scope inside a sentence, and
marks each target span negated, uncertain, hypothetical, historical or about family. Here the targets are the
concepts an extractor already found (their exact offsets in the note), so ConText decides only the assertion,
never what a concept is. Everything comes with the packages: medspaCy's clinical tokenizer, PyRuSH sentence
rules and ConText's English rule set over ``spacy.blank("en")``; no model and nothing downloaded.

Two changes to medspaCy's defaults, chosen on MACCROBAT and PHEE *train* gold spans (bench/assertion.py), never
on dev: a cue reaches at most ``MAX_SCOPE_TOKENS`` tokens, still inside its sentence (the default, the whole
sentence, lets "no past medical history" negate the finding the sentence goes on to report); and ``EXTRA_RULES``
adds negation cues the default English set lacks: a finding that was not found ("... was not detected") or went
away ("the effusion resolved", "resolution of", "free from"), which case reports state after the finding.

ConText categories -> answer-schema assertions: NEGATED_EXISTENCE -> ``negated``, POSSIBLE_EXISTENCE ->
``speculated``, HYPOTHETICAL -> ``hypothetical`` (in that order of precedence); HISTORICAL and FAMILY have no
assertion of their own (a past or a relative's finding is still asserted present) and leave ``present``.

Methods (``job.assertion``): ``model`` keeps the extractor's markers; ``context`` replaces them with ConText's;
``combined`` takes negation from ConText and speculation and hypothesis from the model: ``negated`` when ConText
says so, else the model's marker unless that is ``negated``, else ``present``. Measured on MACCROBAT and PHEE dev
(bench/assertion.py), ConText's negation beats the model's on both, the model's speculation beats ConText's, and
letting either side negate (a union) loses precision.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Collection, Iterable, Sequence

ASSERTION_METHODS = ("model", "context", "combined")
#: Tokens a cue reaches (inside its sentence) when its rule sets no scope of its own.
MAX_SCOPE_TOKENS = 8
_BE = {"LOWER": {"IN": ["was", "were", "is", "are", "been"]}}
_NOT_FOUND = ["detected", "found", "seen", "observed", "identified", "noted", "present", "visualized", "evident",
              "shown", "demonstrated", "appreciated", "reported"]
#: Negation cues added to medspaCy's English rules: (literal, direction, token pattern).
EXTRA_RULES = (
    ("were ruled out", "BACKWARD", [{"LOWER": {"IN": ["were", "be", "been"]}}, {"LOWER": "ruled"}, {"LOWER": "out"}]),
    ("was not detected", "BACKWARD", [_BE, {"LOWER": {"IN": ["not", "never"]}}, {"LOWER": {"IN": _NOT_FOUND}}]),
    ("was absent", "BACKWARD", [_BE, {"LOWER": {"IN": ["absent", "excluded"]}}]),
    ("resolved", "BACKWARD", [{"LOWER": {"IN": ["resolved", "disappeared", "subsided", "vanished", "abated", "ceased",
                                                "regressed"]}}]),
    ("resolution of", "FORWARD", [{"LOWER": {"IN": ["resolution", "disappearance", "relief", "remission", "regression",
                                                    "absence"]}}, {"LOWER": "of"}]),
    ("relieved", "FORWARD", [{"LOWER": {"IN": ["relieved", "resolved", "eliminated"]}}]),
    ("free from", "FORWARD", [{"LOWER": "free"}, {"LOWER": {"IN": ["from", "of"]}}]),
    ("no longer", "FORWARD", [{"LOWER": "no"}, {"LOWER": "longer"}]),
    ("neither", "FORWARD", [{"LOWER": {"IN": ["neither", "nor"]}}]),
)
#: ConText reads one sentence at a time, but the sentence splitter's time grows faster than its text (PyRuSH: about
#: 1 s for 27k characters, 28 s for 220k on one core): a longer note is read in segments of at most this many
#: characters, cut between sentences (a newline, else a sentence end) and never inside a concept.
SEGMENT_CHARS = 8000
_SENTENCE_END = re.compile(r"[.!?]\s")
_SPAN_GROUP = "notelake_concepts"
#: ConText attribute -> assertion, highest precedence first.
_CONTEXT_ASSERTIONS = (("is_negated", "negated"), ("is_uncertain", "speculated"), ("is_hypothetical", "hypothetical"))


@lru_cache(maxsize=1)
def context_pipeline():
    """medspaCy's tokenizer, PyRuSH sentence splitter and ConText (span-group input), built once per process."""
    try:
        import medspacy
    except ImportError as exc:
        raise ImportError("job.assertion context/combined needs medspaCy: `make install`, or pip install "
                          "'notelake[assertion]' then `pip install --no-deps medspacy==1.3.1` (setup.py); "
                          "job.assertion: model needs neither") from exc

    from medspacy.context import ConTextRule

    nlp = medspacy.load(medspacy_enable=["medspacy_tokenizer", "medspacy_pyrush"])
    context = nlp.add_pipe("medspacy_context", config={"input_span_type": "group", "span_group_name": _SPAN_GROUP})
    context.add([ConTextRule(literal, "NEGATED_EXISTENCE", direction=direction, pattern=pattern)
                 for literal, direction, pattern in EXTRA_RULES])
    # A rule's own max_scope trims its sentence scope; the component-wide max_scope would replace the sentence
    # by a window that crosses sentence ends.
    for rule in context.rules:
        if rule.max_scope is None:
            rule.max_scope = MAX_SCOPE_TOKENS
    return nlp


def context_assertions(text: str, extents: Sequence[tuple[int, int]], labels: Sequence[str] | None = None) -> list[str]:
    """ConText's assertion for each ``(start, end)`` character extent of ``text`` (one note, one call).

    An extent is widened to whole tokens; one outside the text is ``present``. ``labels`` (optional, the
    concepts' labels) become the spans' labels, which rules may restrict. A note over ``SEGMENT_CHARS`` is read
    segment by segment (:func:`segments`), only those holding an extent.
    """
    found = ["present"] * len(extents)
    for seg_start, seg_end in segments(text, extents):
        inside = [k for k, (s, e) in enumerate(extents) if seg_start <= s and e <= seg_end]
        if not inside:
            continue
        judged = _context_of(text[seg_start:seg_end], [(extents[k][0] - seg_start, extents[k][1] - seg_start)
                                                         for k in inside],
                             [labels[k] for k in inside] if labels else None)
        for k, assertion in zip(inside, judged):
            found[k] = assertion
    return found


def segments(text: str, extents: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``text`` cut into ``(start, end)`` segments of at most ``SEGMENT_CHARS`` characters where it can be: each
    cut after the last newline, else the last sentence end, in the second half of the segment, moved to the start
    (or, when the concept opens the segment, the end) of a concept it would cut."""
    cuts, start = [], 0
    while len(text) - start > SEGMENT_CHARS:
        window = text[start + SEGMENT_CHARS // 2:start + SEGMENT_CHARS]
        at = window.rfind("\n") + 1 or max((m.end() for m in _SENTENCE_END.finditer(window)), default=len(window))
        cut, later = start + SEGMENT_CHARS // 2 + at, False
        while blocked := [(s, e) for s, e in extents if s < cut < e]:
            first = min(s for s, _ in blocked)
            later = later or first <= start  # a concept that opens the segment: cut after it, and never back
            cut = max(e for _, e in blocked) if later else first
        cuts.append((start, cut))
        start = cut
    return [*cuts, (start, len(text))]


def _context_of(text: str, extents: Sequence[tuple[int, int]], labels: Sequence[str] | None) -> list[str]:
    nlp = context_pipeline()
    doc = nlp.make_doc(text)
    for name, component in nlp.pipeline:
        if name != "medspacy_context":
            doc = component(doc)
    spans = [doc.char_span(s, e, label=(labels[k] if labels else "concept"), alignment_mode="expand")
             for k, (s, e) in enumerate(extents)]
    doc.spans[_SPAN_GROUP] = [sp for sp in spans if sp is not None]
    doc = nlp.get_pipe("medspacy_context")(doc)
    return [_assertion_of(sp) for sp in spans]


def _assertion_of(span) -> str:
    if span is None:
        return "present"
    return next((assertion for attr, assertion in _CONTEXT_ASSERTIONS if getattr(span._, attr)), "present")


def combine(model: str, context: str, method: str) -> str:
    """One concept's assertion from the extractor's marker and ConText's, by ``method`` (module docstring)."""
    if method == "model":
        return model
    if method == "context":
        return context
    if method == "combined":
        if context == "negated":
            return "negated"
        return "present" if model == "negated" else model
    raise ValueError(f"assertion method {method!r}: expected one of {', '.join(ASSERTION_METHODS)}")


def assign_assertions(text: str, concepts: Iterable[dict], method: str = "combined",
                      labels: Collection[str] | None = None) -> list[dict]:
    """The concept rows of one note (``udfs.assemble.assemble_note``'s, or any rows with ``spans`` as
    ``[{"start", "end"}, ...]`` offsets into ``text``, ``label`` and ``assertion``) with ``assertion`` set by
    ``method``. Only rows whose label is in ``labels`` (the task's ``assertion_labels``; None = every label) are
    judged; the others, and ungrounded rows (no spans), keep their assertion. Rows are copied, in the same order;
    a discontinuous concept is judged on its extent (first start to last end). ``model`` returns copies unchanged
    without running ConText."""
    rows = [dict(c) for c in concepts]
    if method not in ASSERTION_METHODS:
        raise ValueError(f"assertion method {method!r}: expected one of {', '.join(ASSERTION_METHODS)}")
    grounded = [r for r in rows if r.get("spans") and (labels is None or r["label"] in labels)]
    if method == "model" or not grounded:
        return rows
    found = context_assertions(text, [(r["spans"][0]["start"], r["spans"][-1]["end"]) for r in grounded],
                               [r["label"] for r in grounded])
    for row, context in zip(grounded, found):
        row["assertion"] = combine(row.get("assertion") or "present", context, method)
    return rows


def assertion_fingerprint(method: str, labels: Collection[str] | None) -> dict | None:
    """What the extraction fingerprint must hold for ``method`` over a task's ``labels``: None for ``model`` (the
    rows are the extractor's own), else the method, the judged labels, the medspaCy release whose rules decide and
    a hash of this module's changes to them.
    Reads package metadata only (no spaCy import), so the driver can call it."""
    if method not in ASSERTION_METHODS:
        raise ValueError(f"assertion method {method!r}: expected one of {', '.join(ASSERTION_METHODS)}")
    if method == "model":
        return None
    try:
        release = version("medspacy")
    except PackageNotFoundError:
        release = None
    rules = json.dumps([EXTRA_RULES, MAX_SCOPE_TOKENS, _CONTEXT_ASSERTIONS, SEGMENT_CHARS], sort_keys=True)
    return {"method": method, "labels": sorted(labels) if labels is not None else None, "medspacy": release,
            "rules_sha256": hashlib.sha256(rules.encode()).hexdigest()[:12]}
