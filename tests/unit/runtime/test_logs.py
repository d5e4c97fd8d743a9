"""Structured logs: one JSON object per line that carries the active trace and span ids."""

from __future__ import annotations

import io
import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from services.runtime.logs import JsonFormatter, _TraceContextFilter


def _logger(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.addFilter(_TraceContextFilter())
    handler.setFormatter(JsonFormatter("gateway"))
    logger = logging.getLogger("ragfleet.test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_log_lines_carry_the_trace_id_inside_a_span() -> None:
    stream = io.StringIO()
    logger = _logger(stream)
    tracer = TracerProvider().get_tracer("test")  # a local provider: the global one belongs to the process
    with tracer.start_as_current_span("ask") as span:
        logger.info("answered", extra={"fields": {"tokens": 12}})
        context = span.get_span_context()
    logger.warning("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert (inside["service"], inside["level"], inside["msg"], inside["tokens"]) == ("gateway", "INFO", "answered", 12)
    assert "trace_id" not in outside and outside["level"] == "WARNING"


def test_exceptions_are_one_json_line() -> None:
    stream = io.StringIO()
    logger = _logger(stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    (line,) = stream.getvalue().splitlines()
    assert "RuntimeError: boom" in json.loads(line)["exc"]
