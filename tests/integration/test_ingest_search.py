"""Ingest -> store on the server's morag-store worker -> search; deletion; webhooks."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.conftest import RedisServer
from tests.integration import media
from tests.integration.conftest import running_stack
from tests.integration.stack import Stack, wait_until

SECRET = "test-webhook-secret"


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ingest")
    return {
        "docx": media.docx_file(d / "harbour.docx"),
        "pptx": media.pptx_file(d / "bakery.pptx"),
        "pdf": media.pdf_file(d / "bees.pdf"),
        "html": media.html_page(d / "island.html"),
    }


@pytest.fixture(scope="module")
def web(docs: dict[str, Path]) -> Iterator[str]:
    with media.http_server(docs["html"].parent) as url:
        yield url


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("ingeststack")
    workers = {"gpu0@in": "gpu-tasks", "cpu0@in": "celery", "store@in": "morag-store"}
    settings = {
        "qdrant_path": root / "qdrant",
        "chunk_size": 400,
        "chunk_overlap": 60,
        "webhook_secret": SECRET,
        "webhook_backoff": 0.2,
        "webhook_retries": 3,
        "store_ingested": "true",
    }
    with running_stack(redis_server, root, workers, **settings) as s:
        yield s


def _search(stack: Stack, query: str, **extra: Any) -> list[dict[str, Any]]:
    with stack.client() as c:
        resp = c.post("/api/v1/search", json={"query": query, "limit": 3, **extra}, timeout=90)
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


@pytest.fixture(scope="module")
def ingested(stack: Stack, docs: dict[str, Path], web: str) -> dict[str, dict[str, Any]]:
    jobs = {}
    for i, name in enumerate(("docx", "pptx", "pdf")):
        with stack.client() as c, open(docs[name], "rb") as f:
            resp = c.post(
                "/api/v1/ingest/file",
                files={"file": (docs[name].name, f)},
                data={
                    "gpu": str(i % 2 == 0).lower(),
                    "metadata": json.dumps({"team": "docs", "n": i, "weight": i + 0.5}),
                },
            )
        assert resp.status_code == 202, resp.text
        jobs[name] = resp.json()
    with stack.client() as c:
        resp = c.post(
            "/api/v1/ingest/url",
            json={
                "url": f"{web}/island.html",
                "gpu": True,
                "metadata": {"team": "web"},
            },
        )
    assert resp.status_code == 202, resp.text
    jobs["html"] = resp.json()
    return {name: stack.wait_job(j["task_id"], timeout=120) for name, j in jobs.items()}


def test_ingest_succeeds_only_once_stored(ingested: dict[str, dict[str, Any]]) -> None:
    for name, job in ingested.items():
        assert job["status"] == "succeeded", (name, job["error"])
        meta = job["result"]["metadata"]
        assert meta["stored"] is True and meta["stored_chunks"] >= 1, (name, meta)


@pytest.mark.parametrize(
    ("name", "query", "sentence", "source"),
    [
        (
            "docx",
            "what colour did the lighthouse keeper paint the tower",
            media.DOCX_SENTENCE,
            "harbour.docx",
        ),
        (
            "pptx",
            "bread leavened with natural yeast",
            media.PPTX_SENTENCE,
            "bakery.pptx",
        ),
        (
            "pdf",
            "how do bees tell each other where flowers are",
            media.PDF_SENTENCE,
            "bees.pdf",
        ),
        (
            "html",
            "an eruption buried the town under ash",
            media.WEB_SENTENCE,
            "/island.html",
        ),
    ],
)
def test_paraphrased_query_finds_the_sentence(
    stack: Stack,
    ingested: dict[str, dict[str, Any]],
    name: str,
    query: str,
    sentence: str,
    source: str,
) -> None:
    top = _search(stack, query)[0]
    assert sentence in " ".join(top["text"].split())
    assert top["source"].endswith(source)
    assert top["job_id"] == ingested[name]["task_id"]
    assert top["score"] > 0.3 and isinstance(top["chunk_index"], int)
    assert top["content_type"] in ("document", "web")


def test_a_number_in_a_filter_matches_stored_numbers(
    stack: Stack, ingested: dict[str, dict[str, Any]]
) -> None:
    # A float used to reach Qdrant's MatchValue, fail on the store worker and answer 503.
    hits = _search(stack, "bees and flowers", filter={"weight": 2.5})
    assert hits and {h["job_id"] for h in hits} == {ingested["pdf"]["task_id"]}
    # 1.0 matches the integer 1 that was stored.
    hits = _search(stack, "bread", filter={"n": 1.0})
    assert hits and {h["job_id"] for h in hits} == {ingested["pptx"]["task_id"]}
    assert _search(stack, "bread", filter={"weight": 0.25}) == []


def test_a_filter_value_that_is_no_number_is_a_422(stack: Stack) -> None:
    # Python's JSON parser reads NaN; it matches nothing and must not reach the store.
    with stack.client() as c:
        resp = c.post(
            "/api/v1/search",
            content=b'{"query": "x", "filter": {"weight": NaN}}',
            headers={"Content-Type": "application/json"},
        )
    assert resp.status_code == 422, resp.text
    assert "filter" in str(resp.json()["detail"])


def test_filter_and_delete_by_source(
    stack: Stack, ingested: dict[str, dict[str, Any]], web: str
) -> None:
    hits = _search(stack, "bees and flowers", filter={"team": "web"})
    assert hits and all(h["metadata"]["team"] == "web" for h in hits)
    hits = _search(stack, "bees and flowers", filter={"content_type": "document"})
    assert hits[0]["source"] == "bees.pdf"
    with stack.client() as c:
        resp = c.delete("/api/v1/search/source", params={"source": "bees.pdf"}, timeout=60)
    assert resp.status_code == 200 and resp.json()["deleted"] >= 1
    assert all(h["source"] != "bees.pdf" for h in _search(stack, "bees waggle dance"))


def test_search_needs_an_api_key(stack: Stack) -> None:
    with stack.client(key=None) as c:
        assert c.post("/api/v1/search", json={"query": "x"}).status_code == 401


class _Receiver(http.server.BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[bytes, dict[str, str]]]] = []
    fail_first = 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append((body, dict(self.headers.items())))
        status = 500 if len(type(self).calls) <= type(self).fail_first else 200
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhook_is_signed_and_retried(stack: Stack, docs: dict[str, Path]) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        with stack.client() as c, open(docs["docx"], "rb") as f:
            resp = c.post(
                "/api/v1/ingest/file",
                files={"file": ("hooked.docx", f)},
                data={"webhook_url": hook},
            )
        assert resp.status_code == 202, resp.text
        assert resp.json()["webhook"] == {"url": hook, "signed": True, "note": None}
        task_id = resp.json()["task_id"]
        wait_until(lambda: len(_Receiver.calls) >= 2, 60, "the webhook retry")
    finally:
        server.shutdown()
    body, headers = _Receiver.calls[-1]
    # Standard Webhooks, checked with its reference library; a retry keeps the message id.
    Webhook(SECRET.encode()).verify(body, headers)
    assert headers["webhook-id"] == _Receiver.calls[0][1]["webhook-id"] == f"msg_{task_id}"
    with pytest.raises(WebhookVerificationError):  # a replay of an old capture is refused
        Webhook(SECRET.encode()).verify(
            body, {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 600)}
        )
    # The store worker counted the failed POST and the delivered one.
    wait_until(lambda: stack.scrape().value("morag_webhooks_delivered_total") >= 1, 10, "the count")
    m = stack.scrape()
    assert m.value("morag_webhook_failures_total", outcome="retrying") >= 1
    assert m.value("morag_queue_consumers", queue="morag-store") == 1
    payload = json.loads(body)
    assert payload["task_id"] == task_id and payload["status"] == "succeeded"
    assert payload["result"]["metadata"]["stored"] is True


def test_refused_webhook_url_is_422(stack: Stack, docs: dict[str, Path]) -> None:
    with stack.client() as c:
        resp = c.post(
            "/api/v1/ingest/url",
            json={
                "url": "http://127.0.0.1:9/x.html",
                "webhook_url": "http://10.9.8.7/hook",
            },
        )
    assert resp.status_code == 422 and "webhook_url refused" in resp.json()["detail"]
