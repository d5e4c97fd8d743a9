"""span_encoding writes the request the SDK's OTLP encoder builds, byte for byte in meaning: for spans recorded by the
real SDK (any attributes, events, links, status, kind, remote or local parent, trace state, several resources and
scopes), the bytes parse to a request equal to opentelemetry-exporter-otlp's. And WireSpanExporter sends them to a real
gRPC TraceService."""

from __future__ import annotations

import math
from concurrent import futures

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace import set_span_in_context
from opentelemetry.trace.span import TraceState

from services.runtime.span_encoding import encode_request
from services.runtime.span_exporter import WireSpanExporter

Request = trace_service_pb2.ExportTraceServiceRequest

_keys = st.text(min_size=1, max_size=12)
_scalars = st.one_of(st.booleans(), st.text(max_size=20), st.integers(min_value=-(1 << 70), max_value=1 << 70),
                     st.floats(allow_nan=False))
_values = st.one_of(_scalars, st.lists(st.booleans(), max_size=4), st.lists(st.text(max_size=5), max_size=4),
                    st.lists(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), max_size=4),
                    st.lists(st.floats(allow_nan=False), max_size=4))
_attributes = st.dictionaries(_keys, _values, max_size=6)
_ids = st.integers(min_value=1, max_value=(1 << 64) - 1)
_contexts = st.builds(lambda trace_id, span_id, remote: SpanContext(trace_id, span_id, is_remote=remote,
                                                                     trace_flags=TraceFlags(TraceFlags.SAMPLED)),
                      st.integers(min_value=1, max_value=(1 << 128) - 1), _ids, st.booleans())


@st.composite
def _span_specs(draw: st.DrawFn) -> dict:
    return {
        "name": draw(st.text(max_size=30)),
        "kind": draw(st.sampled_from(list(SpanKind))),
        "attributes": draw(_attributes),
        "later": draw(_attributes),
        "events": draw(st.lists(st.tuples(st.text(max_size=10), _attributes), max_size=3)),
        "links": draw(st.lists(st.tuples(_contexts, _attributes), max_size=2)),
        "parent": draw(st.none() | _contexts),
        "trace_state": draw(st.sampled_from([None, (("vendor", "a1"),), (("x", "1"), ("y", "2"))])),
        "status": draw(st.sampled_from([None, (StatusCode.OK, None), (StatusCode.ERROR, "UNAVAILABLE:gone"),
                                        (StatusCode.ERROR, None)])),
        "resource": draw(st.integers(min_value=0, max_value=1)),
        "scope": draw(st.sampled_from([("a", None, None), ("b", "1.2", "https://opentelemetry.io/schemas/1.21.0")])),
    }


_RESOURCES = [Resource.create({"service.name": "ragfleet-test", "host.name": "pod-1"}),
              Resource({"service.name": "other", "k8s.pod.uid": 42}, schema_url="https://example.com/schema")]


def _record(specs: list[dict]) -> list:
    exporter = InMemorySpanExporter()
    providers = []
    for resource in _RESOURCES:
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers.append(provider)
    for spec in specs:
        name, version, schema_url = spec["scope"]
        tracer = providers[spec["resource"]].get_tracer(name, version, schema_url=schema_url)
        parent = spec["parent"]
        if parent is not None and spec["trace_state"]:
            parent = SpanContext(parent.trace_id, parent.span_id, parent.is_remote, parent.trace_flags,
                                 TraceState(list(spec["trace_state"])))
        context = set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
        span = tracer.start_span(spec["name"], context=context, kind=spec["kind"], attributes=spec["attributes"],
                                 links=[Link(link, attributes) for link, attributes in spec["links"]])
        span.set_attributes(spec["later"])
        for event_name, attributes in spec["events"]:
            span.add_event(event_name, attributes)
        if spec["status"] is not None:
            span.set_status(Status(*spec["status"]))
        span.end()
    return list(exporter.get_finished_spans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_span_specs(), min_size=1, max_size=6))
