"""Any OpenAI-compatible `/v1/embeddings` endpoint through the `openai` package.

One AsyncOpenAI client per process (its HTTP connection pool is reused by every call), a timeout per call, bounded
retries on transient failures (connection errors, timeouts, 408/409/429 and 5xx; ``services.runtime.retry``), batches capped at `max_batch_size` texts, at most `max_in_flight` calls at once, and every answer checked:
one vector per input, in input order, of the configured dimension. The remote model does its own tokenization, so
token counts here are estimates used only for batching; the input limit is checked by characters (see `prepare`).
An endpoint refusing the input itself (400/413/422) is the caller's INVALID_ARGUMENT with the endpoint's message,
not UNAVAILABLE: retrying cannot help, and the batcher retries the batch's texts apart so one bad text fails alone.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any, Sequence

import httpx2
import numpy as np
import openai

from services.embedding.backends.base import EmbeddingBackend, PreparedText, l2_normalise
from services.embedding.config import OpenAIConfig
from services.runtime.errors import InvalidArgument, Unavailable
from services.runtime.openai_client import openai_client
from services.runtime.retry import RetryPolicy

log = logging.getLogger("ragfleet.embedding.remote")

REMOTE_MAX_TOKENS = 8191
_CHARS_PER_TOKEN = 4
# The endpoint refused the request's content (too long, malformed text). Other 4xx (401/403/404...) mean our key,
# URL or model name is wrong: a server problem the caller cannot fix, so they stay UNAVAILABLE.
_BAD_INPUT_STATUS = {400, 413, 422}

_client: openai.AsyncOpenAI | None = None
_client_key: tuple | None = None


def shared_client(config: OpenAIConfig) -> openai.AsyncOpenAI:
    """The process's one AsyncOpenAI client; its pool holds one connection per call allowed in flight."""
    global _client, _client_key
    key = (config.base_url, config.api_key, config.timeout_seconds, config.max_in_flight)
    if _client is None or _client_key != key:
        _client = openai_client(base_url=config.base_url, api_key=config.api_key, timeout=config.timeout_seconds,
                                max_connections=config.max_in_flight)
        _client_key = key
    return _client


def refuses_input(exc: Exception) -> bool:
    return isinstance(exc, openai.APIStatusError) and exc.status_code in _BAD_INPUT_STATUS


def endpoint_message(exc: openai.APIStatusError) -> str:
    """The endpoint's own explanation (OpenAI's error.message), else the SDK's summary of the response."""
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return exc.message


def decode(embedding: object) -> np.ndarray:
    """One vector from the wire: base64 float32 (as asked) or a float list (servers that ignore encoding_format)."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype=np.float32)
    return np.asarray(embedding, dtype=np.float32)


class RemoteEmbeddingBackend(EmbeddingBackend):
    pads_batches = False  # the endpoint tokenizes and prices each text itself: merging never adds padding here

    def __init__(self, config: OpenAIConfig) -> None:
        if not config.base_url:
            raise ValueError("the openai embedding backend needs a base URL")
        self.config = config
        self.model_id = config.model
        self.dimension = config.dimension
        self.max_batch_size = config.max_batch_size
        self.max_in_flight = config.max_in_flight
        self.max_tokens = REMOTE_MAX_TOKENS
        self._client = shared_client(config)
        # A server asking for a longer wait than one call's whole timeout: giving up answers sooner.
        self.retry = RetryPolicy(max_retries=config.max_retries, max_server_wait=config.timeout_seconds)

    @property
    def input_limit(self) -> str:
        return f"{self.max_tokens} characters (a safe bound for the endpoint's {self.max_tokens}-token limit)"

    def prepare(self, texts: Sequence[str]) -> list[PreparedText]:
        """Flag (and cut) texts over `max_tokens` CHARACTERS, so truncation or rejection happens here instead of
        the endpoint failing the whole batch. Without the endpoint's tokenizer, each character counts as up to one
        token: a conservative estimate (a CJK character is about one token; English ~4 characters per one, so
        long English texts are cut earlier than the endpoint would). Emoji and rare symbols can take several
        tokens each; the endpoint's 400 still catches those, for that text alone. `token_count` stays the usual
        ~4 characters per token: it only budgets batches."""
        items = []
        for text in texts:
            over = len(text) > self.max_tokens
            if over:
                text = text[:self.max_tokens]
            items.append(PreparedText(text, max(1, len(text) // _CHARS_PER_TOKEN), over))
        return items

    async def embed(self, items: Sequence[PreparedText]) -> np.ndarray:
        texts = [item.text for item in items]
        # base64 float32 is ~4x smaller than JSON floats and decodes in numpy; a server that ignores it sends lists.
        body = {"model": self.config.model, "input": texts, "encoding_format": "base64"}
        attempt = 0
        while True:
            attempt += 1
            try:
                # The SDK's generic POST (auth, base URL, timeout, pool, status errors -> APIStatusError) with the raw
                # body back: embeddings.create's parameter transform and pydantic response models cost ~1.3 ms of
                # CPU per call.
                response = await self._client.post("/embeddings", body=body, cast_to=httpx2.Response)
                return self._check(json.loads(response.content), len(texts))
            except Exception as exc:  # noqa: BLE001 - classified below
                if refuses_input(exc):
                    raise InvalidArgument(self._refusal(texts, exc)) from exc
                delay = self.retry.delay(exc, attempt)
                if delay is None:
                    raise Unavailable(f"embedding endpoint {self.config.base_url} failed: "
                                      f"{type(exc).__name__}: {exc}") from exc
                log.info("embedding call failed (%s); retry %d in %.0f ms", type(exc).__name__, attempt,
                         delay * 1000)
                await asyncio.sleep(delay)

    def _refusal(self, texts: Sequence[str], exc: openai.APIStatusError) -> str:
        what = f"the text {texts[0][:40]!r}..." if len(texts) == 1 else f"a batch of {len(texts)} texts"
        return (f"texts: the embedding endpoint refused {what} with HTTP {exc.status_code}: "
                f"{endpoint_message(exc).rstrip('.')}; shorten or fix the text")

    def _check(self, payload: dict[str, Any], expected: int) -> np.ndarray:
        data = sorted(payload["data"], key=lambda d: d["index"])
        if len(data) != expected:
            raise Unavailable(f"embedding endpoint {self.config.base_url} returned {len(data)} vectors for "
                              f"{expected} texts")
        vectors = np.stack([decode(d["embedding"]) for d in data])
        if vectors.shape[1] != self.dimension:
            raise Unavailable(f"embedding endpoint {self.config.base_url} returned dimension {vectors.shape[1]}; "
                              f"expected {self.dimension} (RAGFLEET_EMBEDDING_OPENAI_DIMENSION)")
        return l2_normalise(vectors)

    async def close(self) -> None:
        global _client
        if _client is self._client:
            await self._client.close()
            _client = None
