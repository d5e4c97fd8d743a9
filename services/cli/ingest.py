"""`ragfleet ingest PATH`: send .txt/.md files (a file or a directory tree) or a BEIR corpus.jsonl to the gateway.

Documents go out in batches of whole documents, a few requests in flight, with a progress bar. Ingest is
idempotent per doc_id (a file's path relative to PATH, or a BEIR `_id`), so running it again updates in place.

    ragfleet ingest samples/corpus            # every .txt/.md below, plus any corpus.jsonl
    ragfleet ingest scifact/corpus.jsonl      # BEIR: {"_id", "title", "text", "metadata"} per line
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator

import grpc

from services.cli.ask import add_connection_arguments, auth_metadata, describe_error, gateway_channel
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
BATCH_DOCUMENTS = 32
BATCH_BYTES = 2 * 1024 * 1024
IN_FLIGHT_REQUESTS = 2
REQUEST_TIMEOUT_SECONDS = 300.0


class IngestInputError(ValueError):
    """PATH cannot be ingested as given: nothing to ingest, an unsupported file, a malformed or non-UTF-8 line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a .txt/.md file, a BEIR corpus.jsonl, or a directory of them")
    add_connection_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        documents, chunks = ingest_path(args.gateway, args.path, api_key=args.api_key,
                                        show_progress=not args.no_progress)
    except (IngestInputError, OSError) as exc:  # OSError: a missing or unreadable path
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The in-flight requests were cancelled on the way out; ingest is idempotent, so re-running is safe.
        print("\ninterrupted: ingest cancelled (documents already sent are kept; re-run to finish)",
              file=sys.stderr)
        return 130
    print(f"ingested {documents} documents as {chunks} chunks")
    return 0


def ingest_path(gateway_address: str, path: str, *, api_key: str | None = None,
                show_progress: bool = True) -> tuple[int, int]:
    """Ingest everything under `path`; returns (documents, chunks written). Raises grpc.RpcError on failure."""
    from tqdm import tqdm

    root = check_path(path)
    total = count_documents(root)
    metadata = auth_metadata(api_key)
    documents = chunks = 0
    with gateway_channel(gateway_address) as channel, \
            tqdm(total=total, unit="doc", disable=not show_progress, desc="ingest") as bar:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        window: list[tuple[Future, int]] = []

        def settle(future: Future, size: int) -> None:
            nonlocal documents, chunks
            reply: gateway_pb2.IngestResponse = future.result()
            documents += reply.documents
            chunks += reply.chunks_written
            bar.update(size)
            bar.set_postfix(chunks=chunks)

        try:
            for batch in _batches(read_documents(root)):
                request = gateway_pb2.IngestRequest(documents=batch)
                window.append((stub.Ingest.future(request, timeout=REQUEST_TIMEOUT_SECONDS, metadata=metadata),
                               len(batch)))
                if len(window) >= IN_FLIGHT_REQUESTS:
                    settle(*window.pop(0))
            while window:
                settle(*window.pop(0))
        finally:
            for future, _ in window:
                future.cancel()
    return documents, chunks


def check_path(path: str) -> Path:
    """`path` as a Path if there is something to ingest there; else FileNotFoundError or IngestInputError."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not _files(root):
        raise IngestInputError(f"{path}: nothing to ingest (no .txt/.md files or corpus.jsonl below it)")
    return root


def count_documents(root: Path) -> int:
    """How many documents read_documents will yield (for the progress bar), without parsing them."""
    return sum(_count_lines(f) if f.suffix == ".jsonl" else 1 for f in _files(root))


def read_documents(root: Path) -> Iterator[gateway_pb2.Document]:
    for file in _files(root):
        if file.suffix == ".jsonl":
            yield from _read_beir(file)
        else:
            doc = _read_text_file(file, root)
            if doc is not None:
                yield doc


def _files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix.lower() not in TEXT_SUFFIXES + (".jsonl",):
            raise IngestInputError(f"{root}: not a .txt/.md file or a BEIR .jsonl corpus")
        return [root]
    found = [p for p in root.rglob("*") if p.is_file()
             and (p.suffix.lower() in TEXT_SUFFIXES or p.name == "corpus.jsonl")]
    return sorted(found)


def _count_lines(file: Path) -> int:
    with file.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _read_beir(file: Path) -> Iterator[gateway_pb2.Document]:
    with file.open("rb") as handle:  # line by line: a corpus can be larger than memory
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8-sig"))  # UnicodeDecodeError is a ValueError too
                if not isinstance(row, dict):
                    raise ValueError("a JSON object is expected")
                doc_id = str(row["_id"])
                metadata = row.get("metadata") or {}
                if not isinstance(metadata, dict):
                    raise ValueError("'metadata' must be an object")
            except (ValueError, KeyError) as exc:
                reason = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
                raise IngestInputError(f"{file}:{number}: not a BEIR corpus line ({reason})") from None
            text = str(row.get("text") or "").strip()
            if not text:
                continue
            meta = {str(k): str(v) for k, v in metadata.items()}
            yield gateway_pb2.Document(doc_id=doc_id, title=str(row.get("title") or ""), text=text, metadata=meta)


def _read_text_file(file: Path, root: Path) -> gateway_pb2.Document | None:
    text = file.read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        return None
    doc_id = file.name if root.is_file() else file.relative_to(root).as_posix()
    title = file.stem.replace("_", " ").replace("-", " ").strip()
    first, _, rest = text.partition("\n")
    if file.suffix.lower() in (".md", ".markdown") and first.startswith("#") and rest.strip():
        # The heading becomes the title (sent with every chunk), so it is not repeated in the body.
        title, text = first.lstrip("#").strip() or title, rest.strip()
    return gateway_pb2.Document(doc_id=doc_id, title=title, text=text, metadata={"source": file.as_posix()})


def _batches(documents: Iterator[gateway_pb2.Document]) -> Iterator[list[gateway_pb2.Document]]:
    batch: list[gateway_pb2.Document] = []
    size = 0
    for doc in documents:
        doc_bytes = doc.ByteSize()
        if batch and (len(batch) >= BATCH_DOCUMENTS or size + doc_bytes > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(doc)
        size += doc_bytes
    if batch:
        yield batch
