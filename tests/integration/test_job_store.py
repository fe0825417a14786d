"""Job record transitions against a real Redis: the races the workers and watchdog run."""

from __future__ import annotations

import redis
from morag.jobs import RUNNING, JobStore, new_record

from tests.conftest import RedisServer

ROUTE = {"queue": "gpu-tasks", "gpu_requested": True, "reason": "test"}
ATTEMPT = {"queue": "gpu-tasks", "worker": "gpu0@h", "device": "cpu"}


def _store(redis_server: RedisServer) -> JobStore:
    client = redis.Redis.from_url(redis_server.url(redis_server.fresh_db()))
    return JobStore(client, ttl=600, lease_ttl=30)


def _running(store: JobStore, kind: str = "ingest") -> str:
    record = new_record(
        kind=kind, content_type="audio", source={"type": "url", "url": "x"}, options={}, route=ROUTE
    )
    store.create(record)
    claim = store.claim(
        record["task_id"],
        owner="gpu0@h/1",
        attempt=ATTEMPT,
        max_deliveries=3,
        owner_is_dead=lambda _: False,
    )
    assert claim.run
    return record["task_id"]


def test_watchdog_never_requeues_a_job_handed_to_the_store(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    task_id = _running(store)
    assert store.hand_to_store(task_id, "gpu0@h/1", result={"content": "x", "metadata": {}})
    # The watchdog saw "running" before the hand-over and finds no lease now.
    assert store.lease_owner(task_id) is None
    assert store.requeue(task_id, route=ROUTE, error="lost", owner=None) is None
    record = store.get(task_id)
    assert record["status"] == RUNNING and record["storing"] is True
    assert store.finish_store(task_id, stored_chunks=3)
    assert store.get(task_id)["status"] == "succeeded"


def test_only_the_lease_holder_completes_a_job(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    task_id = _running(store, kind="process")
    assert not store.finish(task_id, "gpu0@h/2", result={"content": "late"})
    assert store.finish(task_id, "gpu0@h/1", result={"content": "ok"})
    assert not store.finish(task_id, "gpu0@h/1", result={"content": "twice"})
    assert store.get(task_id)["result"] == {"content": "ok"}


def test_orphan_requeue_needs_an_expired_lease(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    task_id = _running(store, kind="process")
    assert store.requeue(task_id, route=ROUTE, error="lost", owner=None) is None
    store.r.delete(f"morag:lease:{task_id}")  # the lease expired: its worker is gone
    requeued = store.requeue(task_id, route=ROUTE, error="lost", owner=None)
    assert requeued is not None and requeued["status"] == "queued"
    assert requeued["attempts"][-1]["error"] == "lost"
