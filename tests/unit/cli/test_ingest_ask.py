"""`ragfleet ingest` / `ragfleet ask` / `ragfleet demo` as a user meets them: one-line errors and exit codes, Ctrl-C,
auth metadata and deadlines. The gateway is an in-process fake, so these run in well under a second each."""

from __future__ import annotations

import _thread
import argparse
import gc
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from services.cli import ask, demo, ingest
from services.runtime.pb.ragfleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


class FakeGateway(gateway_pb2_grpc.GatewayServiceServicer):
    """Records each call's metadata and deadline. mode: "ok", "unauthenticated", or "block" (until cancelled)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls: list[tuple[str, dict[str, str], float | None]] = []
        self.arrived = threading.Event()
        self.cancelled = threading.Event()

    def _enter(self, name: str, context: grpc.ServicerContext) -> None:
        self.calls.append((name, dict(context.invocation_metadata()), context.time_remaining()))
        if self.mode == "unauthenticated":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: unknown API key")
        context.add_callback(lambda: None if context.is_active() else self.cancelled.set())
        self.arrived.set()
        if self.mode == "block":
            self.cancelled.wait(10)

    def Ask(self, request, context):
        self._enter("Ask", context)
        yield gateway_pb2.AskResponse(delta=common_pb2.TextDelta(text="Bees dance [1]."))
        yield gateway_pb2.AskResponse(finished=gateway_pb2.AskFinished(model="m"))

    def Ingest(self, request, context):
        self._enter("Ingest", context)
        return gateway_pb2.IngestResponse(documents=len(request.documents), chunks_written=len(request.documents))


@pytest.fixture
def gateway():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    fake = FakeGateway()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        fake.cancelled.set()
        server.stop(0)


def _ingest_args(path: Path | str, gateway: str = "127.0.0.1:1", api_key: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(path=str(path), gateway=gateway, api_key=api_key, no_progress=True)


def _interrupt_when(event: threading.Event, cancelled: threading.Event) -> None:
    """Ctrl-C in the main thread (where the CLI waits on the call) once the server has the request. The test run may
    have been started with SIGINT ignored (a background job of a non-interactive shell), and interrupt_main() does
    nothing then: Python's own handler is installed for the test (the fixture below restores the previous one).
    Like a user, it presses again if the call is not cancelled within 2 s: an interrupt that lands while the main
    thread is finalising garbage (an earlier test's grpc.aio channel, whose __dealloc__ joins a thread) is swallowed
    there as unraisable, and a CI run once lost it so (the CLI then waited out the server's block and exited 0).
    Collecting that garbage first makes it rare."""
    gc.collect()
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def fire() -> None:
        if not event.wait(10):
            return
        for _ in range(3):
            _thread.interrupt_main()
            if cancelled.wait(2):
                return
    threading.Thread(target=fire, daemon=True).start()


@pytest.fixture(autouse=True)
def _restore_sigint() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


# -- ingest: local input problems are one line on stderr and exit 2, never a traceback -------------------------------

@pytest.mark.parametrize("line, reason", [
    (b"not json\n", "Expecting value"),
    (b"[1, 2]\n", "a JSON object is expected"),
    (b'{"title": "no id", "text": "x"}\n', "missing '_id'"),
    (b'{"_id": "d2", "text": "x", "metadata": ["a"]}\n', "'metadata' must be an object"),
    (b'{"_id": "d2", "text": "caf\xe9"}\n', "utf-8"),  # Latin-1, not UTF-8
], ids=["not-json", "not-an-object", "no-id", "bad-metadata", "not-utf8"])
def test_a_malformed_corpus_line_is_a_one_line_error(tmp_path: Path, capsys, line: bytes, reason: str) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"_id": "d1", "text": "fine"}\n' + line)
    assert ingest.run(_ingest_args(corpus)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {corpus}:2: not a BEIR corpus line (") and reason in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_utf8_bom_is_not_a_malformed_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes('\ufeff{"_id": "d1", "text": "fine"}\n'.encode())
    assert [d.doc_id for d in ingest.read_documents(corpus)] == ["d1"]


def test_a_directory_with_nothing_to_ingest_fails(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    assert ingest.run(_ingest_args(tmp_path)) == 2
    assert "nothing to ingest" in capsys.readouterr().err


def test_an_unsupported_file_is_refused_not_read(tmp_path: Path, capsys, monkeypatch) -> None:
    image = tmp_path / "disk.iso"
    image.write_bytes(b"\0" * 1024)
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("an unsupported file was read"))
    assert ingest.run(_ingest_args(image)) == 2
    assert capsys.readouterr().err == f"error: {image}: not a .txt/.md file or a BEIR .jsonl corpus\n"


def test_a_missing_path_is_exit_2(tmp_path: Path, capsys) -> None:
    assert ingest.run(_ingest_args(tmp_path / "nope")) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such file or directory\n"


# -- ingest against the gateway -------------------------------------------------------------------------------------

def test_ingest_sends_the_api_key_and_a_deadline(tmp_path: Path, gateway, capsys) -> None:
    fake, address = gateway
    (tmp_path / "a.md").write_text("# Title\nbody")
    assert ingest.run(_ingest_args(tmp_path, address, api_key="k1")) == 0
    (name, metadata, remaining), = fake.calls
    assert name == "Ingest" and metadata["authorization"] == "Bearer k1"
    # (the deadline crosses the wire rounded up, hence the slack)
    assert remaining is not None and 0 < remaining < ingest.REQUEST_TIMEOUT_SECONDS + 2
    assert "ingested 1 documents as 1 chunks" in capsys.readouterr().out


def test_ingest_rpc_error_is_status_and_details(tmp_path: Path, gateway, capsys) -> None:
    fake, address = gateway
    fake.mode = "unauthenticated"
    (tmp_path / "a.txt").write_text("text")
    assert ingest.run(_ingest_args(tmp_path, address)) == 1
    assert capsys.readouterr().err == "error: UNAUTHENTICATED: authorization: unknown API key\n"


def test_ctrl_c_during_ingest_cancels_the_call_and_exits_130(tmp_path: Path, gateway, capsys) -> None:
    fake, address = gateway
    fake.mode = "block"
    (tmp_path / "a.txt").write_text("text")
    _interrupt_when(fake.arrived, fake.cancelled)
    assert ingest.run(_ingest_args(tmp_path, address)) == 130
    assert fake.cancelled.wait(5), "the server never saw the call cancelled"
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


# -- ask ------------------------------------------------------------------------------------------------------------

def test_ask_sends_the_api_key_and_a_deadline(gateway, capsys) -> None:
    fake, address = gateway
    out_path = []

    class Out:
        def write(self, text: str) -> None:
            out_path.append(text)

        def flush(self) -> None:
            pass

    assert ask.ask(address, "q", api_key="k2", out=Out(), timeout=7) == 0
    (name, metadata, remaining), = fake.calls
    assert name == "Ask" and metadata["authorization"] == "Bearer k2" and remaining is not None and 0 < remaining < 9
    assert "Bees dance [1]." in "".join(out_path)


def test_ask_rpc_error_is_status_and_details(gateway, capsys) -> None:
    fake, address = gateway
    fake.mode = "unauthenticated"
    assert ask.ask(address, "q") == 1
    assert capsys.readouterr().err.strip() == "error: UNAUTHENTICATED: authorization: unknown API key"


def test_ctrl_c_during_ask_cancels_the_call_and_exits_130(gateway, capsys) -> None:
    fake, address = gateway
    fake.mode = "block"
    _interrupt_when(fake.arrived, fake.cancelled)
    assert ask.ask(address, "q") == 130
    assert fake.cancelled.wait(5), "the server never saw the call cancelled"


# -- demo -----------------------------------------------------------------------------------------------------------

def test_demo_checks_the_corpus_before_starting_the_mesh(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(demo, "build_mesh", lambda *a: pytest.fail("the mesh was started for a missing corpus"))
    args = argparse.Namespace(corpus=str(tmp_path / "nope"), data_dir=None, question="q", start_timeout=1.0)
    assert demo.run(args) == 2
    assert capsys.readouterr().err == f"ragfleet demo failed: --corpus: {tmp_path / 'nope'}: no such file or directory\n"


def test_demo_reports_a_malformed_corpus_line_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import contextlib

    class Mesh:
        def address(self, name: str) -> str:
            return "127.0.0.1:1"

    monkeypatch.setattr(demo, "build_mesh", lambda *a: Mesh())
    monkeypatch.setattr(demo, "running_mesh", lambda *a, **k: contextlib.nullcontext(0.0))
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{oops\n')
    args = argparse.Namespace(corpus=str(tmp_path), data_dir=None, question="q", start_timeout=1.0)
    assert demo.run(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the demo's progress bar
    assert last.startswith("ragfleet demo failed: ingest: ") and "corpus.jsonl:2: not a BEIR corpus line" in last


def test_a_channel_that_will_not_close_after_ctrl_c_does_not_hold_the_cli(monkeypatch) -> None:
    """grpc's Channel.close() once waited forever after an interrupt: the CLI exits after a bounded wait anyway,
    and closes the channel normally on any other way out."""
    closed = threading.Event()
    never = threading.Event()

    class Stuck:
        def close(self) -> None:
            closed.set()
            never.wait(30)

    monkeypatch.setattr(ask.grpc, "insecure_channel", lambda address: Stuck())
    monkeypatch.setattr(ask, "CLOSE_AFTER_INTERRUPT_SECONDS", 0.2)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with ask.gateway_channel("127.0.0.1:1"):
            raise KeyboardInterrupt
    assert closed.is_set() and time.monotonic() - started < 2

    class Plain:
        closes = 0

        def close(self) -> None:
            Plain.closes += 1

    monkeypatch.setattr(ask.grpc, "insecure_channel", lambda address: Plain())
    with pytest.raises(RuntimeError):
        with ask.gateway_channel("127.0.0.1:1"):
            raise RuntimeError("an RPC error, say")
    assert Plain.closes == 1
