"""Time-window coalescing (services.runtime.coalesce, window > 0): the first delta at once, deltas within a window
merged into one message, none held longer than the window, the final event and errors flushing what is held, and
window 0 keeping the lag-only behaviour. Real short windows, timed with perf_counter."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from services.runtime.coalesce import Coalescer, TimerLateness

DONE = "<done>"
WINDOW = 0.03
MARGIN = 0.015  # scheduling slack on a shared machine


def is_delta(event: str) -> str | None:
    return None if event == DONE else event


def coalescer(source, **kwargs) -> Coalescer[str]:
    return Coalescer(source, text=is_delta, join=str, **kwargs)


async def producer(texts, *, gap: float = 0.0, log: dict | None = None, done: bool = True, fail: bool = False):
    for i, text in enumerate(texts):
        if i and gap:
            await asyncio.sleep(gap)
        if log is not None:
            log[text] = time.perf_counter()
        yield text
    if fail:
        raise RuntimeError("upstream broke")
    if done:
        yield DONE


async def timed(stream: Coalescer[str]) -> list[tuple[float, str]]:
    """(left at, event) for every event, read as fast as they come."""
    out = []
    async with stream as events:
        async for event in events:
            out.append((time.perf_counter(), event))
    return out


def tokens(n: int) -> list[str]:
    return [f"t{i:03d} " for i in range(n)]  # 5 bytes, and each token's text is unique


async def test_first_delta_is_not_held():
    log: dict = {}
    out = await timed(coalescer(producer(tokens(5), gap=0.005, log=log), window=0.2))
    left, first = out[0]
    assert first == "t000 " and left - log["t000 "] < 0.01  # far below the 200 ms window


async def test_deltas_within_the_window_leave_as_one_message():
    texts = tokens(40)  # 2 ms apart: ~15 per 30 ms window
    stream = coalescer(producer(texts, gap=0.002), window=WINDOW)
    out = await timed(stream)
    deltas = [e for _, e in out if e != DONE]
    assert "".join(deltas) == "".join(texts) and out[-1][1] == DONE  # nothing lost, order kept, Done last
    assert len(deltas) <= len(texts) / 4, deltas
    assert stream.merged == len(texts) - len(deltas)


async def test_no_delta_is_held_longer_than_the_window_and_messages_are_a_window_apart():
    log: dict = {}
    texts = tokens(30)
    out = await timed(coalescer(producer(texts, gap=0.004, log=log, done=False), window=WINDOW))
    held = []
    for left, message in out:
        for i in range(0, len(message), 5):
            held.append(left - log[message[i:i + 5]])
    assert max(held) <= WINDOW + MARGIN, f"held up to {max(held) * 1000:.1f} ms; the window is 30 ms"
    gaps = [b[0] - a[0] for a, b in zip(out, out[1:-1])]  # the last one leaves when the source ends
    assert min(gaps) >= WINDOW * 0.9, gaps  # at most one message per window


async def test_a_delta_after_a_pause_goes_out_at_once():
    log: dict = {}
    # Slower than the window: nothing to merge, so nothing is held (what a 20 tokens/s LLM sees).
    out = await timed(coalescer(producer(tokens(5), gap=WINDOW * 2, log=log), window=WINDOW))
    assert [e for _, e in out[:-1]] == tokens(5)
    assert all(left - log[e] < 0.01 for left, e in out[:-1])


async def test_the_final_event_flushes_held_deltas_at_once():
    started = time.perf_counter()
    out = await timed(coalescer(producer(["a", "b", "c"], gap=0.002), window=5.0))
    assert [e for _, e in out] == ["a", "bc", DONE]
    assert out[-1][0] - started < 0.5  # not the 5 s window


async def test_an_error_flushes_held_deltas_then_raises():
    got = []
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="upstream broke"):
        async with coalescer(producer(["a", "b", "c"], gap=0.002, done=False, fail=True), window=5.0) as events:
            async for event in events:
                got.append(event)
    assert got == ["a", "bc"] and time.perf_counter() - started < 0.5


async def test_max_bytes_still_bounds_a_message():
    texts = tokens(40)
    out = await timed(coalescer(producer(texts, gap=0.001), window=WINDOW, max_bytes=16))
    deltas = [e for _, e in out if e != DONE]
    assert "".join(deltas) == "".join(texts)
    assert max(len(d) for d in deltas) <= 16 and len(deltas) < len(texts)


async def test_window_zero_forwards_each_delta_alone_to_a_consumer_that_keeps_up():
    texts = tokens(20)
    stream = coalescer(producer(texts, gap=0.002))
    out = await timed(stream)
    assert [e for _, e in out] == [*texts, DONE] and stream.merged == 0


async def test_cancelling_while_a_delta_is_held_closes_the_source():
    closed = asyncio.Event()
    second_sent = asyncio.Event()

    async def endless():
        try:
            yield "a"
            yield "b"  # held: it arrives within the window of "a"
            second_sent.set()
            await asyncio.sleep(3600)
        finally:
            closed.set()

    async def consume():
        async with coalescer(endless(), window=3600) as events:
            async for _ in events:
                pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(second_sent.wait(), 1)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


async def test_aclosing_without_reading_closes_the_source():
    closed = False

    async def source():
        nonlocal closed
        try:
            yield "a"
        finally:
            closed = True

    events = source()
    await anext(events)  # started, so closing runs its finally
    async with contextlib.aclosing(coalescer(events, window=WINDOW)):
        pass
    assert closed


def test_timer_lateness_follows_the_loop_and_its_allowance_is_capped():
    lateness = TimerLateness()
    for _ in range(200):
        lateness.observe(0.002)  # a loop that wakes every timer 2 ms late
    assert lateness.mean == pytest.approx(0.002, rel=0.01) and lateness.deviation < 0.0001
    assert lateness.allowance(cap=0.01) == pytest.approx(0.002, rel=0.05)
    assert lateness.allowance(cap=0.001) == 0.001  # never more than the cap: messages stay most of a window apart
    for late in (0.0, 0.004) * 100:  # jittery wake-ups: the allowance covers the spread, not only the mean
        lateness.observe(late)
    assert 0.004 < lateness.allowance(cap=1.0) < 0.012
    lateness.observe(-0.001)  # woken early (cannot happen with asyncio): counted as on time
    assert lateness.mean >= 0


async def test_a_hold_aims_early_by_the_loops_lateness_and_learns_it():
    lateness = TimerLateness(initial=0.0)
    for _ in range(50):
        lateness.observe(0.006)  # learned: this loop wakes timers 6 ms late
    log: dict = {}
    stream = coalescer(producer(tokens(3), gap=0.001, log=log, done=False), window=WINDOW)
    stream._lateness = lateness
    out = await timed(stream)
    held = out[1][0] - log["t001 "]  # "t001 " arrived 1 ms after the first message left, and was held
    assert [e for _, e in out] == ["t000 ", "t001 t002 "]
    assert held < WINDOW - 0.004, f"held {held * 1000:.1f} ms: the hold did not end ~6 ms early"
    assert lateness.mean != pytest.approx(0.006, abs=1e-9)  # this hold's own wake-up was measured


async def test_deltas_less_than_two_a_window_are_not_held():
    # 21 ms apart with a 30 ms window: a hold would delay each by up to 9 ms and merge almost none.
    log: dict = {}
    out = await timed(coalescer(producer(tokens(8), gap=WINDOW * 0.7, log=log), window=WINDOW))
    deltas = [(left, e) for left, e in out if e != DONE]
    assert [e for _, e in deltas] == tokens(8)  # one message each
    assert max(left - log[e] for left, e in deltas) < 0.005


async def test_a_stream_that_speeds_up_is_held_again():
    log: dict = {}

    async def speeding_up():
        for i, text in enumerate(tokens(24)):
            if i:
                await asyncio.sleep(WINDOW * 0.8 if i < 6 else 0.002)
            log[text] = time.perf_counter()
            yield text
        yield DONE

    out = await timed(coalescer(speeding_up(), window=WINDOW))
    deltas = [e for _, e in out if e != DONE]
    assert deltas[:6] == tokens(6)  # slow: as they came
    assert len(deltas) <= 6 + 6, deltas  # then 18 deltas 2 ms apart (36 ms): after a few, merged a window at a time
    assert "".join(deltas) == "".join(tokens(24))
