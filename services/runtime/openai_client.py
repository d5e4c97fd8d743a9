"""The one way services build an AsyncOpenAI client (embedding's remote backend, generation's LLM backend).

The SDK's aiohttp transport: its default httpx stack cost about twice the CPU per call and per streamed chunk
(bench/generation_stream.py, bench/embedding_bench.py). Retries are the caller's (only where they are safe), so the
client's own are off; the pool keeps every connection it may open alive.
"""

from __future__ import annotations

import httpx2
import openai


def openai_client(*, base_url: str, api_key: str, timeout: float | openai.Timeout,
                  max_connections: int) -> openai.AsyncOpenAI:
    connections = max(1, max_connections)
    return openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0,
        http_client=openai.DefaultAioHttpClient(limits=httpx2.Limits(
            max_connections=connections, max_keepalive_connections=connections)))
