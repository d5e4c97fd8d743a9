"""Client channels: created once per process per target, traced, with keepalive and a retry service config.

Unary, idempotent methods listed in ``retry_methods`` are retried by gRPC itself on UNAVAILABLE (transparent to
the caller, capped backoff); streaming methods are never listed, so a started stream is never replayed.

With ``health_service`` the channel watches each backend's grpc.health.v1 status for that service (gRPC's
client-side health checking) and round-robins only over backends reporting SERVING. A replica that starts draining
(NOT_SERVING on SIGTERM) stops getting new calls at once, so its in-flight streams can finish within the grace
period; DNS alone would not do it, since gRPC re-resolves only when a connection breaks.

    pool = ChannelPool()
    channel = pool.get("127.0.0.1:50051", health_service="ragfleet.v1.EmbeddingService",
                       retry_methods=[("ragfleet.v1.EmbeddingService", "Embed")])
    stub = EmbeddingServiceStub(channel)
    await stub.Embed(request, timeout=2.0)   # every call carries a deadline
    await pool.close()

Every call carries this process's service token (``authorization: Bearer ...``, services.runtime.internal_auth)
when one is installed, so the internal services can tell their callers apart.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import grpc

from services.runtime import internal_auth, telemetry
from services.runtime.rpc_tracing import TracedChannel

DEFAULT_RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.02s",
    "maxBackoff": "0.2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(retry_methods: Iterable[tuple[str, str]], health_service: str | None = None) -> str:
    names = [{"service": service, "method": method} for service, method in retry_methods]
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_service:
        config["healthCheckConfig"] = {"serviceName": health_service}
    if names:
        config["methodConfig"] = [{"name": names, "retryPolicy": DEFAULT_RETRY_POLICY}]
    return json.dumps(config)


def channel_options(retry_methods: Sequence[tuple[str, str]] = (), max_message_mb: int = 64,
                    health_service: str | None = None) -> list[tuple[str, object]]:
    max_bytes = max_message_mb * 1024 * 1024
    return [
        ("grpc.service_config", service_config(retry_methods, health_service)),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Fail fast when a peer is down instead of waiting out the whole reconnect backoff.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


class ChannelPool:
    """One traced channel per target for the life of the process."""

    def __init__(self, token: internal_auth.CallerToken | None = None) -> None:
        """``token``: presented on every call; by default the process's (installed by services.runtime.serve)."""
        self._channels: dict[str, TracedChannel] = {}
        self._token = token if token is not None else internal_auth.process_token()

    def get(self, target: str, *, health_service: str | None = None,
            retry_methods: Sequence[tuple[str, str]] = ()) -> TracedChannel:
        """The channel to `target`, created on first use with these settings (one service per target)."""
        channel = self._channels.get(target)
        if channel is None:
            options = channel_options(retry_methods, health_service=health_service)
            # The span, the trace context and the token are added at the call site: no client interceptor.
            channel = telemetry.traced_channel(grpc.aio.insecure_channel(target, options=options),
                                               self._token.metadata if self._token is not None else None)
            self._channels[target] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
