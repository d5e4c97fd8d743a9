"""A LeanSpan exports what the SDK's own span exports for the same calls: the same attributes (cleaned and limited the
same way), events, exception events, status rules, name, kind, parent, resource and scope. And it starts as the
SDK would: the provider's sampler decides, the parent's trace continues, and without an SDK provider the API's no-op
tracer answers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace import TraceFlags

from services.runtime.lean_span import LeanSpan, LeanTracer

SCOPE = "services.runtime.rpc_tracing"
NAME = "/ragfleet.v1.EmbeddingService/Embed"
_PARENT = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED))
_LINKED = SpanContext(0x1AF7651916CD43DD8448EB211C80319C, 0xC7AD6B7169203331, is_remote=True,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _provider(**kwargs: Any) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider(resource=Resource.create({"service.name": "ragfleet-test"}), **kwargs)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


class _Boom(Exception):
    pass


_keys = st.sampled_from(["rpc.system", "ragfleet.caller", "a", "b.c", "", "x" * 3])
_values = st.one_of(st.text(max_size=40), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.lists(st.integers(), max_size=3), st.none(), st.just(object), st.just(("a", "b")))
_ops = st.lists(st.one_of(
    st.tuples(st.just("attribute"), _keys, _values),
    st.tuples(st.just("attributes"), st.dictionaries(_keys, _values, max_size=3)),
    st.tuples(st.just("event"), st.text(max_size=8), st.dictionaries(_keys, _values, max_size=3)),
    st.tuples(st.just("status"), st.sampled_from(list(StatusCode)), st.none() | st.text(max_size=8)),
    st.tuples(st.just("name"), st.text(max_size=8)),
    st.tuples(st.just("link"), st.sampled_from([_LINKED, INVALID_SPAN_CONTEXT]), st.dictionaries(_keys, _values,
                                                                                              max_size=2)),
    st.tuples(st.just("exception"))), max_size=12)


def _apply(span: trace.Span, ops: list[tuple], raise_in_block: bool) -> None:
    """`ops` on the span, which then ends: by end(), or by an exception leaving a `with span:` block."""
    error = _Boom("the downstream said no")
    for op in ops:
        if op[0] == "attribute":
            span.set_attribute(op[1], op[2])
        elif op[0] == "attributes":
            span.set_attributes(op[1])
        elif op[0] == "event":
            span.add_event(op[1], op[2], timestamp=1)
        elif op[0] == "status":
            span.set_status(Status(op[1], op[2]))
        elif op[0] == "name":
            span.update_name(op[1])
        elif op[0] == "link":
            span.add_link(op[1], op[2])
        else:
            span.record_exception(error, timestamp=2)
    if raise_in_block:
        try:
            with span:
                raise _Boom("left the block")
        except _Boom:
            pass
    else:
        span.end()
    span.set_attribute("after.end", 1)  # ignored by both


def _comparable(exporter: InMemorySpanExporter) -> Any:
    request = encode_spans(exporter.get_finished_spans())
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            scope_spans.scope.ClearField("version")
            for span in scope_spans.spans:
                for field in ("span_id", "start_time_unix_nano", "end_time_unix_nano"):
                    span.ClearField(field)
                for event in span.events:
                    if event.name == "exception" and event.time_unix_nano != 2:  # recorded at the block's exit
                        event.ClearField("time_unix_nano")
    return request


@pytest.mark.parametrize("limits", [
    {},
    {"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "3", "OTEL_SPAN_EVENT_COUNT_LIMIT": "2", "OTEL_SPAN_LINK_COUNT_LIMIT": "1",
     "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "5"},
    {"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "0", "OTEL_SPAN_EVENT_COUNT_LIMIT": "0", "OTEL_SPAN_LINK_COUNT_LIMIT": "0"},
    "the provider's span_limits"], ids=["defaults", "small limits", "zero limits", "provider limits"])
@settings(max_examples=60, deadline=None)
@given(ops=_ops, initial=st.dictionaries(st.sampled_from(["rpc.system", "rpc.method"]), st.text(max_size=6)),
       raise_in_block=st.booleans())
def test_a_lean_span_exports_what_the_sdk_span_does(limits: dict[str, str] | str, ops: list[tuple],
                                                    initial: dict[str, str], raise_in_block: bool) -> None:
    with pytest.MonkeyPatch.context() as patch:
        options: dict[str, Any] = {}
        if isinstance(limits, str):
            options["span_limits"] = SpanLimits(max_span_attributes=1, max_attribute_length=3, max_events=1)
        else:
            for key, value in limits.items():
                patch.setenv(key, value)
        sdk_provider, sdk_spans = _provider(**options)
        lean_provider, lean_spans = _provider(**options)
        parent = trace.set_span_in_context(NonRecordingSpan(_PARENT))
        _apply(sdk_provider.get_tracer(SCOPE).start_span(NAME, context=parent, kind=SpanKind.SERVER,
                                                          attributes=initial), ops, raise_in_block)
        lean = LeanTracer(SCOPE, lean_provider).start_span(NAME, parent, SpanKind.SERVER, initial)
        assert isinstance(lean, LeanSpan)
        _apply(lean, ops, raise_in_block)
    assert _comparable(lean_spans) == _comparable(sdk_spans)


def test_the_span_continues_the_callers_trace_and_is_its_child() -> None:
    provider, exporter = _provider()
    span = LeanTracer(SCOPE, provider).start_span(NAME, trace.set_span_in_context(NonRecordingSpan(_PARENT)),
                                                  SpanKind.SERVER, {"rpc.system": "grpc"})
    assert span.is_recording()
    span.end()
    assert not span.is_recording()
    (finished,) = exporter.get_finished_spans()
    assert finished.context.trace_id == _PARENT.trace_id and finished.parent == _PARENT
    assert finished.context.span_id != _PARENT.span_id and finished.context.trace_flags.sampled
    assert dict(finished.attributes) == {"rpc.system": "grpc"} and finished.kind is SpanKind.SERVER
    assert finished.resource.attributes["service.name"] == "ragfleet-test"


def test_a_root_gets_a_new_trace_and_the_current_span_is_its_parent_when_no_context_is_given() -> None:
    provider, exporter = _provider()
    tracer = LeanTracer(SCOPE, provider)
    root = tracer.start_span(NAME, None, SpanKind.SERVER, {})
    with trace.use_span(root, end_on_exit=True):
        tracer.start_span("child", None, SpanKind.INTERNAL, {}).end()
    child, parent = exporter.get_finished_spans()
    assert parent.parent is None and parent.context.trace_id != 0
    assert child.parent == parent.context and child.context.trace_id == parent.context.trace_id


def test_the_providers_sampler_decides_and_an_unsampled_span_still_carries_ids() -> None:
    provider, exporter = _provider(sampler=ParentBased(root=ALWAYS_OFF))
    span = LeanTracer(SCOPE, provider).start_span(NAME, None, SpanKind.SERVER, {})
    assert not span.is_recording() and not isinstance(span, LeanSpan)
    assert span.get_span_context().is_valid and not span.get_span_context().trace_flags.sampled
    span.end()
    assert exporter.get_finished_spans() == ()


def test_without_an_sdk_provider_the_api_tracer_answers() -> None:
    span = LeanTracer(SCOPE, trace.NoOpTracerProvider()).start_span(NAME, None, SpanKind.SERVER, {})
    assert not span.is_recording() and not span.get_span_context().is_valid


def test_a_provider_installed_later_is_used(span_exporter) -> None:
    span = LeanTracer(SCOPE).start_span(NAME, None, SpanKind.SERVER, {"rpc.system": "grpc"})
    span.end()
    assert [s.name for s in span_exporter.get_finished_spans()] == [NAME]
