"""The offline answerer picks the relevant sentences, cites them, streams word by word and honours limits."""

from __future__ import annotations

from services.generation.base import Delta, Done
from services.generation.config import GenerationConfig
from services.generation.extractive import NO_ANSWER, NO_SOURCES, ExtractiveAnswerer, compose, split_sentences
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
