"""The gateway's Ask admission: the runtime's limiter with the gateway's metrics and setting."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.runtime.admission import AdmissionLimiter

ASKS_IN_FLIGHT = Gauge("ragfleet_gateway_asks_in_flight", "Ask streams in progress on this replica",
                       multiprocess_mode="livesum")  # a replica's workers together (the HPA's per-pod value)
ASKS_REJECTED = Counter("ragfleet_gateway_asks_rejected_total", "Asks refused with RESOURCE_EXHAUSTED")


def ask_limiter(limit: int) -> AdmissionLimiter:
    return AdmissionLimiter(limit, in_flight=ASKS_IN_FLIGHT, rejected=ASKS_REJECTED, what="gateway: {} Asks",
                            setting="RAGFLEET_GATEWAY_MAX_IN_FLIGHT")
