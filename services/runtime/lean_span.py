"""The RPC spans, recorded with a fraction of the SDK span's work, ending as the SDK's own ReadableSpan.

Every Ask opens one server span in each of the four services, and at 100 % sampling the SDK's span was most of what
tracing cost the mesh: ~180 Python calls to start, annotate and end one server span here (cProfile call counts, off
vs sampled), for a lock per attribute, an attribute validator that walks every value twice, a BoundedAttributes, a
BoundedList per span for events and links, and a second ReadableSpan copied from the span at its end.

A ``LeanSpan`` is the ReadableSpan itself (as the SDK's span is), with a plain dict of attributes checked by type.
It still goes through the SDK where the SDK decides something: the provider's sampler (OTEL_TRACES_SAMPLER, parent
based by default) and id generator, its resource, and its span processors (``on_start``, then ``on_end`` with the
span: the BatchSpanProcessor and its exporter, or a test's in-memory exporter, see an ordinary span), and its span
limits (OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT..., or the provider's span_limits).
Without an SDK provider (OTEL_SDK_DISABLED, tests without one) the API's tracer is used as it is. Not carried over:
the SDK's self-metrics of spans started and ended (opt-in, OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED), its
experimental ``_on_ending`` processor hook, and its per-span lock: a span here lives in one event loop's task.

    tracer = LeanTracer("services.runtime.rpc_tracing")
    span = tracer.start_span("/ragfleet.v1.EmbeddingService/Embed", context=parent, kind=SpanKind.SERVER,
                             attributes={"rpc.system": "grpc"})
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from time import time_ns
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes, _clean_attribute_value  # the SDK's own validation
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

_log = logging.getLogger(__name__)
_SCALARS = (str, bool, int, float)


class LeanSpan(trace.Span, ReadableSpan):
    """A recording span: the API's Span over the SDK's ReadableSpan, handed to the span processors as it is."""

    def __init__(self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
                 recorder: "_Recorder") -> None:
        ReadableSpan.__init__(self, name=name, context=context, parent=parent, resource=recorder.resource,
                              attributes={}, events=(), links=(), kind=kind, start_time=time_ns(),
                              instrumentation_scope=recorder.scope)
        self._recorder = recorder
        self._dropped_attributes = 0
        # Events and links are rare on these spans: their BoundedLists (which count what the limits drop, for the
        # exporters' dropped_events and dropped_links) are made on the first one.

    # -- ReadableSpan: what exporters read -------------------------------------------------------------------
    @property
    def dropped_attributes(self) -> int:
        return self._dropped_attributes

    # -- the API's Span --------------------------------------------------------------------------------------
    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: Any) -> None:
        if self._ended("set_attribute"):
            return
        limits = self._recorder.limits
        if limits.max_span_attributes == 0:  # as the SDK's BoundedAttributes: counted, not kept
            self._dropped_attributes += 1
            return
        if not key or not isinstance(key, str):
            _log.warning("invalid key `%s`. must be non-empty string. Dropping key from attributes.", key)
            self._dropped_attributes += 1
            return
        if type(value) not in _SCALARS or limits.max_span_attribute_length is not None:
            value = _clean_attribute_value(value, limits.max_span_attribute_length)  # as the SDK's span does
        attributes: dict[str, Any] = self._attributes  # type: ignore[assignment]
        if key in attributes:  # a key set again moves to the end, as in the SDK's BoundedAttributes
            del attributes[key]
        elif limits.max_span_attributes is not None and len(attributes) >= limits.max_span_attributes:
            del attributes[next(iter(attributes))]  # the oldest goes
            self._dropped_attributes += 1
        attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None,
                  timestamp: int | None = None) -> None:
        if self._ended("add_event"):
            return
        limits = self._recorder.limits
        if type(self._events) is tuple:
            self._events = BoundedList(limits.max_events)
        event = Event(name, self._frozen(attributes, limits.max_event_attributes), timestamp)
        self._events.append(event)  # type: ignore[attr-defined]

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if not (context and (context.is_valid or attributes or context.trace_state)):
            return  # as the SDK: a link to nothing is no link
        if self._ended("add_link"):
            return
        limits = self._recorder.limits
        if type(self._links) is tuple:
            self._links = BoundedList(limits.max_links)
        link = Link(context, self._frozen(attributes, limits.max_link_attributes))
        self._links.append(link)  # type: ignore[attr-defined]

    def _frozen(self, attributes: Mapping[str, Any] | None, most: int | None) -> BoundedAttributes:
        """An event's or a link's attributes, cleaned and limited as the SDK's span does."""
        return BoundedAttributes(most, attributes, immutable=True,
                                 max_value_len=self._recorder.limits.max_attribute_length)

    def _ended(self, call: str) -> bool:
        if self._end_time is None:
            return False
        _log.warning("Tried calling %s on an ended span.", call)
        return True

    def update_name(self, name: str) -> None:
        if not self._ended("update_name"):
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK's: UNSET is ignored, and so is anything after OK."""
        if self._ended("set_status") or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(self, exception: BaseException, attributes: Mapping[str, Any] | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        """The SDK's "exception" event, with the same attributes (exception.type, .message, .stacktrace, .escaped)."""
        module, qualname = type(exception).__module__, type(exception).__qualname__
        event = {"exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
                 "exception.message": str(exception),
                 "exception.stacktrace": "".join(traceback.format_exception(exception)),
                 "exception.escaped": str(escaped)}
        self.add_event("exception", {**event, **(attributes or {})}, timestamp)

    def __exit__(self, exc_type: type[BaseException] | None, exc_val: BaseException | None,
                 exc_tb: TracebackType | None) -> None:
        """As the SDK's span used as a context manager: an exception leaving the block is recorded, and is an ERROR."""
        if exc_val is not None and self.is_recording():
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        super().__exit__(exc_type, exc_val, exc_tb)

    def end(self, end_time: int | None = None) -> None:
        if self._ended("end"):
            return
        self._end_time = end_time if end_time is not None else time_ns()
        self._recorder.processor.on_end(self)


class _Recorder:
    """What the spans of one tracer share, taken from the SDK tracer the provider gave."""

    def __init__(self, tracer: SdkTracer, scope: str) -> None:
        self.sampler = tracer.sampler
        self.ids = tracer.id_generator
        self.resource = tracer.resource
        self.processor = tracer.span_processor
        self.scope = InstrumentationScope(scope)
        self.limits: SpanLimits = getattr(tracer, "_span_limits", None) or SpanLimits()  # the provider's limits


class LeanTracer:
    """start_span for LeanSpans. Without `provider`, the process's tracer provider is looked up on each call: one
    installed later (by setup_tracing, or a test) is used from then on."""

    def __init__(self, scope: str, provider: trace.TracerProvider | None = None) -> None:
        self._scope = scope
        self._fixed = provider
        self._provider: object = None
        self._recorder: _Recorder | None = None
        self._fallback: trace.Tracer | None = None

    def _resolve(self) -> None:
        provider = self._fixed or trace.get_tracer_provider()
        if provider is self._provider:
            return
        tracer = provider.get_tracer(self._scope)
        self._provider = provider
        self._recorder = _Recorder(tracer, self._scope) if isinstance(tracer, SdkTracer) else None
        self._fallback = None if self._recorder is not None else tracer

    def start_span(self, name: str, context: Context | None, kind: SpanKind,
                   attributes: Mapping[str, Any]) -> trace.Span:
        """A span child of the span in `context` (None: the current context), sampled by the provider's sampler."""
        self._resolve()
        recorder = self._recorder
        if recorder is None:
            return self._fallback.start_span(name, context=context, kind=kind,  # type: ignore[union-attr]
                                             attributes=attributes)
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
        else:
            parent = None
            trace_id = recorder.ids.generate_trace_id()
            random_id = recorder.ids.is_trace_id_random()
        result = recorder.sampler.should_sample(context, trace_id, name, kind, attributes)
        flags = TraceFlags.SAMPLED if result.decision.is_sampled() else TraceFlags.DEFAULT
        if random_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(trace_id, recorder.ids.generate_span_id(), is_remote=False,
                                   trace_flags=TraceFlags(flags), trace_state=result.trace_state)
        if not result.decision.is_recording():
            return NonRecordingSpan(span_context)
        span = LeanSpan(name, span_context, parent, kind, recorder)
        if result.attributes:
            span.set_attributes(result.attributes)
        recorder.processor.on_start(span, parent_context=context)
        return span


__all__ = ("LeanSpan", "LeanTracer")
