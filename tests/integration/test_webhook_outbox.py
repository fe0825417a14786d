"""Every ended job with a ``webhook_url`` gets exactly one webhook, whoever ended it, with the
API and workers logged in as the role's ACL users (issue 18): a job failed on a GPU/CPU
worker, one killed by the time limit, one whose worker was SIGKILLed between the terminal
write and the webhook's publish, and the redelivered message of an ended job.

The terminal state and its webhook outbox entry are written in one transaction; the server's
morag-store worker delivers it and marks it delivered (morag.webhooks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.integration.conftest import running_stack
from tests.integration.receiver import Receiver
from tests.integration.stack import Stack, wait_until

SECRET = "outbox-webhook-secret"
QUEUES = ("celery", "gpu-tasks", "morag-store")


@pytest.fixture(scope="module")
def hooked(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Receiver]]:
    """API, a CPU worker, a store worker (webhook delivery) and a GPU-queue worker with a
    3 s time limit, each as its ACL user; ingested results are not stored."""
    receiver = Receiver(SECRET)
    workers = {"cpu0@hooks": "celery", "store@hooks": "morag-store"}
    with running_stack(
        redis_server,
        tmp_path_factory.mktemp("hooks"),
        workers,
        webhook_secret=SECRET,
        webhook_backoff=0.2,
        outbox_grace=1,
    ) as stack:
        stack.start_worker("gpu0@hooks", "gpu-tasks", job_time_limit=3)
        try:
            yield stack, receiver
        finally:
            receiver.close()


def _settled(stack: Stack, task_id: str) -> bool:
    """Nothing is left that could send the job's webhook again: it is marked delivered, its
    outbox entry is gone, no message waits in a queue or unacked, and no worker is busy."""
    r = stack.redis
    return (
        r.get(f"morag:webhook:{task_id}") == b"delivered"
        and r.zscore("morag:outbox:webhooks", task_id) is None
        and all(r.llen(q) == 0 for q in QUEUES)
        and r.hlen("unacked") == 0
        and not any((stack.heartbeat(w) or {}).get("busy") for w in stack.procs if w != "api")
    )


def _one_webhook(stack: Stack, receiver: Receiver, task_id: str) -> dict[str, Any]:
    wait_until(lambda: receiver.of(task_id), 60, f"the webhook of job {task_id}")
    wait_until(lambda: _settled(stack, task_id), 60, f"job {task_id}'s webhook to settle")
    payloads = receiver.of(task_id)
    assert len(payloads) == 1, payloads
    return payloads[0]


def test_a_job_that_succeeds_on_a_worker_gets_one_webhook(
    hooked: tuple[Stack, Receiver], speech_wav: Path
) -> None:
    stack, receiver = hooked
    accepted = stack.ingest(speech_wav, gpu=False, webhook_url=receiver.url)
    job = stack.wait_job(accepted["task_id"], timeout=120)
    assert job["status"] == "succeeded", job
    payload = _one_webhook(stack, receiver, accepted["task_id"])
    assert payload["status"] == "succeeded" and payload["task_id"] == accepted["task_id"]


def test_a_corrupt_wav_that_fails_on_the_worker_gets_one_webhook(
    hooked: tuple[Stack, Receiver], tmp_path: Path
) -> None:
    stack, receiver = hooked
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 8)
    accepted = stack.ingest(broken, gpu=False, webhook_url=receiver.url)
    job = stack.wait_job(accepted["task_id"], timeout=120)
    assert job["status"] == "failed", job
    payload = _one_webhook(stack, receiver, accepted["task_id"])
    assert payload["status"] == "failed" and payload["error"] == job["error"]


def test_a_job_killed_by_the_time_limit_gets_one_webhook(
    hooked: tuple[Stack, Receiver], speech_wav: Path
) -> None:
    stack, receiver = hooked
    accepted = stack.ingest(
        speech_wav, gpu=True, options={"fault": "stuck:60"}, webhook_url=receiver.url
    )
    assert accepted["route"]["queue"] == "gpu-tasks", accepted
    job = stack.wait_job(accepted["task_id"], timeout=120)
    assert job["status"] == "failed" and job["error"].startswith("ran out of time"), job
    payload = _one_webhook(stack, receiver, accepted["task_id"])
    assert payload["status"] == "failed" and payload["error"] == job["error"]


def test_a_worker_killed_between_the_end_and_the_publish_still_sends_one_webhook(
    hooked: tuple[Stack, Receiver], speech_wav: Path
) -> None:
    """The pool child SIGKILLs itself right after the terminal write, before it publishes
    the webhook; Celery redelivers its message, which must not notify a second time."""
    stack, receiver = hooked
    accepted = stack.ingest(
        speech_wav, gpu=False, options={"fault": "die_before_webhook"}, webhook_url=receiver.url
    )
    task_id = accepted["task_id"]
    job = stack.wait_job(task_id, timeout=120)
    assert job["status"] == "succeeded", job
    log = stack.logs / "cpu0_hooks.log"
    wait_until(
        lambda: f"job {task_id} not run here: job already succeeded" in log.read_text(),
        60,
        "the redelivered message of the ended job",
    )
    payload = _one_webhook(stack, receiver, task_id)
    assert payload["status"] == "succeeded"
    assert len(stack.job(task_id)["attempts"]) == 1
    assert stack.alive("cpu0@hooks")
