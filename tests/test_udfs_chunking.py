import base64
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notelake.udfs.chunking import Chunk, chunk_text, has_prose, prose_pieces, split_chunk

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

pieces = st.sampled_from(["word", "Ab", "x.", "end. ", "Q? ", " ", "  ", "\n", "\n\n", "\r\n", "\r\n\r\n", "\t",
                          "\x00", "\x1f", "é", "中文", "\u2005", "😀", "a" * 40, "no-space-token-" * 5])
texts = st.lists(pieces, max_size=120).map("".join) | st.text(max_size=400)


def word_count(s: str) -> int:
    return len(s.split())


def check_chunks(text: str, chunks: list[Chunk], max_chars: int, max_tokens: int | None = None) -> None:
    if not text:
        assert chunks == []
        return
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for i, c in enumerate(chunks):
        assert c.index == i
        assert text[c.start:c.end] == c.text
        assert 0 < len(c.text) <= max_chars
        if max_tokens is not None and len(c.text) > 1:
            assert word_count(c.text) <= max_tokens
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start <= a.end  # progress, no hole
        assert b.end > a.end


@PROPS
@given(text=texts, max_chars=st.integers(1, 300), overlap=st.integers(0, 400))
def test_chunks_map_exactly_and_cover(text, max_chars, overlap):
    chunks = chunk_text(text, max_chars, overlap)
    check_chunks(text, chunks, max_chars)
    cap = (max_chars - 1) // 2
    for a, b in zip(chunks, chunks[1:]):
        assert a.end - b.start <= min(overlap, cap)


@PROPS
@given(text=texts, max_chars=st.integers(10, 300), max_tokens=st.integers(1, 30))
def test_token_budget_is_respected(text, max_chars, max_tokens):
    chunks = chunk_text(text, max_chars, 50, count_tokens=word_count, max_tokens=max_tokens)
    check_chunks(text, chunks, max_chars, max_tokens)


def test_within_budget_is_one_chunk_and_empty_is_none():
    assert chunk_text("", 100) == []
    assert chunk_text("short note.", 100) == [Chunk(0, 0, 11, "short note.")]
    assert chunk_text("a b c d", 100, count_tokens=word_count, max_tokens=4) == [Chunk(0, 0, 7, "a b c d")]
    assert len(chunk_text("a b c d e", 100, count_tokens=word_count, max_tokens=4)) > 1


def test_prefers_paragraph_then_sentence_boundaries():
    para1 = "First sentence here. " * 6  # 126 chars
    text = para1 + "\n\n" + "Second paragraph sentence. " * 6
    chunks = chunk_text(text, 200, 40)
    assert chunks[0].text.endswith("\n\n")  # cut at the paragraph break
    assert chunks[1].text.startswith("First sentence here.")  # overlap starts on a sentence
    one_para = "Alpha beta gamma. " * 30
    chunks = chunk_text(one_para, 100, 30)
    assert all(c.text.endswith(". ") for c in chunks[:-1])
    assert all(c.text.startswith("Alpha") for c in chunks)


def test_hard_cut_when_no_boundary():
    text = "x" * 250
    chunks = chunk_text(text, 100, 20)
    check_chunks(text, chunks, 100)
    assert [len(c.text) for c in chunks][:2] == [100, 100]


def test_real_maccrobat_notes():
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "maccrobat" / "dev.jsonl"
    if not data.exists():
        import pytest

        pytest.skip("shared data not available")
    for line in data.read_text(encoding="utf-8").splitlines()[:5]:
        text = json.loads(line)["text"]
        chunks = chunk_text(text, 400, 200)
        check_chunks(text, chunks, 400)
        for a, b in zip(chunks, chunks[1:]):
            assert 0 < a.end - b.start <= 199


@PROPS
@given(text=texts, max_chars=st.integers(20, 300), overlap=st.integers(0, 100), min_chars=st.integers(1, 60),
       lead=st.text(max_size=30))
