"""Coalescing: deltas pass one by one to a consumer that keeps up, merge (bounded) only for one that lags."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.generation.base import Delta, Done
from services.generation.coalesce import Coalescer

DONE = Done("stop", 1, 1, "m")


async def producer(texts, *, gap: float = 0.0, done: bool = True, log: list | None = None, fail: bool = False):
    for i, text in enumerate(texts):
        if i and gap:
            await asyncio.sleep(gap)
        if log is not None:
            log.append(("produced", text, time.perf_counter()))
        yield Delta(text)
    if fail:
        raise RuntimeError("upstream broke")
    if done:
        yield DONE


async def collect(coalescer: Coalescer, consumer_delay: float = 0.0) -> list:
    out = []
    async with coalescer as events:
        async for event in events:
            out.append(event)
            if consumer_delay:
                await asyncio.sleep(consumer_delay)
    return out


async def test_consumer_that_keeps_up_gets_every_delta_alone():
    texts = [f" t{i}" for i in range(20)]
    out = await collect(Coalescer(producer(texts, gap=0.002), max_bytes=1024, max_delay=0.005))
    assert [e.text for e in out[:-1]] == texts
    assert out[-1] == DONE


async def test_lagging_consumer_gets_merged_deltas_bounded_by_bytes():
    texts = [f"w{i:02d} " for i in range(40)]  # 4 bytes each
    coalescer = Coalescer(producer(texts, gap=0.001), max_bytes=16, max_delay=0.005)
    out = await collect(coalescer, consumer_delay=0.02)
    deltas = [e for e in out if isinstance(e, Delta)]
    assert "".join(d.text for d in deltas) == "".join(texts)  # nothing lost, order kept
    assert out[-1] == DONE and out.count(DONE) == 1
    assert len(deltas) < len(texts) / 2  # merged ...
    assert max(len(d.text.encode()) for d in deltas) <= 16  # ... but never above max_bytes
    assert coalescer.merged == len(texts) - len(deltas)


async def test_first_token_is_never_delayed():
    log: list = []
    coalescer = Coalescer(producer(["first", " second", " third"], gap=0.02, log=log), max_bytes=1024,
                          max_delay=0.05)
    async with coalescer as events:
        first = await events.__anext__()
        received = time.perf_counter()
    assert first == Delta("first")
    assert received - log[0][2] < 0.01  # far below max_delay: no linger for the first token


async def test_a_lagging_consumer_gets_each_merge_within_max_delay_of_its_oldest_delta():
    """The linger may hold a merge only until its oldest delta is max_delay old: beyond the moment both that delta
    and the consumer were there, no message waits more than max_delay (+ a scheduling margin)."""
    log: list = []
    texts = [f"d{i:02d} " for i in range(20)]
    max_delay = 0.005
    coalescer = Coalescer(producer(texts, gap=0.02, done=False, log=log), max_bytes=1 << 20, max_delay=max_delay)
    messages: list[tuple[float, float, str]] = []  # (asked at, left at, text)
    async with coalescer as events:
        while True:
            asked = time.perf_counter()
            try:
                event = await anext(events)
            except StopAsyncIteration:
                break
            messages.append((asked, time.perf_counter(), event.text))
            # Now and then a stall (a backlog forms: lagging); otherwise back just after the next delta arrives,
            # while still lagging, so that delta's merge lingers.
            await asyncio.sleep(0.045 if len(messages) % 6 == 2 else 0.0165)
    produced = {text: at for _, text, at in log}
    assert "".join(text for _, _, text in messages) == "".join(texts)
    assert coalescer.merged > 0, "the consumer lagged"
    _, first_left, first_text = messages[0]
    assert first_text == texts[0] and first_left - produced[texts[0]] < 0.01, "the first delta is never delayed"
    for asked, left, text in messages:
        held = left - max(asked, produced[text[:4]])
        assert held <= max_delay + 0.015, f"{text!r} was held {held * 1000:.1f} ms; max_delay is 5 ms"


async def test_a_single_oversized_delta_still_goes_out():
    out = await collect(Coalescer(producer(["x" * 100, "y" * 100]), max_bytes=10), consumer_delay=0.01)
    assert [e.text for e in out[:-1]] == ["x" * 100, "y" * 100]


async def test_error_comes_after_the_deltas_before_it():
    got = []
    with pytest.raises(RuntimeError, match="upstream broke"):
        async with Coalescer(producer(["a", "b"], done=False, fail=True)) as events:
            async for event in events:
                got.append(event.text)
    assert "".join(got) == "ab"


async def test_leaving_early_closes_the_source():
    closed = asyncio.Event()

    async def endless():
        try:
            while True:
                yield Delta("tok ")
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async with Coalescer(endless()) as events:
        async for _ in events:
            break
    assert closed.is_set()


async def test_cancelling_the_consumer_closes_the_source():
    closed = asyncio.Event()
    started = asyncio.Event()

    async def slow():
        try:
            yield Delta("a")
            started.set()
            await asyncio.sleep(3600)
            yield Delta("never")
        finally:
            closed.set()

    async def consume():
        async with Coalescer(slow()) as events:
            async for _ in events:
                pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


async def test_full_buffer_stops_the_producer():
    produced = 0

    async def fast():
        nonlocal produced
        for _ in range(1000):
            produced += 1
            yield Delta("0123456789")

    async with Coalescer(fast(), max_pending_bytes=100) as events:
        first = await events.__anext__()
        await asyncio.sleep(0.02)  # a stalled consumer
        assert produced <= 25  # one merged message plus ~100 bytes buffered, not all 10 kB
        rest = [e async for e in events]
    assert len(first.text) + sum(len(e.text) for e in rest) == 10000


async def test_a_burst_inside_the_window_wakes_the_consumer_once_per_message_not_per_delta():
    """The offline answerer yields its words in one burst: the held message fills while the consumer sleeps until
    the window's end (or a full merge), instead of waking, re-arming a timer and re-checking for every word."""
    waits = 0

    class Counting(Coalescer):
        async def _wait_change(self, timeout=None):
            nonlocal waits
            waits += 1
            await super()._wait_change(timeout)

    async def burst():
        for i in range(200):
            yield Delta(f" w{i:03d}")  # 5 bytes: 200 words, ~1000 bytes
            await asyncio.sleep(0)
        yield DONE

    started = time.perf_counter()
    out = await collect(Counting(burst(), max_bytes=4096, window=0.02))
    assert "".join(e.text for e in out if isinstance(e, Delta)) == "".join(f" w{i:03d}" for i in range(200))
    assert len(out) == 3 and out[-1] == DONE  # the first word alone, the rest as one message, the final event
    assert waits <= 3, waits
    assert time.perf_counter() - started < 0.5
