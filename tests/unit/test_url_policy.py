"""The URL policy: malformed URLs are refused cleanly, connections go to the checked address,
and yt-dlp's traffic (redirects, media, HLS fragments) goes through the policy proxy.

Two loopback servers play the outside world: one on 127.0.0.1 (allow-listed) and one on
127.0.0.2 (loopback but not allow-listed, so it stands for a private address)."""

from __future__ import annotations

import http.server
import ipaddress
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from morag import urls
from morag.policy_proxy import policy_proxy, ydl_proxy_options

ALLOW = ["127.0.0.1"]


class _Site(http.server.SimpleHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []
    redirect_to: ClassVar[str] = ""

    def do_GET(self) -> None:
        type(self).hosts.append(self.headers.get("Host", ""))
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", type(self).redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


def _serve(address: str, directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = type("Site", (_Site,), {"hosts": [], "redirect_to": ""})

    def factory(*args: Any) -> http.server.BaseHTTPRequestHandler:
        return handler(*args, directory=str(directory))

    server = http.server.ThreadingHTTPServer((address, 0), factory)
    server.handler = handler  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{address}:{server.server_address[1]}"


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[dict[str, Any]]:
    public_dir, private_dir = tmp_path / "public", tmp_path / "private"
    public_dir.mkdir()
    private_dir.mkdir()
    (public_dir / "page.html").write_text("<html><body>public</body></html>")
    (private_dir / "secret.txt").write_text("private data")
    public, public_url = _serve("127.0.0.1", public_dir)
    private, private_url = _serve("127.0.0.2", private_dir)
    try:
        yield {
            "public": public_url,
            "private": private_url,
            "public_dir": public_dir,
            "private_dir": private_dir,
            "public_site": public.handler,  # type: ignore[attr-defined]
            "private_site": private.handler,  # type: ignore[attr-defined]
        }
    finally:
        public.shutdown()
        private.shutdown()


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",
        "http://a..b/x",
        f"http://{'a' * 70}.example.com/x",
        "http://example.com:99999/x",
        "http://exa mple.com/",
        "http://-bad-.example.com/",
        "http://" + "a." * 130 + "com/x",
        "http://[not-an-ip]/x",
        "https://",
    ],
)
def test_malformed_urls_are_refused_not_crashes(url: str) -> None:
    with pytest.raises(urls.UrlRefused):
        urls.check_url(url, [])


