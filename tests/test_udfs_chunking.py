import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notelake.udfs.chunking import Chunk, chunk_text

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