def test_the_request_equals_the_sdk_encoders(specs: list[dict]) -> None:
    spans = _record(specs)
    assert Request.FromString(encode_request(spans)) == encode_spans(spans)


def test_repeated_attributes_are_reused_and_each_span_keeps_its_own_values() -> None:
    specs = [{"name": "/ragfleet.v1.EmbeddingService/Embed", "kind": SpanKind.SERVER, "events": [], "links": [],
              "attributes": {"rpc.system": "grpc", "ragfleet.embedding.texts": n % 2, "cached": n % 3 == 0},
              "later": {"ragfleet.stage.model_ms": n / 7}, "parent": None, "trace_state": None, "status": None,
              "resource": 0, "scope": ("a", None, None)} for n in range(40)]
    spans = _record(specs)
    request = Request.FromString(encode_request(spans))
    decoded = request.resource_spans[0].scope_spans[0].spans
    assert [span.span_id for span in decoded] == [span.context.span_id.to_bytes(8, "big") for span in spans]
    for n, span in enumerate(decoded):
        values = {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}
        assert values["ragfleet.embedding.texts"] == n % 2 and values["cached"] is (n % 3 == 0)
        assert math.isclose(values["ragfleet.stage.model_ms"], n / 7)


def test_a_value_out_of_int64_range_is_left_out_like_the_sdk_does() -> None:
    spec = {"name": "s", "kind": SpanKind.INTERNAL, "events": [], "links": [], "parent": None, "trace_state": None,
            "status": None, "resource": 0, "scope": ("a", None, None),
            "attributes": {"big": 1 << 64, "fine": -1}, "later": {}}
    spans = _record([spec])
    attributes = Request.FromString(encode_request(spans)).resource_spans[0].scope_spans[0].spans[0].attributes
    assert [(kv.key, kv.value.int_value) for kv in attributes] == [("fine", -1)]


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[Request] = []

    def Export(self, request: Request, context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = _Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_the_exporter_sends_the_encoded_request_to_a_trace_service(collector) -> None:
    servicer, address = collector
    spans = _record([{"name": f"/ragfleet.v1.GatewayService/Ask{n}", "kind": SpanKind.SERVER, "events": [],
                      "links": [], "attributes": {"rpc.system": "grpc"}, "later": {}, "parent": None,
                      "trace_state": None, "status": (StatusCode.ERROR, "INTERNAL:boom"), "resource": n % 2,
                      "scope": ("a", None, None)} for n in range(5)])
    exporter = WireSpanExporter(endpoint=f"http://{address}", insecure=True)
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert servicer.requests == [encode_spans(spans)]


def test_the_exporter_reports_failure_when_no_collector_answers() -> None:
    spans = _record([{"name": "s", "kind": SpanKind.SERVER, "events": [], "links": [], "attributes": {},
                      "later": {}, "parent": None, "trace_state": None, "status": None, "resource": 0,
                      "scope": ("a", None, None)}])
    exporter = WireSpanExporter(endpoint="http://127.0.0.1:9", insecure=True, timeout=1)
    try:
        assert exporter.export(spans) is SpanExportResult.FAILURE
    finally:
        exporter.shutdown()


def test_long_string_values_are_written_each_time_not_kept() -> None:
    from services.runtime import span_encoding

    trace_text = "Traceback (most recent call last):\n" + "  File x, line 1\n" * 40
    spec = {"name": "s", "kind": SpanKind.SERVER, "events": [], "links": [], "parent": None, "trace_state": None,
            "status": None, "resource": 0, "scope": ("a", None, None),
            "attributes": {"error.stack": trace_text, "rpc.system": "grpc"}, "later": {}}
    spans = _record([spec])
    assert Request.FromString(encode_request(spans)) == encode_spans(spans)
    kept = {key[1:3] for key in span_encoding._ENCODER._attributes}
    assert ("rpc.system", str) in kept and ("error.stack", str) not in kept
