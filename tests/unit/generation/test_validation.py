"""Bad Generate requests are refused with INVALID_ARGUMENT-class errors that name the field and the limit."""

from __future__ import annotations

import pytest

from services.generation.config import Limits
from services.generation.validation import number_passages, validate
from services.runtime.errors import InvalidArgument
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2

LIMITS = Limits(max_question_chars=50, max_passages=2, max_history_turns=2, max_tokens=100)
P = common_pb2.Passage


def req(**kw) -> generation_pb2.GenerateRequest:
    kw.setdefault("question", "why?")
    return generation_pb2.GenerateRequest(**kw)


@pytest.mark.parametrize("request_, message", [
    (req(question="  "), "question: must not be empty"),
    (req(question="x" * 51), "question: 51 characters exceeds the limit of 50"),
    (req(passages=[P(number=1, text="a"), P(number=2, text="b"), P(number=3, text="c")]),
     "passages: 3 passages exceeds the limit of 2"),
    (req(passages=[P(number=1, text="a"), P(number=1, text="b")]), r"passages\[1\].number: 1 is used twice"),
    (req(passages=[P(number=1, text="a"), P(number=0, text="b")]), r"passages\[1\].number: must be >= 1"),
    (req(passages=[P(number=1, text=" ")]), r"passages\[0\].text: must not be empty"),
    (req(history=[common_pb2.ChatTurn(role=common_pb2.ROLE_USER, content="hi")] * 3),
     "history: 3 turns exceeds the limit of 2"),
    (req(history=[common_pb2.ChatTurn(content="hi")]), r"history\[0\].role"),
    (req(history=[common_pb2.ChatTurn(role=common_pb2.ROLE_USER)]), r"history\[0\].content: must not be empty"),
    (req(params=common_pb2.GenerationParams(temperature=2.5)), r"params.temperature: 2.5 is outside \[0, 2\]"),
    (req(params=common_pb2.GenerationParams(max_tokens=0)), r"params.max_tokens: 0 is outside \[1, 100\]"),
    (req(params=common_pb2.GenerationParams(max_tokens=101)), r"params.max_tokens: 101 is outside \[1, 100\]"),
    (req(params=common_pb2.GenerationParams(top_p=0)), r"params.top_p: 0 is outside \(0, 1\]"),
    (req(params=common_pb2.GenerationParams(stop=["a", "b", "c", "d", "e"])),
     "params.stop: 5 sequences exceeds the limit of 4"),
])
def test_rejects(request_, message):
    number_passages(request_)
    with pytest.raises(InvalidArgument, match=message):
        validate(request_, LIMITS)


def test_accepts_and_numbers_unnumbered_passages():
    request = req(passages=[P(text="a"), P(text="b")], params=common_pb2.GenerationParams(max_tokens=100))
    number_passages(request)
    validate(request, LIMITS)
    assert [p.number for p in request.passages] == [1, 2]
