"""A loopback HTTP proxy that applies ``urls`` policy to every connection yt-dlp makes.

yt-dlp fetches pages, follows redirects and downloads HLS/DASH fragments with its own
HTTP stack; checking the first URL is not enough. Each job starts this proxy and passes it
as yt-dlp's ``proxy``: every request (plain HTTP in absolute form, HTTPS as ``CONNECT``)
names its host here, the proxy resolves it, applies the policy to each address and
connects to a checked address itself, so neither a redirect, a fragment URL nor a changed
DNS answer can reach a private network. One request per client connection: a kept-alive
proxy connection could otherwise carry a second request to an unchecked host.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from morag import urls

log = logging.getLogger("morag.policy_proxy")

MAX_HEAD = 64 * 1024
_HOP_HEADERS = {b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive"}


@dataclass
class ProxyLog:
    """What the proxy refused, so a failed download can say why."""

    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, reason: str) -> None:
        with self.lock:
            self.refused.append(reason)


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("client closed before its request head")
        data += chunk
        if len(data) > MAX_HEAD:
            raise ConnectionError("request head too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _relay(a: socket.socket, b: socket.socket, timeout: float, one_way: bool = False) -> None:
    """Copy bytes between two sockets until one side closes (or nothing moves for
    ``timeout`` seconds). ``one_way``: only b -> a after the request was sent."""
    sockets = [b] if one_way else [a, b]
    while True:
        readable, _, _ = select.select(sockets, [], [], timeout)
        if not readable:
            return
        for src in readable:
            dst = b if src is a else a
            try:
                chunk = src.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            dst.sendall(chunk)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(self.server.timeout_s)
        try:
            head, rest = _read_head(client)
            line, *header_lines = head.split(b"\r\n")
            method, target, version = line.decode("latin-1").split(" ", 2)
            if method.upper() == "CONNECT":
                self._connect(client, target)
            else:
                self._forward(client, method, target, version, header_lines, rest)
        except (OSError, ValueError, ConnectionError) as exc:
            log.debug("proxy connection ended: %s", exc)

    def _open(self, url: str) -> socket.socket | None:
        """A connection to a checked address of ``url``'s host, or None (refused)."""
        try:
            target = urls.parse(url)
            addrs = urls.resolve(target, self.server.allowlist)
        except urls.UrlRefused as exc:
            self.server.log.add(f"{url}: {exc}")
            log.warning("yt-dlp request refused: %s: %s", url, exc)
            return None
        # Connect to the address that was checked, never to a fresh lookup of the name.
        return socket.create_connection((str(addrs[0]), target.port), timeout=self.server.timeout_s)

    def _refuse(self, client: socket.socket, url: str) -> None:
        body = f"refused by MoRAG's URL policy: {url}\n".encode()
        client.sendall(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def _connect(self, client: socket.socket, authority: str) -> None:
        url = f"https://{authority}/"
        upstream = self._open(url)
        if upstream is None:
            self._refuse(client, url)
            return
        with upstream:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            _relay(client, upstream, self.server.timeout_s)

    def _forward(
        self,
        client: socket.socket,
        method: str,
        url: str,
        version: str,
        header_lines: list[bytes],
        rest: bytes,
    ) -> None:
        if not url.lower().startswith("http://"):
            self._refuse(client, url)
            return
        upstream = self._open(url)
        if upstream is None:
            self._refuse(client, url)
            return
        parts = urls.parse(url).parts
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        headers = [
            h for h in header_lines if h.split(b":", 1)[0].strip().lower() not in _HOP_HEADERS
        ]
        headers.append(b"Connection: close")
        request = f"{method} {path} {version}\r\n".encode() + b"\r\n".join(headers) + b"\r\n\r\n"
        with upstream:
            upstream.sendall(request + rest)
            # Request bodies (rare for yt-dlp: some extractors POST JSON) follow the head.
            length = next(
                (
                    int(h.split(b":", 1)[1].strip())
                    for h in headers
                    if h.split(b":", 1)[0].strip().lower() == b"content-length"
                ),
                0,
            )
            remaining = length - len(rest)
            while remaining > 0:
                chunk = client.recv(min(65536, remaining))
                if not chunk:
                    break
                upstream.sendall(chunk)
                remaining -= len(chunk)
            _relay(client, upstream, self.server.timeout_s, one_way=True)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, allowlist: list[str], timeout_s: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.allowlist = allowlist
        self.timeout_s = timeout_s
        self.log = ProxyLog()


@contextlib.contextmanager
def policy_proxy(allowlist: list[str], timeout: float) -> Iterator[tuple[str, ProxyLog]]:
    """Run the proxy for the duration of a job: yields its URL and the refusal log."""
    server = _Server(allowlist, timeout)
    thread = threading.Thread(target=server.serve_forever, name="morag-policy-proxy", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}", server.log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def ydl_proxy_options(proxy_url: str) -> dict[str, Any]:
    """yt-dlp options that keep all of its traffic on the proxy: its native HLS/DASH
    downloader (an external ffmpeg downloader would fetch fragments itself)."""
    return {"proxy": proxy_url, "hls_prefer_native": True, "external_downloader": {}}
