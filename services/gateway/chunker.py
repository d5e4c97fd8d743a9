"""Token-aware chunking: fixed token windows with overlap, snapped to sentence ends, each chunk keeping its title.

Tokens are counted with the embedding model's own tokenizer (tokenizer.json via the ``tokenizers`` package) when
one is found, so a chunk never silently overflows the model's window; otherwise a word/punctuation estimate stands
in behind the same two-method interface. Chunk text is cut from the original string by character offsets, so
formatting survives.

    chunks = chunk_text(load_tokenizer(None), "Title", long_text, chunk_tokens=200, overlap=40)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.runtime.errors import ConfigError

log = logging.getLogger("ragfleet.gateway.chunker")

_WORD_RE = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = frozenset(".!?;:")
# Only snap a window back to a sentence end if that keeps at least this share of the window.
_MIN_SNAP_FRACTION = 0.6
_EMBEDDING_DIR = Path(__file__).resolve().parent.parent / "embedding"


class Tokenizer(Protocol):
    name: str

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) of every token, in order. Must not add special tokens."""

    def count(self, text: str) -> int:
        """Number of tokens in text."""


class WordTokenizer:
    """Words and punctuation marks as tokens: close to WordPiece counts for English prose, needs no files."""

    name = "word-estimate"

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _WORD_RE.finditer(text)]

    def count(self, text: str) -> int:
        return sum(1 for _ in _WORD_RE.finditer(text))


class HuggingFaceTokenizer:
    """The embedding model's tokenizer.json, without truncation, padding or special tokens."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.name = f"tokenizer.json:{path}"

    def spans(self, text: str) -> list[tuple[int, int]]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).offsets)

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def load_tokenizer(path: str | None) -> Tokenizer:
    """The configured tokenizer.json, else one vendored under services/embedding, else the word estimate.

    An explicitly configured path that cannot be loaded is a ConfigError: silently chunking with another tokenizer
    would let chunks overflow the model the operator chose."""
    if path:
        try:
            return HuggingFaceTokenizer(path)
        except Exception as exc:  # noqa: BLE001 - any load failure means the same: a bad setting
            raise ConfigError(f"RAGFLEET_GATEWAY_TOKENIZER_PATH={path!r} cannot be loaded as a tokenizer.json "
                              f"({exc}); point it at a valid file, or unset it to use the default") from exc
    for candidate in sorted(_EMBEDDING_DIR.rglob("tokenizer.json")):
        try:
            return HuggingFaceTokenizer(candidate)
        except Exception as exc:  # noqa: BLE001 - fall back, but say why
            log.warning("cannot load tokenizer %s (%s)", candidate, exc)
    return WordTokenizer()


@dataclass(frozen=True)
class TextChunk:
    index: int
    text: str
    token_count: int


def chunk_text(tokenizer: Tokenizer, title: str, text: str, *, chunk_tokens: int, overlap: int) -> list[TextChunk]:
    """Split text into windows of at most ``chunk_tokens`` tokens INCLUDING the title line that is embedded with
    each chunk, consecutive windows sharing ``overlap`` tokens. Deterministic, so re-ingesting yields the same ids."""
    if overlap >= chunk_tokens:
        raise ValueError("overlap must be smaller than chunk_tokens")
    spans = tokenizer.spans(text)
    if not spans:
        return []
    # The title travels with every chunk (see embed_text), so it eats into the window; keep at least half.
    budget = max(chunk_tokens - (tokenizer.count(title) + 1 if title else 0), chunk_tokens // 2)
    overlap = min(overlap, budget // 2)
    chunks: list[TextChunk] = []
    start, total = 0, len(spans)
    while start < total:
        end = min(start + budget, total)
        if end < total:
            end = _snap_to_sentence_end(text, spans, start, end)
        chunks.append(TextChunk(len(chunks), text[spans[start][0]:spans[end - 1][1]], end - start))
        if end >= total:
            break
        start = _snap_to_sentence_start(text, spans, max(end - overlap, start + 1), end)
    return chunks


def _snap_to_sentence_end(text: str, spans: list[tuple[int, int]], start: int, end: int) -> int:
    """Move `end` back to just after a sentence end or line break, if one lies in the window's last 40%."""
    floor = start + max(1, int((end - start) * _MIN_SNAP_FRACTION))
    for j in range(end, floor, -1):
        last_end = spans[j - 1][1]
        if text[last_end - 1] in _SENTENCE_END or "\n" in text[last_end:spans[j][0]]:
            return j
    return end


def _snap_to_sentence_start(text: str, spans: list[tuple[int, int]], start: int, end: int) -> int:
    """Move an overlap's `start` forward to the first sentence start before `end`, so chunks do not open
    mid-sentence; keeps `start` when the overlap holds no sentence start."""
    for j in range(max(start, 1), end):
        previous_end = spans[j - 1][1]
        if text[previous_end - 1] in _SENTENCE_END or "\n" in text[previous_end:spans[j][0]]:
            return j
    return start


def embed_text(title: str, chunk: str) -> str:
    """What the embedding model sees for a chunk: its title on the first line, so a chunk from the middle of a
    document still matches questions about the document's subject."""
    return f"{title}\n{chunk}" if title else chunk
