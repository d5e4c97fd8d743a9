"""`ragfleet demo`: the whole job once, on embedded defaults: mesh up, sample corpus ingested, one question answered.

Exits 0 only when the answer streamed back with sources, so it doubles as a smoke test of a fresh install.

    ragfleet demo
    ragfleet demo --question "Why do honeybee colonies swarm?"
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from services.cli.mesh import MeshError
from services.cli.up import add_mesh_arguments, build_mesh, resolve_data_dir, running_mesh

SAMPLE_CORPUS = Path(__file__).resolve().parent / "sample_corpus"
DEFAULT_QUESTION = "How does a honeybee tell her nestmates where to find food?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Free ports by default, so the demo never collides with a running `ragfleet up`.
    add_mesh_arguments(parser, port_base=0)
    parser.add_argument("--data-dir", default=None,
                        help="keep the demo's data here (default: a temporary directory removed afterwards)")
    parser.add_argument("--corpus", default=str(SAMPLE_CORPUS), help="what to ingest (default: the sample corpus)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="what to ask")


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """ingest_path/ask may be plain or async functions; run either to completion."""
    result = fn(*args, **kwargs)
    return asyncio.run(result) if inspect.isawaitable(result) else result


class _Recorder:
    """Passes text through to the terminal and keeps a copy, so the demo can check what the user saw."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.text: list[str] = []

    def write(self, text: str) -> int:
        self.text.append(text)
        return self._out.write(text)

    def flush(self) -> None:
        self._out.flush()

    def isatty(self) -> bool:
        return self._out.isatty()


def _answered_with_sources(result: Any, shown: str) -> bool:
    """Success = ask() reported sources and an answer; falls back to what was printed if it returns nothing."""
    sources = getattr(result, "sources", None)
    answer = getattr(result, "answer", None) if result is not None else None
    if isinstance(result, dict):
        sources, answer = result.get("sources"), result.get("answer")
    if sources is not None or answer is not None:
        return bool(sources) and bool(answer and str(answer).strip())
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        return False
    return "[1]" in shown


def run(args: argparse.Namespace) -> int:
    from services.cli.ask import ask
    from services.cli.ingest import ingest_path

    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="ragfleet-demo-") as tmp:
        data = resolve_data_dir(args.data_dir) if args.data_dir else Path(tmp)
        try:
            mesh = build_mesh(args, data)
            with running_mesh(mesh, timeout=args.start_timeout, out=out) as cold_start:
                gateway = mesh.address("gateway")
                print(f"mesh up in {cold_start:.1f} s; gateway {gateway}\n\ningesting {args.corpus}", file=out,
                      flush=True)
                _call(ingest_path, gateway, args.corpus, api_key=None, show_progress=True)
                print(f"\nQ: {args.question}\n", file=out, flush=True)
                recorder = _Recorder(out)
                result = _call(ask, gateway, args.question, api_key=None, out=recorder)
                print(file=out, flush=True)
                if not _answered_with_sources(result, "".join(recorder.text)):
                    print("demo failed: no answer with sources came back", file=sys.stderr)
                    return 1
                failed = mesh.exited()
                if failed is not None:
                    print(f"demo failed: {failed.name} died:\n{failed.log_tail()}", file=sys.stderr)
                    return 1
            return 0
        except MeshError as exc:
            print(f"ragfleet demo failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
