"""Grounding: find the character offsets of model-emitted mentions in the text they were extracted from.

A model copies mentions as text (answer schema v2); offsets are recovered here and never invented: a
mention that cannot be found is returned ungrounded (``Grounding(None, "none", 0.0)``).

Tiers, first hit wins:

1. ``exact``: the mention occurs verbatim (every occurrence counts, overlapping ones included).
2. ``normalized``: equal modulo case and whitespace, first with whitespace runs collapsed to one space,
   then with whitespace ignored altogether (``"60mg"`` ~ ``"60 mg"``). Offsets index the original text.
3. discontinuous (method ``exact``): the corpora join the fragments of a discontinuous mention with one
   space. The mention is split at spaces into 2, then 3, then 4 fragments found in order in the text, each
   gap between fragments 1..``max_gap`` characters; several spans are returned.
4. ``fuzzy`` (optional): the most similar word-aligned window (difflib ratio >= ``min_fuzzy_score``).

Which occurrence (answer schema v2 writes lines in text order and arguments next to their event's anchor):

* a mention with an anchor (an event argument) takes the occurrence nearest to where its anchor was grounded;
* any other mention takes the first occurrence at or after the previous such mention's start (the reading
  cursor) that no earlier mention with the same (label, text) took, else the first one not taken, else the
  first one (a repeated concept, merged later).

So PHEE's Drug "insulin" and Treatment "insulin" may share offsets, two Sign_symptom "pain" lines take two
occurrences in order, and an argument repeated in two events grounds next to each event's trigger.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[int, int]
Spans = tuple[Span, ...]

#: Longest gap between two fragments of a discontinuous mention. PHEE has gaps up to 179 characters
#: (train+dev; 134 of its 503 discontinuous concepts have a gap over 60), MACCROBAT up to 34.
DEFAULT_MAX_GAP = 200
MAX_FRAGMENTS = 4
# Upper bound on substring searches per mention in the discontinuous tier (pathological repeats).
_DISCONTINUOUS_BUDGET = 20_000
# Longest mention the fuzzy tier considers (difflib is quadratic).
_FUZZY_MAX_LEN = 300
# Upper bound on difflib ratio computations per mention in the fuzzy tier (pathological repeats).
_FUZZY_BUDGET = 1_000


@dataclass(frozen=True)
class Grounding:
    spans: Spans | None
    method: str  # "exact" | "normalized" | "fuzzy" | "none"
    score: float

    @property
    def grounded(self) -> bool:
        return self.spans is not None

    @property
    def start(self) -> int | None:
        return self.spans[0][0] if self.spans else None

    @property
    def end(self) -> int | None:
        return self.spans[-1][1] if self.spans else None


UNGROUNDED = Grounding(None, "none", 0.0)


def find_all(text: str, sub: str) -> list[int]:
    """Start of every occurrence of ``sub`` in ``text``, overlapping ones included."""
    out, pos = [], text.find(sub)
    while pos != -1:
        out.append(pos)
        pos = text.find(sub, pos + 1)
    return out


def collapse_ws(s: str) -> str:
    """Case-folded, whitespace runs -> one space, stripped (the ``normalized`` tier's equality)."""
    return " ".join(s.casefold().split())


def strip_ws(s: str) -> str:
    """Case-folded with all whitespace removed (the whitespace-free ``normalized`` tier's equality)."""
    return "".join(s.casefold().split())


class _NormalizedView:
    """``text`` lower-cased with whitespace collapsed (or removed), plus the original index of each char."""

    def __init__(self, text: str, keep_spaces: bool):
        chars: list[str] = []
        origin: list[int] = []
        prev_space = True  # drop leading whitespace
        for i, ch in enumerate(text):
            if ch.isspace():
                if keep_spaces and not prev_space:
                    chars.append(" ")
                    origin.append(i)
                prev_space = True
                continue
            prev_space = False
            for low in ch.casefold():
                chars.append(low)
                origin.append(i)
        self.text = "".join(chars)
        self.origin = origin
        self.keep_spaces = keep_spaces

    def spans_of(self, original: str, mention: str) -> list[Spans]:
        norm = collapse_ws if self.keep_spaces else strip_ws
        target = norm(mention)
        if not target:
            return []
        out: list[Spans] = []
        seen: set[Span] = set()
        for pos in find_all(self.text, target):
            start = self.origin[pos]
            end = self.origin[pos + len(target) - 1] + 1
            # A match may begin or end inside a multi-character case folding (e.g. "ß" -> "ss"); only
            # offsets whose original text normalizes to the mention are returned.
            if (start, end) not in seen and norm(original[start:end]) == target:
                seen.add((start, end))
                out.append(((start, end),))
        return out


class _TextIndex:
    """Lazily built views of one text, shared by all mentions grounded in it."""

    def __init__(self, text: str):
        self.text = text
        self._collapsed: _NormalizedView | None = None
        self._stripped: _NormalizedView | None = None
        self._word_bounds: tuple[list[int], list[int]] | None = None

    @property
    def collapsed(self) -> _NormalizedView:
        if self._collapsed is None:
            self._collapsed = _NormalizedView(self.text, keep_spaces=True)
        return self._collapsed

    @property
    def stripped(self) -> _NormalizedView:
        if self._stripped is None:
            self._stripped = _NormalizedView(self.text, keep_spaces=False)
        return self._stripped

    @property
    def word_bounds(self) -> tuple[list[int], list[int]]:
        """Token starts and ends: around whitespace and at letter/digit <-> punctuation transitions."""
        if self._word_bounds is None:
            starts, ends = [], []
            text, n = self.text, len(self.text)
            for i, ch in enumerate(text):
                if ch.isspace():
                    continue
                if i == 0 or text[i - 1].isspace() or text[i - 1].isalnum() != ch.isalnum():
                    starts.append(i)
                if i + 1 == n or text[i + 1].isspace() or text[i + 1].isalnum() != ch.isalnum():
                    ends.append(i + 1)
            self._word_bounds = (starts, ends)
        return self._word_bounds


def _pick(candidates: list[Spans], used: set[Spans], cursor: int = 0, near: int | None = None) -> Spans:
    """``near`` given: the candidate starting nearest to it. Else the first unused one at or after ``cursor``,
    else the first unused one, else the first (candidates are in text order)."""
    if near is not None:
        return min(candidates, key=lambda spans: (abs(spans[0][0] - near), spans[0][0]))
    for cand in candidates:
        if cand not in used and cand[0][0] >= cursor:
            return cand
    for cand in candidates:
        if cand not in used:
            return cand
    return candidates[0]


def _is_word_char(ch: str) -> bool:
    return ch.isalnum()


def _boundary_violations(text: str, spans: Spans) -> int:
    bad = 0
    for s, e in spans:
        if s > 0 and _is_word_char(text[s - 1]) and _is_word_char(text[s]):
            bad += 1
        if e < len(text) and _is_word_char(text[e]) and _is_word_char(text[e - 1]):
            bad += 1
    return bad


def _discontinuous_candidates(text: str, mention: str, max_gap: int) -> list[Spans]:
    """Spans of ``mention`` split at spaces into fragments found in order, best candidates first.

    Ranked by (fragments cutting through a word, number of fragments, total gap, start).
    """
    cuts = [i for i, ch in enumerate(mention) if ch == " "]
    if not cuts:
        return []
    budget = _DISCONTINUOUS_BUDGET
    found: dict[Spans, tuple[int, int, int, int]] = {}

    for n_frag in range(2, MAX_FRAGMENTS + 1):
        if n_frag - 1 > len(cuts):
            break
        for combo in itertools.combinations(cuts, n_frag - 1):
            bounds = (-1, *combo, len(mention))
            frags = [mention[a + 1 : b] for a, b in zip(bounds, bounds[1:])]
            if any(not f or f != f.strip() for f in frags):
                continue
            # depth-first: fragment k starts 1..max_gap characters after fragment k-1 ends
            stack: list[tuple[int, Spans]] = []
            for pos in find_all(text, frags[0]):
                budget -= 1
                stack.append((1, ((pos, pos + len(frags[0])),)))
                if budget <= 0:
                    break
            while stack and budget > 0:
                k, spans = stack.pop()
                if k == len(frags):
                    gap = sum(b[0] - a[1] for a, b in zip(spans, spans[1:]))
                    found.setdefault(spans, (_boundary_violations(text, spans), n_frag, gap, spans[0][0]))
                    continue
                frag, prev_end = frags[k], spans[-1][1]
                pos = text.find(frag, prev_end + 1, prev_end + max_gap + len(frag))
                while pos != -1 and budget > 0:
                    budget -= 1
                    stack.append((k + 1, spans + ((pos, pos + len(frag)),)))
                    pos = text.find(frag, pos + 1, prev_end + max_gap + len(frag))
            if budget <= 0:
                break
        # stop at the smallest fragment count that gives a candidate cutting through no word
        if budget <= 0 or any(rank[0] == 0 for rank in found.values()):
            break
    return sorted(found, key=lambda spans: found[spans])


def _fuzzy_candidates(index: _TextIndex, mention: str, min_score: float) -> list[tuple[float, Spans]]:
    target = collapse_ws(mention)
    if not target or len(target) > _FUZZY_MAX_LEN:
        return []
    text = index.text
    starts, ends = index.word_bounds
    lo, hi = max(1, int(len(target) * 0.7)), int(len(target) * 1.3) + 1
    scored: list[tuple[float, Spans]] = []
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(target)
    ei, budget = 0, _FUZZY_BUDGET
    for s in starts:
        if budget <= 0:
            break
        while ei < len(ends) and ends[ei] <= s:
            ei += 1
        for j in range(ei, len(ends)):
            e = ends[j]
            if e - s > hi:
                break
            if e - s < lo:
                continue
            window = collapse_ws(text[s:e])
            matcher.set_seq1(window)
            if matcher.real_quick_ratio() < min_score or matcher.quick_ratio() < min_score:
                continue
            budget -= 1
            score = matcher.ratio()
            if score >= min_score:
                scored.append((score, ((s, e),)))
    scored.sort(key=lambda item: (-item[0], item[1][0][0]))
    return scored


def _ground_one(  # the search state of one note's mentions, threaded through each call
    index: _TextIndex,
    mention: str,
    used: set[Spans],
    cursor: int,
    near: int | None,
    fuzzy: bool,
    min_fuzzy_score: float,
    max_gap: int,
) -> Grounding:
    if not isinstance(mention, str) or not mention.strip():
        return UNGROUNDED
    text = index.text

    exact = [((p, p + len(mention)),) for p in find_all(text, mention)]
    if exact:
        return Grounding(_pick(exact, used, cursor, near), "exact", 1.0)

    for view in (index.collapsed, index.stripped):
        normalized = view.spans_of(text, mention)
        if normalized:
            return Grounding(_pick(normalized, used, cursor, near), "normalized", 1.0)

    discontinuous = _discontinuous_candidates(text, mention, max_gap)
    if discontinuous:  # ranked by fit, not position: the best fit not yet taken
        return Grounding(_pick(discontinuous, used), "exact", 1.0)

    if fuzzy:
        scored = _fuzzy_candidates(index, mention, min_fuzzy_score)
        if scored:
            spans = _pick([spans for _, spans in scored], used)
            score = next(sc for sc, sp in scored if sp == spans)
            return Grounding(spans, "fuzzy", round(score, 4))
    return UNGROUNDED


def ground_mentions(
    text: str,
    mentions: Sequence[tuple[str, str, int | None]],
    fuzzy: bool = False,
    min_fuzzy_score: float = 0.9,
    max_gap: int = DEFAULT_MAX_GAP,
) -> list[Grounding]:
    """Ground each (label, mention_text, anchor index) in ``text``; one :class:`Grounding` per mention.

    The anchor index (or None) points to an earlier mention of the list: an event argument is grounded next to
    it (module docstring). Offsets index ``text``. A grounded mention with one span satisfies
    ``text[start:end] == mention`` (method ``exact``) or equality modulo case and whitespace (``normalized``);
    with several spans, ``" ".join(text[s:e] for s, e in spans) == mention``.
    """
    index = _TextIndex(text)
    used: dict[tuple[str, str], set[Spans]] = {}
    out: list[Grounding] = []
    cursor = 0
    for label, mention, anchor in mentions:
        taken = used.setdefault((label, mention), set())
        near = out[anchor].start if anchor is not None and 0 <= anchor < len(out) else None
        grounding = _ground_one(index, mention, taken, cursor, near, fuzzy, min_fuzzy_score, max_gap)
        if grounding.spans is not None:
            taken.add(grounding.spans)
            if near is None and anchor is None:
                cursor = grounding.start
        out.append(grounding)
    return out
