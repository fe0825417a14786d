"""Redis failing at the edges of a job, with real workers on a Redis of the test's own (the
role's ACL users): a long outage as a job finishes, and writes refused during a claim."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests import redis_acl
from tests.conftest import free_port
from tests.integration.stack import OwnRedis, Stack, stack_on_own_redis, wait_until

WORKER = "cpu0@test"


def _log(stack: Stack) -> str:
    return (stack.logs / f"{WORKER.replace('@', '_')}.log").read_text(errors="replace")


def _down_past_the_retry_window(stack: Stack, server: OwnRedis, task_id: str) -> None:
    """Stop Redis while the job runs; keep it down from the worker's first failed attempt
    to record the job until well past MORAG_REDIS_RETRY_SECONDS (and the lease)."""
    stack.wait_job(task_id, timeout=30, states=("running",))
    server.stop()
    wait_until(
        lambda: f"recording job {task_id}: Redis" in _log(stack),
        60,
        "the worker to fail to record the finished job",
    )
    time.sleep(float(stack.env["MORAG_REDIS_RETRY_SECONDS"]) + 2 * stack.TTL)  # the outage


def _ran_once(stack: Stack, task_id: str) -> None:
    job = stack.wait_job(task_id, timeout=90)
    assert job["status"] == "succeeded", job
    # One attempt, not labelled lost, not rerun; the result is the first run's.
    assert [(a["worker"], a["error"]) for a in job["attempts"]] == [(WORKER, None)], job
    assert job["route"]["code"] != "worker_lost"
    assert "report" in job["result"]["content"].lower()
    assert json.loads(stack.redis.get(f"morag:job:{task_id}"))["deliveries"] == 1
    parked = stack.root / "work" / "parked" / WORKER
    wait_until(lambda: not any(parked.glob("*.json")), 30, "the kept result to be dropped")


def test_a_result_is_kept_through_an_outage_longer_than_the_retry_window(
    tmp_path: Path, speech_wav: Path
) -> None:
    with stack_on_own_redis(tmp_path, redis_retry_seconds=1) as (stack, server):
        stack.start_api()
        stack.start_worker(WORKER, "celery")
        task_id = stack.ingest(speech_wav, gpu=False, options={"fault": "slow:3"})["task_id"]
        _down_past_the_retry_window(stack, server, task_id)
        server.start()
        _ran_once(stack, task_id)


def test_a_kept_result_survives_a_restart_of_its_worker(tmp_path: Path, speech_wav: Path) -> None:
    """The watchdog (the API's) requeues no job as lost for outage_grace once Redis is back:
    time enough for the restarted worker to record the result it kept."""
    with stack_on_own_redis(tmp_path, redis_retry_seconds=1, outage_grace=120) as (
        stack,
        server,
    ):
        stack.start_api()
        stack.start_worker(WORKER, "celery")
        task_id = stack.ingest(speech_wav, gpu=False, options={"fault": "slow:3"})["task_id"]
        _down_past_the_retry_window(stack, server, task_id)
        stack.kill(WORKER)  # e.g. systemd restarts it during the outage
        server.start()
        stack.start_worker(WORKER, "celery")
        _ran_once(stack, task_id)


# What each refusal looks like in a worker's log, and how the test makes Redis answer it.
REFUSALS = {
    "oom": "maxmemory",
    "readonly": "read only replica",
    "misconf": "MISCONF",
}


def _refuse_writes(server: OwnRedis, refusal: str) -> None:
    admin = server.client()
    if refusal == "oom":
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
    elif refusal == "readonly":
        admin.execute_command("REPLICAOF", "127.0.0.1", free_port())  # a master that never answers
    else:
        # A snapshot that cannot be written (its target is a directory) with save points
        # set: Redis refuses writes until a snapshot succeeds or the save points go.
        (server.dir / "dump.rdb").mkdir()
        admin.config_set("save", "3600 1")
        admin.execute_command("BGSAVE", "SCHEDULE")
        wait_until(
            lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "err",
            30,
            "the snapshot to fail",
        )


def _accept_writes(server: OwnRedis, refusal: str) -> None:
    admin = server.client()
    if refusal == "oom":
        admin.config_set("maxmemory", 0)
    elif refusal == "readonly":
        admin.execute_command("REPLICAOF", "NO", "ONE")
    else:
        admin.config_set("save", "")
        (server.dir / "dump.rdb").rmdir()


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_a_claim_refused_by_redis_does_not_park_its_message(
    tmp_path: Path, speech_wav: Path, refusal: str
) -> None:
    with stack_on_own_redis(tmp_path) as (stack, server):
        stack.start_api()
        stack.start_worker(WORKER, "celery")
        hold = tmp_path / "hold"
        hold.touch()
        task_id = stack.ingest(speech_wav, gpu=False, options={"fault": f"hold_claim:{hold}"})[
            "task_id"
        ]
        wait_until(lambda: stack.redis.hlen("unacked") == 1, 30, "the message to be delivered")
        seen = _log(stack).count(REFUSALS[refusal])
        _refuse_writes(server, refusal)
        hold.unlink()  # the worker claims now
        wait_until(
            lambda: _log(stack).count(REFUSALS[refusal]) > seen,
            30,
            "the claim to be refused",
        )
        _accept_writes(server, refusal)
        job = stack.wait_job(task_id, timeout=60)
        assert job["status"] == "succeeded", job
        assert [(a["worker"], a["error"]) for a in job["attempts"]] == [(WORKER, None)]
        # Acknowledged once done: nothing left for the visibility timeout.
        wait_until(lambda: stack.redis.hlen("unacked") == 0, 30, "the message to be acked")


def test_a_claim_refused_for_another_reason_hands_the_message_back(
    tmp_path: Path, speech_wav: Path
) -> None:
    """NOPERM (an ACL that lost the job keys) is no outage: the message goes back to its
    queue at a slow pace, and the job runs once the permission is back. A worker writing its
    records on Redis (job_writes=redis): through the API the claim is the API's write."""
    with stack_on_own_redis(tmp_path, job_writes="redis") as (stack, server):
        stack.start_api()
        stack.start_worker(WORKER, "celery")
        worker = redis_acl.role_users()["worker"]
        celery_keys = [k for k in worker.keys if not k.startswith("morag")]
        server.restrict_keys("worker", *(f"~{k}" for k in celery_keys), "%R~*")
        task_id = stack.ingest(speech_wav, gpu=False)["task_id"]
        wait_until(
            lambda: any(
                task_id in line and "no permissions" in line for line in _log(stack).splitlines()
            ),
            60,
            "the claim to be refused",
        )
        server.restore_keys("worker")
        job = stack.wait_job(task_id, timeout=60)
        assert job["status"] == "succeeded", job
        assert [(a["worker"], a["error"]) for a in job["attempts"]] == [(WORKER, None)]
        wait_until(lambda: stack.redis.hlen("unacked") == 0, 30, "the message to be acked")
