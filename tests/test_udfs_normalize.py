"""Term normalization and the fuzzy lexicon of the concept linker (pure functions, no Spark)."""

from __future__ import annotations

import pytest

from notelake.udfs.matching import FuzzyLexicon
from notelake.udfs.normalize import normalize_term, sorted_tokens


@pytest.mark.parametrize("raw, expected", [
    ("  Warfarin   Sodium ", "warfarin sodium"),          # case and whitespace
    ("Gastro-intestinal/bleed.", "gastro intestinal bleed"),  # punctuation to spaces
    ("Crohn\u2019s disease", "crohns disease"),             # apostrophes removed, typographic ones too
    ("Crohn's disease", "crohns disease"),
    ("\ufb01brosis", "fibrosis"),                            # NFKC: ligature
    ("\uff21\uff2b\uff29", "aki"),                           # NFKC: full-width letters
    ("Stra\u00dfe", "strasse"),                              # case folding, not lower()
    ("5\u00a0mg", "5 mg"),                                   # no-break space is a space
    ("Coumadin\u00ae", "coumadin"),                          # symbols to spaces
    ('"Blood thinners" (lay term)', "blood thinners lay term"),
    ("tab\there\nnewline", "tab here newline"),
    ("Hyperkal\u00e6mia", "hyperkal\u00e6mia"),              # letters kept: the fuzzy step joins spellings
    ("Sj\u00f6gren", "sj\u00f6gren"),
    ("---", ""),
    ("", ""),
    (None, ""),
])
def test_normalize_term(raw, expected):
    assert normalize_term(raw) == expected


def test_normalize_is_idempotent_and_sorted_tokens_ignore_order():
    for raw in ("Haemorrhage, gastrointestinal", "Gastrointestinal haemorrhage", "ＡＫＩ (acute)"):
        assert normalize_term(normalize_term(raw)) == normalize_term(raw)
    assert sorted_tokens(normalize_term("Haemorrhage, gastrointestinal")) == \
        sorted_tokens(normalize_term("gastrointestinal HAEMORRHAGE"))
    assert sorted_tokens("") == ""


def lexicon(**settings) -> FuzzyLexicon:
    terms = ["gastrointestinal haemorrhage", "gi bleed", "hyperkalaemia", "warfarin", "warfarin sodium",
             "cardiomyopathy type a", "cardiomyopathy type b", "rash"]
    concepts = [1, 1, 2, 3, 3, 4, 5, 6]
    return FuzzyLexicon(terms, concepts, **{"threshold": 0.9, "margin": 0.05, "min_chars": 4, **settings})


def test_fuzzy_accepts_a_close_spelling_and_reports_the_entry():
    [hemorrhage, kalemia, order] = lexicon().lookup(
        ["gastrointestinal hemorrhage", "hyperkalemia", "haemorrhage gastrointestinal"])
    assert (hemorrhage.status, hemorrhage.entry) == ("fuzzy", 0)
    assert hemorrhage.score == pytest.approx(2 * 27 / (28 + 27))  # Indel similarity of the two strings
    assert (kalemia.status, kalemia.entry) == ("fuzzy", 2)
    assert (order.status, order.entry, order.score) == ("fuzzy", 0, 1.0)  # token_sort: word order ignored
    [plain] = lexicon(scorer="ratio").lookup(["haemorrhage gastrointestinal"])
    assert plain.status == "none"  # the plain ratio does not ignore word order


def test_fuzzy_rejects_a_low_score():
    [result] = lexicon().lookup(["hepatotoxicity"])
    assert result.status == "none" and result.entry == -1
    [below] = lexicon(threshold=0.99).lookup(["hyperkalemia"])  # 0.96: under this threshold
    assert below.status == "none" and 0.95 < below.score < 0.99


def test_fuzzy_rejects_a_match_without_margin_over_another_concept():
    # as close to "cardiomyopathy type a" as to "... type b": two concepts, no margin -> ambiguous, no entry
    [result] = lexicon().lookup(["cardiomyopathy type"])
    assert result.status == "ambiguous" and result.entry == -1
    assert result.score == pytest.approx(result.runner_up)
    assert result.score >= 0.9
    # synonyms of one concept are no runner-up to each other: "warfarin sodiu" is near both entries of concept 3
    [same_concept] = lexicon().lookup(["warfarin sodiu"])
    assert same_concept.status == "fuzzy" and same_concept.entry == 4


def test_fuzzy_skips_short_mentions_and_prefers_the_earlier_entry_on_equal_scores():
    [short] = lexicon(min_chars=5).lookup(["rash"])
    assert short.status == "none"
    tied = FuzzyLexicon(["abcdef", "abcdef"], [7, 7], threshold=0.8, margin=0.0)
    assert tied.lookup(["abcdeg"])[0].entry == 0


def test_fuzzy_length_window_loses_no_candidate():
    """Entries are compared only within the length window that can reach threshold - margin: the result equals
    a comparison with every entry."""
    from rapidfuzz import fuzz

    terms = ["a" * n + "b" for n in range(1, 40)] + ["x" * 10]
    lex = FuzzyLexicon(terms, list(range(len(terms))), scorer="ratio", threshold=0.85, margin=0.0, min_chars=1)
    for mention in ["a" * 9 + "b", "a" * 20, "a" * 30 + "bb", "x" * 9]:
        result = lex.lookup([mention])[0]
        best = max(range(len(terms)), key=lambda i: (fuzz.ratio(mention, terms[i]), -i))
        if fuzz.ratio(mention, terms[best]) >= 85:
            assert result.status == "fuzzy" and result.entry == best
        else:
            assert result.status == "none"


def test_repeated_mentions_are_looked_up_once_with_the_same_result():
    lex = lexicon()
    first = lex.lookup(["hyperkalemia", "gastrointestinal hemorrhage", "hyperkalemia"])
    assert first[0] == first[2] and first[0].status == "fuzzy"
    assert lex.lookup(["hyperkalemia"]) == [first[0]]  # kept from the earlier batch
