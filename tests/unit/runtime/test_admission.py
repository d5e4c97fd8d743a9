"""The admission limiter: refuses at once past its limit with RESOURCE_EXHAUSTED naming the setting, frees a slot
however the admitted call ends, and keeps its gauge and counter in step."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.runtime.admission import AdmissionLimiter
from services.runtime.errors import Overloaded


def limiter(limit: int) -> tuple[AdmissionLimiter, Gauge, Counter]:
    registry = CollectorRegistry()  # a private registry: these names must not clash with the services' metrics
    in_flight = Gauge("test_in_flight", "calls in flight", registry=registry)
    rejected = Counter("test_rejected", "calls refused", registry=registry)
    return (AdmissionLimiter(limit, in_flight=in_flight, rejected=rejected, what="svc: {} calls",
                             setting="RAGFLEET_SVC_MAX"), in_flight, rejected)


def value(metric: Gauge | Counter) -> float:
    return next(s.value for m in metric.collect() for s in m.samples if not s.name.endswith("_created"))


def test_refuses_past_the_limit_naming_the_setting() -> None:
    admission, in_flight, rejected = limiter(2)
    admission.acquire()
    admission.acquire()
    with pytest.raises(Overloaded) as refused:
        admission.acquire()
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.message == ("svc: 2 calls in flight, the limit is 2 (RAGFLEET_SVC_MAX); "
                                     "retry with backoff")
    assert (admission.count, value(in_flight), value(rejected)) == (2, 2, 1)
    admission.release()
    admission.acquire()  # a freed slot admits the next call
    assert (admission.count, value(in_flight)) == (2, 2)


async def test_a_slot_is_freed_when_the_call_fails_or_its_stream_is_closed() -> None:
    admission, in_flight, _ = limiter(1)
    with pytest.raises(RuntimeError), admission.admitted():
        raise RuntimeError("handler bug")
    assert admission.count == 0

    async def stream():
        with admission.admitted():
            yield 1
            yield 2

    events = stream()
    assert await anext(events) == 1
    assert admission.count == 1
    with pytest.raises(Overloaded):
        admission.acquire()
    await events.aclose()  # the client went away mid-stream
    assert (admission.count, value(in_flight)) == (0, 0)
