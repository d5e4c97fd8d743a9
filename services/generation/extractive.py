"""The offline extractive answerer: the passages' sentences most relevant to the question, with [n] citations.

Needs no model and no network, so the mesh answers out of the box and stays up when the LLM is down (fallback).
Relevance is IDF-weighted overlap of content words between the question and each sentence, with a small bonus for
sentences from more relevant passages; the best few sentences form the answer, streamed word by word.

    answerer = ExtractiveAnswerer(counter)
    async for event in answerer.stream(prompt): ...      # Delta("Paris"), Delta(" is"), ..., Done(...)
"""

from __future__ import annotations

import asyncio
import functools
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
    """A light English suffix strip so 'colonies' meets 'colony', 'swarming' meets 'swarm', 'decoded' 'decode'."""
    if len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "ches", "shes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # running -> run
            break
    return word.rstrip("e") if len(word) > 3 else word  # decode/decoded -> decod


def content_terms(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


@dataclass(frozen=True)
class Candidate:
    sentence: str
    number: int  # the passage's citation number
    order: tuple[int, int]  # (passage rank, sentence index): reading order
    terms: frozenset[str]  # question terms the sentence contains
    prior: float  # passage-rank bonus over length penalty


@dataclass(frozen=True)
class _Analysis:
    sentences: tuple[tuple[str, frozenset[str]], ...]  # each sentence with its content terms
    terms: frozenset[str]  # the content terms of title and text together


@functools.lru_cache(maxsize=4096)
def _analyse(title: str, text: str) -> _Analysis:
    """A passage's sentences and terms, the same whatever the question: passages recur across questions, and
    splitting and stemming them on every Ask was ~20 % of generation's CPU under load (bench/load.py
    --profile-rate)."""
    return _Analysis(tuple((s, frozenset(content_terms(s))) for s in split_sentences(text)),
                     frozenset(content_terms(f"{title} {text}")))


def candidates(question: str, passages: Sequence[common_pb2.Passage]) -> tuple[list[Candidate], dict[str, float]]:
    """Sentences that share a content word with the question, and the IDF weight of each question term."""
    wanted = content_terms(question)
    analyses = [_analyse(p.title, p.text) for p in passages]
    sentences = [(s, terms, p.number, (rank, i)) for rank, (p, a) in enumerate(zip(passages, analyses))
                 for i, (s, terms) in enumerate(a.sentences)]
    if not wanted or not sentences:
        return [], {}
    # IDF over passages, not sentences: the passage's own topic word recurs in its sentences and must not lose
    # weight for it; a word found in every passage still says little about which one answers.
    n = len(passages)
    idf = {t: math.log(1 + (n + 1) / (1 + sum(1 for a in analyses if t in a.terms))) for t in wanted}
    out: list[Candidate] = []
    seen: set[frozenset[str]] = set()
    for sentence, terms, number, order in sentences:
        if not wanted & terms or terms in seen:
            continue
        seen.add(terms)  # the same sentence twice (overlapping chunks) counts once
        # Retrieval rank matters (the caller ranked passages), and a passage's first sentence often states its point.
        prior = (1 + 1 / (1 + order[0])) * (1.25 if order[1] == 0 else 1.0) / math.sqrt(1 + 0.05 * len(terms))
        out.append(Candidate(sentence, number, order, frozenset(wanted & terms), prior))
    return out, idf


def select(question: str, passages: Sequence[common_pb2.Passage],
           max_sentences: int = MAX_SENTENCES) -> list[Candidate]:
    """Greedy choice that rewards covering question terms not yet covered, so an answer to "direction and
    distance" takes one sentence for each rather than two for the same; returned in reading order."""
    pool, idf = candidates(question, passages)
    weight = dict(idf)
    chosen: list[Candidate] = []
    first_score = 0.0
    while pool and len(chosen) < max_sentences:
        scores = [sum(weight[t] for t in c.terms) * c.prior for c in pool]
        best = max(range(len(pool)), key=scores.__getitem__)
        if not chosen:
            first_score = scores[best]
        elif scores[best] < MIN_RELATIVE_SCORE * first_score:
            break
        chosen.append(pool.pop(best))
        for term in chosen[-1].terms:
            weight[term] *= 0.5
    return sorted(chosen, key=lambda c: c.order)


def cite(sentence: str, number: int) -> str:
    """'Paris is big.' -> 'Paris is big [1].'"""
    body = sentence.rstrip()
    end = body[-1] if body and body[-1] in ".!?" else "."
    body = body.rstrip(".!?").rstrip()
    return f"{body} [{number}]{end}"


def compose(question: str, passages: Sequence[common_pb2.Passage], max_sentences: int = MAX_SENTENCES) -> str:
    if not passages:
        return NO_SOURCES
    chosen = select(question, passages, max_sentences)
    if not chosen:
        return NO_ANSWER
    return " ".join(cite(c.sentence, c.number) for c in chosen)


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
