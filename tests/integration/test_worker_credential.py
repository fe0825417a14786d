"""What a stolen GPU/CPU worker credential (`morag-worker`) cannot do through the store worker,
tried as that user against a real Redis with the role's ACL and real Celery workers: order a
delete or a search (forged, planted or replayed `morag.vector_op`), or have a finished job
stored again (a forged `morag.store_job`). docs/security.md, "Credentials"."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from morag import store_requests
from morag.celery_app import celery_config
from morag.config import Settings

from tests.conftest import RedisServer
from tests.integration import media
from tests.integration.conftest import running_stack
from tests.integration.stack import Stack, wait_until

SOURCE = "harbour.docx"
STORE = "store@cred"


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("credstack")
    workers = {"cpu0@cred": "celery", STORE: "morag-store"}
    settings = {"qdrant_path": root / "qdrant", "store_ingested": "true"}
    with running_stack(redis_server, root, workers, **settings) as s:
        yield s


@pytest.fixture(scope="module")
def ingested(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    doc = media.docx_file(tmp_path_factory.mktemp("creddoc") / SOURCE)
    job = stack.wait_job(stack.ingest(doc, gpu=False)["task_id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    return job


def _as(stack: Stack, role: str) -> tuple[Celery, redis.Redis]:
    """A Celery client and a Redis connection holding only ``role``'s credential."""
    assert stack.users is not None
    url = stack.users[role]
    app = Celery(f"as-{role}", set_as_current=False)
    app.conf.update(celery_config(Settings(redis_url=url)))
    return app, redis.Redis.from_url(url)


def _hits(stack: Stack) -> list[dict[str, Any]]:
    with stack.client() as c:
        resp = c.post(
            "/api/v1/search",
            json={"query": "lighthouse tower", "limit": 10, "filter": {"source": SOURCE}},
            timeout=90,
        )
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def _store_log(stack: Stack) -> str:
    return (stack.logs / f"{STORE.replace('@', '_')}.log").read_text(errors="replace")


def test_a_worker_cannot_order_the_store_to_delete(stack: Stack, ingested: dict[str, Any]) -> None:
    before = _hits(stack)
    assert before, "the ingested document is searchable"
    celery, client = _as(stack, "worker")
    # The message the attack used: an old-style delete with its filter in the arguments.
    forged = "f" * 32
    celery.send_task(
        "morag.vector_op", (forged, "delete", {"filter": {"source": SOURCE}}), queue="morag-store"
    )
    # Planting the request the store reads first: the worker user may not write it.
    planted = "e" * 32
    with pytest.raises(redis.exceptions.NoPermissionError):
        store_requests.put(client, planted, "delete", {"filter": {"source": SOURCE}}, 60)
    celery.send_task("morag.vector_op", (planted,), queue="morag-store")

    def settled() -> bool:
        log = _store_log(stack)
        refused = all(f"vector operation {rid} refused" in log for rid in (forged, planted))
        return refused or not _hits(stack)  # without the check: the points are gone

    wait_until(settled, 60, "the store worker to refuse both messages")
    assert [h["text"] for h in _hits(stack)] == [h["text"] for h in before]


def test_a_request_runs_once(stack: Stack, ingested: dict[str, Any]) -> None:
    """A worker can read the API's messages (the unacked hash, the queue) and send one again:
    the request it names is gone once run, so a replayed delete deletes nothing."""
    celery, client = _as(stack, "api")
    rid = "a" * 32
    store_requests.put(client, rid, "search", {"query": "lighthouse", "limit": 1}, 60)
    for _ in range(2):
        celery.send_task("morag.vector_op", (rid,), queue="morag-store")
    reply = client.blpop([f"morag:reply:{rid}"], timeout=60)
    assert reply is not None and json.loads(reply[1])["results"]
    wait_until(
        lambda: f"vector operation {rid} refused" in _store_log(stack),
        60,
        "the replayed message to be refused",
    )
    assert client.llen(f"morag:reply:{rid}") == 0  # one answer only


def test_a_worker_cannot_have_a_stored_job_stored_again(
    stack: Stack, ingested: dict[str, Any]
) -> None:
    celery, _ = _as(stack, "worker")
    task_id = ingested["task_id"]
    celery.send_task("morag.store_job", (task_id,), queue="morag-store")
    wait_until(
        lambda: f"job {task_id} not stored here: nothing to store" in _store_log(stack),
        60,
        "the store worker to refuse the forged store message",
    )
    job = stack.job(task_id)
    assert job["status"] == "succeeded"
    assert job["result"]["metadata"] == ingested["result"]["metadata"]
    assert job["updated_at"] == ingested["updated_at"]


def test_the_store_takes_requests_only_from_a_key_workers_cannot_write(
    stack: Stack, tmp_path: Path
) -> None:
    _, worker = _as(stack, "worker")
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.get(store_requests.request_key("b" * 32))
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.delete(store_requests.request_key("b" * 32))
