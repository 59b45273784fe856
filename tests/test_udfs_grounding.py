from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notelake.udfs.answer import occurrence_index
from notelake.udfs.grounding import Grounding, collapse_ws, ground_mentions, strip_ws

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# small alphabet = many repeated substrings; plus case pairs, unicode with multi-char case folding,
# combining marks, \r\n, tabs, control characters, unicode spaces
ALPHABET = list("aaabAB  ..\r\n\t\x00\x07\x1f") + ["İ", "ß", "Σ", "ς", "é", "e\u0301", "中", "\u2005", "\u200b", "😀"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=80).map("".join) | st.text(max_size=80)


def check_invariants(text: str, mention: str, g: Grounding) -> None:
    assert g.method in ("exact", "normalized", "fuzzy", "none")
    if not g.grounded:
        assert g.method == "none" and g.start is None and g.end is None
        return
    assert g.spans and all(0 <= s < e <= len(text) for s, e in g.spans)
    assert all(a[1] < b[0] for a, b in zip(g.spans, g.spans[1:]))  # ordered, disjoint fragments
    assert (g.start, g.end) == (g.spans[0][0], g.spans[-1][1])
    if g.method == "exact":
        assert " ".join(text[s:e] for s, e in g.spans) == mention
    elif g.method == "normalized":
        assert len(g.spans) == 1
        assert strip_ws(text[g.start:g.end]) == strip_ws(mention)


@PROPS
@given(text=texts, data=st.data())
def test_substring_of_text_is_grounded_exactly_and_hint_picks_it(text, data):
    if not text:
        return
    s = data.draw(st.integers(0, len(text) - 1))
    e = data.draw(st.integers(s + 1, len(text)))
    mention = text[s:e]
    hint = occurrence_index(text, mention, s)
    hinted, plain = ground_mentions(text, [("L", mention, hint), ("M", mention, None)])
    if not mention.strip():
        assert not hinted.grounded  # blank mentions are never grounded
        return
    assert hinted.method == "exact" and hinted.spans == ((s, e),)
    assert plain.method == "exact"
    check_invariants(text, mention, hinted)
    check_invariants(text, mention, plain)
    assert plain.spans == ((text.find(mention), text.find(mention) + len(mention)),)


@PROPS
@given(text=texts, mentions=st.lists(st.tuples(st.sampled_from(["A", "B"]), texts, st.none() | st.integers(-2, 5)), max_size=6),
       fuzzy=st.booleans())
def test_arbitrary_mentions_never_invent_offsets(text, mentions, fuzzy):
    out = ground_mentions(text, mentions, fuzzy=fuzzy)
    assert len(out) == len(mentions)
    for (_, mention, _), g in zip(mentions, out):
        check_invariants(text, mention, g)


@PROPS
@given(words=st.lists(st.sampled_from(["renal", "acute", "failure", "of", "the", "x", "Dose", "a"]), min_size=2, max_size=12),
       data=st.data())
def test_discontinuous_mentions_from_text(words, data):
    text = " ".join(words)
    n = len(words)
    i = data.draw(st.integers(0, n - 2))
    j = data.draw(st.integers(i + 2, n)) if i + 2 <= n else n
    if j <= i + 1 or j > n:
        return
    # drop one inner word to make a 2-fragment mention
    k = data.draw(st.integers(i, j - 1))
    kept = words[i:k] + words[k + 1 : j]
    if not kept:
        return
    mention = " ".join(kept)
    (g,) = ground_mentions(text, [("L", mention, None)])
    assert g.grounded
    check_invariants(text, mention, g)


def test_exact_and_occurrence_hint():
    text = "insulin then insulin again, insulin"
    (g1, g2, g3, g4) = ground_mentions(text, [("Drug", "insulin", 2), ("Drug", "insulin", None),
                                             ("Drug", "insulin", None), ("Drug", "insulin", 9)])
    assert g1.spans == ((13, 20),)
    assert g2.spans == ((0, 7),)  # first unused
    assert g3.spans == ((28, 35),)  # 1st and 2nd used
    assert g4.spans == ((0, 7),)  # hint beyond count -> unused rule; all used -> first
    assert all(g.method == "exact" and g.score == 1.0 for g in (g1, g2, g3, g4))


