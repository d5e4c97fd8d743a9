"""Generation service process: config -> tokenizers, answerers (offline extractive, optional LLM) -> gRPC server."""

from __future__ import annotations

import logging

from services.generation.config import GenerationConfig
from services.generation.extractive import ExtractiveAnswerer
from services.generation.prompt import PromptBuilder, TokenCounter
from services.generation.servicer import GenerationServiceServicer
from services.runtime.limits import FIELD_OVERHEAD, GENERATION_PARAMS_BYTES, chunk_bytes, text_bytes
from services.runtime.pb.ragfleet.v1 import generation_pb2, generation_pb2_grpc
from services.runtime.serve import Binding, Service, Started

SERVICE = Service(generation_pb2.DESCRIPTOR.services_by_name["GenerationService"], GenerationConfig)
log = logging.getLogger("ragfleet.generation")


def request_limits(config: GenerationConfig) -> dict[str, int]:
    """Largest legitimate Generate, every field at its limit (~117 MiB by default, so the server's MAX_MESSAGE_MB is
    the effective bound): refused unparsed past it (services.runtime.guard)."""
    lim = config.limits
    return {"Generate": text_bytes(lim.max_question_chars) + lim.max_passages * chunk_bytes(lim.max_passage_chars)
            + lim.max_history_turns * (text_bytes(lim.max_turn_chars) + 2 * FIELD_OVERHEAD)
            + GENERATION_PARAMS_BYTES}


async def build(config: GenerationConfig) -> Started:
    """Load the tokenizers, build the offline answerer and, when configured, the LLM client."""
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
    return Started([Binding(SERVICE.full_name, generation_pb2_grpc.add_GenerationServiceServicer_to_server, servicer,
                            max_request_bytes=request_limits(config))], llm.close if llm is not None else None)
