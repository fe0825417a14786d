"""The webhook outbox on a real Redis, each side logged in as its roles/redis ACL user: every
way a job ends writes the webhook it owes in the same transaction (the worker user may), only
once; the store worker's delivery marks make a duplicate message send nothing; marks written
by an older release stay readable."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from morag import webhooks
from morag.job_record import JobRecord, Route, Source
from morag.jobs import WEBHOOK_OUTBOX, JobStore, new_record

from tests.conftest import RedisServer

ROUTE = Route(queue="celery", gpu_requested=False, code="not_requested", reason="test")
ATTEMPT = {"queue": "celery", "worker": "cpu0@h", "device": "cpu"}
OWNER = "cpu0@h/1"
HOOK = "https://example.org/hook"


class Users:
    """One database; a JobStore per ACL user (api, worker, store) and the admin client."""

    def __init__(self, server: RedisServer) -> None:
        db = server.fresh_db()
        self.admin = redis.Redis.from_url(server.url(db))
        self.clients = {
            role: redis.Redis.from_url(url) for role, url in server.role_urls(db).items()
        }
        self.stores = {
            role: JobStore(client, ttl=600, lease_ttl=30, outbox_grace=30)
            for role, client in self.clients.items()
        }

    def owed(self) -> dict[str, float]:
        return {k.decode(): v for k, v in self.admin.zrange(WEBHOOK_OUTBOX, 0, -1, withscores=True)}


@pytest.fixture
def users(redis_server: RedisServer) -> Users:
    return Users(redis_server)


def _queued(store: JobStore, webhook_url: str | None = HOOK) -> JobRecord:
    record = new_record(
        kind="ingest",
        content_type="audio",
        source=Source.link("https://example.org/x.wav"),
        options={},
        route=ROUTE,
        webhook_url=webhook_url,
    )
    store.create(record)
    return record


def _running(store: JobStore, webhook_url: str | None = HOOK) -> str:
    record = _queued(store, webhook_url)
    claim = store.claim(
        record.task_id,
        owner=OWNER,
        attempt=ATTEMPT,
        max_deliveries=1,
        owner_is_dead=lambda _: False,
    )
    assert claim.run
    return record.task_id


def _claim_again(store: JobStore, task_id: str) -> None:
    store.claim(
        task_id, owner="cpu0@h/2", attempt=ATTEMPT, max_deliveries=1, owner_is_dead=lambda _: True
    )


def _succeeded(store: JobStore, task_id: str) -> None:
    store.finish(task_id, OWNER, result={"content": "x"})


def _failed(store: JobStore, task_id: str) -> None:
    store.finish(task_id, OWNER, error="cannot decode audio")


def _timed_out(store: JobStore, task_id: str) -> None:
    store.fail_timed_out(task_id, "cpu0@h", 3)


def _cancelled(store: JobStore, task_id: str) -> None:
    store.cancel(task_id)


# How a job can end -> (the ACL user whose process ends it, how).
ENDINGS: dict[str, tuple[str, Callable[[Users], str]]] = {
    "worker success": ("worker", lambda u: _end(u, _succeeded)),
    "worker failure": ("worker", lambda u: _end(u, _failed)),
    "time limit": ("worker", lambda u: _end(u, _timed_out)),
    "delivery cap": ("worker", lambda u: _end(u, _claim_again)),
    "cancel by the API": ("api", lambda u: _end(u, _cancelled, role="api")),
    "broker refused": ("api", lambda u: _unsent(u)),
    "store worker": ("store", lambda u: _stored(u)),
}


def _end(users: Users, end: Callable[[JobStore, str], object], role: str = "worker") -> str:
    task_id = _running(users.stores["worker"])
    end(users.stores[role], task_id)
    return task_id


def _unsent(users: Users) -> str:
    record = _queued(users.stores["api"])
    users.stores["api"].fail_unsent(record.task_id, "not accepted")
    return record.task_id


def _stored(users: Users) -> str:
    task_id = _running(users.stores["worker"])
    assert users.stores["worker"].hand_to_store(task_id, OWNER, result={"content": "x"})
    assert users.stores["store"].finish_store(task_id, error="storing failed")
    return task_id


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_way_a_job_ends_owes_its_webhook_in_the_same_write(users: Users, ending: str) -> None:
    role, end = ENDINGS[ending]
    before = time.time()
    task_id = end(users)
    record = users.stores["api"].get(task_id)
    assert record is not None and record.status.final, record
    owed = users.owed()
    assert list(owed) == [task_id], f"{ending} ({role}) owes no webhook"
    assert before + 30 - 1 <= owed[task_id] <= time.time() + 30
    # Nothing ends twice: a second end (a late duplicate) owes nothing more.
    users.admin.zrem(WEBHOOK_OUTBOX, task_id)
    users.stores["api"].cancel(task_id)
    assert users.owed() == {}


def test_a_job_without_a_webhook_owes_none(users: Users) -> None:
    task_id = _running(users.stores["worker"], webhook_url=None)
    assert users.stores["worker"].finish(task_id, OWNER, error="bad wav")
    assert users.owed() == {}


def test_the_worker_user_may_owe_a_webhook_but_not_touch_delivery_marks(users: Users) -> None:
    worker = users.clients["worker"]
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.get(webhooks.sent_key("any"))
    with pytest.raises(redis.exceptions.NoPermissionError):
        webhooks.settle(worker, "any", webhooks.DELIVERED)
    with pytest.raises(redis.exceptions.NoPermissionError):
        webhooks.claim_delivery(worker, "any", "w/1", hold=30)


def test_a_duplicate_delivery_message_sends_nothing(users: Users) -> None:
    task_id = _end(users, _failed)
    store = users.clients["store"]
    assert webhooks.claim_delivery(store, task_id, "store@h/1", hold=300) == "send"
    # While one POSTs, a second message (the reconciler's resend) leaves it alone.
    assert webhooks.claim_delivery(store, task_id, "store@h/2", hold=300) == "busy"
    assert users.owed()[task_id] >= time.time() + webhooks.CLAIM_TTL - 5
    webhooks.settle(store, task_id, webhooks.DELIVERED)
    assert users.owed() == {}
    assert webhooks.claim_delivery(store, task_id, "store@h/3", hold=300) == "done"
    assert users.admin.get(webhooks.sent_key(task_id)) == b"delivered"


def test_a_failed_post_releases_the_claim_for_its_retry(users: Users) -> None:
    task_id = _end(users, _failed)
    store = users.clients["store"]
    assert webhooks.claim_delivery(store, task_id, "store@h/1", hold=300) == "send"
    retry_at = time.time() + 4
    webhooks.release(store, task_id, retry_at=retry_at, hold=300)
    assert users.owed()[task_id] == pytest.approx(retry_at + 300, abs=1)
    assert webhooks.claim_delivery(store, task_id, "store@h/1", hold=300) == "send"


@pytest.mark.parametrize("old_mark", ["publishing", "succeeded", "failed", "cancelled"])
def test_marks_of_the_previous_release_read_as_not_delivered(users: Users, old_mark: str) -> None:
    """Rolling update: the old notify_end wrote "publishing", then the job's status, once
    it had published; the message it published is delivered by the new store worker."""
    users.admin.set(webhooks.sent_key("old"), old_mark)
    assert webhooks.claim_delivery(users.clients["store"], "old", "store@h/1", hold=30) == "send"


def test_notify_end_publishes_or_leaves_the_webhook_owed(
    users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = _end(users, _failed)
    record = users.stores["worker"].get(task_id)
    first_due = users.owed()[task_id]
    published: list[str] = []

    def refused(task: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(webhooks, "publish", refused)
    assert webhooks.notify_end(users.stores["worker"], record) is False
    assert users.owed() == {task_id: first_due}, "still owed, due for the reconciler"
    monkeypatch.setattr(webhooks, "publish", published.append)
    assert webhooks.notify_end(users.stores["worker"], record, resend_after=500) is True
    assert published == [task_id]
    assert users.owed()[task_id] >= time.time() + 490
    # The reconciler resends a due entry and pushes it on again.
    users.admin.zadd(WEBHOOK_OUTBOX, {task_id: 0})
    due = users.stores["worker"].webhooks_due()
    assert due == [task_id]
    assert webhooks.resend_due(users.stores["worker"], due, resend_after=60) == 1
    assert published == [task_id, task_id]
    assert users.stores["worker"].webhooks_due() == []
    # An entry whose job expired is dropped, not sent.
    users.admin.zadd(WEBHOOK_OUTBOX, {"expired": 0})
    assert webhooks.resend_due(users.stores["worker"], ["expired"], resend_after=60) == 0
    assert "expired" not in users.owed()
    # Once delivered, a late fast path does not make it owed again.
    webhooks.settle(users.clients["store"], task_id, webhooks.DELIVERED)
    assert webhooks.notify_end(users.stores["worker"], record) is True
    assert users.owed() == {}
