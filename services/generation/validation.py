"""Request validation for Generate: every check that can fail runs before the first response is sent, and before
any tokenising (pure Python, on the event loop), so an oversized passage costs a length check, not a stall."""

from __future__ import annotations

from services.generation.config import Limits
from services.runtime.errors import require
from services.runtime.limits import (MAX_CHUNK_ID_CHARS, MAX_DOC_ID_CHARS, MAX_TITLE_CHARS,
                                     check_generation_params, check_metadata, check_text)
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2

_ROLES = (common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)


def number_passages(request: generation_pb2.GenerateRequest) -> None:
    """Passages sent without numbers (all 0) are numbered 1..n in the order given."""
    if request.passages and all(p.number == 0 for p in request.passages):
        for i, passage in enumerate(request.passages, start=1):
            passage.number = i


def validate(request: generation_pb2.GenerateRequest, limits: Limits) -> None:
    question = request.question.strip()
    require(bool(question), "question: must not be empty")
    require(len(question) <= limits.max_question_chars,
            f"question: {len(question)} characters exceeds the limit of {limits.max_question_chars}")
    require(len(request.passages) <= limits.max_passages,
            f"passages: {len(request.passages)} passages exceeds the limit of {limits.max_passages}")
    seen: set[int] = set()
    for i, passage in enumerate(request.passages):
        require(passage.number >= 1, f"passages[{i}].number: must be >= 1 (or leave every number 0 to number "
                                     f"them in order), got {passage.number}")
        require(passage.number not in seen, f"passages[{i}].number: {passage.number} is used twice")
        seen.add(passage.number)
        check_text(passage.text, f"passages[{i}].text", limits.max_passage_chars)
        require(bool(passage.text.strip()), f"passages[{i}].text: must not be empty")
        check_text(passage.title, f"passages[{i}].title", MAX_TITLE_CHARS)
        check_text(passage.doc_id, f"passages[{i}].doc_id", MAX_DOC_ID_CHARS)
        check_text(passage.chunk_id, f"passages[{i}].chunk_id", MAX_CHUNK_ID_CHARS)
        check_metadata(passage.metadata, f"passages[{i}].metadata")
    require(len(request.history) <= limits.max_history_turns,
            f"history: {len(request.history)} turns exceeds the limit of {limits.max_history_turns}")
    for i, turn in enumerate(request.history):
        require(turn.role in _ROLES, f"history[{i}].role: must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        check_text(turn.content, f"history[{i}].content", limits.max_turn_chars)
        require(bool(turn.content.strip()), f"history[{i}].content: must not be empty")
    check_generation_params(request.params, max_tokens=limits.max_tokens)

