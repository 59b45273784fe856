"""BIO tags <-> character offsets (udfs/bio.py): the classification-head baseline's alignment, on hand-made
offsets (as the base tokenizer produces them) and on the real tokenizer over the dev sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from notelake.udfs.bio import IGNORE, decode_layers, decode_tags, encode_layers, encode_tags, tag_names

# SmolLM2's byte-level BPE: leading spaces inside tokens, one 4-byte character split into three tokens that share
# its offsets, control characters as tokens of their own (offsets printed by the tokenizer, kept verbatim).
TEXT = "Fièvre à 39°C, naïve 𝛼-blocker\x07ok\r\nnext  line"
OFFSETS = [(0, 2), (2, 3), (3, 6), (6, 8), (8, 9), (9, 10), (10, 11), (11, 12), (12, 13), (13, 14), (14, 17),
           (17, 20), (20, 21), (21, 22), (21, 22), (21, 22), (22, 23), (23, 28), (28, 30), (30, 31), (31, 33),
           (33, 34), (34, 35), (35, 39), (39, 40), (40, 45)]


def concept(label, *spans, cid=""):
    return {"id": cid, "label": label, "spans": [list(s) for s in spans]}


def test_tag_names():
    assert tag_names(["Drug", "Effect"]) == ["O", "B-Drug", "I-Drug", "B-Effect", "I-Effect"]


def test_multibyte_control_characters_and_inner_spaces_round_trip():
    gold = [concept("Temp", (9, 13)), concept("Drug", (21, 30)), concept("Note", (35, 45))]
    assert [TEXT[s:e] for c in gold for s, e in c["spans"]] == ["39°C", "𝛼-blocker", "next  line"]
    tags, stats = encode_tags(TEXT, OFFSETS, gold)
    assert tags[13:19] == ["B-Drug", "I-Drug", "I-Drug", "I-Drug", "I-Drug", "I-Drug"]  # 𝛼 is three tokens
    assert tags[19] == "O"  # the BEL control character
    assert tags[23:26] == ["B-Note", "I-Note", "I-Note"]  # the whitespace token between the words belongs to it
    assert (stats.concepts, stats.fragments, stats.overlapping, stats.untokenized) == (3, 0, 0, 0)
    decoded = decode_tags(TEXT, OFFSETS, tags)
    assert [(c["label"], c["start"], c["end"], c["text"]) for c in decoded] == [
        ("Temp", 9, 13, "39°C"), ("Drug", 21, 30, "𝛼-blocker"), ("Note", 35, 45, "next  line")]
    assert all(TEXT[c["start"]:c["end"]] == c["text"] for c in decoded)


def test_leading_space_of_a_token_is_not_part_of_the_concept():
    text = "Lithium-induced seizure in a 45 y/o."
    offsets = [(0, 4), (4, 7), (7, 8), (8, 15), (15, 23), (23, 26), (26, 28), (28, 29), (29, 30), (30, 31), (31, 33),
               (33, 34), (34, 35), (35, 36)]
    gold = [concept("Drug", (0, 7)), concept("Effect", (16, 23)), concept("Age", (29, 35))]
    tags, _ = encode_tags(text, offsets, gold)
    assert tags[:5] == ["B-Drug", "I-Drug", "O", "O", "B-Effect"]
    assert tags[7] == "O"  # the space token before "45" is outside
    decoded = decode_tags(text, offsets, tags)
    assert [(c["label"], c["text"]) for c in decoded] == [("Drug", "Lithium"), ("Effect", "seizure"),
                                                         ("Age", "45 y/o")]


def test_discontinuous_and_overlapping_concepts_are_counted_as_lost():
    text = "Lithium-induced seizure in a 45 y/o."
    offsets = [(0, 4), (4, 7), (7, 8), (8, 15), (15, 23), (23, 26), (26, 28), (28, 29), (29, 30), (30, 31), (31, 33),
               (33, 34), (34, 35), (35, 36)]
    gold = [concept("Effect", (0, 7), (16, 23), cid="T1"), concept("Drug", (0, 15), cid="T2")]
    tags, stats = encode_tags(text, offsets, gold)
    # T2 starts first and is longer: it holds "Lithium-induced"; T1's first fragment overlaps it and is lost
    assert (stats.fragments, stats.overlapping, stats.lost_ids) == (1, 1, ["T1"])
    decoded = decode_tags(text, offsets, tags)
    assert [(c["label"], c["text"]) for c in decoded] == [("Drug", "Lithium-induced"), ("Effect", "seizure")]


def test_decoding_is_lenient_about_a_missing_b_tag():
    text = "rash and fever"
    offsets = [(0, 4), (4, 8), (8, 14)]
    assert [(c["label"], c["text"]) for c in decode_tags(text, offsets, ["I-Effect", "O", "I-Effect"])] == [
        ("Effect", "rash"), ("Effect", "fever")]
    assert [c["text"] for c in decode_tags(text, offsets, ["B-Effect", "I-Effect", "I-Effect"])] == ["rash and fever"]
    assert [(c["label"], c["text"]) for c in decode_tags(text, offsets, ["B-Effect", "I-Drug", "O"])] == [
        ("Effect", "rash"), ("Drug", "and")]


def test_label_layers_keep_nested_concepts_of_different_labels():
    text = "a 45-year-old man"
    offsets = [(0, 1), (1, 2), (2, 4), (4, 5), (5, 9), (9, 10), (10, 13), (13, 17)]
    gold = [concept("Subject", (0, 17), cid="T1"), concept("Subject_age", (2, 13), cid="T2"),
            concept("Drug", (14, 17), cid="T3")]
    labels = ["Subject", "Subject_age", "Drug", "Effect"]
    codes, stats = encode_layers(text, offsets, gold, labels)
    assert (stats.concepts, stats.overlapping, stats.unknown_label) == (3, 0, 0)
    assert [row[0] for row in codes] == [1, 2, 2, 2, 2, 2, 2, 2]  # Subject: B then I over the whole span
    assert [row[1] for row in codes] == [0, 0, 1, 2, 2, 2, 2, 0]  # Subject_age nested inside it
    assert all(row[3] == 0 for row in codes)
    decoded = decode_layers(text, offsets, codes, labels)
    assert [(c["label"], c["text"]) for c in decoded] == [
        ("Subject", "a 45-year-old man"), ("Subject_age", "45-year-old"), ("Drug", "man")]
    codes, stats = encode_layers(text, [(0, 0), *offsets], gold + [concept("Other", (0, 1), cid="T4")], labels)
    assert codes[0] == [IGNORE] * 4 and (stats.unknown_label, stats.lost_ids) == (1, ["T4"])


@pytest.mark.parametrize("corpus", ["phee", "maccrobat"])
def test_dev_gold_survives_the_real_tokenizer(corpus, base_model_path):
    """Every gold concept of the dev set that the label layers can hold comes back through the base tokenizer's
    offsets: exactly, or widened to the token edges when gold ends inside a token ("60%" in "60%,")."""
    from transformers import AutoTokenizer

    from notelake.conf.task import load_task
    from notelake.udfs.bio import _overlaps, _strip

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / corpus / "dev.jsonl"
    if not data.exists():
        pytest.skip("shared/data not beside the repository")
    labels = list(load_task(corpus).concepts)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    exact = widened = total = lost = 0
    for line in data.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        text = record["text"]
        offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        codes, stats = encode_layers(text, offsets, record["concepts"], labels)
        assert stats.untokenized == 0 and stats.unknown_label == 0
        decoded = {(c["label"], c["start"], c["end"]) for c in decode_layers(text, offsets, codes, labels)}
        holdable = [c for c in record["concepts"] if len(c["spans"]) == 1 and c["id"] not in stats.lost_ids]
        total += len(record["concepts"])
        lost += len(record["concepts"]) - len(holdable)
        for c in holdable:
            start, end = c["spans"][0]
            inside = [_strip(text, tok) for tok in offsets if _overlaps(_strip(text, tok), start, end)]
            on_tokens = (c["label"], min(s for s, _ in inside), max(e for _, e in inside))
            assert on_tokens in decoded, f"{c['id']} of {record['note_id']} did not come back"
            exact += on_tokens == (c["label"], start, end)
            widened += on_tokens != (c["label"], start, end)
    assert exact + widened == total - lost
    assert lost / total < {"phee": 0.025, "maccrobat": 0.005}[corpus]
    assert widened / total < 0.02
