"""Job record transitions against a real Redis: the races the workers and watchdog run."""

from __future__ import annotations

import redis
from morag.job_record import JobRecord, Route, Source
from morag.jobs import RUNNING, JobStore, new_record

from tests.conftest import RedisServer

ROUTE = Route(queue="gpu-tasks", gpu_requested=True, code="gpu_worker", reason="test")
ATTEMPT = {"queue": "gpu-tasks", "worker": "gpu0@h", "device": "cpu"}


def _store(redis_server: RedisServer) -> JobStore:
    client = redis.Redis.from_url(redis_server.url(redis_server.fresh_db()))
    return JobStore(client, ttl=600, lease_ttl=30)


def _queued(store: JobStore, kind: str = "process") -> JobRecord:
    """A new audio job, stored with its outbox entry (its message not sent yet)."""
    record = new_record(
        kind=kind,
        content_type="audio",
        source=Source.link("https://example.org/x"),
        options={},
        route=ROUTE,
    )
    store.create(record)
    return record


def _running(store: JobStore, kind: str = "ingest") -> str:
    record = _queued(store, kind)
    claim = store.claim(
        record.task_id,
        owner="gpu0@h/1",
        attempt=ATTEMPT,
        max_deliveries=3,
        owner_is_dead=lambda _: False,
    )
    assert claim.run
    return record.task_id


def test_watchdog_never_requeues_a_job_handed_to_the_store(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    task_id = _running(store)
    assert store.hand_to_store(task_id, "gpu0@h/1", result={"content": "x", "metadata": {}})
    # The watchdog saw "running" before the hand-over and finds no lease now.
    assert store.lease_owner(task_id) is None
    assert store.requeue(task_id, route=ROUTE, error="lost", owner=None) is None
    record = store.get(task_id)
    assert record.status == RUNNING and record.storing is True
    assert store.finish_store(task_id, stored_chunks=3)
    assert store.get(task_id).status == "succeeded"


def test_only_the_lease_holder_completes_a_job(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    task_id = _running(store, kind="process")
    assert not store.finish(task_id, "gpu0@h/2", result={"content": "late"})
    assert store.finish(task_id, "gpu0@h/1", result={"content": "ok"})
    assert not store.finish(task_id, "gpu0@h/1", result={"content": "twice"})
    stored = store.get(task_id)
    assert stored is not None and stored.result is not None and stored.result.content == "ok"


def test_orphan_requeue_needs_an_expired_lease(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    task_id = _running(store, kind="process")
    assert store.requeue(task_id, route=ROUTE, error="lost", owner=None) is None
    store.r.delete(f"morag:lease:{task_id}")  # the lease expired: its worker is gone
    requeued = store.requeue(task_id, route=ROUTE, error="lost", owner=None)
    assert requeued is not None and requeued.status == "queued"
    assert requeued.attempts[-1].error == "lost"


def test_a_new_record_waits_in_the_outbox_until_its_message_is_sent(
    redis_server: RedisServer,
) -> None:
    store = _store(redis_server)
    store.outbox_grace = 0.0
    record = _queued(store)
    # The sender died here: the reconciler finds the record.
    assert store.outbox_due() == [record.task_id]
    store.sent(record.task_id)
    assert store.outbox_due() == []


def test_the_api_ends_a_job_whose_message_the_broker_refused(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    record = _queued(store)
    failed = store.fail_unsent(record.task_id, "not accepted: broker down")
    assert failed.status == "failed" and failed.error == "not accepted: broker down"
    assert store.outbox_size() == 0 and record.task_id not in store.active_ids()


def test_a_result_survives_a_lease_lapsed_in_a_redis_outage(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    task_id = _running(store, kind="process")
    store.r.delete(f"morag:lease:{task_id}")  # Redis was out of reach longer than the lease
    # The worker takes its lease back at its next heartbeat...
    store.refresh_leases({task_id: "gpu0@h/1"})
    assert store.lease_owner(task_id) == "gpu0@h/1"
    store.r.delete(f"morag:lease:{task_id}")
    # ...or simply records its result: nobody else took the job, so it counts.
    assert store.finish(task_id, "gpu0@h/1", result={"content": "ok"})
    assert store.get(task_id).status == "succeeded"


def test_a_late_result_loses_once_the_job_was_requeued(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    task_id = _running(store, kind="process")
    store.r.delete(f"morag:lease:{task_id}")
    assert store.requeue(task_id, route=ROUTE, error="lost", owner=None) is not None
    assert not store.finish(task_id, "gpu0@h/1", result={"content": "late"})
    store.refresh_leases({task_id: "gpu0@h/1"})
    assert store.lease_owner(task_id) is None
    assert store.get(task_id).status == "queued"


def test_a_job_killed_by_the_hard_time_limit_fails_once(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    task_id = _running(store, kind="process")
    assert store.fail_timed_out(task_id, "gpu1@h", 60).status == RUNNING  # not its job
    record = store.fail_timed_out(task_id, "gpu0@h", 60)
    assert record.status == "failed" and record.error.startswith("ran out of time")
    assert len(record.attempts) == 1 and record.attempts[0].error == record.error


def test_requeue_and_store_hand_over_write_their_outbox_entry_with_the_record(
    redis_server: RedisServer,
) -> None:
    """CPU fallback, watchdog requeue and store hand-over write the record before the
    message: the same transaction marks it, so a sender dying in between strands nothing."""
    store = _store(redis_server)
    store.outbox_grace = 0.0
    fallback = _running(store, kind="process")
    store.sent(fallback)
    assert store.requeue(fallback, route=ROUTE, error="CUDA oom", owner="gpu0@h/1", force_cpu=True)
    handed = _running(store)
    store.sent(handed)
    assert store.hand_to_store(handed, "gpu0@h/1", result={"content": "x", "metadata": {}})
    assert sorted(store.outbox_due()) == sorted([fallback, handed])
    assert str(store.get(handed).waiting_for).startswith("a morag-store worker")


def test_a_worker_that_cannot_process_a_job_hands_it_back(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    store.outbox_grace = 0.0
    record = _queued(store)
    store.sent(record.task_id)
    first = store.decline(record.task_id, "cpu0@h", queue="celery")
    assert first is not None and not first.repeat
    assert first.record.status == "queued" and first.record.declined_by == ["cpu0@h"]
    assert str(first.record.waiting_for).startswith("a worker on celery that offers audio")
    assert store.outbox_due() == [record.task_id]  # the message the caller sends again
    again = store.decline(record.task_id, "cpu0@h", queue="celery")
    assert again is not None and again.repeat and again.record.declined_by == ["cpu0@h"]
    # Once a capable worker runs it, a late duplicate message is dropped, not sent again.
    claim = store.claim(
        record.task_id,
        owner="cpu1@h/1",
        attempt=ATTEMPT,
        max_deliveries=3,
        owner_is_dead=lambda _: False,
    )
    assert claim.run and claim.record is not None and claim.record.waiting_for is None
    assert store.decline(record.task_id, "cpu0@h", queue="celery") is None
