"""Fuzzy lookup of normalized mentions in a label's lexicon (the linker's last step, run on the executors).

A lexicon is a list of entries: a normalized term (``udfs.normalize.normalize_term``) and the concept it names,
in order of preference (the caller orders them: standard names first). A mention is matched to the entry most
similar to it (rapidfuzz's Indel similarity ``ratio``, on the words in sorted order for ``token_sort_ratio``),
and the match is **accepted only when** its similarity is at least ``threshold`` **and** exceeds the best
similarity of any entry of another concept by at least ``margin``. Otherwise the result says ``ambiguous``
(close to several concepts) or ``none``: the linker writes concept 0 then, never a guess.

Speed: each distinct mention is looked up once (results are kept per lexicon), and only entries whose length allows a similarity of ``threshold - margin`` are compared (for the Indel
similarity ``2 * matches / (len_a + len_b)``, lengths outside ``[L * c / (2 - c), L * (2 - c) / c]`` cannot
reach ``c``), with rapidfuzz's ``cdist`` over all mentions of one length at once. Entries below that cut-off
cannot change the decision: a runner-up under ``threshold - margin`` leaves any accepted match its margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from notelake.udfs.normalize import sorted_tokens

Scorer = Literal["ratio", "token_sort_ratio"]
FuzzyStatus = Literal["fuzzy", "ambiguous", "none"]
_MAX_CELLS = 2_000_000  # similarity matrix cells per cdist call (16 MB of float64)
_EPS = 1e-9
_CACHE_SIZE = 200_000  # results kept per lexicon: clinical mentions repeat ("warfarin" in thousands of notes)


@dataclass(frozen=True)
class FuzzyResult:
    """The outcome for one mention: ``entry`` indexes the lexicon (-1 when nothing was accepted); ``score`` is the
    best similarity found (0..1; 0 when nothing reached ``threshold - margin``); ``runner_up`` the best
    similarity of another concept."""

    status: FuzzyStatus
    entry: int
    score: float
    runner_up: float


class FuzzyLexicon:
    """The entries of one label's lexicon, indexed by length for fuzzy lookups."""

    def __init__(self, terms: Sequence[str], concepts: Sequence[int], *, scorer: Scorer = "token_sort_ratio",
                 threshold: float = 0.9, margin: float = 0.05, min_chars: int = 4) -> None:
        if len(terms) != len(concepts):
            raise ValueError("one concept per term")
        self.threshold, self.margin, self.min_chars = threshold, margin, min_chars
        self._key = sorted_tokens if scorer == "token_sort_ratio" else (lambda term: term)
        keys = [self._key(t) for t in terms]
        lengths = np.fromiter((len(k) for k in keys), dtype=np.int64, count=len(keys))
        order = np.argsort(lengths, kind="stable")  # stable: equal lengths keep the caller's preference order
        self._keys = [keys[i] for i in order]
        self._lengths = lengths[order]
        self._entries = order
        self._concepts = np.asarray(concepts, dtype=np.int64)[order]
        self._cut = max(threshold - margin, 0.0)
        self._cache: dict[str, FuzzyResult] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def _window(self, length: int) -> tuple[int, int]:
        """Index range of the entries whose length can reach the cut-off similarity with a mention's."""
        if self._cut <= 0:
            return 0, len(self._keys)
        low = math.ceil(length * self._cut / (2 - self._cut) - _EPS)
        high = math.floor(length * (2 - self._cut) / self._cut + _EPS)
        return (int(np.searchsorted(self._lengths, low, side="left")),
                int(np.searchsorted(self._lengths, high, side="right")))

    def lookup(self, mentions: Sequence[str]) -> list[FuzzyResult]:
        """One result per normalized mention, in order."""
        from rapidfuzz import fuzz, process

        results: list[FuzzyResult | None] = [None] * len(mentions)
        by_length: dict[int, list[int]] = {}
        first: dict[str, int] = {}  # a mention repeated in the batch is looked up once
        for i, mention in enumerate(mentions):
            if mention in self._cache:
                results[i] = self._cache[mention]
            elif len(mention) < self.min_chars or not self._keys:
                results[i] = FuzzyResult("none", -1, 0.0, 0.0)
            elif mention not in first:
                first[mention] = i
                by_length.setdefault(len(self._key(mention)), []).append(i)
        for length, positions in by_length.items():
            start, stop = self._window(length)
            if start == stop:
                for i in positions:
                    results[i] = FuzzyResult("none", -1, 0.0, 0.0)
                continue
            rows = max(1, _MAX_CELLS // (stop - start))
            for chunk in range(0, len(positions), rows):
                part = positions[chunk:chunk + rows]
                scores = process.cdist([self._key(mentions[i]) for i in part], self._keys[start:stop],
                                       scorer=fuzz.ratio, score_cutoff=self._cut * 100, dtype=np.float64,
                                       workers=1)
                for row, i in zip(scores, part):
                    results[i] = self._decide(row, start)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.clear()
        for mention, i in first.items():
            self._cache[mention] = results[i]
        return [r if r is not None else results[first[m]] for r, m in zip(results, mentions)]

    def _decide(self, row: np.ndarray, offset: int) -> FuzzyResult:
        candidates = np.flatnonzero(row >= self._cut * 100 - _EPS) if self._cut > 0 else np.arange(len(row))
        if not len(candidates):
            return FuzzyResult("none", -1, 0.0, 0.0)
        scores = row[candidates] / 100
        best = scores.max()
        tied = candidates[scores >= best - _EPS] + offset
        winner = int(tied[np.argmin(self._entries[tied])])  # equal scores: the caller's preferred entry
        concept = self._concepts[winner]
        others = scores[self._concepts[candidates + offset] != concept]
        runner_up = float(others.max()) if len(others) else 0.0
        entry = int(self._entries[winner])
        if best < self.threshold - _EPS:
            return FuzzyResult("none", -1, float(best), runner_up)
        if best - runner_up < self.margin - _EPS:
            return FuzzyResult("ambiguous", -1, float(best), runner_up)
        return FuzzyResult("fuzzy", entry, float(best), runner_up)
