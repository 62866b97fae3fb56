"""The standalone server's connection limits never cut a request in progress (found in review).

A real uvicorn server in a thread, with this project's protocol and small limits: a
pipelined request whose body arrives slowly is not cut by the header deadline, and a
connection busy with a pipelined request is not evicted for a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from serving.server import connections
from serving.testing import free_port
from serving.testing.poll import wait_for


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await asyncio.sleep({"/slow": 0.3, "/work": 2.0}.get(scope["path"], 0.0))
    out = f"{scope['path']} got {len(body)}".encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(out))]}
    )
    await send({"type": "http.response.body", "body": out})


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(connections, "limits", lambda: connections.ConnectionLimits(1.0, 5.0, 2))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=connections.GuardedHttpToolsProtocol)
    config.log_level = "warning"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the server")
    yield port
    server.should_exit = True
    thread.join(10)


def _answers(sock: socket.socket, count: int, timeout: float = 6.0) -> bytes:
    sock.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"HTTP/1.1 200") < count and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    return data


def test_a_pipelined_request_whose_body_arrives_slowly_is_not_cut(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nPOST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
    )
    wait_for(lambda: b"/slow got 0" in _answers(sock, 1, 2.0), what="the first answer")
    sock.sendall(b"hel")
    time.sleep(1.5)  # NOTE: the client's pace under test: the body ends past the 1 s header deadline
    sock.sendall(b"lo")
    assert b"/up got 5" in _answers(sock, 1)
    sock.close()


def test_a_connection_busy_with_a_pipelined_request_is_not_evicted(port: int) -> None:
    with contextlib.ExitStack() as stack:
        busy = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /work HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: b"/slow got 0" in _answers(busy, 1, 2.0), what="the first answer")
        for _ in range(2):  # NOTE: past the limit of 2
            stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        assert b"/work got 0" in _answers(busy, 1)


def test_the_limit_fits_the_open_file_limit() -> None:
    """Eviction must fire before accept() runs out of descriptors (found in review: 10,000
    under a 1,024 limit never evicted)."""
    import resource

    room = connections.descriptor_room()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 16 <= room <= soft
