"""`ragfleet demo`: the whole job once, on embedded defaults: mesh up, sample corpus ingested, one question answered.

Exits 0 only when the answer streamed back with sources, so it doubles as a smoke test of a fresh install.

    ragfleet demo
    ragfleet demo --question "Why do honeybee colonies swarm?"
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import grpc

from services.cli.mesh import MeshError
from services.cli.up import (OUTPUT_GONE_EXIT, SAMPLE_CORPUS, add_mesh_arguments, build_mesh, output_gone,
                             resolve_data_dir, running_mesh, say, silence)

DEFAULT_QUESTION = "How does the waggle dance tell other bees the direction and distance of food?"
SOURCES_MARKER = "\nSources:\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Free ports by default, so the demo never collides with a running `ragfleet up`.
    add_mesh_arguments(parser, port_base=0)
    parser.add_argument("--data-dir", default=None,
                        help="keep the demo's data here (default: a temporary directory removed afterwards)")
    parser.add_argument("--corpus", default=str(SAMPLE_CORPUS), help="what to ingest (default: the sample corpus)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="what to ask")


class _Recorder:
    """Passes text through to the terminal and keeps a copy, so the demo can check what the user saw."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self._out.write(text)

    def flush(self) -> None:
        self._out.flush()


def answered_with_sources(exit_code: int, shown: str) -> bool:
    """`ask` prints the answer, then a "Sources:" list; both must be there and the call must have succeeded."""
    answer, marker, sources = shown.partition(SOURCES_MARKER)
    return exit_code == 0 and bool(marker) and bool(answer.strip()) and "[1]" in sources


def run(args: argparse.Namespace) -> int:
    from services.cli.ask import ask, describe_error
    from services.cli.ingest import IngestInputError, check_path, ingest_path

    out = sys.stdout
    try:  # before minutes of mesh start-up, not after
        check_path(args.corpus)
    except (IngestInputError, OSError) as exc:
        print(f"ragfleet demo failed: --corpus: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ragfleet-demo-") as tmp:
        data = resolve_data_dir(args.data_dir) if args.data_dir else Path(tmp)
        try:
            mesh = build_mesh(args, data)
            with running_mesh(mesh, timeout=args.start_timeout, out=out) as cold_start:
                gateway = mesh.address("gateway")
                print(f"mesh up in {cold_start:.1f} s; gateway {gateway}\n\ningesting {args.corpus}", file=out,
                      flush=True)
                documents, chunks = ingest_path(gateway, args.corpus, api_key=None, show_progress=True)
                print(f"ingested {documents} documents as {chunks} chunks\n\nQ: {args.question}\n", file=out,
                      flush=True)
                if not chunks:
                    print("demo failed: nothing was ingested", file=sys.stderr)
                    return 1
                recorder = _Recorder(out)
                code = ask(gateway, args.question, api_key=None, out=recorder)
                if not answered_with_sources(code, "".join(recorder.parts)):
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
        except grpc.RpcError as exc:
            print(f"ragfleet demo failed: ingest: {describe_error(exc)}", file=sys.stderr)
            return 1
        except IngestInputError as exc:  # a malformed corpus line, found while sending
            print(f"ragfleet demo failed: ingest: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM or a closed terminal (SIGHUP); the mesh is already stopped
            say("interrupted", sys.stderr)
            return 130
        except OSError as exc:  # stdout met a closed pipe or terminal (`ragfleet demo | head`); the mesh is stopped
            if not output_gone(exc):
                raise
            silence(out, sys.stderr)
            return OUTPUT_GONE_EXIT