def test_split_chunk_pieces_map_exactly_into_the_note(text, max_chars, overlap, min_chars, lead):
    note = lead + text
    for chunk in chunk_text(note, max_chars, overlap):
        pieces = split_chunk(chunk, min_chars)
        if len(chunk.text) < 2 * min_chars:
            assert pieces == []
            continue
        assert pieces[0].start == chunk.start and pieces[-1].end == chunk.end
        for i, p in enumerate(pieces):
            assert p.index == i and note[p.start:p.end] == p.text and 0 < len(p.text) < len(chunk.text)
        for a, b in zip(pieces, pieces[1:]):
            assert a.start < b.start <= a.end < b.end  # overlapping neighbours, no hole


def test_split_chunk_halves_a_window_on_its_boundaries():
    text = "Rash developed after amoxicillin. 😀 Naproxène was stopped; the rash resolved. " * 3
    (chunk,) = chunk_text(text, 1000)
    pieces = split_chunk(chunk, 48)
    assert 2 <= len(pieces) <= 3 and all(len(p.text) <= len(text) // 2 + len(text) // 8 + 1 for p in pieces)
    assert all(p.text.endswith((". ", "; ")) for p in pieces[:-1])


BLOBS = {
    "whitespace of a template": " " * 200 + "\n\t \n" * 50,
    "a separator line": "=" * 400,
    "a spaced separator": "- " * 200,
    "a run of one letter": "a" * 400,
    "a few characters repeated": "ab " * 130,
    "base64 (MIME lines)": base64.encodebytes(bytes(range(256)) * 2).decode(),
    "base64 (one token)": base64.b64encode(bytes(range(256)) * 2).decode(),
    "hex": bytes(range(200)).hex(),
    "RTF": r"{\rtf1\ansi\ansicpg1252\deff0\nouicompat{\fonttbl{\f0\fnil\fcharset0 Calibri;}}{\*\generator Riched20"
           r" 10.0}\viewkind4\uc1 \pard\sa200\sl276\slmult1\f0\fs22\lang9 {\pict\pngblip\picw64\pich64 "
           + "89504e470d0a1a0a0000000d49484452" * 8 + "}",
}


@pytest.mark.parametrize("name", sorted(BLOBS))
def test_no_prose_in_blobs(name):
    (chunk,) = chunk_text(BLOBS[name], 4000)
    assert not has_prose(chunk.text) and prose_pieces(chunk) == []


def test_prose_beside_a_blob_is_kept_at_its_offsets():
    rtf = r"{\rtf1\ansi \pard INR rose to 9 today.\par}"
    labs = "WBC 12.3, Hb 9.1 g/dL, (+), CK19 (+)."
    text = "Pt took warfarin 5 mg.\n" + BLOBS["base64 (MIME lines)"] + rtf + "\n" + "=" * 80 + "\n" + labs
    (chunk,) = chunk_text(text, 4000)
    pieces = prose_pieces(chunk)
    assert [p.text for p in pieces] == ["Pt took warfarin 5 mg.", r"INR rose to 9 today.\par}", labs]
    assert all(text[p.start:p.end] == p.text for p in pieces)
    sentence = Chunk(0, 0, 22, "Pt took warfarin 5 mg.")
    assert prose_pieces(sentence) == [sentence]  # prose as a whole: the window itself


def test_every_window_of_the_corpora_is_prose():
    """Lab value lists, HLA alleles, karyotypes, a hyphenated 82-character regimen: all prose, down to the pieces
    udfs/windows.py splits a cut window into."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (root / "maccrobat" / "dev.jsonl").exists():
        pytest.skip("shared data not available")
    n = 0
    for corpus, max_chars in (("phee", 1000), ("maccrobat", 400)):
        for split in ("train", "dev"):
            for line in (root / corpus / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
                windows = chunk_text(json.loads(line)["text"], max_chars, 200)
                for _ in range(4):
                    assert all(prose_pieces(w) == [w] for w in windows)
                    n += len(windows)
                    windows = [p for w in windows for p in split_chunk(w, 48)]
    assert n > 50_000
