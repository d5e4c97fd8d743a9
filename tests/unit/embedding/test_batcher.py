"""Batching policy: merging, limits, length grouping, bounded reordering, waiting, admission, cancellation,
per-caller results, the oldest-wait gauge."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.embedding.batcher import Batcher
from services.embedding.config import BatcherConfig
from services.runtime.errors import InvalidArgument, Overloaded
from tests.unit.embedding.conftest import ScriptedBackend


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def batch_count() -> float:
    return REGISTRY.get_sample_value("ragfleet_embedding_batch_size_count") or 0.0


def batch_sum() -> float:
    return REGISTRY.get_sample_value("ragfleet_embedding_batch_size_sum") or 0.0


async def embed_one(batcher: Batcher, text: str) -> np.ndarray:
    (future,) = batcher.append(batcher.backend.prepare([text]))
    return (await future).vector


async def test_concurrent_calls_are_merged(scripted):
    scripted.delay = 0.01
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=32))
    batcher.start()
    before_count, before_sum = batch_count(), batch_sum()
    try:
        await asyncio.gather(*(embed_one(batcher, f"text number {i}") for i in range(64)))
    finally:
        await batcher.close()
    batches = batch_count() - before_count
    assert batch_sum() - before_sum == 64
    assert batches <= 8, f"64 concurrent texts took {batches} batches"  # merged, visible in the metric
    assert max(len(b) for b in scripted.batches) > 1
    assert all(len(b) <= 32 for b in scripted.batches)


async def test_every_caller_gets_its_own_vectors_in_order(scripted, text_vector):
    scripted.delay = 0.002
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=16, max_batch_tokens=64))
    batcher.start()

    async def caller(n: int) -> None:
        texts = [words(1 + (n * 7 + j) % 12, tag=f"c{n}x{j}") for j in range(1 + n % 5)]
        futures = batcher.append(scripted.prepare(texts))
        await asyncio.sleep(0)
        got = [(await f).vector for f in futures]
        for text, vector in zip(texts, got):
            np.testing.assert_array_equal(vector, text_vector(text))

    try:
        await asyncio.gather(*(caller(n) for n in range(300)))
    finally:
        await batcher.close()
    assert len(scripted.batches) < scripted.texts_embedded  # they really were mixed in shared batches


async def test_batches_respect_size_and_token_budget_and_group_by_length(scripted):
    gate = scripted.gate = asyncio.Event()
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=8, max_batch_tokens=100))
    batcher.start()
    # While the first batch is held, queue short and long texts interleaved.
    first = batcher.append(scripted.prepare([words(3, "first")]))
    await asyncio.sleep(0.01)
    texts = [words(3 if i % 2 else 40, f"t{i}") for i in range(24)]
    futures = batcher.append(scripted.prepare(texts))
    gate.set()
    await asyncio.gather(*first, *futures)
    await batcher.close()
    for batch in scripted.batches[1:]:
        lengths = [len(t.split()) for t in batch]
        assert len(batch) <= 8
        assert len(batch) * max(lengths) <= 100
        assert len(set(lengths)) == 1, f"short and long texts mixed in one batch: {lengths}"


async def test_full_queue_is_refused_at_once_and_cancellation_frees_slots(scripted):
    gate = scripted.gate = asyncio.Event()
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=4, queue_capacity=6))
    batcher.start()
    running = batcher.append(scripted.prepare(["running"]))
    await asyncio.sleep(0.01)  # the model now holds this one; the queue is empty
    queued = batcher.append(scripted.prepare([f"q{i}" for i in range(6)]))
    assert batcher.depth == 6
    started = time.perf_counter()
    with pytest.raises(Overloaded, match="queue is full"):
        batcher.append(scripted.prepare(["one too many"]))
    assert time.perf_counter() - started < 0.01
    for future in queued[:3]:
        future.cancel()
    await asyncio.sleep(0)  # done-callbacks run on the next loop turn
    assert batcher.depth == 3
    admitted = batcher.append(scripted.prepare(["a", "b", "c"]))  # the cancelled callers' slots are free again
    gate.set()
    await asyncio.gather(*running, *queued[3:], *admitted)
    await batcher.close()
    embedded = {t for b in scripted.batches for t in b}
    assert not embedded & {"q0", "q1", "q2"}, "cancelled texts were still run"
    assert {"q3", "q4", "q5", "a", "b", "c"} <= embedded


async def test_lone_caller_never_waits(scripted):
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=32, max_wait_ms=50))
    batcher.start()
    try:
        await embed_one(batcher, "warm")
        await asyncio.sleep(0.06)
        latencies = []
        for i in range(5):
            started = time.perf_counter()
            await embed_one(batcher, f"lone {i}")
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.06)  # sparse traffic: arrivals far apart
    finally:
        await batcher.close()
    assert max(latencies) < 0.02, latencies  # far below the 50 ms max wait


async def test_bursty_traffic_waits_to_fill_batches(scripted):
    scripted.delay = 0.005
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=16, max_wait_ms=20))
    batcher.start()

    async def late_caller(i: int) -> None:
        await asyncio.sleep(0.001 * i)  # trickles in over 8 ms
        await embed_one(batcher, f"burst {i}")

    try:
        for _ in range(3):
            await asyncio.gather(*(late_caller(i) for i in range(8)))
    finally:
        await batcher.close()
    # After the first round teaches it traffic is bursty, each round of 8 lands in one or two batches.
    assert len(scripted.batches[-2:]) == 2 and sum(len(b) for b in scripted.batches[-2:]) >= 9


async def test_backend_failure_reaches_only_that_batch(scripted):
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=4))
    batcher.start()
    scripted.fail_with = RuntimeError("model exploded")
    with pytest.raises(RuntimeError, match="exploded"):
        await embed_one(batcher, "doomed")
    scripted.fail_with = None
    assert (await embed_one(batcher, "fine")).shape == (8,)
    await batcher.close()


async def test_a_refused_batch_is_split_until_the_bad_text_fails_alone(text_vector):
    class RefusesBadTexts(ScriptedBackend):
        active = peak = 0

        async def embed(self, items):
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                vectors = await super().embed(items)  # records the call
            finally:
                self.active -= 1
            if any("bad" in i.text for i in items):
                raise InvalidArgument("texts: the endpoint refused a text")
            return vectors

    backend = RefusesBadTexts(delay=0.002)
    batcher = Batcher(backend, BatcherConfig(max_batch_size=32))
    batcher.start()
    texts = [f"good {i}" for i in range(5)] + ["bad text"] + [f"good {i}" for i in range(5, 8)]
    try:
        results = await asyncio.gather(*batcher.append(backend.prepare(texts)), return_exceptions=True)
    finally:
        await batcher.close()
    assert isinstance(results[5], InvalidArgument)
    for text, result in zip(texts, results):
        if text != "bad text":
            np.testing.assert_array_equal(result.vector, text_vector(text))
    assert len(backend.batches[0]) == 9 and len(backend.batches) <= 1 + 2 * 4  # halvings, not a call per text
    assert backend.peak == backend.max_in_flight == 1  # the halves ran one after the other


async def test_real_model_under_concurrency_gives_each_caller_its_vector(each_compute, scifact_texts):
    onnx_backend = each_compute
    texts = scifact_texts[:48]
    alone = {t: (await onnx_backend.embed(onnx_backend.prepare([t])))[0] for t in texts}
    batcher = Batcher(onnx_backend, BatcherConfig(max_batch_size=16, max_batch_tokens=2048))
    batcher.start()
    try:
        results = await asyncio.gather(*(embed_one(batcher, t) for t in texts))
    finally:
        await batcher.close()
    for text, vector in zip(texts, results):
        assert float(vector @ alone[text]) > 0.99999


async def test_a_merge_that_adds_too_much_padding_waits_for_a_better_batch(scripted):
    gate = scripted.gate = asyncio.Event()
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=16, max_batch_tokens=10_000, max_added_padding=4))
    batcher.start()
    first = batcher.append(scripted.prepare([words(3, "first")]))
    await asyncio.sleep(0.01)  # the model holds this one while the rest queue up
    texts = [words(n, f"t{i}") for i, n in enumerate([10, 40, 12, 11, 41, 40, 25])]
    futures = batcher.append(scripted.prepare(texts))
    gate.set()
    await asyncio.gather(*first, *futures)
    await batcher.close()
    groups = sorted(sorted(len(t.split()) for t in batch) for batch in scripted.batches[1:])
    # 10/11/12 merge (each adds <= 4 padding tokens), 40/40/41 merge, 25 is 13+ tokens from both: alone.
    assert groups == [[10, 11, 12], [25], [40, 40, 41]], groups


async def test_a_backend_that_does_not_pad_merges_any_lengths(scripted):
    scripted.pads_batches = False  # a remote API: each text is priced alone, padding is not ours to pay
    gate = scripted.gate = asyncio.Event()
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=16, max_batch_tokens=10_000, max_added_padding=4))
    batcher.start()
    first = batcher.append(scripted.prepare([words(3, "first")]))
    await asyncio.sleep(0.01)
    futures = batcher.append(scripted.prepare([words(n, f"t{i}") for i, n in enumerate([10, 40, 12, 25])]))
    gate.set()
    await asyncio.gather(*first, *futures)
    await batcher.close()
    assert [len(batch) for batch in scripted.batches] == [1, 4]


def test_padding_limit_is_configured_and_remote_backends_do_not_pad():
    from services.embedding.backends.onnx import OnnxBackend
    from services.embedding.backends.remote import RemoteEmbeddingBackend
    from services.embedding.config import EmbeddingConfig, OnnxConfig

    assert EmbeddingConfig.from_env({}).batcher.max_added_padding == 16
    assert EmbeddingConfig.from_env({"RAGFLEET_EMBEDDING_MAX_ADDED_PADDING": "8"}).batcher.max_added_padding == 8
    assert not RemoteEmbeddingBackend.pads_batches and RemoteEmbeddingBackend.shares_call_cost
    float32, int8 = OnnxBackend(OnnxConfig(compute="float32")), OnnxBackend(OnnxConfig(compute="int8"))
    assert float32.pads_batches and float32.shares_call_cost
    assert not int8.pads_batches and not int8.shares_call_cost  # each text runs alone: nothing to pad or share


class PerTextBackend(ScriptedBackend):
    """Like the int8 model: each text runs alone, costing `per_word` seconds per word, 2 calls at once."""

    pads_batches = shares_call_cost = False

    def __init__(self, per_word: float) -> None:
        super().__init__(max_in_flight=2)
        self.per_word = per_word
        self.running = self.peak = 0
        self.started: list[str] = []
        self.done_at: dict[str, float] = {}

    async def embed(self, items):
        self.started += [i.text for i in items]
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.per_word * sum(i.token_count for i in items))
            vectors = await super().embed(items)
            self.done_at.update((i.text, time.perf_counter()) for i in items)
            return vectors
        finally:
            self.running -= 1


async def test_a_per_text_backend_answers_a_short_text_before_a_long_one_ends():
    """A burst of one long text and three short ones on a 2-slot per-text backend: the old batcher cut it into two
    calls of two ([long, short] and [short, short]), so a short text waited for the long one and got its answer
    when that whole call ended. Now each slot takes the oldest text when it is free and each caller gets its
    vector as soon as its own text is done: the short texts all finish on the other slot, long before the long one."""
    backend = PerTextBackend(per_word=0.001)
    batcher = Batcher(backend, BatcherConfig(max_batch_size=32, max_wait_ms=2.0))
    batcher.start()
    texts = [words(200, "long")] + [words(10, f"short{i}-") for i in range(3)]
    finished: dict[str, float] = {}
    futures = batcher.append(backend.prepare(texts))
    for text, future in zip(texts, futures):
        future.add_done_callback(lambda _f, t=text: finished.setdefault(t, time.perf_counter()))
    try:
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
    finally:
        await batcher.close()
    # ~10 ms per short text on the free slot, 200 ms for the long one: every short answer comes >= 100 ms earlier.
    long_done = finished[texts[0]]
    assert all(finished[t] < long_done - 0.1 for t in texts[1:]), [long_done - finished[t] for t in texts[1:]]
    assert backend.peak == 2  # both slots ran at once
    assert [r.batch_size for r in results] == [1, 1, 1, 1]  # each ran alone
    assert sorted(t for batch in backend.batches for t in batch) == sorted(texts)  # each text computed once


async def test_a_per_text_backend_serves_first_come_first_served_on_every_free_slot():
    """Texts start in arrival order, never more than max_in_flight at once, and a slot that frees takes the oldest
    queued text: a later burst is not committed up front to a slot still busy with earlier texts."""
    backend = PerTextBackend(per_word=0.0005)
    batcher = Batcher(backend, BatcherConfig(max_batch_size=32, max_wait_ms=2.0))
    batcher.start()
    before_count, before_sum = batch_count(), batch_sum()
    futures = []
    try:
        for i in range(40):
            futures += batcher.append(backend.prepare([words(5 + (i * 37) % 60, f"t{i}-")]))
            if i % 8 == 7:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(*futures), 10)
    finally:
        await batcher.close()
    assert backend.started == [words(5 + (i * 37) % 60, f"t{i}-") for i in range(40)]  # first come, first served
    assert backend.peak == 2
    assert batch_sum() - before_sum == 40  # the metric counts every text once, in few calls
    assert batch_count() - before_count < 40


async def test_a_per_text_backend_hands_results_back_together_but_holds_each_only_a_share_of_its_wait():
    """Under a queue, finished vectors go back to the event loop in groups (each hand-off costs a loop wake-up and
    a gRPC write on the model's cores), but no text's answer is held longer than a tenth of its wait so far."""
    backend = PerTextBackend(per_word=0.0005)  # 2.5 ms a text
    batcher = Batcher(backend, BatcherConfig(max_batch_size=64))
    handoffs: list[int] = []
    deliver_all = batcher._deliver_all

    def counted(results):
        handoffs.append(len(results))
        deliver_all(results)

    batcher._deliver_all = counted  # type: ignore[method-assign]
    batcher.start()
    texts = [words(5, f"t{i}-") for i in range(80)]
    answered: dict[str, float] = {}
    enqueued = time.perf_counter()
    futures = batcher.append(backend.prepare(texts))
    for text, future in zip(texts, futures):
        future.add_done_callback(lambda _f, t=text: answered.setdefault(t, time.perf_counter()))
    try:
        await asyncio.wait_for(asyncio.gather(*futures), 10)
    finally:
        await batcher.close()
    assert sum(handoffs) == 80 and len(handoffs) < 60, handoffs  # grouped: texts 40 deep wait ~100 ms
    # (+10 ms: the loop's own lateness on a loaded machine, which counts here too)
    late = {text: answered[text] - backend.done_at[text] - 0.1 * (backend.done_at[text] - enqueued) for text in texts}
    assert max(late.values()) <= 0.01, max(late.items(), key=lambda kv: kv[1])


async def test_a_per_text_backend_call_stops_at_max_batch_size_and_a_failure_fails_one_text():
    backend = PerTextBackend(per_word=0.0)
    calls = []
    original = backend.embed_each

    async def counted(take, put):
        calls.append(1)
        await original(take, put)

    backend.embed_each = counted  # type: ignore[method-assign]
    real_embed = backend.embed

    async def embed(items):
        if items[0].text == "bad":
            raise InvalidArgument("bad text")
        return await real_embed(items)

    backend.embed = embed  # type: ignore[method-assign]
    batcher = Batcher(backend, BatcherConfig(max_batch_size=3, max_wait_ms=0))
    batcher.start()
    texts = [f"text {i}" for i in range(5)] + ["bad"] + [f"text {i}" for i in range(5, 9)]
    try:
        results = await asyncio.gather(*batcher.append(backend.prepare(texts)), return_exceptions=True)
    finally:
        await batcher.close()
    assert [isinstance(r, InvalidArgument) for r in results] == [t == "bad" for t in texts]
    assert len(calls) >= 4  # 10 texts, at most 3 per call


async def test_a_remote_backend_with_calls_in_flight_waits_instead_of_sending_single_texts(scripted):
    # Texts trickle in 0.5-4 ms apart (not bursty enough for the idle-model wait) to a backend that does not pad
    # and allows 4 calls in flight: without waiting, nearly every text took a free slot alone (mean batch ~1.06).
    import random

    scripted.pads_batches = False
    scripted.max_in_flight = 4
    scripted.delay = 0.010
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=32, max_wait_ms=2.0))
    batcher.start()
    rng = random.Random(1)
    futures = []
    try:
        for i in range(300):
            futures += batcher.append(scripted.prepare([f"trickle {i}"]))
            await asyncio.sleep(rng.uniform(0.0005, 0.004))
        await asyncio.gather(*futures)
    finally:
        await batcher.close()
    assert scripted.texts_embedded == 300
    assert len(scripted.batches) <= 0.8 * 300, f"{len(scripted.batches)} calls for 300 texts"
    order = [text for batch in scripted.batches for text in batch]
    assert order == [f"trickle {i}" for i in range(300)]  # first come, first served


async def test_a_full_batch_runs_at_once_and_a_partial_one_waits(scripted):
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=8, max_wait_ms=200))
    batcher.start()

    async def latency(texts: list[str]) -> float:
        started = time.perf_counter()
        await asyncio.gather(*batcher.append(scripted.prepare(texts)))
        return time.perf_counter() - started

    try:
        for _ in range(3):  # bursty arrivals teach it to wait for more texts
            futures = []
            for i in range(8):
                futures += batcher.append(scripted.prepare([f"burst {i}"]))
                await asyncio.sleep(0.001)
            await asyncio.gather(*futures)
        full = await latency([f"full {i}" for i in range(8)])
        partial = await latency([f"partial {i}" for i in range(3)])
    finally:
        await batcher.close()
    assert full < 0.05, f"a full batch waited {full * 1000:.0f} ms"
    assert 0.15 < partial < 0.4, f"a partial batch waited {partial * 1000:.0f} ms, not about the 200 ms max wait"
    assert scripted.batches[-2:] == [[f"full {i}" for i in range(8)], [f"partial {i}" for i in range(3)]]


async def test_a_text_cancelled_in_the_same_loop_turn_is_never_batched(scripted):
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=8))  # not started: the test cuts the batch itself
    futures = batcher.append(scripted.prepare(["kept 1", "cancelled", "kept 2"]))
    futures[1].cancel()  # its done-callback (which frees the slot) only runs on the next loop turn
    assert [entry.item.text for entry in batcher.next_batch()] == ["kept 1", "kept 2"]
    assert batcher.depth == 0
    await asyncio.sleep(0)  # the late done-callback must not free the slot a second time
    assert batcher.depth == 0 and batcher.next_batch() == []
    await batcher.close()


def test_a_queue_smaller_than_one_full_request_is_refused_at_start_up():
    from services.embedding.config import EmbeddingConfig
    from services.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"QUEUE_CAPACITY=100 is below RAGFLEET_EMBEDDING_MAX_TEXTS=256"):
        EmbeddingConfig.from_env({"RAGFLEET_EMBEDDING_QUEUE_CAPACITY": "100"})
    fits = EmbeddingConfig.from_env({"RAGFLEET_EMBEDDING_QUEUE_CAPACITY": "100", "RAGFLEET_EMBEDDING_MAX_TEXTS": "100"})
    assert fits.batcher.queue_capacity == fits.max_texts == 100


class TokenCostBackend(ScriptedBackend):
    """A batch takes `per_token` seconds per padded token (texts x longest), as a CPU model does."""

    def __init__(self, per_token: float) -> None:
        super().__init__()
        self.per_token = per_token
        self.started: list[tuple[float, list[str]]] = []

    async def embed(self, items):
        self.started.append((time.perf_counter(), [i.text for i in items]))
        await asyncio.sleep(self.per_token * len(items) * max(i.token_count for i in items))
        return await super().embed(items)


async def rare_text_among_a_steady_stream(config: BatcherConfig) -> tuple[float, int, TokenCostBackend]:
    """Eight queued texts of lengths 20..160 (too far apart to share a batch), then one rare 230-word text, then a
    steady stream (one text every 2 ms for 0.6 s) of the common lengths. Returns the rare text's queue wait, how many
    stream texts that arrived more than the reorder window after it were served before it, and the backend."""
    backend = TokenCostBackend(per_token=0.0002)
    batcher = Batcher(backend, config)
    lengths = [20 * (i + 1) for i in range(8)]
    arrived: dict[str, float] = {}

    def submit(text: str) -> asyncio.Future:
        (future,) = batcher.append(backend.prepare([text]))
        arrived[text] = time.perf_counter()
        return future

    older = [submit(words(n, f"old{n}-")) for n in lengths]
    rare = submit(words(230, "rare"))
    batcher.start()
    stream = []
    try:
        for i in range(300):
            stream.append(submit(words(lengths[i % len(lengths)], f"s{i}-")))
            await asyncio.sleep(0.002)
        wait = (await asyncio.wait_for(rare, 10)).queue_wait
        await asyncio.gather(*older, *stream)
    finally:
        await batcher.close()
    rare_text = words(230, "rare")
    rare_started = next(t for t, texts in backend.started if rare_text in texts)
    late = arrived[rare_text] + config.reorder_window_ms / 1000
    overtook = sum(1 for t, texts in backend.started if t < rare_started for text in texts if arrived[text] > late)
    return wait, overtook, backend


async def test_a_rare_length_among_a_steady_stream_is_served_within_the_reorder_window():
    window_ms = 40.0
    # A fixed window (share 0) states the bound plainly; the share's own bound is tested below.
    wait, overtook, backend = await rare_text_among_a_steady_stream(
        BatcherConfig(max_batch_size=32, max_wait_ms=0, reorder_window_ms=window_ms, reorder_window_share=0.0))
    # The bound: no text that arrived more than the window after it went ahead of it...
    assert overtook == 0, f"{overtook} texts that arrived over {window_ms:.0f} ms later went first"
    # ...so it waited for the eight older texts and what arrived within the window only (~20 texts of 20-160 tokens
    # at 0.2 ms per padded token: ~0.35 s; with pure length grouping, ~2 s behind 55-60 newer texts).
    assert wait < 1.0, f"the rare text waited {wait * 1000:.0f} ms"


async def test_the_window_grows_with_the_oldest_wait_but_only_by_its_share():
    # Share 0.2: the rare text may be passed over only by texts that arrived within 20 % of its wait (the oldest
    # text's age when its batch was cut is at most the rare text's own wait plus the older texts' few ms).
    config = BatcherConfig(max_batch_size=32, max_wait_ms=0, reorder_window_ms=1.0, reorder_window_share=0.2)
    wait, _, backend = await rare_text_among_a_steady_stream(config)
    assert wait < 1.0, f"the rare text waited {wait * 1000:.0f} ms"
    rare_text = words(230, "rare")
    rare_started = next(t for t, texts in backend.started if rare_text in texts)
    # Stream text i arrived at least 2*i ms after the rare one (one every 2 ms or slower).
    passed = [int(text[1:text.index("-")]) for t, texts in backend.started if t < rare_started for text in texts
              if text.startswith("s")]
    assert passed, "the stream never joined a batch: the window did not grow"
    assert 0.002 * max(passed) <= 0.2 * wait + 0.01, (max(passed), wait)


async def test_a_window_share_grows_batches_under_load(scripted):
    # 64 queued texts of one length that arrived over 1 s: a fixed 100 ms window groups the first 7 only; a share
    # of 0.2 of the oldest text's 1 s wait lets 200 ms of arrivals (13 texts) group.
    def cut(share: float) -> int:
        batcher = Batcher(scripted, BatcherConfig(max_batch_size=32, reorder_window_share=share))
        now = time.perf_counter()
        for i in range(64):
            (future,) = batcher.append(scripted.prepare([words(20, f"t{i}-")]))
            batcher._queue[-1].enqueued = now - 1.0 + i / 64
        return len(batcher.next_batch())

    assert cut(0.0) <= 7 < 12 <= cut(0.2)


async def test_pure_length_grouping_lets_a_stream_pass_a_rare_length():
    # The comparison policy (and the batcher before the reorder window): the same stream overtakes the rare text.
    wait, overtook, _ = await rare_text_among_a_steady_stream(
        BatcherConfig(max_batch_size=32, max_wait_ms=0, policy="length", reorder_window_ms=40.0))
    assert overtook > 20 and wait > 1.0, (overtook, wait)


async def test_oldest_wait_gauge_shows_a_text_held_in_the_queue(scripted):
    gate = scripted.gate = asyncio.Event()
    batcher = Batcher(scripted, BatcherConfig(max_batch_size=1))
    batcher.start()
    running = batcher.append(scripted.prepare(["running"]))
    await asyncio.sleep(0.01)  # the model holds this one
    assert REGISTRY.get_sample_value("ragfleet_embedding_oldest_wait_seconds") == 0.0
    held = batcher.append(scripted.prepare(["held"]))
    await asyncio.sleep(0.05)
    age = REGISTRY.get_sample_value("ragfleet_embedding_oldest_wait_seconds")
    gate.set()
    await asyncio.gather(*running, *held)
    await batcher.close()
    assert 0.04 <= age < 1.0, age
    assert REGISTRY.get_sample_value("ragfleet_embedding_oldest_wait_seconds") == 0.0


def test_batch_policy_and_reorder_window_are_configured():
    from services.embedding.config import EmbeddingConfig
    from services.runtime.errors import ConfigError

    default = EmbeddingConfig.from_env({}).batcher
    assert (default.policy, default.reorder_window_ms) == ("bounded", 100.0)
    assert default.reorder_window_share == 0.2
    assert EmbeddingConfig.from_env({"RAGFLEET_EMBEDDING_REORDER_WINDOW_SHARE": "0"}).batcher.reorder_window_share == 0
    chosen = EmbeddingConfig.from_env({"RAGFLEET_EMBEDDING_BATCH_POLICY": "Length",
                                       "RAGFLEET_EMBEDDING_REORDER_WINDOW_MS": "25"}).batcher
    assert (chosen.policy, chosen.reorder_window_ms) == ("length", 25.0)
    with pytest.raises(ConfigError, match="BATCH_POLICY='fifo' must be one of bounded, length"):
        EmbeddingConfig.from_env({"RAGFLEET_EMBEDDING_BATCH_POLICY": "fifo"})
