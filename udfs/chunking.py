"""Split a long note into overlapping chunks that fit one prompt, with exact offsets into the note.

A chunk ends on the best boundary available in its window: a paragraph break, else a sentence end (or a
line break), else whitespace, else a hard cut. The next chunk starts on a boundary about ``overlap_chars``
before the previous end, so a mention cut by one chunk end lies whole in the next chunk. Invariants:
``note[c.start:c.end] == c.text``, chunks cover the note, ``len(c.text) <= max_chars`` (and at most
``max_tokens`` tokens when a token counter is given), every chunk starts after the previous one.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int
    end: int
    text: str


# Boundary = the position where the next piece starts (just after the separating whitespace).
_PARAGRAPH = re.compile(r"\n[^\S\n]*\n\s*")
_SENTENCE = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+|\n\s*")
_WHITESPACE = re.compile(r"\s+")


def _boundaries(pattern: re.Pattern, text: str) -> list[int]:
    return [m.end() for m in pattern.finditer(text) if 0 < m.end() < len(text)]


def _last_in(bounds: list[int], lo: int, hi: int) -> int | None:
    """Largest boundary b with lo < b <= hi."""
    i = bisect.bisect_right(bounds, hi) - 1
    if i >= 0 and bounds[i] > lo:
        return bounds[i]
    return None


def _first_in(bounds: list[int], lo: int, hi: int) -> int | None:
    """Smallest boundary b with lo <= b < hi."""
    i = bisect.bisect_left(bounds, lo)
    if i < len(bounds) and bounds[i] < hi:
        return bounds[i]
    return None


def chunk_text(  # ~70 lines: the cut rule (a closure) reads the text's boundaries the loop computes once
    text: str,
    max_chars: int,
    overlap_chars: int = 200,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
) -> list[Chunk]:
    """Chunks of ``text``, each at most ``max_chars`` characters (and ``max_tokens`` tokens when given).

    A text within budget is one chunk. ``overlap_chars`` is capped below ``max_chars / 2`` (and below half
    of a chunk shrunk to fit ``max_tokens``) so every chunk makes progress. Empty text gives no chunk.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    if not text:
        return []
    use_tokens = count_tokens is not None and max_tokens is not None

    def fits(start: int, end: int) -> bool:
        return not use_tokens or count_tokens(text[start:end]) <= max_tokens  # type: ignore[misc]

    n = len(text)
    if n <= max_chars and fits(0, n):
        return [Chunk(0, 0, n, text)]

    paragraphs = _boundaries(_PARAGRAPH, text)
    sentences = sorted(set(_boundaries(_SENTENCE, text)) | set(paragraphs))
    words = sorted(set(_boundaries(_WHITESPACE, text)) | set(sentences))
    overlap_cap = max(0, min(overlap_chars, (max_chars - 1) // 2))

    def cut(start: int, floor: int) -> int:
        """End of the chunk starting at ``start``: the best boundary in the window, beyond ``floor``."""
        limit = min(n, start + max_chars)
        while True:
            if limit == n:
                end = n
            else:
                half = max(floor, start + max(1, (limit - start) // 2) - 1)
                end = (
                    _last_in(paragraphs, half, limit)
                    or _last_in(sentences, half, limit)
                    or _last_in(words, max(start, floor), limit)
                    or limit
                )
            if end - start <= 1 or fits(start, end):
                return end
            # over the token budget: shrink the window proportionally and cut again
            n_tok = count_tokens(text[start:end])  # type: ignore[misc]
            limit = start + max(1, min(end - start - 1, (end - start) * max_tokens // max(n_tok, 1)))  # type: ignore[operator]

    chunks: list[Chunk] = []
    start, prev_end = 0, 0
    while True:
        end = cut(start, prev_end)
        if end <= prev_end:
            # the overlap left no room under the token budget: start where the previous chunk ended
            start = prev_end
            end = cut(start, prev_end)
        chunks.append(Chunk(len(chunks), start, end, text[start:end]))
        if end >= n:
            return chunks
        overlap = min(overlap_cap, (end - start) // 2)
        prev_end = end
        if overlap <= 0:
            start = end
            continue
        lo = end - overlap
        # a sentence start if it keeps at least half the overlap, else the earliest word start
        nxt = _first_in(sentences, lo, end - overlap // 2) or _first_in(words, lo, end) or lo
        start = max(nxt, start + 1)


def split_chunk(chunk: Chunk, min_chars: int) -> list[Chunk]:
    """``chunk`` in overlapping pieces of about half its length (a quarter of it shared by neighbours), cut on the
    best boundaries as :func:`chunk_text` does, with offsets into the same text as ``chunk``'s (``index`` = position
    among the pieces). Empty when ``chunk`` is shorter than ``2 * min_chars``: it is as small as it gets."""
    n = len(chunk.text)
    if n < 2 * max(1, min_chars):
        return []
    overlap = n // 4
    pieces = chunk_text(chunk.text, min(n - 1, max(min_chars, (n + overlap) // 2 + 1)), overlap)
    return [Chunk(p.index, chunk.start + p.start, chunk.start + p.end, p.text) for p in pieces]


# What is not prose, by cheap features (none needs a tokenizer). A blob token (whitespace-separated): one too long
# to be words (base64, hex, a run of one letter), one that is mostly RTF control words or braces ("{\rtf1",
# "\pard\fs22", "Calibri;}}{\*\generator"), a run of one or two punctuation characters ("=====", "*-*-*-"). Prose
# is what is left between blob tokens, unless little of it is letters or digits or it uses a handful of characters
# ("ab ab ab"). Of the windows of PHEE and MACCROBAT train+dev, chunked as the job does, and their pieces down to
# three rounds of split_chunk (as udfs/windows.py splits them), none holds a blob token or is taken for no prose.
MIN_ALNUM_SHARE = 0.5
_BLOB_TOKEN_CHARS = 64  # the corpora's longest whitespace token is a regimen of hyphenated drug names, 82 chars
_PUNCTUATION_RUN = 4
_WORD_CHAIN = re.compile(r"[(\[\"']*[^\W\d_]{1,45}(?:[-/'\u2019][^\W\d_]{1,45})*[)\]\"'.,;:!?]*")
_RTF_CONTROL = re.compile(r"\\[a-zA-Z]+-?\d*|\\[^a-zA-Z\s]|[{}]")
_MIN_DISTINCT_CHARS = 4
_NON_SPACE = re.compile(r"\S+")


def _is_blob_token(token: str) -> bool:
    if len(token) >= _BLOB_TOKEN_CHARS and not _WORD_CHAIN.fullmatch(token):
        return True
    if len(token) >= _PUNCTUATION_RUN and len(set(token)) <= 2 and not any(ch.isalnum() for ch in token):
        return True
    return 2 * sum(len(m) for m in _RTF_CONTROL.findall(token)) >= len(token)


def has_prose(text: str) -> bool:
    """Whether ``text`` is worth a model call as a whole: no blob token, at least ``MIN_ALNUM_SHARE`` of its
    non-space characters letters or digits, at least ``_MIN_DISTINCT_CHARS`` different characters."""
    tokens = text.split()
    if not tokens or any(_is_blob_token(t) for t in tokens):
        return False
    chars = "".join(tokens)
    return sum(ch.isalnum() for ch in chars) >= MIN_ALNUM_SHARE * len(chars) and len(set(chars)) >= _MIN_DISTINCT_CHARS


def prose_pieces(chunk: Chunk) -> list[Chunk]:
    """The parts of ``chunk`` worth a model call, with offsets into the same text as ``chunk``'s (``index`` =
    position among the parts): ``[chunk]`` when it holds prose as a whole; else its runs of tokens between blob
    tokens (see the comment above) that hold prose and two words or more, each from its first to its last token;
    ``[]`` for none (a window of whitespace, of a separator line, of a base64 or RTF blob)."""
    if has_prose(chunk.text):
        return [chunk]
    runs: list[list[re.Match]] = [[]]
    for m in _NON_SPACE.finditer(chunk.text):
        if _is_blob_token(m.group()):
            runs.append([])
        else:
            runs[-1].append(m)
    pieces = []
    for run in runs:  # a lone word between blobs is a name in a header (an RTF font table), not prose
        words = sum(any(ch.isalpha() for ch in m.group()) for m in run)
        if words >= 2 and has_prose(chunk.text[run[0].start():run[-1].end()]):
            start, end = chunk.start + run[0].start(), chunk.start + run[-1].end()
            pieces.append(Chunk(len(pieces), start, end, chunk.text[run[0].start():run[-1].end()]))
    return pieces