def test_overlapping_occurrences_count_like_occurrence_index():
    text = "aaaa"
    (g,) = ground_mentions(text, [("L", "aa", 2)])
    assert g.spans == ((1, 3),)
    assert occurrence_index(text, "aa", 1) == 2


def test_used_is_tracked_per_label_and_text():
    # PHEE: the same span is a Drug and a Treatment
    text = "She received insulin and later insulin."
    g = ground_mentions(text, [("Drug", "insulin", None), ("Treatment", "insulin", None), ("Drug", "insulin", None)])
    assert g[0].spans == g[1].spans == ((13, 20),)
    assert g[2].spans == ((31, 38),)


def test_normalized_case_and_whitespace_maps_back_to_original_offsets():
    text = "Pt has  Acute\r\n Renal   FAILURE today; 60 mg daily"
    g1, g2 = ground_mentions(text, [("L", "acute renal failure", None), ("L", "60mg", None)])
    assert g1.method == "normalized"
    assert text[g1.start:g1.end] == "Acute\r\n Renal   FAILURE"
    assert collapse_ws(text[g1.start:g1.end]) == "acute renal failure"
    assert g2.method == "normalized" and text[g2.start:g2.end] == "60 mg"


def test_case_folding_that_changes_length():
    text = "xx STRASSE İstanbul ßig"
    g1, g2 = ground_mentions(text, [("L", "straße", None), ("L", "İSTANBUL", None)])
    assert g1.method == "normalized" and text[g1.start:g1.end] == "STRASSE"
    assert g2.grounded and strip_ws(text[g2.start:g2.end]) == strip_ws("İSTANBUL")


def test_discontinuous_two_and_three_fragments():
    text = "Patients developed renal and hepatic failure after cisplatin, lithium-associated and dose-dependent tremor."
    g1, g2 = ground_mentions(text, [("Effect", "renal failure", None), ("Effect", "lithium-associated tremor", None)])
    assert g1.method == "exact" and len(g1.spans) == 2
    assert [text[s:e] for s, e in g1.spans] == ["renal", "failure"]
    assert [text[s:e] for s, e in g2.spans] == ["lithium-associated", "tremor"]
    text3 = "increase in serum (but not urine) levels of the drug"
    (g3,) = ground_mentions(text3, [("X", "increase levels drug", None)])
    assert [text3[s:e] for s, e in g3.spans] == ["increase", "levels", "drug"]


def test_discontinuous_gap_is_bounded():
    text = "renal " + "x" * 300 + " failure"
    (g,) = ground_mentions(text, [("Effect", "renal failure", None)])
    assert not g.grounded
    (g,) = ground_mentions(text, [("Effect", "renal failure", None)], max_gap=400)
    assert g.grounded and len(g.spans) == 2


def test_unfound_is_ungrounded_and_fuzzy_is_optional():
    text = "The patient developed severe hypoglycaemia after insulin."
    (g,) = ground_mentions(text, [("Effect", "hypoglycemia", None)])
    assert g == Grounding(None, "none", 0.0) and not g.grounded and g.start is None
    (g,) = ground_mentions(text, [("Effect", "hypoglycemia", None)], fuzzy=True)
    assert g.method == "fuzzy" and text[g.start:g.end] == "hypoglycaemia" and 0.9 <= g.score < 1.0
    (g,) = ground_mentions(text, [("Effect", "myocardial infarction", None)], fuzzy=True)
    assert not g.grounded


def test_blank_and_empty_inputs():
    assert ground_mentions("", [("L", "a", None)]) == [Grounding(None, "none", 0.0)]
    assert ground_mentions("abc", [("L", "", None), ("L", "  ", 1)]) == [Grounding(None, "none", 0.0)] * 2
    assert ground_mentions("abc", []) == []
