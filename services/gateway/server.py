"""Gateway process: config -> upstream clients, cache, conversation store, pipelines -> gRPC server."""

from __future__ import annotations

import logging

from services.gateway.admission import ask_limiter
from services.gateway.ask import AskPipeline
from services.gateway.auth import ApiKeyAuth
from services.gateway.chunker import load_tokenizer
from services.gateway.config import GatewayConfig
from services.gateway.conversations import ConversationStore
from services.gateway.ingest import Ingestor
from services.gateway.response_cache import ResponseCache
from services.gateway.servicer import GatewayServiceServicer
from services.gateway.upstreams import GenerationClient, RetrievalClient
from services.runtime import redis_client
from services.runtime.channels import ChannelPool
from services.runtime.embed_client import EmbedClient
from services.runtime.errors import ConfigError
from services.runtime.guard import KiB, MiB, utf8_bytes
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc
from services.runtime.serve import Binding, Service, Started

SERVICE = Service(gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"], GatewayConfig)
log = logging.getLogger("ragfleet.gateway")


# A larger corpus goes in several requests: `ragfleet ingest` sends batches of at most 2 MiB.
MAX_INGEST_BYTES = 16 * MiB


def request_limits(config: GatewayConfig) -> dict[str, int]:
    """Largest legitimate request per method, refused before parsing past it (services.runtime.guard). An Ask is a
    question of at most MAX_QUESTION_CHARS plus a few small fields."""
    return {"Ask": max(64 * KiB, utf8_bytes(config.ask.max_question_chars) + 32 * KiB),
            "Ingest": MAX_INGEST_BYTES, "DeleteDocuments": 1 * MiB}


async def build(config: GatewayConfig) -> Started:
    """Load the tokenizer (a RAGFLEET_GATEWAY_TOKENIZER_PATH that does not load is a ConfigError), wire the upstream
    clients, the response cache, the conversation store and the pipelines."""
    if config.server.workers > 1 and not config.redis_url:
        # Workers are replicas on one port: without Redis each would keep its own conversations and corpus version.
        raise ConfigError("RAGFLEET_GATEWAY_WORKERS > 1 needs RAGFLEET_REDIS_URL: the workers share conversations, "
                          "the corpus version and cached answers only through Redis")
    tokenizer = load_tokenizer(config.ingest.tokenizer_path)
    pool = ChannelPool()
    redis = redis_client.connect(config.redis_url) if config.redis_url else None
    embedding = EmbedClient(pool, config.embedding_address)
    retrieval = RetrievalClient(pool, config.retrieval_address)
    cache = ResponseCache(config.cache, redis)
    pipeline = AskPipeline(embedding=embedding, retrieval=retrieval,
                           generation=GenerationClient(pool, config.generation_address), cache=cache,
                           conversations=ConversationStore(config.conversations, redis,
                                                           prefix=config.cache.redis_prefix),
                           limits=config.ask, budgets=config.budgets)
    log.info("chunking with %s", tokenizer.name)
    ingestor = Ingestor(embedding=embedding, retrieval=retrieval, cache=cache, tokenizer=tokenizer,
                        config=config.ingest, budgets=config.budgets)
    servicer = GatewayServiceServicer(auth=ApiKeyAuth(config.api_keys), limiter=ask_limiter(config.ask.max_in_flight),
                                      pipeline=pipeline, ingestor=ingestor)

    async def close() -> None:
        await pool.close()
        await cache.close()  # the answers' Redis writes still in flight (each bounded by the cache budget), the mirror
        if redis is not None:
            await redis.aclose()

    # The API key is checked by the guard, from metadata, before the request is sized or parsed.
    return Started([Binding(SERVICE.full_name, gateway_pb2_grpc.add_GatewayServiceServicer_to_server, servicer,
                            max_request_bytes=request_limits(config), authenticator=servicer.authenticator)], close)