def test_international_names_are_checked_in_their_dns_form() -> None:
    assert urls.parse("http://bücher.example/x").host == "xn--bcher-kva.example"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def test_downloads_connect_to_the_checked_address_once_resolved(
    sites: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A spy, not a stand-in: every lookup still goes to the real resolver.
    lookups: list[str] = []
    real = socket.getaddrinfo

    def spy(host: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(str(host))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    port = sites["public"].rsplit(":", 1)[1]
    # 127.0.0.1 only: whatever else "localhost" resolves to (::1) would be refused.
    urls.download(
        f"http://localhost:{port}/page.html",
        tmp_path / "out.html",
        allowlist=["localhost"],
        max_bytes=10_000,
        timeout=10,
        deadline=30,  # well within: the deadline changes nothing for a prompt server
    )
    assert (tmp_path / "out.html").read_text().startswith("<html>")
    # One lookup of the name, by the policy; the connection went to the IP it checked
    # (connecting to an IP literal "looks up" the literal, which asks no DNS server).
    assert [h for h in lookups if not _is_ip(h)] == ["localhost"]
    assert sites["public_site"].hosts == [f"localhost:{port}"]


def test_a_redirect_to_a_private_address_is_refused(sites: dict[str, Any], tmp_path: Path) -> None:
    sites["public_site"].redirect_to = sites["private"] + "/secret.txt"
    with pytest.raises(urls.UrlRefused, match=r"127\.0\.0\.2"):
        urls.download(
            sites["public"] + "/redirect",
            tmp_path / "x",
            allowlist=ALLOW,
            max_bytes=10_000,
            timeout=10,
        )
    assert sites["private_site"].hosts == []


def test_the_proxy_forwards_allowed_requests_and_refuses_the_rest(sites: dict[str, Any]) -> None:
    sites["public_site"].redirect_to = sites["private"] + "/secret.txt"
    with policy_proxy(ALLOW, 10) as (proxy, refusals):
        with httpx.Client(proxy=proxy, follow_redirects=True, timeout=10) as c:
            ok = c.get(sites["public"] + "/page.html")
            redirected = c.get(sites["public"] + "/redirect")
            direct = c.get(sites["private"] + "/secret.txt")
            literal_v6 = c.get("http://[::1]:9/x")
        # CONNECT is refused before any connection is made.
        with httpx.Client(proxy=proxy, timeout=10) as c, pytest.raises(httpx.ProxyError):
            c.get("https://127.0.0.2:443/")
    assert ok.status_code == 200 and "public" in ok.text
    assert redirected.status_code == 403 and "refused" in redirected.text
    assert direct.status_code == 403 and literal_v6.status_code == 403
    assert sites["private_site"].hosts == [], "nothing may reach the private server"
    assert len(refusals.refused) == 4
    assert "127.0.0.2" in refusals.refused[0]


def _wav(path: Path) -> Path:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
         "sine=frequency=440:duration=1", "-y", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    return path


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is installed by make test")
def test_yt_dlp_goes_through_the_policy(sites: dict[str, Any], tmp_path: Path) -> None:
    from yt_dlp import YoutubeDL
    from yt_dlp.utils import DownloadError

    _wav(sites["public_dir"] / "tone.wav")
    _wav(sites["private_dir"] / "tone.wav")
    sites["public_site"].redirect_to = sites["private"] + "/tone.wav"

    def fetch(url: str, dest: Path, proxy: str) -> None:
        opts = {
            **ydl_proxy_options(proxy),
            "outtmpl": str(dest / "media.%(ext)s"),
            "quiet": True,
            "no_warnings": True,
            "noprogress": True,
            "retries": 0,
            "cachedir": False,
        }
        with YoutubeDL(opts) as ydl:
            ydl.extract_info(url, download=True)

    with policy_proxy(ALLOW, 10) as (proxy, refusals):
        fetch(sites["public"] + "/tone.wav", tmp_path / "ok", proxy)
        assert list((tmp_path / "ok").glob("media.*"))
        with pytest.raises(DownloadError):
            fetch(sites["public"] + "/redirect", tmp_path / "redirected", proxy)
    assert refusals.refused and "127.0.0.2" in refusals.refused[0]
    assert sites["private_site"].hosts == []


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is installed by make test")
def test_hls_fragments_on_a_private_address_are_refused(
    sites: dict[str, Any], tmp_path: Path
) -> None:
    from yt_dlp import YoutubeDL
    from yt_dlp.utils import DownloadError

    hls = sites["private_dir"]
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
         "sine=frequency=440:duration=3", "-c:a", "aac", "-f", "hls", "-hls_time", "1",
         "-hls_segment_filename", str(hls / "seg%d.ts"), str(hls / "list.m3u8")],
        check=True, timeout=60,
    )  # fmt: skip
    # The playlist is public; its fragments live on the private server.
    playlist = (hls / "list.m3u8").read_text()
    playlist = "\n".join(
        f"{sites['private']}/{line}" if line.endswith(".ts") else line
        for line in playlist.splitlines()
    )
    (sites["public_dir"] / "list.m3u8").write_text(playlist + "\n")
    opts = {
        **ydl_proxy_options("PROXY"),
        "outtmpl": str(tmp_path / "media.%(ext)s"),
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "retries": 0,
        "fragment_retries": 0,
        "skip_unavailable_fragments": False,
        "cachedir": False,
    }
    with policy_proxy(ALLOW, 10) as (proxy, refusals):
        opts["proxy"] = proxy
        with YoutubeDL(opts) as ydl, pytest.raises(DownloadError):
            ydl.extract_info(sites["public"] + "/list.m3u8", download=True)
    assert any("127.0.0.2" in r for r in refusals.refused), refusals.refused
    assert sites["private_site"].hosts == [], "no fragment may come from the private server"


