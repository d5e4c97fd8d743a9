"""The offline answerer picks the relevant sentences, cites them, streams word by word and honours limits."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from services.generation.base import Delta, Done
from services.generation.config import GenerationConfig
from services.generation.extractive import (NO_ANSWER, NO_SOURCES, ExtractiveAnswerer, candidates, compose,
                                           split_sentences)
from services.generation.prompt import PromptBuilder, TokenCounter
from services.runtime.config import ServerConfig
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2

COUNTER = TokenCounter()
PASSAGES = [
    common_pb2.Passage(number=1, title="Qdrant", score=0.9, text=(
        "Qdrant is a vector database written in Rust. It builds HNSW graphs for approximate search. "
        "The project started in 2021.")),
    common_pb2.Passage(number=2, title="Redis", score=0.5, text=(
        "Redis keeps data in memory. Redis can expire keys with a TTL.")),
]


async def run(question: str, passages=PASSAGES, **params):
    builder = PromptBuilder(GenerationConfig(server=ServerConfig("generation")), COUNTER)
    prompt = await builder.build(generation_pb2.GenerateRequest(
        question=question, passages=passages, params=common_pb2.GenerationParams(**params)))
    events = [e async for e in ExtractiveAnswerer(COUNTER).stream(prompt)]
    return events, prompt


def test_sentence_split():
    assert split_sentences("One is here. Two? Three!\n\nFour 4.5 stays") == ["One is here.", "Two?", "Three!",
                                                                            "Four 4.5 stays"]


def test_picks_relevant_sentences_with_citations():
    answer = compose("Which language is Qdrant written in?", PASSAGES)
    assert answer.startswith("Qdrant is a vector database written in Rust [1].")
    assert "Redis" not in answer
    assert compose("How do keys expire in Redis?", PASSAGES).startswith("Redis can expire keys with a TTL [2].")
    assert compose("What is the weather on Mars?", PASSAGES) == NO_ANSWER
    assert compose("anything", []) == NO_SOURCES


async def test_streams_token_by_token_then_done_with_usage():
    events, prompt = await run("Which language is Qdrant written in?")
    deltas = [e for e in events if isinstance(e, Delta)]
    assert len(deltas) > 5 and all(len(d.text.split()) == 1 for d in deltas)
    done = events[-1]
    text = "".join(d.text for d in deltas)
    assert isinstance(done, Done) and done.finish_reason == "stop" and done.model == "extractive"
    assert done.prompt_tokens == prompt.prompt_tokens and done.completion_tokens == COUNTER.count(text)


async def test_max_tokens_and_stop():
    events, _ = await run("Which language is Qdrant written in?", max_tokens=3)
    assert "".join(e.text for e in events[:-1]) == "Qdrant is a" and events[-1].finish_reason == "length"
    events, _ = await run("Which language is Qdrant written in?", stop=["Rust"])
    text = "".join(e.text for e in events[:-1])
    assert text.endswith("written in") and events[-1].finish_reason == "stop"


def test_stemming_matches_word_forms():
    from services.generation.extractive import content_terms

    assert content_terms("Why do colonies swarm?") == content_terms("colony swarming")
    assert content_terms("decoded dances") == content_terms("decode dance")


def test_covers_each_part_of_the_question_in_reading_order():
    passages = [common_pb2.Passage(number=4, text=(
        "Bees dance on the comb. The angle of the run gives the direction of the food. "
        "The duration of the run gives the distance to the food. The direction of the food changes with the sun."))]
    answer = compose("How does the dance give direction and distance?", passages)
    # "direction" is covered once: the later sentence that only repeats it is not picked over the distance one.
    assert "The angle of the run gives the direction of the food [4]." in answer
    assert "The duration of the run gives the distance to the food [4]." in answer
    assert "changes with the sun" not in answer
    assert answer.index("angle") < answer.index("duration")  # reading order


def _candidates_uncached(question, passages):
    """The analysis per Ask, as before passages' analyses were cached: the reference candidates() must match."""
    from services.generation.extractive import content_terms
    wanted = content_terms(question)
    sentences = [(s, p.number, (rank, i)) for rank, p in enumerate(passages)
                 for i, s in enumerate(split_sentences(p.text))]
    if not wanted or not sentences:
        return [], {}
    term_sets = [content_terms(s) for s, _, _ in sentences]
    passage_terms = [content_terms(f"{p.title} {p.text}") for p in passages]
    n = len(passages)
    idf = {t: math.log(1 + (n + 1) / (1 + sum(1 for terms in passage_terms if t in terms))) for t in wanted}
    out, seen = [], set()
    for (sentence, number, order), terms in zip(sentences, term_sets):
        if not wanted & terms or frozenset(terms) in seen:
            continue
        seen.add(frozenset(terms))
        prior = (1 + 1 / (1 + order[0])) * (1.25 if order[1] == 0 else 1.0) / math.sqrt(1 + 0.05 * len(terms))
        out.append((sentence, number, order, frozenset(wanted & terms), prior))
    return out, idf


_WORDS = st.sampled_from(["bees", "colony", "Colonies", "swarming", "the", "dance.", "Honey", "wax!", "hive?",
                          "winter", "warm", "of", "and", "\n\n", "A", "7"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.lists(_WORDS, max_size=4).map(" ".join), st.lists(_WORDS, max_size=40).map(" ".join)),
                max_size=5),
       st.lists(_WORDS, min_size=1, max_size=6).map(" ".join))
def test_cached_passage_analyses_give_the_same_candidates_as_analysing_every_time(parts, question):
    passages = [common_pb2.Passage(number=i + 1, title=t, text=x) for i, (t, x) in enumerate(parts)]
    for _ in range(2):  # cold, then from the cache
        got, idf = candidates(question, passages)
        want, want_idf = _candidates_uncached(question, passages)
        assert [(c.sentence, c.number, c.order, c.terms, c.prior) for c in got] == want and idf == want_idf
