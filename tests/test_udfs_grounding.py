from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
def test_substring_of_text_is_grounded_exactly_and_anchor_picks_the_nearest(text, data):
    if not text:
        return
    s = data.draw(st.integers(0, len(text) - 1))
    e = data.draw(st.integers(s + 1, len(text)))
    mention = text[s:e]
    anchor, near, plain = ground_mentions(text, [("A", text[s], None), ("L", mention, 0), ("M", mention, None)])
    if not mention.strip():
        assert not near.grounded  # blank mentions are never grounded
        return
    assert near.method == "exact" and plain.method == "exact"
    check_invariants(text, mention, near)
    check_invariants(text, mention, plain)
    if anchor.grounded:  # no occurrence of the mention starts nearer its anchor than the one picked
        starts = [i for i in range(len(text)) if text.startswith(mention, i)]
        assert abs(near.start - anchor.start) == min(abs(i - anchor.start) for i in starts)
    if not text[s].strip():
        return  # a blank anchor is ungrounded and leaves the cursor at 0
    assert plain.start >= anchor.start or mention not in text[anchor.start:]


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


def test_repeats_ground_in_reading_order():
    text = "insulin then insulin again, insulin"
    g = ground_mentions(text, [("Drug", "insulin", None), ("Drug", "insulin", None),
                               ("Drug", "insulin", None), ("Drug", "insulin", None)])
    assert [x.spans for x in g] == [((0, 7),), ((13, 20),), ((28, 35),), ((0, 7),)]  # all used -> the first
    assert all(x.method == "exact" and x.score == 1.0 for x in g)


def test_the_cursor_skips_earlier_occurrences():
    # "pain" at 6 precedes the cursor set by "fever" at 16: the pain after it is taken
    text = "chest pain, then fever and pain"
    g = ground_mentions(text, [("S", "fever", None), ("S", "pain", None)])
    assert g[1].spans == ((27, 31),)


def test_arguments_ground_next_to_their_anchor():
    text = "aspirin caused rash; later aspirin induced ulcer"
    g = ground_mentions(text, [("T", "caused", None), ("Drug", "aspirin", 0), ("T", "induced", None),
                               ("Drug", "aspirin", 2), ("Effect", "ulcer", 2)])
    assert g[1].spans == ((0, 7),) and g[3].spans == ((27, 34),) and g[4].spans == ((43, 48),)


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
