"""Slow clients cannot take the API down (issue 18 item 5).

A real uvicorn (``morag api``) and raw sockets: connections that send part of a request's
headers, silently or one byte at a time, or a partial second request on a keep-alive
connection, are closed once MORAG_API_HEADER_TIMEOUT has passed, while /health answers
all along."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import wait_until
from tests.integration.stack import Stack

HEADER_TIMEOUT = 3.0
PARTIAL = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def closed(sock: socket.socket) -> bool:
    """Whether the server closed (FIN) or reset this connection; never blocks."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # ECONNRESET: the server aborted it
        return True


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body (/health), from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "connection closed in the body"
        body += chunk
    return head


@pytest.fixture
def api(make_stack: Callable[..., Stack]) -> Stack:
    stack = make_stack(api_header_timeout=HEADER_TIMEOUT)
    stack.start_api()
    return stack


@contextlib.contextmanager
def connections(count: int, port: int) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_partial_headers_are_closed_after_the_deadline_while_health_answers(
    api: Stack,
) -> None:
    with connections(90, api.api_port) as socks:
        # socks[:30] stay silent after their partial request.
        trickling, keepalive = socks[30:60], socks[60:]
        # A keep-alive connection whose first request was whole: its second one is not.
        for sock in keepalive:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        opened = time.monotonic()
        for sock in socks:
            sock.sendall(PARTIAL)
            sock.setblocking(False)

        during_attack = 0
        closed_at: dict[int, float] = {}

        def all_closed() -> bool:
            nonlocal during_attack
            # /health answers throughout, and at least once while every connection is open.
            assert httpx.get(f"{api.api_url}/health", timeout=10).status_code == 200
            if not closed_at:
                during_attack += 1
            for i, sock in enumerate(socks):
                if i in closed_at:
                    continue
                if closed(sock):
                    closed_at[i] = time.monotonic()
                elif sock in trickling:
                    # One more header byte: the deadline is not an idle timer.
                    with contextlib.suppress(BlockingIOError, OSError):
                        sock.send(b"x")
            return len(closed_at) == len(socks)

        wait_until(
            all_closed,
            HEADER_TIMEOUT + 60,
            "the server to close the slow connections",
            0.5,
        )
        assert during_attack >= 1
        # Not before the deadline (each one's timer started at its partial request).
        assert min(closed_at.values()) - opened >= HEADER_TIMEOUT * 0.9
    assert httpx.get(f"{api.api_url}/health", timeout=10).status_code == 200
