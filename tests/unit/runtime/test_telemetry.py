"""Health checks and reflection are infrastructure: neither traced (telemetry) nor counted (rpc_handlers)."""

from __future__ import annotations

import pytest

from services.runtime import rpc_handlers, telemetry


@pytest.mark.parametrize(("method", "traced"), [
    ("/ragfleet.v1.GatewayService/Ask", True),
    (b"/ragfleet.v1.EmbeddingService/Embed", True),  # grpc.aio client call details carry bytes
    ("/grpc.health.v1.Health/Check", False),
    (b"/grpc.health.v1.Health/Watch", False),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
])
def test_infrastructure_rpcs_are_not_traced(method: str | bytes, traced: bool) -> None:
    assert telemetry.traced(method) is traced


def test_the_metrics_interceptor_skips_the_same_methods() -> None:
    assert rpc_handlers.INFRA_METHOD_PREFIXES is telemetry.INFRA_METHOD_PREFIXES


def _provider(sampler):
    from opentelemetry.sdk.trace import TracerProvider

    return TracerProvider(sampler=sampler).get_tracer("test")


def _remote_parent(sampled: bool):
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    parent = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def test_without_an_exporter_a_trace_started_here_is_not_recorded_but_has_ids(monkeypatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    tracer = _provider(telemetry.default_sampler(None))
    root = tracer.start_span("/ragfleet.v1.GatewayService/Ask")
    assert not root.is_recording() and not root.get_span_context().trace_flags.sampled
    assert root.get_span_context().is_valid  # logs, AskFinished.trace_id and the traceparent still carry it
    # A caller's sampled trace is followed (its collector wants the spans); an unsampled one is not.
    assert tracer.start_span("/ragfleet.v1.GatewayService/Ask", context=_remote_parent(True)).is_recording()
    assert not tracer.start_span("/ragfleet.v1.GatewayService/Ask", context=_remote_parent(False)).is_recording()


def test_with_an_exporter_or_a_chosen_sampler_every_trace_is_recorded(monkeypatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    assert telemetry.default_sampler("http://127.0.0.1:4317") is None  # the SDK's own: parentbased_always_on
    assert _provider(telemetry.default_sampler("http://127.0.0.1:4317")).start_span("root").is_recording()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    assert telemetry.default_sampler(None) is None
    assert _provider(telemetry.default_sampler(None)).start_span("root").is_recording()


def test_a_hashed_resource_hashes_once_and_groups_spans_as_the_resource_it_wraps(monkeypatch) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    plain = Resource.create({"service.name": "ragfleet-test", "service.namespace": "ragfleet"})
    resource = telemetry.HashedResource(plain)
    assert resource == plain and hash(resource) == hash(plain) and resource.attributes == plain.attributes
    calls = []
    monkeypatch.setattr(Resource, "__hash__", lambda self: calls.append(1) or 0)
    hash(resource), hash(resource)
    assert calls == [], "the JSON hash is not recomputed"

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    for name in ("a", "b", "c"):
        provider.get_tracer("test").start_span(name).end()
    request = encode_spans(exporter.get_finished_spans())
    assert len(request.resource_spans) == 1  # one resource, all three spans under it
    group = request.resource_spans[0]
    assert [s.name for s in group.scope_spans[0].spans] == ["a", "b", "c"]
    assert {a.key: a.value.string_value for a in group.resource.attributes}["service.name"] == "ragfleet-test"


def test_the_process_resource_names_the_service_and_its_replica(monkeypatch) -> None:
    import socket

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    attributes = telemetry.process_resource("retrieval").attributes
    assert attributes["service.name"] == "ragfleet-retrieval" and attributes["service.namespace"] == "ragfleet"
    assert attributes["host.name"] == socket.gethostname()  # the pod, in Kubernetes
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "host.name=node-7,deployment.environment=prod")
    attributes = telemetry.process_resource("retrieval").attributes
    assert attributes["host.name"] == "node-7" and attributes["deployment.environment"] == "prod"