class _Drip(http.server.BaseHTTPRequestHandler):
    """A media file served one small piece at a time, each well within the read timeout."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.send_header("Content-Length", str(1024 * 1024))
        self.end_headers()
        try:
            for _ in range(1024):
                self.wfile.write(b"\x00" * 1024)
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass  # the client gave up: what the test wants

    def log_message(self, *args: object) -> None:
        pass


def test_a_slow_drip_download_is_stopped_at_the_tool_timeout(tmp_path: Path) -> None:
    from morag.config import Settings
    from morag.processors.base import ProcessContext, ProcessingError
    from morag.processors.youtube import YoutubeProcessor

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/slow.wav"
    settings = Settings(url_allowlist=ALLOW, tool_timeout=1.0, url_timeout=10)
    ctx = ProcessContext(settings, "cpu", tmp_path, lambda _: None, source_url=url)
    started = time.monotonic()
    try:
        with pytest.raises(ProcessingError, match=r"took longer than 1s"):
            YoutubeProcessor().process(tmp_path, {}, ctx)
    finally:
        server.shutdown()
    assert time.monotonic() - started < 20  # the whole file would take about 50 s


# Private IPv4 addresses written as IPv6: the policy decides by the IPv4 address inside.
EMBEDDED_PRIVATE = [
    "http://[::127.0.0.1]/",  # IPv4-compatible (deprecated)
    "http://[::ffff:10.0.0.1]/",  # IPv4-mapped
    "http://[64:ff9b::10.0.0.1]/",  # NAT64 well-known prefix
    "http://[64:ff9b::169.254.169.254]/",  # ... to a cloud metadata service
    "http://[64:ff9b:1::a00:1]/",  # NAT64 local-use prefix: a site's own translator
    "http://[2002:a00:1::1]/",  # 6to4 of 10.0.0.1
    "http://[2002:7f00:1::1]/",  # 6to4 of 127.0.0.1
    "http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/",  # Teredo, client 10.0.0.1
]


@pytest.mark.parametrize("url", EMBEDDED_PRIVATE)
def test_private_ipv4_in_an_ipv6_form_is_refused(url: str) -> None:
    with pytest.raises(urls.UrlRefused, match=r"private, loopback or link-local|local-use"):
        urls.check_url(url, [])


@pytest.mark.parametrize(
    "url", ["http://[64:ff9b::8.8.8.8]/", "http://[2002:808:808::1]/", "http://[::ffff:8.8.8.8]/"]
)
def test_public_ipv4_in_an_ipv6_form_is_accepted(url: str) -> None:
    assert urls.check_url(url, []) == url


def test_the_allowlist_opens_an_embedded_address_by_its_ipv4_network() -> None:
    assert urls.check_url("http://[64:ff9b::10.0.0.1]/", ["10.0.0.0/8"])


def test_a_dns_answer_in_an_ipv6_form_is_refused_at_connect_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The name passes nothing by itself: the resolver answers a NAT64 form of a private
    # address (what a rebinding DNS server would send). No DNS server of ours can answer
    # for a name here, so the answer is given to getaddrinfo's caller directly.
    def nat64_answer(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("64:ff9b::7f00:1", port, 0, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", nat64_answer)
    with pytest.raises(urls.UrlRefused, match=r"64:ff9b::7f00:1 \(it carries the IPv4 address"):
        urls.download(
            "http://rebind.example/x", tmp_path / "x", allowlist=[], max_bytes=10, timeout=5
        )


def _through_proxy(proxy: str, request_line: str) -> bytes:
    # Raw bytes: httpx writes an IPv6 proxy target without its brackets.
    host, port = proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"{request_line}\r\nHost: x\r\n\r\n".encode())
        return sock.recv(65536)


def test_the_proxy_refuses_ipv6_forms_of_private_addresses(sites: dict[str, Any]) -> None:
    port = sites["private"].rsplit(":", 1)[1]
    with policy_proxy(ALLOW, 10) as (proxy, refusals):
        answers = [
            _through_proxy(proxy, f"GET http://[::127.0.0.2]:{port}/secret.txt HTTP/1.1"),
            _through_proxy(proxy, f"GET http://[64:ff9b::127.0.0.2]:{port}/secret.txt HTTP/1.1"),
            _through_proxy(proxy, f"CONNECT [2002:7f00:2::1]:{port} HTTP/1.1"),
        ]
    assert all(a.startswith(b"HTTP/1.1 403") for a in answers), answers
    assert len(refusals.refused) == 3
    assert all("carries the IPv4 address 127.0.0.2" in r for r in refusals.refused)
    assert sites["private_site"].hosts == []


class _SlowPage(http.server.BaseHTTPRequestHandler):
    """A page sent one byte every 0.2 s (each byte well within the read timeout), the
    headers too when the path asks for it; about 10 s in all."""

    def do_GET(self) -> None:
        body = b"<html><body>" + b"x" * 30 + b"</body></html>"
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        if self.path == "/slow-headers":
            slow, fast = head + body, b""
        else:
            slow, fast = body, head
        try:
            self.wfile.write(fast)
            for i in range(len(slow)):
                self.wfile.write(slow[i : i + 1])
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass  # the client gave up: what the test wants

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("path", ["/slow-body", "/slow-headers"])
def test_a_web_fetch_stops_at_its_overall_deadline(tmp_path: Path, path: str) -> None:
    from morag.config import Settings
    from morag.processors.base import ProcessContext
    from morag.processors.web import WebProcessor

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    settings = Settings(url_allowlist=ALLOW, url_timeout=10, web_fetch_deadline=1.0)
    ctx = ProcessContext(settings, "cpu", tmp_path, lambda _: None, source_url=url)
    started = time.monotonic()
    try:
        with pytest.raises(urls.UrlRefused, match=r"took longer than 1s"):
            WebProcessor().process(tmp_path, {}, ctx)
    finally:
        server.shutdown()
    # The page takes about 10 s to arrive; a loaded machine still stops well before.
    assert time.monotonic() - started < 8
