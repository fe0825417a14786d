"""The narrow write path (MORAG_JOB_WRITES=api, morag.job_writes): GPU/CPU workers on two
hosts, each with only its own host token and the role's worker user for that mode
(redis_worker_job_writes: api), against a real Redis and real Celery workers.

Jobs run, split across the two hosts and are rescued by the API's watchdog after a SIGKILL,
while the worker credential cannot write a job record, a lease or an outbox, and a host
cannot change an attempt of another host, through the API or around it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from morag.job_writes import host_token

from tests import redis_acl
from tests.conftest import RedisServer, wait_until
from tests.integration import media
from tests.integration.conftest import running_stack
from tests.integration.stack import WORKER_TOKEN, Stack

HOSTS = {"cpu0@hosta": "hosta", "cpu1@hostb": "hostb"}
TERMINAL = ("succeeded", "failed", "cancelled")


def _host_settings(host: str) -> dict[str, str]:
    return {
        "job_writes": "api",
        "worker_host": host,
        "worker_token": host_token(WORKER_TOKEN, host),
    }


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("writestack")
    # No worker writes records on Redis here: the API's watchdog is the only one.
    with running_stack(
        redis_server, root, {}, split_min_seconds=30, whisper_cpu_threads=1, api_watchdog="true"
    ) as s:
        for name, host in HOSTS.items():
            s.start_worker(name, "celery", wait=False, **_host_settings(host))
        for name in HOSTS:
            s.wait_live(name)
        yield s


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return media.docx_file(tmp_path_factory.mktemp("writedoc") / "harbour.docx")


def _as_host(stack: Stack, host: str, token_of: str | None = None) -> httpx.Client:
    """An HTTP client of the worker routes holding ``token_of``'s host token as ``host``."""
    token = host_token(WORKER_TOKEN, token_of or host)
    headers = {"X-Worker-Token": token, "X-Worker-Host": host}
    return httpx.Client(base_url=stack.api_url, headers=headers, timeout=30, verify=stack.verify)


def _running(stack: Stack, document: Path, fault: str) -> dict[str, Any]:
    task_id = stack.ingest(document, gpu=False, options={"fault": fault})["task_id"]
    return wait_until(
        lambda: (j := stack.job(task_id))["status"] == "running" and j["attempts"] and j,
        60,
        f"job {task_id} to run",
    )


def _denials(stack: Stack, user: str) -> list[dict[str, Any]]:
    entries = stack.redis.execute_command("ACL", "LOG", "128")
    parsed = [
        dict(zip(e[::2], e[1::2], strict=True)) if isinstance(e, list) else e for e in entries
    ]
    return [e for e in parsed if _text(e.get("username", e.get(b"username"))) == user]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _record(stack: Stack, task_id: str) -> dict[str, Any]:
    (record,) = [j for j in stack.jobs_in_redis() if j["task_id"] == task_id]
    return record


