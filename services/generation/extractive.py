"""The offline extractive answerer: the passages' sentences most relevant to the question, with [n] citations.

Needs no model and no network, so the mesh answers out of the box and stays up when the LLM is down (fallback).
Relevance is IDF-weighted overlap of content words between the question and each sentence, with a small bonus for
sentences from more relevant passages; the best few sentences form the answer, streamed word by word.

    answerer = ExtractiveAnswerer(counter)
    async for event in answerer.stream(prompt): ...      # Delta("Paris"), Delta(" is"), ..., Done(...)
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from services.generation.base import FINISH_LENGTH, FINISH_STOP, Delta, Done, Event
from services.generation.config import EXTRACTIVE_MODEL
from services.generation.prompt import Prompt, TokenCounter
from services.runtime.pb.ragfleet.v1 import common_pb2

MAX_SENTENCES = 3
# A sentence joins the answer only if it scores at least this share of the best one: it keeps a sentence that
# shares one common word with the question from diluting a precise answer.
MIN_RELATIVE_SCORE = 0.6
NO_SOURCES = "No sources were provided, so I cannot answer this from the documents."
NO_ANSWER = "The provided sources do not appear to answer this question."

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\n{2,}")
_WORD = re.compile(r"[a-z0-9]+")
_TOKEN = re.compile(r"\s*\S+")
_STOPWORDS = frozenset(
    "a an and are as at be been but by can could did do does for from had has have how i if in into is it its "
    "me my of on or our so than that the their them then there these they this those to was we were what when "
    "where which who whom why will with would you your about after all also any before between both each few "
    "more most no not only other over same should some such through under until up very".split())


def _stem(word: str) -> str:
    """A light suffix strip so 'engines' matches 'engine' and 'started' matches 'start'."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_terms(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


@dataclass(frozen=True)
class Candidate:
    score: float
    sentence: str
    number: int


def rank_sentences(question: str, passages: Sequence[common_pb2.Passage]) -> list[Candidate]:
    """Every sentence with a positive score, best first."""
    wanted = content_terms(question)
    sentences = [(s, p.number, rank) for rank, p in enumerate(passages) for s in split_sentences(p.text)]
    if not wanted or not sentences:
        return []
    term_sets = [content_terms(s) for s, _, _ in sentences]
    df = {t: sum(1 for terms in term_sets if t in terms) for t in wanted}
    n = len(sentences)
    idf = {t: math.log(1 + n / (1 + d)) for t, d in df.items()}
    out: list[Candidate] = []
    seen: set[str] = set()
    for (sentence, number, rank), terms in zip(sentences, term_sets):
        overlap = wanted & terms
        key = " ".join(sorted(terms))
        if not overlap or key in seen:
            continue
        seen.add(key)
        score = sum(idf[t] for t in overlap) / math.sqrt(1 + 0.05 * len(terms)) * (1 + 0.1 / (1 + rank))
        out.append(Candidate(score, sentence, number))
    out.sort(key=lambda c: -c.score)
    return out


def cite(sentence: str, number: int) -> str:
    """'Paris is big.' -> 'Paris is big [1].'"""
    body = sentence.rstrip()
    end = body[-1] if body and body[-1] in ".!?" else "."
    body = body.rstrip(".!?").rstrip()
    return f"{body} [{number}]{end}"


def compose(question: str, passages: Sequence[common_pb2.Passage], max_sentences: int = MAX_SENTENCES) -> str:
    if not passages:
        return NO_SOURCES
    ranked = rank_sentences(question, passages)
    if not ranked:
        return NO_ANSWER
    best = [c for c in ranked[:max_sentences] if c.score >= MIN_RELATIVE_SCORE * ranked[0].score]
    return " ".join(cite(c.sentence, c.number) for c in best)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class ExtractiveAnswerer:
    name = EXTRACTIVE_MODEL

    def __init__(self, counter: TokenCounter) -> None:
        self._counter = counter

    async def stream(self, prompt: Prompt) -> AsyncIterator[Event]:
        answer, _ = _cut_at_stop(compose(prompt.question, prompt.passages), prompt.sampling.stop)
        tokens = _TOKEN.findall(answer)
        finish = FINISH_STOP
        if len(tokens) > prompt.sampling.max_tokens:
            tokens, finish = tokens[: prompt.sampling.max_tokens], FINISH_LENGTH
        for token in tokens:
            yield Delta(token)
            await asyncio.sleep(0)  # let other streams run between tokens; cancellation lands here too
        completion = self._counter.count("".join(tokens), prompt.encoding)
        yield Done(finish, prompt.prompt_tokens, completion, EXTRACTIVE_MODEL)

    async def close(self) -> None:
        return None
