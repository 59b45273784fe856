"""Term normalization for concept linking: one function applied alike to mentions and to vocabulary names.

``normalize_term`` folds what does not change a term's meaning, so that an exact match on its result is a match
a terminologist would accept:

* Unicode NFKC (compatibility forms: ligatures, full-width letters, superscripts, the micro sign);
* case folding (``str.casefold``: also ``ß`` -> ``ss``);
* apostrophes removed (``Crohn's`` = ``Crohns``); every other punctuation or symbol character (Unicode
  categories P* and S*: hyphens, slashes, brackets, quotes, ``+``, ``®``) and every separator or control
  character becomes a space;
* runs of spaces collapsed to one, none at either end.

Letters, digits and marks are kept as they are: ``Sjögren`` and ``Sjogren`` stay different (the fuzzy step
of the linker joins them), and so do ``5 mg`` and ``5mg``. ``sorted_tokens`` is the word-order-free form the
fuzzy step compares (``token_sort`` scorer).

``NORMALIZER_VERSION`` changes whenever the output of these functions changes for some input: it is part of
the link fingerprint, so every stored concept is linked again under the new rules.
"""

from __future__ import annotations

import unicodedata

NORMALIZER_VERSION = "n1"

_APOSTROPHES = frozenset("'\u2019\u02bc\u2018\u00b4`")


class _FoldTable(dict):
    """``str.translate`` table computed lazily per code point (the Unicode database, not a hand list)."""

    def __missing__(self, code_point: int) -> str:
        char = chr(code_point)
        if char in _APOSTROPHES:
            value = ""
        elif unicodedata.category(char)[0] in "PSZC" or char.isspace():
            value = " "
        else:
            value = char
        self[code_point] = value
        return value


_FOLD = _FoldTable()


def normalize_term(text: str | None) -> str:
    """The normalized form of a term (see the module docstring); ``""`` for None or a term of nothing but
    punctuation and space."""
    if not text:
        return ""
    folded = unicodedata.normalize("NFKC", text).casefold().translate(_FOLD)
    # casefold can emit characters NFKC would change again (rare: some Greek forms); a second pass is stable.
    folded = unicodedata.normalize("NFKC", folded)
    return " ".join(folded.split())


def sorted_tokens(normalized: str) -> str:
    """The words of a normalized term in sorted order (word order ignored by the fuzzy comparison)."""
    return " ".join(sorted(normalized.split(" "))) if normalized else ""
