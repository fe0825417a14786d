"""Client-supplied URLs: only well-formed http(s), never to private networks unless
allow-listed, and always connected to the address that was checked.

Checked at submission (a clear 422) and again by the worker before each request and
redirect. A check alone is not enough: a second DNS lookup at connect time could answer a
private address (DNS rebinding). ``resolve`` returns the checked addresses and ``open_pinned``
sends the request to one of them, with the original ``Host`` header and TLS server name.
yt-dlp's traffic goes through the same policy in ``morag.policy_proxy``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import httpx

MAX_REDIRECTS = 5
MAX_URL_LENGTH = 4096
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class UrlRefused(ValueError):
    pass


def parse_allowlist(entries: list[str]) -> tuple[set[str], list[Network]]:
    hosts: set[str] = set()
    nets: list[Network] = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            hosts.add(entry.lower())
    return hosts, nets


def _ascii_host(host: str) -> str:
    """The host as DNS sees it (IDNA for non-ASCII names), or UrlRefused if it is no name."""
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise UrlRefused(f"the host {host!r} is not a valid domain name") from exc
    name = ascii_host.rstrip(".")
    if not name or len(name) > 253:
        raise UrlRefused(f"the host {host[:80]!r} is not a valid domain name (over 253 chars)")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            raise UrlRefused(
                f"the host {host[:80]!r} is not a valid domain name: labels are 1 to 63 "
                "letters, digits or hyphens"
            )
    return name


@dataclass(frozen=True)
class Target:
    """A checked URL: its parts, the host to send as ``Host``/SNI, and where it may go."""

    url: str
    parts: SplitResult
    host: str  # lower-case, IDNA; no brackets for IPv6
    port: int
    literal: bool  # the URL names an IP address itself


def parse(url: str) -> Target:
    """Syntax only: scheme, host and port; UrlRefused (a 422) for anything malformed."""
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise UrlRefused("the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
        raw_host = parts.hostname or ""
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535"
        raise UrlRefused(f"malformed URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("only http and https URLs are accepted")
    if not raw_host:
        raise UrlRefused("the URL has no host")
    if port == 0:
        raise UrlRefused("port 0 is not a valid port")
    host = raw_host.lower()
    try:
        ipaddress.ip_address(host.split("%")[0])
        literal = True
    except ValueError:
        literal = False
        if "[" in parts.netloc:
            raise UrlRefused(f"malformed URL: {host!r} is not an IP address") from None
        host = _ascii_host(host)
    default_port = 443 if parts.scheme == "https" else 80
    return Target(url=url, parts=parts, host=host, port=port or default_port, literal=literal)


def _addresses(host: str, port: int) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRefused(f"cannot resolve host {host!r}") from exc
    found: list[Address] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if addr not in found:
            found.append(addr)
    if not found:
        raise UrlRefused(f"cannot resolve host {host!r}")
    return found


# IPv6 prefixes whose last 32 bits are an IPv4 address the kernel or a translator reaches:
# IPv4-compatible (deprecated, ::/96) and NAT64's well-known prefix (64:ff9b::/96). Python's
# is_global calls them global, which let http://[::127.0.0.1]/ or 64:ff9b::10.0.0.1 through.
_EMBEDDING_V6 = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("64:ff9b::/96"))
_LOCAL_USE_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(addr: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4 or the
    Teredo client), or None: the policy decides by it, as that is where packets end up."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if any(addr in net for net in _EMBEDDING_V6):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def check_address(host: str, addr: Address, nets: list[Network]) -> None:
    inner = embedded_ipv4(addr)
    if any(addr in net or (inner is not None and inner in net) for net in nets):
        return
    if not addr.is_global or (inner is not None and not inner.is_global):
        via = f" (it carries the IPv4 address {inner})" if inner is not None else ""
        raise UrlRefused(
            f"{host} resolves to {addr}{via}, a private, loopback or link-local address "
            "(allow it with MORAG_URL_ALLOWLIST)"
        )
    if addr in _LOCAL_USE_NAT64:
        # A site's own translator (RFC 8215), with an embedding it chooses: no way to tell
        # which IPv4 address it reaches, so only the allowlist opens it.
        raise UrlRefused(
            f"{host} resolves to {addr}, in the local-use NAT64 prefix 64:ff9b:1::/48 "
            "(allow it with MORAG_URL_ALLOWLIST)"
        )


def resolve(target: Target, allowlist: list[str]) -> list[Address]:
    """The addresses a connection to ``target`` may use; all of them passed the policy.
    One bad answer refuses the host: a name that mixes public and private addresses is
    the shape of a rebinding attack."""
    hosts, nets = parse_allowlist(allowlist)
    addrs = _addresses(target.host, target.port)
    if target.host in hosts:
        return addrs
    for addr in addrs:
        check_address(target.host, addr, nets)
    return addrs


def check_url(url: str, allowlist: list[str]) -> str:
    """Return the URL if a worker may fetch it, else raise UrlRefused with the reason."""
    resolve(parse(url), allowlist)
    return url


def pinned_request(
    client: httpx.Client, method: str, url: str, allowlist: list[str], **kwargs: object
) -> httpx.Request:
    """A request for ``url`` addressed to a checked IP: the connection cannot go elsewhere,
    whatever DNS answers later. ``Host`` and the TLS server name stay the URL's host, so
    virtual hosts and certificate checks work as usual."""
    target = parse(url)
    addr = resolve(target, allowlist)[0]
    ip = f"[{addr}]" if addr.version == 6 else str(addr)
    netloc = f"{ip}:{target.port}"
    pinned = urlunsplit(target.parts._replace(netloc=netloc))
    default_port = 443 if target.parts.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    if target.literal and addr.version == 6:
        host_header = f"[{target.host}]" + (
            "" if target.port == default_port else f":{target.port}"
        )
    headers = dict(kwargs.pop("headers", None) or {})  # type: ignore[call-overload]
    headers["Host"] = host_header
    extensions = {} if target.literal else {"sni_hostname": target.host}
    return client.build_request(
        method,
        pinned,
        headers=headers,
        extensions=extensions,
        **kwargs,  # type: ignore[arg-type]
    )


class _Deadline:
    """A wall-clock limit for a whole download. httpx's read timeout restarts with every
    byte (a server sending 1 byte every 2 s never trips it), so at the deadline a timer
    shuts down the connection's socket, which ends a read blocked anywhere in httpx,
    response headers included."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, request: httpx.Request, timeout: float) -> None:
        """Track the sockets ``request`` opens (httpcore's trace events), and keep its
        timeouts inside the deadline."""
        self.check()
        request.extensions["trace"] = self._trace
        left = min(timeout, max(self.at - time.monotonic(), 0.001))
        request.extensions["timeout"] = httpx.Timeout(left).as_dict()

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        sock = info["return_value"].get_extra_info("socket")
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def check(self) -> None:
        if self.expired:
            raise self.error()

    def error(self) -> UrlRefused:
        return UrlRefused(
            f"the download took longer than {self.seconds:g}s and was stopped "
            "(MORAG_WEB_FETCH_DEADLINE for web pages, MORAG_TOOL_TIMEOUT for media)"
        )

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    # Already closed, or detached when TLS wrapped it (then the TLS socket is shut).
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def download(
    url: str,
    dest: Path,
    *,
    allowlist: list[str],
    max_bytes: int,
    timeout: float,
    deadline: float | None = None,
) -> str:
    """Stream ``url`` to ``dest`` with a size cap, re-checking every redirect and connecting
    to the checked address; ``timeout`` bounds each connect/read, ``deadline`` (seconds)
    the whole download, redirects included. Returns the final URL's content type header."""
    current = url
    limit = _Deadline(deadline) if deadline else None
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                request = pinned_request(client, "GET", current, allowlist)
                if limit is not None:
                    limit.watch(request, timeout)
                resp = client.send(request, stream=True)
                try:
                    if resp.is_redirect:
                        current = urljoin(current, resp.headers.get("location", ""))
                        continue
                    if resp.status_code != 200:
                        raise UrlRefused(f"fetching {current} answered HTTP {resp.status_code}")
                    size = 0
                    with open(dest, "wb") as out:
                        # No chunk size: each arrival is checked, not each megabyte.
                        for chunk in resp.iter_bytes():
                            if limit is not None:
                                limit.check()
                            size += len(chunk)
                            if size > max_bytes:
                                raise UrlRefused(
                                    f"the content at {current} exceeds {max_bytes} bytes"
                                )
                            out.write(chunk)
                    if limit is not None:
                        limit.check()  # a body that ends at close may end at the shutdown
                    return resp.headers.get("content-type", "")
                finally:
                    resp.close()
    except httpx.TransportError:
        # A socket shut by the deadline surfaces as whatever httpx makes of a closed one.
        if limit is not None and limit.expired:
            raise limit.error() from None
        raise
    finally:
        if limit is not None:
            limit.cancel()
    raise UrlRefused(f"more than {MAX_REDIRECTS} redirects")


def post_pinned(
    url: str, *, allowlist: list[str], content: bytes, headers: dict[str, str], timeout: float
) -> httpx.Response:
    """POST to a checked address (webhooks); redirects are not followed."""
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        request = pinned_request(client, "POST", url, allowlist, content=content, headers=headers)
        return client.send(request)
