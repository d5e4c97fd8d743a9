"""Chunker: token limits (title included), overlap, sentence snapping, determinism, both tokenizers."""

import pytest

from services.gateway.chunker import HuggingFaceTokenizer, WordTokenizer, chunk_text, embed_text, load_tokenizer

TEXT = " ".join(f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(120))


def _tokenizers():
    found = load_tokenizer(None)
    return [WordTokenizer()] + ([found] if isinstance(found, HuggingFaceTokenizer) else [])


@pytest.mark.parametrize("tokenizer", _tokenizers(), ids=lambda t: t.name.split(":")[0])
def test_chunks_respect_the_budget_including_title(tokenizer):
    title = "A fairly long document title"
    chunks = chunk_text(tokenizer, title, TEXT, chunk_tokens=64, overlap=16)
    assert len(chunks) > 5
    for chunk in chunks:
        assert tokenizer.count(embed_text(title, chunk.text)) <= 64
        assert chunk.text == chunk.text.strip() and chunk.text in TEXT
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_consecutive_chunks_overlap_and_cover_everything():
    tok = WordTokenizer()
    chunks = chunk_text(tok, "", TEXT, chunk_tokens=50, overlap=10)
    for a, b in zip(chunks, chunks[1:]):
        tail = a.text.split()[-3:]
        assert " ".join(tail) in b.text, "the next chunk starts inside the previous one"
    assert chunks[0].text.startswith("Sentence number 0") and chunks[-1].text.endswith("topic 0 in some detail.")


def test_chunks_end_at_sentence_boundaries_when_possible():
    chunks = chunk_text(WordTokenizer(), "", TEXT, chunk_tokens=60, overlap=0)
    assert all(c.text.endswith(".") for c in chunks)


def test_short_text_is_one_chunk_and_empty_is_none():
    assert [c.text for c in chunk_text(WordTokenizer(), "T", "  short text  ", chunk_tokens=64, overlap=8)] == ["short text"]
    assert chunk_text(WordTokenizer(), "T", "   ", chunk_tokens=64, overlap=8) == []


def test_deterministic_and_formatting_preserved():
    text = "Line one.\n\nLine two has *markdown*.\n" * 40
    a = chunk_text(WordTokenizer(), "t", text, chunk_tokens=40, overlap=8)
    b = chunk_text(WordTokenizer(), "t", text, chunk_tokens=40, overlap=8)
    assert a == b and "\n\n" in a[0].text


def test_overlap_must_be_smaller():
    with pytest.raises(ValueError):
        chunk_text(WordTokenizer(), "", TEXT, chunk_tokens=32, overlap=32)


def test_embed_text_keeps_title():
    assert embed_text("Title", "body") == "Title\nbody"
    assert embed_text("", "body") == "body"


def test_overlap_starts_at_a_sentence_start_when_it_holds_one():
    chunks = chunk_text(WordTokenizer(), "", TEXT, chunk_tokens=60, overlap=20)
    assert all(c.text.startswith("Sentence number") for c in chunks)
    for a, b in zip(chunks, chunks[1:]):
        assert b.text.split(".")[0] in a.text, "still overlapping"