def test_the_worker_credential_reads_jobs_and_writes_none(stack: Stack, document: Path) -> None:
    assert stack.users is not None
    job = stack.wait_job(stack.ingest(document, gpu=False)["task_id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempts"][-1]["worker"] in HOSTS
    task_id = job["task_id"]
    worker = redis.Redis.from_url(stack.users["worker_api"])
    assert worker.get(f"morag:job:{task_id}") is not None  # reads stay on Redis
    writes = [
        ("SET", f"morag:job:{task_id}", "{}"),
        ("EXPIRE", f"morag:job:{task_id}", "1"),
        ("DEL", f"morag:job:{task_id}"),
        ("SET", f"morag:lease:{task_id}", "cpu9@hostz/1"),
        ("DEL", f"morag:lease:{task_id}"),
        ("SADD", "morag:jobs:active", task_id),
        ("ZADD", "morag:outbox", "0", task_id),
        ("ZREM", "morag:outbox:webhooks", task_id),
        ("SET", "morag:watchdog", "me"),
        ("HSET", "morag:orphans:suspects", task_id, "0"),
    ]
    for command in writes:
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.execute_command(*command)
    assert stack.job(task_id)["status"] == "succeeded"
    # Only this test's own attempts are in the log (the last test reads it for the workers').
    name = redis_acl.role_users()["worker_api"].name
    assert _denials(stack, name), "the refusals above are logged"
    stack.redis.execute_command("ACL", "LOG", "RESET")


def test_a_host_changes_only_its_own_attempts(stack: Stack, document: Path) -> None:
    job = _running(stack, document, "stuck:600")
    task_id = job["task_id"]
    record = _record(stack, task_id)
    owner = record["owner"]
    mine = HOSTS[job["attempts"][-1]["worker"]]
    (other,) = set(HOSTS.values()) - {mine}
    url = f"/api/v1/worker/jobs/{task_id}"
    with _as_host(stack, other) as them:
        refused = [
            them.post(f"{url}/finish", json={"owner": owner, "error": "forged"}),
            them.post(f"{url}/requeue", json={"owner": owner, "route": job["route"], "error": "x"}),
            them.post(f"{url}/progress", json={"owner": owner, "progress": 0.9}),
            them.post(f"{url}/lease", json={"owner": owner}),
            them.post(f"{url}/timed_out", json={"worker": owner.rpartition("/")[0], "limit": 1}),
            them.post(f"{url}/cancel_piece", json={"reason": "forged"}),  # not a piece
            them.post(f"{url}/take_back", json={"reason": "forged"}),
            them.post(f"{url}/expire_piece", json={"seconds": 1}),
            them.post(f"{url}/sent", json={}),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused), [r.text for r in refused]
        # As a worker of its own host, the attempt is not its: the store refuses it.
        fake = f"cpu9@{other}/1"
        answer = them.post(f"{url}/finish", json={"owner": fake, "error": "forged"})
        assert answer.status_code == 200 and answer.json() == {"ok": False}, answer.text
        piece = dict(record, task_id="f" * 32, parent_id=task_id, status="queued", attempts=[])
        forged = them.post(f"{url}/create_pieces", json={"records": [piece]})
        assert forged.status_code == 403, forged.text
    with _as_host(stack, mine, token_of=other) as impostor:
        answer = impostor.post(f"{url}/finish", json={"owner": owner, "error": "forged"})
        assert answer.status_code == 403 and "invalid worker token" in answer.text
    anonymous = httpx.post(
        f"{stack.api_url}{url}/finish", json={"owner": owner}, timeout=30, verify=stack.verify
    )
    assert anonymous.status_code == 401
    after = _record(stack, task_id)
    assert (after["status"], after["owner"], after["error"]) == ("running", owner, None)
    assert len(after["attempts"]) == len(record["attempts"]) and after["progress"] < 0.9
    assert stack.redis.get(f"morag:lease:{task_id}") == owner.encode()
    # Its own host may: the path works for the attempt that runs the job.
    with _as_host(stack, mine) as own:
        done = own.post(f"{url}/progress", json={"owner": owner, "progress": 0.25})
        assert done.status_code == 200, done.text
    assert _record(stack, task_id)["progress"] == 0.25
    with stack.client() as c:
        assert c.delete(f"/api/v1/ingest/{task_id}").status_code in (200, 202)
    assert stack.wait_job(task_id, timeout=60)["status"] == "cancelled"


def test_a_long_recording_is_split_across_both_hosts(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    recording = media.long_speech(tmp_path_factory.mktemp("writesplit") / "long.wav", repeats=2)
    wait_until(
        lambda: all(not (stack.heartbeat(n) or {"active": 1}).get("active") for n in HOSTS),
        120,
        "both workers idle",
    )
    job = stack.wait_job(stack.ingest(recording, gpu=False)["task_id"], timeout=300)
    assert job["status"] == "succeeded", job
    split = job["result"]["metadata"]["split"]
    assert split["pieces"] == 2 and sorted(split["worker_names"]) == sorted(HOSTS), split
    (piece,) = [j for j in stack.jobs_in_redis() if j.get("parent_id") == job["task_id"]]
    assert piece["status"] == "succeeded"
    # Expired sooner through the API, its message's outbox entry cleared through it too.
    assert 0 < stack.redis.ttl(f"morag:job:{piece['task_id']}") <= 600
    assert stack.redis.zscore("morag:outbox", piece["task_id"]) is None
    assert stack.redis.zscore("morag:outbox", job["task_id"]) is None


def test_the_apis_watchdog_requeues_the_job_of_a_killed_worker(
    stack: Stack, document: Path
) -> None:
    job = _running(stack, document, "stuck:8")
    victim = job["attempts"][-1]["worker"]
    stack.kill(victim)  # SIGKILL, worker and pool child: its lease lapses
    try:
        done = stack.wait_job(job["task_id"], timeout=180)
        assert done["status"] == "succeeded", done
        first, last = done["attempts"][0], done["attempts"][-1]
        assert first["worker"] == victim and "lost" in (first["error"] or ""), first
        (survivor,) = set(HOSTS) - {victim}
        assert last["worker"] == survivor, done["attempts"]
        assert done["route"]["code"] == "worker_lost", done["route"]
    finally:
        stack.start_worker(victim, "celery", **_host_settings(HOSTS[victim]))


def test_no_change_of_the_workers_was_refused_by_redis(stack: Stack) -> None:
    """Everything the workers did above (claims, progress, results, a split job's pieces,
    webhooks and outboxes, a SIGKILL and its rescue) went through the API: Redis refused
    the workers' user nothing."""
    name = redis_acl.role_users()["worker_api"].name
    assert _denials(stack, name) == []
