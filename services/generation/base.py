"""The answerer interface both backends implement, and the events they stream.

    async for event in answerer.stream(prompt):
        Delta -> forward the text;  Done -> the last event, with finish reason and usage

Backends raise ``LLMUnavailable`` only before their first Delta (the servicer may then fall back) and
``LLMStreamError`` once text has flowed (never retried, never replaced: the caller already has part of an answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Protocol

if TYPE_CHECKING:
    from services.generation.prompt import Prompt

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    fallback_used: bool = False


Event = Delta | Done


class LLMUnavailable(Exception):
    """The LLM produced no token (after the bounded retries): safe to fall back or to report UNAVAILABLE."""


class LLMStreamError(Exception):
    """The LLM failed after text was sent: the answer is cut short and must not be retried."""


class Answerer(Protocol):
    name: str

    def stream(self, prompt: "Prompt") -> AsyncIterator[Event]:
        """Yield Delta events, then exactly one Done. Cancelling the iteration must stop upstream work."""
        ...

    async def close(self) -> None: ...
