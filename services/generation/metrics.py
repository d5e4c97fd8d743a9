"""Prometheus metrics of the generation service (module level, so each exists once per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TIME_TO_FIRST_TOKEN = Histogram(
    "ragfleet_generation_time_to_first_token_seconds", "Request received -> first delta sent", ["backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10))
LLM_ATTEMPTS = Counter("ragfleet_generation_llm_attempts_total", "LLM calls by outcome before the first token",
                       ["outcome"])
LLM_STREAM_ERRORS = Counter("ragfleet_generation_llm_stream_errors_total", "LLM streams broken after tokens flowed")
FALLBACKS = Counter("ragfleet_generation_fallbacks_total", "Answers produced offline because the LLM failed")
TOKENS = Counter("ragfleet_generation_tokens_total", "Tokens by kind (prompt, completion) and backend",
                 ["kind", "backend"])
DELTAS_COALESCED = Counter("ragfleet_generation_deltas_coalesced_total",
                           "Deltas merged into an earlier message (the coalescing window, or a lagging consumer)")
HISTORY_TURNS_DROPPED = Counter("ragfleet_generation_history_turns_dropped_total",
                                "Turns dropped (or summarised) to fit the history budget", ["how"])
PASSAGES_DROPPED = Counter("ragfleet_generation_passages_dropped_total", "Passages left out by the token budget")
# Summed over a pod's workers (runtime/workers.py), each admitting MAX_CONCURRENT: the HPA's ratio stays right.
ACTIVE = Gauge("ragfleet_generation_active_streams", "Generate calls in progress", multiprocess_mode="livesum")
# RAGFLEET_GENERATION_MAX_CONCURRENT: the HPA scales on active_streams / admission_limit per pod.
ADMISSION_LIMIT = Gauge("ragfleet_generation_admission_limit", "Most Generate calls admitted at once (MAX_CONCURRENT)",
                        multiprocess_mode="livesum")
REJECTED = Counter("ragfleet_generation_rejected_total", "Generate calls refused at admission (overload)")
