"""Request validation for Generate: every check that can fail runs before the first response is sent."""

from __future__ import annotations

from services.generation.config import MAX_STOP_SEQUENCES, Limits
from services.runtime.errors import InvalidArgument, require
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
        require(bool(passage.text.strip()), f"passages[{i}].text: must not be empty")
    require(len(request.history) <= limits.max_history_turns,
            f"history: {len(request.history)} turns exceeds the limit of {limits.max_history_turns}")
    for i, turn in enumerate(request.history):
        require(turn.role in _ROLES, f"history[{i}].role: must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        require(bool(turn.content.strip()), f"history[{i}].content: must not be empty")
    _validate_params(request.params, limits)


def _validate_params(params: common_pb2.GenerationParams, limits: Limits) -> None:
    if params.HasField("temperature") and not 0.0 <= params.temperature <= 2.0:
        raise InvalidArgument(f"params.temperature: {params.temperature:g} is outside [0, 2]")
    if params.HasField("max_tokens") and not 1 <= params.max_tokens <= limits.max_tokens:
        raise InvalidArgument(f"params.max_tokens: {params.max_tokens} is outside [1, {limits.max_tokens}]")
    if params.HasField("top_p") and not 0.0 < params.top_p <= 1.0:
        raise InvalidArgument(f"params.top_p: {params.top_p:g} is outside (0, 1]")
    require(len(params.stop) <= MAX_STOP_SEQUENCES,
            f"params.stop: {len(params.stop)} sequences exceeds the limit of {MAX_STOP_SEQUENCES}")
    require(all(params.stop), "params.stop: sequences must not be empty")
