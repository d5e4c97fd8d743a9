"""A TCP proxy the fault tests control: put it between two processes, then add latency, cut it, restore it.

It runs its own event loop in a daemon thread, so it keeps forwarding whatever the caller's loop is doing (a test
blocked in a synchronous call, a benchmark driving its own loop), and every control call is thread-safe.

    with TcpProxy(6379) as proxy:          # 127.0.0.1:proxy.port -> 127.0.0.1:6379
        proxy.delay = 0.2                  # seconds added to each direction of every connection
        proxy.cut()                        # listener closed, open connections reset: "unreachable"
        proxy.restore()                    # listening again on the same port
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Any, Coroutine

_READ = 65536


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.delay = 0.0  # one-way latency added to every chunk, both directions
        self.accepted = 0  # connections accepted since start
        self.bytes_forwarded = 0  # both directions, since start
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._sock.close()  # the port is ours: the listener re-binds it with SO_REUSEADDR
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcp-proxy-{self.port}", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self._server is not None

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- control ------------------------------------------------------------------------------------------------

    def start(self) -> "TcpProxy":
        self._run(self._listen())
        return self

    def restore(self) -> None:
        """Listen again on the same port (no-op when already up)."""
        self._run(self._listen())

    def cut(self) -> None:
        """Stop listening (new connects are refused) and reset every open connection (RST, not FIN)."""
        self._run(self._cut())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._cut())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_traffic(self, since_bytes: int, timeout: float) -> bool:
        """True once more than `since_bytes` bytes went through (the peers talk again), polling until timeout."""
        deadline = time.monotonic() + timeout
        while self.bytes_forwarded <= since_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.bytes_forwarded > since_bytes

    # -- the loop's side ----------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_writer)
            return
        self._writers |= {client_writer, upstream_writer}
        try:
            await asyncio.gather(self._pipe(client_reader, upstream_writer),
                                 self._pipe(upstream_reader, client_writer))
        finally:
            for writer in (client_writer, upstream_writer):
                self._writers.discard(writer)
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; with a delay, each chunk leaves `delay` after it arrived (order kept, no throttle)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                self.bytes_forwarded += len(data)
            if writer.can_write_eof():
                writer.write_eof()

        sender = asyncio.ensure_future(deliver())
        try:
            while (data := await reader.read(_READ)) and not sender.done():
                queue.put_nowait((self._loop.time() + self.delay, data))
            queue.put_nowait((0.0, b""))
            await sender
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()
            writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the peer sees ECONNRESET at once, as when a host or link dies."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()
