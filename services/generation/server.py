"""Run the generation service: `python -m services.generation` or `ragfleet serve generation`."""

from __future__ import annotations

import logging
import sys
from typing import Awaitable, Callable, Sequence

from services.generation.config import GenerationConfig
from services.generation.extractive import ExtractiveAnswerer
from services.generation.prompt import PromptBuilder, TokenCounter
from services.generation.servicer import SERVICE_NAME, GenerationServiceServicer
from services.runtime.errors import ConfigError
from services.runtime.guard import KiB, utf8_bytes
from services.runtime.pb.ragfleet.v1 import generation_pb2_grpc
from services.runtime.serve import Binding, bootstrap, serve

log = logging.getLogger("ragfleet.generation")


# Room per passage (a retrieved chunk) and per history turn (a question or an answer of up to MAX_TOKENS_LIMIT).
PASSAGE_BYTES = 32 * KiB
TURN_BYTES = 32 * KiB


def request_limits(config: GenerationConfig) -> dict[str, int]:
    """Largest legitimate Generate (defaults: ~9.4 MiB): refused unparsed past it (services.runtime.guard)."""
    lim = config.limits
    return {"Generate": utf8_bytes(lim.max_question_chars) + lim.max_passages * PASSAGE_BYTES
            + lim.max_history_turns * TURN_BYTES + 4 * KiB}


async def build(config: GenerationConfig) -> tuple[Sequence[Binding], Callable[[], Awaitable[None]] | None]:
    # Load every tokenizer now (~0.2 s each) rather than on the first request.
    counter = TokenCounter(sorted({config.defaults.encoding, *(m.encoding for m in config.models.values())}))
    offline = ExtractiveAnswerer(counter)
    llm = None
    if config.llm is not None:
        # Imported only when used: the openai package alone costs ~1 s of start-up.
        from services.generation.llm import OpenAIAnswerer

        llm = OpenAIAnswerer(config.llm, counter)
        if config.llm.max_connections < config.limits.max_concurrent:
            log.warning("RAGFLEET_GENERATION_MAX_CONNECTIONS (%d) < MAX_CONCURRENT (%d): admitted streams beyond %d "
                        "wait inside the HTTP client for a connection, and their time to first token grows",
                        config.llm.max_connections, config.limits.max_concurrent, config.llm.max_connections)
    summariser = llm.summarise if llm is not None and config.llm and config.llm.summary_model else None
    prompts = PromptBuilder(config, counter, summariser=summariser)
    servicer = GenerationServiceServicer(config, answerer=llm or offline, offline=offline, prompts=prompts)
    log.info("generation backend: %s", f"LLM at {config.llm.base_url}" if config.llm else "offline extractive",
             extra={"fields": {"fallback": config.fallback, "model": config.default_model}})
    binding = Binding(SERVICE_NAME, generation_pb2_grpc.add_GenerationServiceServicer_to_server, servicer,
                      max_request_bytes=request_limits(config))
    return [binding], (llm.close if llm is not None else None)


def main() -> int:
    try:
        config = GenerationConfig.from_env()
    except ConfigError as exc:
        print(f"generation: configuration error: {exc}", file=sys.stderr)
        return 2
    bootstrap(config.server)
    serve(config.server, lambda: build(config))
    return 0
