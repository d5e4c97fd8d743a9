"""The fault suite's own instruments, checked against known ground truth: a leak detector that cannot see a leak
or a proxy that does not cut would let every fault test pass vacuously."""

from __future__ import annotations

import os
import socket
import time

from tests.faults._procs import connections_to
from tests.faults._proxy import TcpProxy


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server


def test_connections_to_counts_only_this_process_sockets_by_state() -> None:
    server = _listener()
    port = server.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    accepted = [server.accept()[0] for _ in clients]
    try:
        assert connections_to(os.getpid(), port) == {"ESTABLISHED": 3}
        accepted[0].close()  # the peer closes, our client never does: the classic leaked socket
        time.sleep(0.05)
        assert connections_to(os.getpid(), port) == {"ESTABLISHED": 2, "CLOSE_WAIT": 1}
        clients[0].close()
        assert connections_to(os.getpid(), port) == {"ESTABLISHED": 2}
    finally:
        for sock in clients + accepted + [server]:
            sock.close()


def test_proxy_forwards_delays_cuts_and_restores() -> None:
    server = _listener()
    with TcpProxy(server.getsockname()[1]) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port))
        peer = server.accept()[0]
        client.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        proxy.delay = 0.3
        started = time.monotonic()
        client.sendall(b"slow")
        assert peer.recv(4) == b"slow" and time.monotonic() - started >= 0.29
        proxy.cut()
        client.settimeout(2)
        try:
            data = client.recv(1)
        except ConnectionResetError:
            data = b""
        assert data == b""  # the open connection is gone (reset)
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
            refused = False
        except ConnectionRefusedError:
            refused = True
        assert refused
        proxy.restore()
        proxy.delay = 0.0
        again = socket.create_connection(("127.0.0.1", proxy.port))
        again.sendall(b"back")
        peer_again = server.accept()[0]
        assert peer_again.recv(4) == b"back"
        for sock in (client, peer, again, peer_again):
            sock.close()
    server.close()
