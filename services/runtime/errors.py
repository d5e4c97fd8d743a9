"""The domain error tree and its one mapping to gRPC status codes.

Handlers raise these; the RPC wrapper (services.runtime.rpc_handlers) turns them into statuses, so no
handler calls ``context.abort`` for an expected failure.

    RagfleetError
     ├── InvalidArgument     -> INVALID_ARGUMENT   (bad input; the message names the field and the limit)
     ├── Unauthenticated     -> UNAUTHENTICATED
     ├── NotFound            -> NOT_FOUND
     ├── Overloaded          -> RESOURCE_EXHAUSTED (admission refused at once; retry later)
     ├── Unavailable         -> UNAVAILABLE        (a dependency is down; the message names it)
     ├── DeadlineExceeded    -> DEADLINE_EXCEEDED
     └── FailedPrecondition  -> FAILED_PRECONDITION
    ConfigError (start-up only; never crosses the wire)
"""

from __future__ import annotations

import grpc


class ConfigError(ValueError):
    """A configuration value is missing or malformed; raised at start-up."""


class RagfleetError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RagfleetError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(RagfleetError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(RagfleetError):
    code = grpc.StatusCode.NOT_FOUND


class Overloaded(RagfleetError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RagfleetError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RagfleetError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(RagfleetError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def from_rpc_error(service: str, error: grpc.aio.AioRpcError) -> RagfleetError:
    """Translate a failed outgoing call into a domain error that names the downstream service."""
    code = error.code()
    details = error.details() or code.name
    message = f"{service} service: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{service} service did not answer in time: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNIMPLEMENTED):
        return Unavailable(message)
    for cls in (InvalidArgument, Unauthenticated, NotFound, Overloaded, FailedPrecondition):
        if cls.code == code:
            return cls(message)
    return Unavailable(message)


def require(condition: bool, message: str) -> None:
    """Raise InvalidArgument(message) unless condition holds."""
    if not condition:
        raise InvalidArgument(message)
