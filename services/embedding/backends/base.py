"""The one interface every embedding backend implements; the batcher and the servicer see nothing else.

    backend = OnnxBackend(config.onnx)          # or RemoteEmbeddingBackend(config.openai)
    await backend.start()
    items = backend.prepare(["a query"])        # token counts for batching; large requests call it off the loop
    vectors = await backend.embed(items)        # (len(items), backend.dimension) float32, L2-normalised
    await backend.embed_each(take, put)         # per-text backends: texts taken one by one, each vector put at once
    await backend.close()
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class PreparedText:
    """A text ready for the model. `tokens` is backend-private (token ids for ONNX, None for remote)."""

    text: str
    token_count: int
    truncated: bool
    tokens: Any = None


class EmbeddingBackend(abc.ABC):
    """Turns prepared texts into L2-normalised float32 vectors. Implementations must be safe to call from one
    event loop with up to `max_in_flight` `embed` calls at once."""

    model_id: str
    dimension: int
    #: Most texts one `embed` call takes; the batcher never exceeds it.
    max_batch_size: int
    #: How many `embed` calls may run at once: 1 for a local model that owns the CPU, more for a remote server.
    max_in_flight: int = 1
    #: The model's input limit in tokens (texts above it are truncated or rejected).
    max_tokens: int
    #: True when a batch costs its padded tokens (a local model pads every text to the batch's longest), so the
    #: batcher keeps texts of unequal length apart; False when the endpoint prices each text alone (a remote API).
    pads_batches: bool = True
    #: True when an `embed` call carries a fixed cost worth sharing (an HTTP round trip, one padded model run), so
    #: the batcher merges texts into fewer calls; False when a call costs just the sum of its texts (a local model
    #: running each text alone), so the batcher feeds every call slot the oldest queued text whenever it is free
    #: (`embed_each`) instead of piling a burst into one call while another slot, and its core, sits idle.
    shares_call_cost: bool = True

    @property
    def input_limit(self) -> str:
        """The limit `prepare` flags texts against, worded for the caller's error message."""
        return f"{self.max_tokens} tokens"

    async def start(self) -> None:
        """Load or connect; called once before serving."""

    @abc.abstractmethod
    def prepare(self, texts: Sequence[str]) -> list[PreparedText]:
        """Tokenize (or estimate tokens) so the batcher can budget and group by length. Must be fast and
        thread-safe: small requests call it on the event loop, large ones in a worker thread (see embedder)."""

    @abc.abstractmethod
    async def embed(self, items: Sequence[PreparedText]) -> np.ndarray:
        """One model batch. Raises services.runtime.errors.Unavailable when the model or endpoint fails."""

    async def embed_each(self, take: Callable[[], PreparedText | None],
                         put: Callable[[np.ndarray | Exception], None]) -> None:
        """Embed texts one after another until `take` returns None, handing each text's vector (or its failure) to
        `put` as soon as it is done, in the order taken; a failure fails only its own text. For backends whose
        call costs just the sum of its texts (`shares_call_cost` False): the batcher then commits no text to a
        call before the call is ready for it. An implementation may call `take` and `put` from its own thread
        (they are thread-safe), so a run of texts costs one hand-off, not one per text. Default: one `embed` call
        per text on the event loop."""
        while (item := take()) is not None:
            try:
                vectors = await self.embed([item])
            except Exception as exc:  # noqa: BLE001 - the text's caller gets it
                put(exc)
            else:
                put(vectors[0])

    async def close(self) -> None:
        """Release threads and connections."""


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.clip(norms, 1e-12, None)).astype(np.float32, copy=False)
