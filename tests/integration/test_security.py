"""Hostile input against a real uvicorn API: the key and the size limit are checked before
the body is read (chunked bodies too), malformed URLs are 422s.

The streaming tests send far more than the server may read from a generator and count what
it yielded when the answer came: a server that reads the whole body first would exhaust it.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from tests.conftest import RedisServer
from tests.integration.conftest import running_stack
from tests.integration.stack import API_KEY, Stack

MIB = 1024 * 1024
LIMIT = 2_000_000  # MORAG_MAX_UPLOAD_BYTES of this module's stack
BOUNDARY = "morag-test-boundary"


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API alone: nothing here may reach a worker."""
    with running_stack(
        redis_server, tmp_path_factory.mktemp("security"), {}, max_upload_bytes=LIMIT
    ) as s:
        yield s


class Body:
    """A multipart upload of ``total`` bytes, produced lazily; ``sent`` counts what left."""

    def __init__(self, total: int, chunk: int = 256 * 1024) -> None:
        self.total = total
        self.chunk = chunk
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            'filename="big.wav"\r\nContent-Type: audio/wav\r\n\r\nRIFF'
        ).encode()
        yield head
        self.sent += len(head)
        block = b"\x00" * self.chunk
        while self.sent < self.total:
            yield block
            self.sent += len(block)
        tail = f"\r\n--{BOUNDARY}--\r\n".encode()
        yield tail
        self.sent += len(tail)

    @property
    def exhausted(self) -> bool:
        return self.sent >= self.total


def _stream(
    stack: Stack, path: str, body: Body, headers: dict[str, str]
) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    with httpx.Client(base_url=stack.api_url, timeout=httpx.Timeout(60, write=30)) as c:
        resp = c.post(
            path,
            content=iter(body),  # a generator: httpx sends it chunked
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **headers},
        )
    return resp, time.monotonic() - started


def _uploads(stack: Stack) -> list[Path]:
    folder = stack.shared / "uploads"
    return list(folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize(
    "headers,status",
    [({}, 401), ({"X-API-Key": "wrong-key"}, 403)],
    ids=["no-key", "wrong-key"],
)
@pytest.mark.parametrize("path", ["/api/v1/ingest/file", "/process/file"])
def test_a_stranger_s_chunked_upload_is_refused_before_it_is_read(
    api: Stack, path: str, headers: dict[str, str], status: int
) -> None:
    body = Body(300 * MIB)
    resp, seconds = _stream(api, path, body, headers)
    # The answer came while the client was still sending: most of 300 MiB never left.
    assert not body.exhausted
    assert body.sent < 64 * MIB, f"{body.sent} bytes sent before the {status}"
    assert resp.status_code == status, resp.text
    assert resp.json()["code"] == {401: "unauthorized", 403: "forbidden"}[status]
    assert "API key" in resp.json()["detail"]
    print(f"{path} {status}: answered after {body.sent / MIB:.1f} MiB sent, {seconds:.2f}s")


@pytest.mark.parametrize("path", ["/api/v1/ingest/file", "/process/file"])
def test_an_oversized_chunked_upload_is_cut_at_the_limit(api: Stack, path: str) -> None:
    body = Body(200 * MIB)
    before = set(_uploads(api))
    resp, seconds = _stream(api, path, body, {"X-API-Key": API_KEY})
    assert not body.exhausted
    assert body.sent < 64 * MIB, f"{body.sent} bytes sent before the 413"
    assert resp.status_code == 413, resp.text
    assert resp.json()["code"] == "too_large"
    assert "exceeds the limit" in resp.json()["detail"]
    assert set(_uploads(api)) == before, "nothing of a refused upload may stay on the share"
    print(f"{path} 413: answered after {body.sent / MIB:.1f} MiB sent, {seconds:.2f}s")


def test_a_declared_length_over_the_limit_is_refused_from_the_headers(api: Stack) -> None:
    body = Body(300 * MIB)
    with httpx.Client(base_url=api.api_url, timeout=httpx.Timeout(60, write=30)) as c:
        resp = c.post(
            "/api/v1/ingest/file",
            content=iter(body),
            headers={
                "X-API-Key": API_KEY,
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Content-Length": str(300 * MIB),
            },
        )
    assert resp.status_code == 413 and resp.json()["code"] == "too_large"
    assert not body.exhausted and body.sent < 64 * MIB


def test_json_routes_have_a_small_body_limit(api: Stack) -> None:
    with api.client() as c:
        resp = c.post(
            "/api/v1/ingest/url",
            content=b'{"url": "' + b"a" * (5 * MIB) + b'"}',
            headers={"Content-Type": "application/json"},
        )
    assert resp.status_code == 413 and resp.json()["code"] == "too_large"


def test_the_worker_token_route_refuses_a_body_without_the_token(api: Stack) -> None:
    body = Body(100 * MIB)
    resp, _ = _stream(api, "/api/v1/files/" + "0" * 32, body, {"X-API-Key": API_KEY})
    assert not body.exhausted
    assert resp.status_code == 401 and resp.json()["code"] == "unauthorized"
    assert "worker token" in resp.json()["detail"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": API_KEY}])
def test_the_openai_route_refuses_a_stranger_s_upload_before_reading_it(
    api: Stack, headers: dict[str, str]
) -> None:
    body = Body(300 * MIB)
    resp, _ = _stream(api, "/v1/audio/transcriptions", body, headers)
    assert not body.exhausted and body.sent < 64 * MIB
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["type"] == "authentication_error"


def test_an_upload_within_the_limit_still_works(api: Stack, speech_wav: Path) -> None:
    with api.client() as c, open(speech_wav, "rb") as f:
        resp = c.post("/api/v1/ingest/file", files={"file": ("speech.wav", f)})
    assert resp.status_code == 202, resp.text
    assert resp.json()["content_type"] == "audio"


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",
        "http://a..b/x",
        f"http://{'a' * 70}.example.com/x",
        "http://exa mple.com/x",
        "http://example.com:99999/x",
        "http://:80/x",
        "http://" + "a." * 130 + "com/x",
    ],
)
def test_malformed_urls_are_422(api: Stack, url: str) -> None:
    with api.client() as c:
        answers = [
            c.post("/api/v1/ingest/url", json={"url": url}),
            c.post("/process/url", json={"url": url}),
            c.post("/api/v1/ingest/batch", json={"items": [{"url": url}]}),
            c.post(
                "/api/v1/ingest/url",
                json={"url": "http://127.0.0.1/a.wav", "webhook_url": url},
            ),
        ]
    for resp in answers:
        assert resp.status_code == 422, (url, resp.status_code, resp.text)
        assert resp.json()["detail"]


