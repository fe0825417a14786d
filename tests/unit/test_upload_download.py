"""A worker's download of an upload from the API (files.fetch_for_worker) rides out what a
load balancer answers while an API host is lost or Redis fails over (502/503/504, refused
connections), and fails at once on an answer that will not change (404). Found by the HA
chaos run (tests/lab/ha.py): jobs failed with "download of the upload failed: HTTP 503"."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from morag import files
from morag.config import Settings
from morag.job_record import Source
from pydantic import SecretStr

BODY = b"RIFF....WAVE" * 1000
FILE_ID = "0123456789abcdef0123456789abcdef"


class Server:
    """A real HTTP server answering each GET with the next status of ``script`` (then 200)."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                status = server.script.pop(0) if server.script else 200
                self.send_response(status)
                body = BODY if status == 200 else b"{}"
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def serve() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.httpd.shutdown()


def fetch(tmp_path: Path, url: str, retry: float = 30.0) -> tuple[Path, str]:
    settings = Settings(
        api_url=url,
        worker_token=SecretStr("t"),
        shared_dir=tmp_path / "shared",
        download_retry_seconds=retry,
    )
    source = Source.upload(
        file_id=FILE_ID, sha256=hashlib.sha256(BODY).hexdigest(), size=len(BODY), filename="a.wav"
    )
    return files.fetch_for_worker(settings, source, tmp_path / "work")


def test_a_503_from_the_load_balancer_is_tried_again(tmp_path: Path, serve: list[Server]) -> None:
    server = Server([503, 502, 504])
    serve.append(server)
    path, how = fetch(tmp_path, server.url)
    assert how == "http"
    assert path.read_bytes() == BODY
    assert server.hits == 4


def test_a_404_fails_at_once(tmp_path: Path, serve: list[Server]) -> None:
    server = Server([404])
    serve.append(server)
    with pytest.raises(files.FileUnavailable, match="HTTP 404"):
        fetch(tmp_path, server.url)
    assert server.hits == 1


def test_the_retries_end(tmp_path: Path, serve: list[Server]) -> None:
    server = Server([503] * 100)
    serve.append(server)
    with pytest.raises(files.FileUnavailable, match="HTTP 503"):
        fetch(tmp_path, server.url, retry=3.0)  # a few tries, even on a busy machine
    assert 1 < server.hits < 100


def test_a_refused_connection_is_tried_again_until_the_deadline(tmp_path: Path) -> None:
    with pytest.raises(files.FileUnavailable, match="download of the upload failed"):
        fetch(tmp_path, "http://127.0.0.1:9", retry=0.6)
