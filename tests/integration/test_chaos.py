"""Chaos: while a few hundred mixed jobs with webhooks arrive, kill (SIGKILL) and restart in
turn the GPU-queue worker, the API, the CPU worker, Redis (AOF; first a clean restart, then
a SIGKILL) and the store worker, and pause Redis writes during submissions.

Every job the API accepted (202) must end ``succeeded``, each exactly once (one attempt
without error, stored once), with exactly one webhook POST; no record in Redis may stay
unfinished, accepted or not (a submission refused with 503 after its record was written,
or cut off by the API's death, must not strand that record).

Real processes throughout, each logged in as the redis role's ACL user: a Redis of the
test's own (AOF, as the redis role configures it), uvicorn, three Celery workers, a webhook
receiver. About nine minutes on 2 cores (the store worker embeds every result); it runs
beside the molecule scenarios.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.integration import media
from tests.integration.receiver import Receiver
from tests.integration.stack import OwnRedis, Stack, stack_on_own_redis

JOBS = 240
SUBMIT_EVERY = 0.1  # seconds between submissions
SECRET = "chaos-webhook-secret"
WORKERS = {"gpu0@chaos": "gpu-tasks", "cpu0@chaos": "celery", "store@chaos": "morag-store"}
TERMINAL = ("succeeded", "failed", "cancelled")


class Submitter(threading.Thread):
    """Sends the jobs at a steady rate; keeps what the API answered for each."""

    def __init__(self, stack: Stack, speech: Path, page_url: str, hook_url: str) -> None:
        super().__init__(name="submitter", daemon=True)
        self.stack = stack
        self.speech = speech
        self.page_url = page_url
        self.hook_url = hook_url
        self.accepted: list[str] = []
        self.refused: Counter[str] = Counter()

    def _one(self, i: int, client: httpx.Client) -> httpx.Response:
        if i % 5 == 4:  # a web page (CPU only)
            return client.post(
                "/api/v1/ingest/url",
                json={"url": self.page_url, "gpu": False, "webhook_url": self.hook_url},
            )
        # Some jobs run long enough for a kill to find them mid-job.
        options = {"fault": "slow:1.5"} if i % 8 == 0 else {}
        with open(self.speech, "rb") as f:
            return client.post(
                "/api/v1/ingest/file",
                files={"file": ("speech.wav", f)},
                data={
                    "gpu": str(i % 2 == 0).lower(),
                    "options": json.dumps(options),
                    "webhook_url": self.hook_url,
                },
            )

    def run(self) -> None:
        with self.stack.client() as client:
            for i in range(JOBS):
                try:
                    resp = self._one(i, client)
                except httpx.HTTPError as exc:
                    self.refused[type(exc).__name__] += 1
                else:
                    if resp.status_code == 202:
                        self.accepted.append(resp.json()["task_id"])
                    else:
                        assert resp.status_code == 503, resp.text  # never a 500
                        self.refused[str(resp.status_code)] += 1
                time.sleep(SUBMIT_EVERY)


def _records(stack: Stack) -> list[dict[str, Any]]:
    try:
        return stack.jobs_in_redis()
    except redis.RedisError:
        return []


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Like wait_until, but a fault fires anyway when its moment never comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _running_on(stack: Stack, worker: str) -> bool:
    return any(
        r["status"] == "running"
        and not r.get("storing")
        and r["attempts"]
        and r["attempts"][-1]["worker"] == worker
        for r in _records(stack)
    )


def _storing(stack: Stack) -> bool:
    """A store worker is storing a job right now (it holds the job's lease)."""
    try:
        return any(
            r["status"] == "running"
            and r.get("storing")
            and stack.redis.exists(f"morag:lease:{r['task_id']}")
            for r in _records(stack)
        )
    except redis.RedisError:
        return False


def _kill_and_restart(stack: Stack, name: str) -> None:
    stack.kill(name)
    stack.start_worker(name, WORKERS[name], wait=False)


def _inflict(stack: Stack, server: OwnRedis, log: list[str]) -> None:
    def step(what: str) -> None:
        log.append(f"{time.monotonic():.1f} {what}")

    caught = _wait_for(lambda: _running_on(stack, "gpu0@chaos"), 20)
    _kill_and_restart(stack, "gpu0@chaos")
    step(f"SIGKILL gpu0 (restarted; {'mid-job' if caught else 'idle'})")
    time.sleep(1)
    stack.kill("api")  # mid-submission: its client sees the connection drop, never a 202
    stack.start_api()
    step("SIGKILL API (restarted)")
    time.sleep(1)
    caught = _wait_for(lambda: _running_on(stack, "cpu0@chaos"), 20)
    _kill_and_restart(stack, "cpu0@chaos")
    step(f"SIGKILL cpu0 (restarted; {'mid-job' if caught else 'idle'})")
    time.sleep(2)
    server.restart(down_for=stack.TTL * 2)  # longer than a lease; submissions refused
    step("Redis restarted after 3s down")
    time.sleep(2)
    server.kill()  # SIGKILL: what the AOF (fsync every second) kept is what comes back
    time.sleep(1)
    server.start()
    step("Redis SIGKILLed, back after 1s")
    caught = _wait_for(lambda: _storing(stack), 20)
    _kill_and_restart(stack, "store@chaos")
    step(f"SIGKILL store worker (restarted; {'mid-store' if caught else 'idle'})")
    time.sleep(1)
    server.pause_writes(3)  # submissions wait; none may be lost or stranded
    step("Redis writes paused 3s")


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    page = media.html_page(tmp_path_factory.mktemp("chaos-web") / "page.html")
    with media.http_server(page.parent) as url:
        yield f"{url}/page.html"


def test_every_accepted_job_ends_once_through_kills_and_redis_restarts(
    tmp_path: Path, speech_wav: Path, page_url: str
) -> None:
    receiver = Receiver(SECRET)
    settings = {
        "webhook_secret": SECRET,
        "webhook_backoff": 0.2,
        "store_ingested": "true",
        "qdrant_path": tmp_path / "qdrant",
        "outbox_grace": 2,
        "store_resend_after": 4,
        "max_deliveries": 5,
        "redis_retry_seconds": 60,
    }
    with stack_on_own_redis(tmp_path, **settings) as (stack, server):
        stack.start(WORKERS)
        submitter = Submitter(stack, speech_wav, page_url, receiver.url)
        started = time.monotonic()
        submitter.start()
        faults: list[str] = []
        _inflict(stack, server, faults)
        submitter.join(300)
        accepted = submitter.accepted

        def settled() -> bool:
            records = _records(stack)
            try:
                hooks_owed = stack.redis.zcard("morag:outbox:webhooks")
            except redis.RedisError:
                return False
            return (
                bool(records) and all(r["status"] in TERMINAL for r in records) and not hooks_owed
            )

        _wait_for(settled, 900)
        elapsed = time.monotonic() - started
        records = {r["task_id"]: r for r in _records(stack)}
        ended = Counter(records[t]["status"] if t in records else "missing" for t in accepted)
        stuck = sorted(t for t, r in records.items() if r["status"] not in TERMINAL)
        # A job completes once: one attempt ended without error, every other one with a
        # reason, and the store wrote it once.
        duplicated = sorted(
            t
            for t in accepted
            if t in records and sum(a["error"] is None for a in records[t]["attempts"]) > 1
        )
        print(
            f"chaos: accepted={len(accepted)} succeeded={ended['succeeded']} "
            f"failed={ended['failed']} stuck={len(stuck)} duplicated={len(duplicated)} "
            f"missing={ended['missing']} refused={dict(submitter.refused)} "
            f"records={len(records)} in {elapsed:.0f}s"
        )
        posts = receiver.deliveries()
        receiver.close()
        hooks = Counter(posts.get(f"msg_{t}", 0) for t in accepted)
        print(f"chaos: webhook POSTs per accepted job: {dict(hooks)}")
        redelivered = sum(len(records[t]["attempts"]) > 1 for t in accepted if t in records)
        print(f"chaos: {redelivered} job(s) ran more than once after a kill")
        print("\n".join(faults))
        assert len(accepted) >= JOBS // 2, submitter.refused
        assert not stuck, [(t, records[t]["status"], records[t].get("waiting_for")) for t in stuck]
        assert ended["missing"] == 0
        assert not duplicated
        for task_id in accepted:
            record = records[task_id]
            if record["status"] == "failed":
                assert record["error"], record
                # Faults of the platform are no reason for a job to fail.
                pytest.fail(f"job {task_id} failed: {record['error']}")
            assert record["status"] == "succeeded", record
            assert record["result"]["metadata"]["stored"] is True, record["result"]["metadata"]
            assert record["attempts"][-1]["error"] is None
        # Records the API wrote but refused (503) ended too: failed, saying why.
        for task_id, record in records.items():
            if task_id not in accepted and record["status"] == "failed":
                assert record["error"], record
        # Exactly one webhook POST per accepted job, none lost and none sent twice; so too
        # for a job that ran though its client never saw the 202 (cut off by the API's death).
        assert set(hooks) == {1}, {t: posts.get(f"msg_{t}", 0) for t in accepted}
        ran = [t for t, r in records.items() if r["status"] == "succeeded"]
        assert all(posts.get(f"msg_{t}", 0) == 1 for t in ran), posts
        assert stack.redis.zcard("morag:outbox") == 0
        assert stack.redis.scard("morag:jobs:active") == 0
        # Each job ended once: the fleet's counters agree with the records.
        finished = stack.scrape().value("morag_jobs_finished_total", state="succeeded")
        assert finished == sum(r["status"] == "succeeded" for r in records.values())