@pytest.mark.parametrize(
    "options",
    [
        {"beam_size": 10**9},
        {"beam_size": 0},
        {"beam_size": "many"},
        {"temperature": 50},
        {"temperature": -1},
        {"ocr_languages": "eng; rm -rf /"},
        {"ocr_languages": "e" * 500},
    ],
)
def test_numeric_and_tool_options_are_bounded(
    api: Stack, speech_wav: Path, options: dict[str, object]
) -> None:
    before = set(_uploads(api))  # an accepted upload from another test may wait there
    with api.client() as c:
        url = c.post(
            "/api/v1/ingest/url", json={"url": "http://127.0.0.1/a.wav", "options": options}
        )
        upload = c.post(
            "/process/file",
            data={"options": json.dumps(options)},
            files={"file": ("speech.wav", speech_wav.read_bytes())},
        )
    for resp in (url, upload):
        assert resp.status_code == 422, resp.text
        assert "options." in resp.json()["detail"] and resp.json()["code"]
    assert set(_uploads(api)) == before, "a refused upload must not stay on the share"


class _Hostile(http.server.BaseHTTPRequestHandler):
    """Pages a worker fetches: an unknown charset, redirects to a private address."""

    private = ""

    def do_GET(self) -> None:
        if self.path == "/bogus.html":
            body = (
                b"<html><body><p>"
                + b"Some words in a strange charset. " * 20
                + b"</p></body></html>"
            )
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=x-no-such-charset")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(302)
        self.send_header("Location", f"{self.private}/media{Path(self.path).suffix}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _Private(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"RIFF")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def worker_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(
        redis_server, tmp_path_factory.mktemp("hostile"), {"cpu0@sec": "celery"}, process_wait=90
    ) as s:
        yield s


@pytest.fixture(scope="module")
def hostile_site() -> Iterator[str]:
    # 127.0.0.2 is loopback but not in the stack's allowlist (127.0.0.1): it plays a
    # private address that a redirect must not reach.
    private = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Private)
    handler = type(
        "Hostile", (_Hostile,), {"private": f"http://127.0.0.2:{private.server_address[1]}"}
    )
    public = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for server in (private, public):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{public.server_address[1]}"
    finally:
        public.shutdown()
        private.shutdown()


def _process_url(stack: Stack, url: str) -> httpx.Response:
    with stack.client() as c:
        return c.post("/process/url", json={"url": url}, timeout=120)


def test_an_unknown_page_charset_fails_the_job_clearly(
    worker_stack: Stack, hostile_site: str
) -> None:
    resp = _process_url(worker_stack, f"{hostile_site}/bogus.html")
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert "processing failed" in detail and "unknown character set 'x-no-such-charset'" in detail


@pytest.mark.parametrize("name", ["/redirect.mp4", "/redirect.wav"], ids=["yt-dlp", "download"])
def test_redirects_to_a_private_address_fail_the_job(
    worker_stack: Stack, hostile_site: str, name: str
) -> None:
    _Private.hits.clear()
    resp = _process_url(worker_stack, hostile_site + name)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert "127.0.0.2" in detail and "private, loopback or link-local" in detail, detail
    assert _Private.hits == [], "the private server was reached"
