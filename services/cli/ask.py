"""`ragfleet ask "question"`: stream an answer from the gateway to the terminal, then list its sources.

    ragfleet ask "What is retrieval-augmented generation?"
    ragfleet ask --conversation c1 "and how is it evaluated?"     # follow-up with the earlier turns as history
    ragfleet ask --verbose "..."      # also each stage's time and the trace id (search it in Jaeger)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
import threading
from typing import Iterator, TextIO

import grpc

from services.runtime.config import CLI_API_KEY, CLI_GATEWAY_ADDRESS, Env
from services.runtime.pb.ragfleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

DEFAULT_TIMEOUT_SECONDS = 120.0
SNIPPET_CHARS = 160


# After Ctrl-C, how long the CLI waits for the channel to close before exiting anyway.
CLOSE_AFTER_INTERRUPT_SECONDS = 2.0


@contextlib.contextmanager
def gateway_channel(address: str) -> Iterator[grpc.Channel]:
    """A channel to the gateway, closed on the way out; after Ctrl-C within a bounded wait. The interrupt lands
    wherever the main thread is, possibly inside grpc's own call bookkeeping, and a suite run once saw
    ``Channel.close()`` wait forever for a cancelled call's state after it: the CLI must exit regardless (the process
    exit then tears the connection down)."""
    channel = grpc.insecure_channel(address)
    interrupted = False
    try:
        yield channel
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if interrupted:
            closer = threading.Thread(target=channel.close, name="channel-close", daemon=True)
            closer.start()
            closer.join(CLOSE_AFTER_INTERRUPT_SECONDS)
        else:
            channel.close()


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--gateway and --api-key, shared by `ask` and `ingest`."""
    parser.add_argument("--gateway", default=Env().read(CLI_GATEWAY_ADDRESS),
                        help="gateway host:port (env RAGFLEET_GATEWAY_ADDRESS; default %(default)s)")
    parser.add_argument("--api-key", default=Env().read(CLI_API_KEY),
                        help="API key sent as 'authorization: Bearer <key>' (env RAGFLEET_API_KEY)")


def auth_metadata(api_key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def describe_error(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code else 'ERROR'}: {details}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the question to ask")
    add_connection_arguments(parser)
    parser.add_argument("--top-k", type=int, default=0, help="passages to retrieve (0 = server default)")
    parser.add_argument("--conversation", default="", help="conversation id: earlier turns are sent as history")
    parser.add_argument("--no-cache", action="store_true", help="bypass the response cache")
    parser.add_argument("--model", default="", help="generation model (default: the server's)")
    parser.add_argument("--max-tokens", type=int, default=None, help="completion token limit")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="deadline in seconds")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print each stage's time and the Ask's trace id (to find its trace in Jaeger)")


def run(args: argparse.Namespace) -> int:
    params = common_pb2.GenerationParams(model=args.model, temperature=args.temperature, max_tokens=args.max_tokens)
    return ask(args.gateway, args.question, api_key=args.api_key, top_k=args.top_k,
               conversation_id=args.conversation, bypass_cache=args.no_cache, params=params, timeout=args.timeout,
               verbose=args.verbose)


def ask(gateway_address: str, question: str, *, api_key: str | None = None, out: TextIO = sys.stdout,
        top_k: int = 0, conversation_id: str = "", bypass_cache: bool = False,
        params: common_pb2.GenerationParams | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS,
        verbose: bool = False) -> int:
    """Stream one answer to `out` (text as it arrives, then sources and a timing line); returns an exit code."""
    request = gateway_pb2.AskRequest(question=question, top_k=top_k, conversation_id=conversation_id,
                                     bypass_cache=bypass_cache, params=params)
    sources: list[common_pb2.Passage] = []
    finished: gateway_pb2.AskFinished | None = None
    try:
        with gateway_channel(gateway_address) as channel:
            call = gateway_pb2_grpc.GatewayServiceStub(channel).Ask(request, timeout=timeout,
                                                                    metadata=auth_metadata(api_key))
            try:
                for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "sources":
                        sources = list(event.sources.passages)
                    elif kind == "delta":
                        out.write(event.delta.text)
                        out.flush()
                    else:
                        finished = event.finished
            except KeyboardInterrupt:
                call.cancel()
                raise
    except KeyboardInterrupt:
        out.write("\n[cancelled]\n")
        return 130
    except grpc.RpcError as exc:
        out.flush()
        print(f"\nerror: {describe_error(exc)}", file=sys.stderr)
        return 1
    out.write("\n")
    _print_sources(sources, out)
    if finished is not None:
        _print_summary(finished, out)
        if verbose:
            _print_details(finished, out)
    out.flush()
    return 0


def _print_sources(sources: list[common_pb2.Passage], out: TextIO) -> None:
    if not sources:
        out.write("\n(no sources: the corpus is empty or nothing matched; try `ragfleet ingest PATH`)\n")
        return
    out.write("\nSources:\n")
    for passage in sources:
        title = passage.title or passage.doc_id
        out.write(f"  [{passage.number}] {title} ({passage.doc_id})  score {passage.score:.3f}\n")
        snippet = " ".join(passage.text.split())
        if len(snippet) > SNIPPET_CHARS:
            snippet = snippet[:SNIPPET_CHARS].rsplit(" ", 1)[0] + " ..."
        out.write(textwrap.indent(textwrap.fill(snippet, width=96), "      ") + "\n")


def _print_summary(finished: gateway_pb2.AskFinished, out: TextIO) -> None:
    t = finished.timings
    cache = gateway_pb2.CacheStatus.Name(finished.cache_status).removeprefix("CACHE_STATUS_")
    parts = [f"cache {cache}", f"model {finished.model or '-'}", f"first token {t.first_token_ms:.0f} ms",
             f"total {t.total_ms:.0f} ms", f"tokens {finished.usage.total_tokens}"]
    if finished.fallback_used:
        parts.append("fallback answerer")
    out.write("\n(" + " · ".join(parts) + ")\n")


def _print_details(finished: gateway_pb2.AskFinished, out: TextIO) -> None:
    """--verbose: where the time went, and the id that finds this Ask's trace (Jaeger: search by trace id)."""
    t = finished.timings
    stages = [("cache", t.cache_ms), ("history", t.history_ms), ("embed", t.embed_ms), ("retrieve", t.retrieve_ms),
              ("rerank", t.rerank_ms), ("first token", t.first_token_ms), ("total", t.total_ms)]
    out.write("stages: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in stages) + "\n")
    out.write(f"trace id: {finished.trace_id or '(none: the gateway is not tracing)'}\n")
