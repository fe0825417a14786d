"""Client-supplied URLs: only http(s), never to private networks unless allow-listed.

Checked at submission (a clear 422) and again by the worker before each request and
redirect, because DNS answers and redirects can change between the two.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

MAX_REDIRECTS = 5
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UrlRefused(f"cannot resolve host {host!r}") from exc
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def check_url(url: str, allowlist: list[str]) -> str:
    """Return the URL if a worker may fetch it, else raise UrlRefused with the reason."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("only http and https URLs are accepted")
    host = (parts.hostname or "").lower()
    if not host:
        raise UrlRefused("the URL has no host")
    hosts, nets = parse_allowlist(allowlist)
    if host in hosts:
        return url
    for addr in _addresses(host):
        if any(addr in net for net in nets):
            continue
        if not addr.is_global:
            raise UrlRefused(
                f"{host} resolves to {addr}, a private, loopback or link-local address "
                "(allow it with MORAG_URL_ALLOWLIST)"
            )
    return url


def download(url: str, dest: Path, *, allowlist: list[str], max_bytes: int, timeout: float) -> str:
    """Stream ``url`` to ``dest`` with a size cap, re-checking every redirect. Returns the
    final URL's content type header."""
    current = url
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(current, allowlist)
            with client.stream("GET", current) as resp:
                if resp.is_redirect:
                    current = urljoin(current, resp.headers.get("location", ""))
                    continue
                if resp.status_code != 200:
                    raise UrlRefused(f"fetching {current} answered HTTP {resp.status_code}")
                size = 0
                with open(dest, "wb") as out:
                    for chunk in resp.iter_bytes(1024 * 1024):
                        size += len(chunk)
                        if size > max_bytes:
                            raise UrlRefused(f"the content at {current} exceeds {max_bytes} bytes")
                        out.write(chunk)
                return resp.headers.get("content-type", "")
    raise UrlRefused(f"more than {MAX_REDIRECTS} redirects")
