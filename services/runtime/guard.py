"""The front door of every RPC: authenticate from metadata, bound the request's size, then parse it.

Every application method's handler is registered with ``request_deserializer=None`` (services.runtime.rpc_handlers),
so its request reaches this module as the raw bytes gRPC received. Before any handler code runs, and before a
single field is parsed:

1. the caller is authenticated from the invocation metadata (an ``Authenticator``: the internal service token on
   embedding/retrieval/generation, the API key on the gateway); missing or unknown -> UNAUTHENTICATED;
2. the size is checked against the method's limit -> RESOURCE_EXHAUSTED naming the message, its size and the limit;
3. the bytes are parsed with the method's own deserializer; a decode failure (a string field that is not UTF-8,
   truncated bytes, groups nested past the parser's depth limit) -> INVALID_ARGUMENT in plain words.

A rejection is an expected client mistake, not a bug: it is counted in ``ragfleet_rpc_rejected_total{method,reason}``
(and in ``ragfleet_rpc_requests_total`` with its code), logged on one line, never with a traceback. The caller's name
(service or tenant) is put on the RPC span and in ``current_principal()`` for the handler.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import grpc
from opentelemetry import trace
from prometheus_client import Counter

from services.runtime.errors import InvalidArgument, RagfleetError, Unauthenticated

log = logging.getLogger("ragfleet.rpc.guard")

KiB = 1024
MiB = 1024 * 1024

RPC_REJECTED = Counter("ragfleet_rpc_rejected_total", "RPCs refused before their handler ran",
                       ["method", "reason"])

Metadata = Iterable[tuple[str, str | bytes]] | None

_principal: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar("ragfleet_principal",
                                                                                     default=None)


def current_principal() -> str | None:
    """Who the guard authenticated for the RPC being handled (a service name or a tenant); None outside one or when
    the server runs without an authenticator."""
    found = _principal.get()
    return None if found is None else found[1]


def authenticated_by(authenticator: object) -> str | None:
    """The caller's name if `authenticator` itself admitted the RPC being handled (the gateway's tenant hand-off),
    else None: a handler never mistakes another authenticator's principal for its own."""
    found = _principal.get()
    return found[1] if found is not None and found[0] is authenticator else None


class Authenticator(Protocol):
    """Turns an RPC's metadata into the caller's name, or raises errors.Unauthenticated. Must be cheap and must not
    log secrets: it runs on every call."""

    span_attribute: str  # where the caller's name goes on the RPC span, e.g. "ragfleet.caller"
    mesh_callers: bool  # its callers are the mesh's own services (their gRPC user agent is not worth a span attribute)

    def authenticate(self, metadata: Metadata) -> str: ...


class Rejected(RagfleetError):
    """A request refused by the guard; ``reason`` labels ragfleet_rpc_rejected_total."""

    reason = "malformed"


class Malformed(Rejected, InvalidArgument):
    reason = "malformed"


class TooLarge(Rejected):
    reason = "too_large"
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotAuthenticated(Rejected, Unauthenticated):
    reason = "unauthenticated"


def format_size(size: int, *, exact: bool = False) -> str:
    """"5.0 MiB", "64 KiB", "900 bytes". ``exact`` drops the decimal of whole units (limits read better that way)."""
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if size >= unit:
            value = size / unit
            if exact and value == int(value):
                return f"{int(value)} {name}"
            return f"{value:.1f} {name}"
    return f"{size} bytes"


def _message_name(deserializer: Callable[[bytes], Any] | None) -> str:
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return descriptor.name if descriptor is not None else "request"


def _why(error: Exception) -> str:
    text = str(error)
    if "UTF-8" in text or "utf-8" in text:
        return "a string field is not valid UTF-8"
    return "the bytes are truncated, malformed or nested too deeply"


@dataclass(frozen=True)
class MethodGuard:
    """The checks of one method: ``method`` is the full path ('/ragfleet.v1.GatewayService/Ask')."""

    method: str
    deserializer: Callable[[bytes], Any] | None
    max_bytes: int
    authenticator: Authenticator | None = None

    @property
    def name(self) -> str:
        return self.method.lstrip("/")

    def admit(self, raw: bytes, metadata: Metadata) -> Any:
        """The parsed request, or a Rejected error (authentication first: an anonymous caller learns nothing)."""
        if self.authenticator is not None:
            try:
                caller = self.authenticator.authenticate(metadata)
            except Unauthenticated as exc:
                raise NotAuthenticated(exc.message) from None
            _principal.set((self.authenticator, caller))
            trace.get_current_span().set_attribute(self.authenticator.span_attribute, caller)
        if len(raw) > self.max_bytes:
            raise TooLarge(f"{self.deserializer_name} is {format_size(len(raw))}; the limit for {self.name} is "
                           f"{format_size(self.max_bytes, exact=True)}")
        if self.deserializer is None:
            return raw
        try:
            return self.deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, RecursionError...: all mean "not a valid message"
            message = self.deserializer_name
            raise Malformed(f"{message} could not be parsed: {_why(exc)}; send a {message} serialized from the "
                            f"ragfleet.v1 protos") from None

    @property
    def deserializer_name(self) -> str:
        return _message_name(self.deserializer)


def record_rejection(guard: MethodGuard, error: Rejected, peer: str | None) -> None:
    RPC_REJECTED.labels(guard.name, error.reason).inc()
    log.info("rejected %s: %s", guard.name, error.message,
             extra={"fields": {"method": guard.name, "reason": error.reason, "peer": peer}})


@dataclass(frozen=True)
class GuardPolicy:
    """What the guard enforces on one server. ``max_bytes`` maps a full method path to its request limit (the rest
    get ``default_max_bytes``); ``authenticators`` maps a proto service name to who may call it (unlisted: anyone)."""

    default_max_bytes: int = 64 * MiB
    max_bytes: Mapping[str, int] = field(default_factory=dict)
    authenticators: Mapping[str, Authenticator] = field(default_factory=dict)

    def guard(self, method: str, deserializer: Callable[[bytes], Any] | None) -> MethodGuard:
        service = method.lstrip("/").split("/", 1)[0]
        limit = min(self.max_bytes.get(method, self.default_max_bytes), self.default_max_bytes)
        return MethodGuard(method, deserializer, limit, self.authenticators.get(service))

    def receive_limit(self, methods: Iterable[str]) -> int:
        """The server's grpc.max_receive_message_length: its largest method limit, so gRPC core refuses anything
        larger before reading it (at least 64 KiB, for health and reflection requests)."""
        limits = [self.max_bytes.get(m, self.default_max_bytes) for m in methods]
        return min(self.default_max_bytes, max([64 * KiB, *limits]))


def utf8_bytes(chars: int) -> int:
    """The most bytes `chars` characters take in UTF-8 (4 each): a limit sized by characters never refuses a valid
    request written in any script."""
    return 4 * chars
