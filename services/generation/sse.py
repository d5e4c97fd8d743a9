"""Server-sent events of an LLM stream: raw body bytes in, one dict per JSON data event out.

The openai SDK builds a pydantic model for every streamed chunk, which at thousands of chunks per second was most of
the generation process's CPU. The answerer needs three fields of each chunk, so it reads the raw body through the SDK
and decodes the events here: a line splitter and one json.loads per event, nothing per field.

Decoding follows the SSE spec (html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in LF, CRLF or CR, also when split across reads; a blank line dispatches the event; several ``data:`` lines
join with LF; ``:`` lines are comments; ``event:`` names the event; ``id:``, ``retry:`` and unknown fields are ignored
(nothing reconnects); an event that the body's end cuts before its blank line is dropped.

    decoder = SSEDecoder()
    for event, data in decoder.feed(raw_bytes):
        if is_done(data): ...
        chunk = decode_data(event, data)      # dict; raises ErrorEvent / MalformedEvent
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_MAX_EVENT_BYTES = 4 * 1024 * 1024  # a chat chunk is ~200 bytes; this only stops a broken peer growing memory
_BOM = b"\xef\xbb\xbf"


class SSEError(Exception):
    """The event stream itself is unusable."""


class MalformedEvent(SSEError, ValueError):
    """An event's data is not a JSON object, or an event grew past the size limit: a broken peer, not retried."""


class ErrorEvent(SSEError):
    """The server reported an error inside the stream (an ``error`` event, or data carrying an ``error`` object)."""

    def __init__(self, message: str, body: object) -> None:
        super().__init__(message)
        self.message = message
        self.body = body


class SSEDecoder:
    """Incremental decoder: feed() each network read, get the events it completed as (event type, data bytes)."""

    __slots__ = ("_partial", "_partial_bytes", "_skip_lf", "_started", "_event", "_data", "_data_bytes", "_max")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._partial: list[bytes] = []  # pieces of a line whose end has not arrived yet
        self._partial_bytes = 0
        self._skip_lf = False  # the last read ended in CR: an LF opening the next read ends the same line
        self._started = False
        self._event = b""  # the event type being built (empty = "message")
        self._data: list[bytes] = []  # its data lines
        self._data_bytes = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        if not self._started:
            if not chunk:
                return []
            self._started = True
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not chunk:
            return []
        if self._partial:
            if b"\n" not in chunk and b"\r" not in chunk:
                self._hold(chunk)
                return []
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            self._partial.clear()
            self._partial_bytes = 0
        lines = chunk.splitlines()  # bytes.splitlines splits on exactly LF, CRLF and CR
        last = chunk[-1]
        if last == 13:
            self._skip_lf = True
        elif last != 10:
            self._hold(lines.pop())
        events: list[tuple[str, bytes]] = []
        for line in lines:
            if line.startswith(b"data: "):  # the common case first
                self._add_data(line[6:])
            elif not line:
                if self._data:
                    events.append(self._dispatch())
                else:
                    self._event = b""
            elif line[0] == 58:  # ':' starts a comment (servers send them as keep-alives)
                continue
            else:
                field, colon, value = line.partition(b":")
                if colon and value.startswith(b" "):
                    value = value[1:]
                if field == b"data":
                    self._add_data(value)
                elif field == b"event":
                    self._event = value
        return events

    def _add_data(self, value: bytes) -> None:
        self._data.append(value)
        self._data_bytes += len(value) + 1
        if self._data_bytes > self._max:
            raise MalformedEvent(f"SSE event larger than {self._max} bytes")

    def _hold(self, piece: bytes) -> None:
        self._partial.append(piece)
        self._partial_bytes += len(piece)
        if self._partial_bytes > self._max:
            raise MalformedEvent(f"SSE line longer than {self._max} bytes")

    def _dispatch(self) -> tuple[str, bytes]:
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        event = self._event.decode("utf-8", "replace") if self._event else "message"
        self._data = []
        self._data_bytes = 0
        self._event = b""
        return event, data


def is_done(data: bytes) -> bool:
    """OpenAI's end-of-stream sentinel (``data: [DONE]``), matched as the SDK matches it."""
    return data.startswith(b"[DONE]")


def decode_data(event: str, data: bytes) -> dict[str, Any] | None:
    """The event's JSON object; None for an event without data (a keep-alive). Raises ErrorEvent, MalformedEvent."""
    try:
        value = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        if not data.strip():
            return None
        if event == "error":
            raise ErrorEvent(data.decode("utf-8", "replace")[:500], data) from None
        raise MalformedEvent(f"SSE data is not JSON ({exc}): {data[:200]!r}") from None
    if event == "error" or (isinstance(value, dict) and value.get("error")):
        raise ErrorEvent(_error_message(value), value.get("error", value) if isinstance(value, dict) else value)
    if not isinstance(value, dict):
        raise MalformedEvent(f"SSE data is not a JSON object: {data[:200]!r}")
    return value


def _error_message(value: object) -> str:
    """The error's message as the SDK reads it: data.error.message (or data.message), else a generic one."""
    if isinstance(value, dict):
        error = value.get("error", value)
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            return message
    return "An error occurred during streaming"
