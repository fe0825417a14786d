"""A request waiting for a job wakes at the job's end (morag.job_events), not at a poll.

Real Redis with the redis role's ACL users: the API's subscription as `morag-api`, the end
written (and announced) by `morag-worker`, as in production. The waiter's fallback poll is
set far beyond the test, so only the announcement can wake it; it reads the record exactly
twice: before the end, and once after the announcement.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from morag.api.deps import wait_for_end
from morag.config import Settings
from morag.job_events import EndListener
from morag.job_record import JobRecord, Route, Source
from morag.jobs import JobStore, new_record

from tests.conftest import RedisServer, wait_until

ROUTE = Route(queue="celery", gpu_requested=False, code="not_requested", reason="test")
OWNER = "cpu0@test/1"


class CountingStore(JobStore):
    """The API's job store, counting the reads of the record the request waits for."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, ttl=600, lease_ttl=15)
        self.reads = 0

    def get(self, task_id: str) -> JobRecord | None:
        self.reads += 1
        return super().get(task_id)


@pytest.fixture
def urls(redis_server: RedisServer) -> dict[str, str]:
    return redis_server.role_urls(redis_server.fresh_db())


def _running_job(api: JobStore, worker: JobStore) -> str:
    record = new_record(
        kind="process",
        content_type="audio",
        source=Source.link("https://example.org/x.wav"),
        options={},
        route=ROUTE,
    )
    api.create(record)
    claim = worker.claim(
        record.task_id,
        owner=OWNER,
        attempt={"queue": "celery", "worker": "cpu0@test", "device": "cpu"},
        max_deliveries=3,
        owner_is_dead=lambda _holder: False,
    )
    assert claim.run, claim.reason
    return record.task_id


def test_a_waiting_request_wakes_at_the_end_announced_by_the_worker(
    urls: dict[str, str],
) -> None:
    api = CountingStore(redis.Redis.from_url(urls["api"]))
    worker = JobStore(redis.Redis.from_url(urls["worker"]), ttl=600, lease_ttl=15)
    listener = EndListener(redis.Redis.from_url(urls["api"]))
    listener.start()
    try:
        wait_until(lambda: listener.live, 30, "the API's job end subscription")
        task_id = _running_job(api, worker)
        # Polling alone would read the record again only after 600 s.
        svc: Any = SimpleNamespace(
            settings=Settings(job_wait_poll=600), store=api, job_ends=listener
        )
        answer: dict[str, Any] = {}

        def wait() -> None:
            answer["record"] = asyncio.run(wait_for_end(svc, task_id, 900))

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        wait_until(lambda: listener.waiting() == 1 and api.reads == 1, 30, "the waiter")
        assert worker.finish(task_id, OWNER, result={"content": "done", "metadata": {}})
        waiter.join(60)
        assert not waiter.is_alive(), "the end did not wake the waiting request"
        assert answer["record"].status == "succeeded"
        assert api.reads == 2  # before the end, and once after its announcement
        assert listener.waiting() == 0
    finally:
        listener.stop()
