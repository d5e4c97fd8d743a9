"""The SSE decoder the answerer reads LLM streams with: the spec's line and event rules, reads split anywhere,
[DONE], error events and malformed data."""

from __future__ import annotations

import json

import pytest

from services.generation.sse import ErrorEvent, MalformedEvent, SSEDecoder, decode_data, is_done

STREAM = (b": keep-alive comment\n"
          b"data: {\"a\": 1}\n\n"
          b"event: delta\n"
          b"data: {\"b\":\n"
          b"data:  2}\n"
          b"id: 7\n"
          b"retry: 100\n"
          b"unknown: field\n\n"
          b"data\n\n"
          b"\n\n"
          b"data: [DONE]\n\n")
EXPECTED = [("message", b'{"a": 1}'), ("delta", b'{"b":\n 2}'), ("message", b""), ("message", b"[DONE]")]


def feed_all(pieces, decoder: SSEDecoder | None = None) -> list[tuple[str, bytes]]:
    decoder = decoder or SSEDecoder()
    return [event for piece in pieces for event in decoder.feed(piece)]


def test_whole_stream_in_one_read():
    assert feed_all([STREAM]) == EXPECTED


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_ends(newline):
    assert feed_all([STREAM.replace(b"\n", newline)]) == EXPECTED


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_reads_split_anywhere_give_the_same_events(newline):
    stream = STREAM.replace(b"\n", newline)
    assert feed_all([stream[i:i + 1] for i in range(len(stream))]) == EXPECTED  # byte by byte
    for cut in range(1, len(stream)):
        assert feed_all([stream[:cut], stream[cut:]]) == EXPECTED, cut


def test_multi_line_data_joins_with_lf_and_parses():
    [(event, data)] = feed_all([b'data: {"choices":\ndata: [{"delta": {"content": "hi"}}]}\n\n'])
    assert decode_data(event, data) == {"choices": [{"delta": {"content": "hi"}}]}


def test_field_without_space_and_value_with_colons():
    assert feed_all([b"data:x: y\n\ndata:  two spaces\n\n"]) == [("message", b"x: y"), ("message", b" two spaces")]


def test_an_event_cut_by_the_end_of_the_body_is_not_dispatched():
    decoder = SSEDecoder()
    assert feed_all([b'data: {"a": 1}\n\ndata: {"b"', b": 2}\n"], decoder) == [("message", b'{"a": 1}')]


def test_leading_bom_is_ignored():
    assert feed_all([b"\xef\xbb\xbfdata: 1\n\n"]) == [("message", b"1")]


def test_done_sentinel():
    assert is_done(b"[DONE]") and not is_done(b'{"done": true}')


def test_keep_alive_without_data_is_skipped():
    assert decode_data("message", b"") is None


def test_chunk_decodes_to_a_plain_dict():
    chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hé"}, "finish_reason": None}],
             "usage": None}
    assert decode_data("message", json.dumps(chunk).encode()) == chunk


def test_data_with_an_error_object_raises_error_event():
    with pytest.raises(ErrorEvent, match="model overloaded") as info:
        decode_data("message", b'{"error": {"message": "model overloaded", "type": "server_error"}}')
    assert info.value.body == {"message": "model overloaded", "type": "server_error"}


def test_error_event_type_raises_even_without_an_error_key():
    with pytest.raises(ErrorEvent, match="rate limited"):
        decode_data("error", b'{"message": "rate limited"}')
    with pytest.raises(ErrorEvent, match="plain text failure"):
        decode_data("error", b"plain text failure")
    with pytest.raises(ErrorEvent, match="An error occurred during streaming"):
        decode_data("error", b'{"code": 500}')


@pytest.mark.parametrize("data", [b'{"choices": [', b"not json", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_malformed_data_raises(data):
    with pytest.raises(MalformedEvent):
        decode_data("message", data)


def test_oversized_event_or_line_raises():
    decoder = SSEDecoder(max_event_bytes=64)
    with pytest.raises(MalformedEvent):
        feed_all([b"data: " + b"x" * 40 + b"\n", b"data: " + b"y" * 40 + b"\n"], decoder)
    with pytest.raises(MalformedEvent):
        feed_all([b"data: " + b"x" * 40, b"y" * 40], SSEDecoder(max_event_bytes=64))
