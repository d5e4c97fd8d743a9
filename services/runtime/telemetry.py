"""OpenTelemetry setup: one tracer provider per process, traced gRPC channels that carry W3C trace context.

Spans are exported over OTLP/gRPC only when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set. Without an
exporter the trace context still runs (trace ids appear in logs, in AskFinished.trace_id, and propagate downstream)
but a trace that starts here is not sampled, so no service records spans nobody can see: recording them costs 1-5 %
of the mesh's CPU per Ask (bench/tracing_cost.py, "sampled"). A sampled parent from outside is still followed, and
OTEL_TRACES_SAMPLER, when set, is honoured as-is.
Health checks and reflection are never traced: they would drown the real traffic.
"""

from __future__ import annotations

import os
import socket

from typing import Callable

import grpc
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler

from services.runtime import rpc_tracing

_provider: TracerProvider | None = None
_client_spans = False  # RAGFLEET_TRACE_CLIENT_SPANS, installed by setup_tracing

# Method-name prefixes of infrastructure RPCs: never traced here, nor counted by the RPC metrics (rpc_handlers).
INFRA_METHOD_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def traced(method: str | bytes) -> bool:
    """Trace everything but health and reflection (decided once per method: services.runtime.rpc_tracing)."""
    if isinstance(method, bytes):  # grpc.aio client details carry bytes (grpc/grpc#31092)
        method = method.decode()
    return not method.startswith(INFRA_METHOD_PREFIXES)


def otlp_endpoint() -> str | None:
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def setup_tracing(component: str, *, client_spans: bool = False) -> TracerProvider:
    """Install the process-wide tracer provider (idempotent). ``client_spans``: channels made after this record a
    CLIENT span per call, not only the trace context (RAGFLEET_TRACE_CLIENT_SPANS)."""
    global _provider, _client_spans
    _client_spans = client_spans
    if _provider is not None:
        return _provider
    resource = process_resource(component)
    endpoint = otlp_endpoint()
    provider = TracerProvider(resource=resource, sampler=default_sampler(endpoint))
    if endpoint:
        from services.runtime.span_exporter import WireSpanExporter

        insecure = endpoint.startswith("http://") or os.environ.get("OTEL_EXPORTER_OTLP_INSECURE", "").lower() == "true"
        # The SDK's own batching settings (OTEL_BSP_SCHEDULE_DELAY, default 5 s; OTEL_BSP_MAX_EXPORT_BATCH_SIZE...):
        # each export is a gRPC call with a fixed cost, and exporting every 500 ms cost more CPU per Ask than the
        # spans themselves once the mesh was lean (bench/tracing_cost.py). The request is written by
        # services.runtime.span_encoding, ~4x cheaper than the SDK's encoder.
        provider.add_span_processor(BatchSpanProcessor(WireSpanExporter(endpoint=endpoint, insecure=insecure)))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def process_resource(component: str) -> "HashedResource":
    """service.name (OTEL_SERVICE_NAME or ragfleet-<component>), service.namespace and host.name (a pod's name in
    Kubernetes), over OTEL_RESOURCE_ATTRIBUTES. host.name says which replica: the server spans of calls inside the
    mesh name their caller's replica through their parent span's resource, not a peer address of their own
    (services.runtime.rpc_tracing); OTEL_RESOURCE_ATTRIBUTES may set it instead."""
    attributes = {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"ragfleet-{component}"),
                  "service.namespace": "ragfleet"}
    if "host.name=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["host.name"] = socket.gethostname()
    return HashedResource(Resource.create(attributes))


class HashedResource(Resource):
    """A Resource whose hash is computed once. The OTLP encoder groups every exported span by its resource, and
    Resource.__hash__ serialises all the attributes to JSON on each call: ~8 us of every span's export here, a fifth
    of its encoding (upstream calls it wasteful too: open-telemetry/opentelemetry-python#5577). A resource's
    attributes cannot change after it is made, so neither can its hash."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def default_sampler(endpoint: str | None) -> Sampler | None:
    """None (the SDK's own: OTEL_TRACES_SAMPLER, else parentbased_always_on) when spans can leave the process or the
    sampler is set; else parent-based with roots not sampled: ids are still made and propagated, nothing recorded."""
    if endpoint or os.environ.get("OTEL_TRACES_SAMPLER"):
        return None
    return ParentBased(root=ALWAYS_OFF)


def shutdown_tracing() -> None:
    """Flush pending spans; called last during graceful shutdown."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=5000)
        _provider.shutdown()


def client_spans() -> bool:
    """Whether outgoing calls get CLIENT spans of their own (RAGFLEET_TRACE_CLIENT_SPANS, as setup_tracing set it):
    the channels between the services, and generation's call to the LLM."""
    return _client_spans


def traced_channel(channel: grpc.aio.Channel, extra_metadata: Callable[[], rpc_tracing.Pairs] | None = None, *,
                   client_spans: bool | None = None) -> rpc_tracing.TracedChannel:
    """`channel` with the trace context on every traced call (and a CLIENT span when ``client_spans``, by default
    as setup_tracing installed), plus ``extra_metadata()`` (the service token) on every call. The server span is
    opened by services.runtime.rpc_handlers (ServerSpan)."""
    return rpc_tracing.TracedChannel(channel, traced, extra_metadata,
                                     client_spans=_client_spans if client_spans is None else client_spans)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def record_stages(timings: Message) -> None:
    """A request's stage timings as attributes of its current (server) span, ``ragfleet.stage.<field>``: the
    gateway's Ask records them instead of a span per stage: each span costs tens of microseconds to record and as
    many to export, an attribute a few. Not ``total_ms``: the span's own duration says it."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"ragfleet.stage.{field.name}": value for field, value in timings.ListFields()
                             if field.name != "total_ms"})


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
