"""EmbeddingService gRPC handlers: validate, embed through the pipeline, annotate the RPC span."""

from __future__ import annotations

import grpc
import numpy as np
from opentelemetry import trace

from services.embedding.embedder import EmbedResult, Embedder
from services.runtime.errors import InvalidArgument
from services.runtime.pb.ragfleet.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc

SERVICE_NAME = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
# Read once: InputType.values() builds a new list on every call.
_INPUT_TYPES = frozenset(common_pb2.InputType.values())


class EmbeddingServiceServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, embedder: Embedder, *, max_texts: int, max_text_chars: int) -> None:
        self.embedder = embedder
        self.max_texts = max_texts
        self.max_text_chars = max_text_chars

    def validate(self, request: embedding_pb2.EmbedRequest) -> None:
        count = len(request.texts)
        if count == 0:
            raise InvalidArgument("texts: at least one text is required")
        if count > self.max_texts:
            raise InvalidArgument(f"texts: {count} texts in one request; the maximum is {self.max_texts}")
        if request.input_type not in _INPUT_TYPES:
            raise InvalidArgument(f"input_type: unknown value {request.input_type}")
        for index, text in enumerate(request.texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{index}]: empty text (only whitespace or nothing)")
            if len(text) > self.max_text_chars:
                raise InvalidArgument(f"texts[{index}]: {len(text)} characters; the maximum is "
                                      f"{self.max_text_chars}")

    async def Embed(self, request: embedding_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> embedding_pb2.EmbedResponse:
        self.validate(request)
        # Queries and unspecified share one cache space; documents get their own (asymmetric remote models).
        input_type = request.input_type or common_pb2.INPUT_TYPE_QUERY
        result = await self.embedder.embed(request.texts, input_type, bypass_cache=request.bypass_cache)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(_span_attributes(len(request.texts), result))
        # Each vector straight to a list (no stacked copy of them all first: most requests hold one text).
        return embedding_pb2.EmbedResponse(
            model=self.embedder.model_id,
            dimension=self.embedder.dimension,
            embeddings=[embedding_pb2.Embedding(values=np.asarray(item.vector, dtype=np.float32).tolist(),
                                                cached=item.cached, token_count=item.token_count,
                                                truncated=item.truncated)
                        for item in result.items],
        )


def _span_attributes(texts: int, result: EmbedResult) -> dict[str, int | float]:
    """What one Embed did, for its span: every attribute costs each span a few microseconds to record and more to
    export, so a count that is zero is left out (absent means 0: the cache levels, single-flight joins) and so are
    the sums a reader can add up (hits = l1 + l2); the batch figures only when this request computed something."""
    attributes: dict[str, int | float] = {"ragfleet.embedding.texts": texts}
    for name, count in (("cache_hits_l1", result.l1_hits), ("cache_hits_l2", result.l2_hits),
                        ("single_flight_joins", result.joined), ("computed", result.computed)):
        if count:
            attributes[f"ragfleet.embedding.{name}"] = count
    if result.max_batch_size:
        attributes["ragfleet.embedding.batch_size"] = result.max_batch_size
        attributes["ragfleet.embedding.queue_wait_ms"] = round(result.max_queue_wait * 1000, 3)
    return attributes
