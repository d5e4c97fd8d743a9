"""GenerationService: validate, admit, assemble the prompt, then stream the answer (coalesced) and a final summary.

Failure contract seen by callers:
  bad request               -> INVALID_ARGUMENT before any message
  too many calls in flight  -> RESOURCE_EXHAUSTED at once
  LLM down before any token -> the extractive answer (fallback_used=true) when FALLBACK is on, else UNAVAILABLE
                               naming the LLM
  LLM breaks mid-stream     -> the deltas already sent, then UNAVAILABLE (never retried: text was already sent)
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import AsyncIterator

import grpc

from services.generation import metrics
from services.generation.base import FINISH_LENGTH, Answerer, Delta, Done, Event, LLMStreamError, LLMUnavailable
from services.generation.coalesce import Coalescer
from services.generation.config import GenerationConfig
from services.generation.prompt import Prompt, PromptBuilder
from services.generation.validation import number_passages, validate
from services.runtime.admission import AdmissionLimiter
from services.runtime.errors import Unavailable
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2, generation_pb2_grpc

log = logging.getLogger("ragfleet.generation")

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


def finished_message(done: Done, prompt: Prompt) -> generation_pb2.GenerateResponse:
    reason = common_pb2.FINISH_REASON_LENGTH if done.finish_reason == FINISH_LENGTH else common_pb2.FINISH_REASON_STOP
    usage = common_pb2.Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                             total_tokens=done.prompt_tokens + done.completion_tokens)
    return generation_pb2.GenerateResponse(finished=generation_pb2.GenerationFinished(
        finish_reason=reason, usage=usage, model=done.model, fallback_used=done.fallback_used,
        passages_used=prompt.passages_used))


class GenerationServiceServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, config: GenerationConfig, *, answerer: Answerer, offline: Answerer,
                 prompts: PromptBuilder) -> None:
        self._config = config
        self._answerer = answerer
        # Falling back to the same offline answerer that just failed would be pointless.
        self._fallback = offline if config.fallback and answerer is not offline else None
        self._prompts = prompts
        self._admission = AdmissionLimiter(config.limits.max_concurrent, in_flight=metrics.ACTIVE,
                                           rejected=metrics.REJECTED, what="generation: {} streams",
                                           setting="RAGFLEET_GENERATION_MAX_CONCURRENT")
        metrics.ADMISSION_LIMIT.set(config.limits.max_concurrent)

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        # One generator from the answerer's events to gRPC (no inner generator re-yielding each message): every
        # layer is a switch per streamed token.
        number_passages(request)
        validate(request, self._config.limits)
        with self._admission.admitted():
            loop = asyncio.get_running_loop()
            started = loop.time()
            prompt = await self._prompts.build(request)
            remaining = context.time_remaining()  # read after the build (which may call a summariser): it is now
            if remaining is not None:
                prompt.deadline = loop.time() + remaining
                if self._fallback is not None:
                    # The LLM gets the deadline less the reserve: a hung LLM leaves the fallback time to answer.
                    prompt.fallback_reserve = self._config.fallback_reserve
            metrics.PASSAGES_DROPPED.inc(len(request.passages) - len(prompt.passages))
            if prompt.history_dropped:
                metrics.HISTORY_TURNS_DROPPED.labels("summarised" if prompt.history_summarised else "dropped").inc(
                    prompt.history_dropped)
            first = True
            coalesce = self._config.coalesce
            # Without a fallback the answerer's own stream is the source: _answer only exists to switch answerers.
            source = self._answer(prompt) if self._fallback is not None else self._answerer.stream(prompt)
            response, text_delta = generation_pb2.GenerateResponse, common_pb2.TextDelta
            try:
                async with Coalescer(source, max_bytes=coalesce.max_bytes, max_delay=coalesce.max_delay,
                                     window=coalesce.window) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            if first:
                                first = False
                                metrics.TIME_TO_FIRST_TOKEN.labels(self._answerer.name).observe(loop.time() - started)
                            yield response(delta=text_delta(text=event.text))
                        else:
                            backend = "fallback" if event.fallback_used else self._answerer.name
                            metrics.TOKENS.labels("prompt", backend).inc(event.prompt_tokens)
                            metrics.TOKENS.labels("completion", backend).inc(event.completion_tokens)
                            yield finished_message(event, prompt)
            except (LLMUnavailable, LLMStreamError) as exc:
                raise Unavailable(str(exc)) from exc

    async def _answer(self, prompt: Prompt) -> AsyncIterator[Event]:
        try:
            async for event in self._answerer.stream(prompt):
                yield event
        except LLMUnavailable as exc:
            # Raised only before the first delta, so switching answerers cannot mix two answers.
            if self._fallback is None:
                raise
            log.warning("LLM unavailable, answering offline: %s", exc)
            metrics.FALLBACKS.inc()
            async for event in self._fallback.stream(prompt):
                yield replace(event, fallback_used=True) if isinstance(event, Done) else event
