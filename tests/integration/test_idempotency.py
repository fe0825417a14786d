"""Submissions a client can retry safely (issue 18 items 3 and 6): the Idempotency-Key header,
all-or-nothing batches, "503 means the job will not run", and no upload left behind by a
refused submission.

Real API and Celery workers on a real Redis, logged in as the role's ACL users. Redis refuses
at a chosen moment through those users' ACL rules (what the delivery tests do), never a mock.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx

from tests import redis_acl
from tests.integration.stack import API_KEY, Stack, stack_on_own_redis, wait_until

IDEM_KEYS = "morag:idempotency:*"
# Queued only: no worker runs these, nothing is fetched.
PAGE = "http://127.0.0.1:9/page.html"
SOUND = "http://127.0.0.1:9/sound.wav"


def _uploads(stack: Stack) -> list[Path]:
    folder = stack.shared / "uploads"
    return sorted(folder.iterdir()) if folder.exists() else []


def _post_file(c: httpx.Client, path: Path, key: str | None, **data: str) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    with path.open("rb") as f:
        return c.post(
            "/api/v1/ingest/file",
            files={"file": (path.name, f)},
            data=data,
            headers=headers,
        )


def _api_user() -> str:
    return redis_acl.role_users()["api"].name


def test_a_retry_with_the_same_key_returns_the_same_job_or_batch(
    make_stack, speech_wav: Path
) -> None:
    stack = make_stack()
    stack.start_api()
    with stack.client() as c:
        first = _post_file(c, speech_wav, "file-1", gpu="false")
        again = _post_file(c, speech_wav, "file-1", gpu="false")
        assert first.status_code == again.status_code == 202, again.text
        assert again.json() == first.json()
        # The retry's upload is not kept: the job reads the first one.
        assert len(_uploads(stack)) == 1

        body = {"url": PAGE, "metadata": {"n": 1}}
        url_1 = c.post("/api/v1/ingest/url", json=body, headers={"Idempotency-Key": "url-1"})
        url_2 = c.post("/api/v1/ingest/url", json=body, headers={"Idempotency-Key": "url-1"})
        assert url_1.status_code == url_2.status_code == 202, url_2.text
        assert url_2.json() == url_1.json()

        batch = {"items": [{"url": PAGE}, {"url": SOUND}]}
        b_1 = c.post("/api/v1/ingest/batch", json=batch, headers={"Idempotency-Key": "b-1"})
        b_2 = c.post("/api/v1/ingest/batch", json=batch, headers={"Idempotency-Key": "b-1"})
        assert b_1.status_code == b_2.status_code == 202, b_2.text
        assert b_2.json() == b_1.json()

        # The same key with a different request: refused, nothing created.
        other = c.post(
            "/api/v1/ingest/url",
            json={**body, "gpu": True},
            headers={"Idempotency-Key": "url-1"},
        )
        assert other.status_code == 422, other.text
        assert other.json()["code"] == "idempotency_key_reused"
        assert "Idempotency-Key" in other.json()["detail"]
        elsewhere = c.post("/api/v1/ingest/batch", json=batch, headers={"Idempotency-Key": "url-1"})
        assert elsewhere.status_code == 422, elsewhere.text

        # Unusable keys are refused with a readable reason.
        long_key = c.post("/api/v1/ingest/url", json=body, headers={"Idempotency-Key": "k" * 300})
        assert long_key.status_code == 422 and "Idempotency-Key" in long_key.json()["detail"]

    # Keys belong to the API key that sent them: another client's same key is its own job.
    with stack.client("second-key") as c2:
        theirs = c2.post("/api/v1/ingest/url", json=body, headers={"Idempotency-Key": "url-1"})
    assert theirs.status_code == 202 and theirs.json()["task_id"] != url_1.json()["task_id"]

    # One job per first request: file, url, 2 batch items, the other client's url.
    assert len(stack.jobs_in_redis()) == 5
    assert len(list(stack.redis.scan_iter("morag:batch:*"))) == 1


def test_concurrent_retries_create_one_job(make_stack) -> None:
    stack = make_stack()
    stack.start_api()
    answers: list[httpx.Response] = []
    go = threading.Barrier(8)

    def post() -> None:
        with stack.client() as c:
            go.wait()
            answers.append(
                c.post(
                    "/api/v1/ingest/url",
                    json={"url": PAGE},
                    headers={"Idempotency-Key": "same-moment"},
                )
            )

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in answers] == [202] * 8, [r.text for r in answers]
    assert len({r.json()["task_id"] for r in answers}) == 1
    assert len(stack.jobs_in_redis()) == 1


def test_keys_expire_after_the_configured_time(make_stack) -> None:
    stack = make_stack(idempotency_ttl=2)
    stack.start_api()
    with stack.client() as c:
        first = c.post("/api/v1/ingest/url", json={"url": PAGE}, headers={"Idempotency-Key": "e"})
        assert first.status_code == 202, first.text
        [key] = stack.redis.keys(IDEM_KEYS)
        assert 0 < stack.redis.pttl(key) <= 2000
        wait_until(lambda: not stack.redis.exists(key), 10, "the key to expire")
        later = c.post("/api/v1/ingest/url", json={"url": PAGE}, headers={"Idempotency-Key": "e"})
    assert later.status_code == 202 and later.json()["task_id"] != first.json()["task_id"]


def test_the_openai_route_answers_a_retry_with_the_same_job(make_stack, speech_wav: Path) -> None:
    stack = make_stack()
    stack.start_api()
    stack.start_worker("cpu0@test", "celery")
    ids = []
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "whisper-1"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=120) as c:
        for _ in range(2):
            with speech_wav.open("rb") as f:
                resp = c.post(
                    "/v1/audio/transcriptions",
                    files={"file": (speech_wav.name, f)},
                    data={"model": "whisper-1", "gpu": "false"},
                )
            assert resp.status_code == 200, resp.text
            assert "report" in resp.json()["text"].lower()
            ids.append(resp.headers["X-MoRAG-Task-Id"])
    assert ids[0] == ids[1]
    assert len(stack.jobs_in_redis()) == 1


def test_a_refused_webhook_url_leaves_no_upload(make_stack, speech_wav: Path) -> None:
    stack = make_stack()
    stack.start_api()
    with stack.client() as c:
        for n in range(3):
            resp = _post_file(c, speech_wav, None, webhook_url=f"http://10.1.2.{n}/hook")
            assert resp.status_code == 422, resp.text
            assert "webhook_url refused" in resp.json()["detail"]
    assert _uploads(stack) == []
    assert stack.jobs_in_redis() == []


def test_a_503_job_never_runs_and_leaves_no_upload(tmp_path: Path, speech_wav: Path) -> None:
    with stack_on_own_redis(tmp_path, outbox_grace=1) as (stack, server):
        stack.start_api()
        # The broker's queues refuse the API's writes; the job records do not.
        server.restrict_keys("api", "~morag:*", "~_kombu.*", "%R~*")
        with stack.client() as c:
            refused = _post_file(c, speech_wav, "retry-me", gpu="false")
        assert refused.status_code == 503, refused.text
        assert "queue is unavailable" in refused.json()["detail"]
        assert _uploads(stack) == [], "a refused submission must not leave its upload"
        server.restore_keys("api")
        [record] = stack.jobs_in_redis()
        assert record["status"] == "failed" and record["error"].startswith("not accepted")

        # A worker and its reconciler get every chance to send it: they never do.
        stack.start_worker("cpu0@test", "celery")
        with stack.client() as c:
            retry = _post_file(c, speech_wav, "retry-me", gpu="false")
        assert retry.status_code == 202, retry.text
        assert retry.json()["task_id"] != record["task_id"]
        assert stack.wait_job(retry.json()["task_id"])["status"] == "succeeded"
        wait_until(lambda: stack.redis.zcard("morag:outbox") == 0, 30, "an empty outbox")
        refused_now = json.loads(stack.redis.get(f"morag:job:{record['task_id']}"))
        assert refused_now["status"] == "failed" and refused_now["attempts"] == []


def test_a_refusal_that_cannot_be_withdrawn_is_answered_202_and_runs_once(
    tmp_path: Path, speech_wav: Path
) -> None:
    with stack_on_own_redis(tmp_path, outbox_grace=2) as (stack, server):
        stack.start_api()
        admin = server.client()
        # The broker refuses the message, and Redis also refuses what would take the job
        # back (ZREM on the outbox): the job stays recorded and the outbox will send it.
        server.restrict_keys("api", "~morag:*", "~_kombu.*", "%R~*")
        admin.execute_command("ACL", "SETUSER", _api_user(), "-zrem")
        try:
            with stack.client() as c:
                resp = _post_file(c, speech_wav, "stuck", gpu="false")
        finally:
            admin.execute_command("ACL", "SETUSER", _api_user(), "+zrem")
            server.restore_keys("api")
        # Not "503, try again later" for a job that the outbox sends anyway.
        assert resp.status_code == 202, resp.text
        stack.start_worker("cpu0@test", "celery")
        job = stack.wait_job(resp.json()["task_id"], timeout=90)
        assert job["status"] == "succeeded", job
        assert len(job["attempts"]) == 1
        assert len(stack.jobs_in_redis()) == 1


def test_a_batch_refused_half_way_leaves_no_job(tmp_path: Path) -> None:
    # A heartbeat that outlives the few moments the GPU worker is stopped below.
    with stack_on_own_redis(tmp_path, outbox_grace=1, heartbeat_ttl=15) as (
        stack,
        server,
    ):
        stack.start_api()
        # A GPU worker that cannot transcribe (no usable Whisper model) but fetches pages:
        # with gpu=true a page goes to gpu-tasks and a sound file to the CPU queue.
        stack.start_worker("gpu0@test", "gpu-tasks", whisper_model=tmp_path / "no-model")
        beat = stack.wait_live("gpu0@test")
        assert "web" in beat["processors"] and "audio" not in beat["processors"], beat
        # gpu-tasks takes the API's messages, the CPU queue refuses them: the batch's first
        # item is sent, its second refused.
        server.restrict_keys("api", "~morag:*", "~_kombu.*", "%R~*", "%W~gpu-tasks*")
        batch: dict[str, Any] = {"items": [{"url": PAGE}, {"url": SOUND}], "gpu": True}
        # Stopped, the GPU worker cannot take the page's message before the API has
        # answered (a claim in that moment would make the batch accepted, and answered 202).
        gpu_worker = stack.procs["gpu0@test"].pid
        os.killpg(gpu_worker, signal.SIGSTOP)
        try:
            with stack.client() as c:
                resp = c.post("/api/v1/ingest/batch", json=batch, headers={"Idempotency-Key": "b"})
        finally:
            os.killpg(gpu_worker, signal.SIGCONT)
            server.restore_keys("api")
        assert resp.status_code == 503, resp.text
        assert not list(stack.redis.scan_iter("morag:batch:*"))
        # The GPU worker takes the page's message; the job it names is not run.
        wait_until(
            lambda: stack.redis.llen("gpu-tasks") == 0 and not stack.redis.hlen("unacked"),
            30,
            "the GPU worker to take the page's message",
        )
        records = stack.jobs_in_redis()
        assert records, "the refused batch's records say why they did not run"
        for record in records:
            assert record["status"] == "failed" and record["attempts"] == [], record
            assert record["error"].startswith("not accepted"), record
        assert stack.redis.zcard("morag:outbox") == 0
        assert stack.redis.scard("morag:jobs:active") == 0
        # The same key afterwards is a new batch, accepted whole.
        with stack.client() as c:
            again = c.post("/api/v1/ingest/batch", json=batch, headers={"Idempotency-Key": "b"})
        assert again.status_code == 202, again.text
        assert len(again.json()["task_ids"]) == 2


def _process_file(c: httpx.Client, path: Path, key: str, **data: str) -> httpx.Response:
    with path.open("rb") as f:
        return c.post(
            "/process/file",
            files={"file": (path.name, f)},
            data=data,
            headers={"Idempotency-Key": key},
        )


def test_process_routes_answer_a_retry_with_the_same_job(make_stack, speech_wav: Path) -> None:
    """/process/* with Idempotency-Key: a retry after the job ended gets that job's answer
    (200 with its result), a retry of a job still queued (202) its id; nothing runs twice."""
    stack = make_stack(process_wait=1)
    stack.start_api()
    stack.start_worker("cpu0@test", "celery")
    with stack.client() as c:
        first = _process_file(c, speech_wav, "proc-file-1", gpu="false")
        assert first.status_code in (200, 202), first.text  # 202: it outlasted the wait
        done = stack.wait_job(first.json()["task_id"], timeout=120)
        assert done["status"] == "succeeded", done
        again = _process_file(c, speech_wav, "proc-file-1", gpu="false")
        assert again.status_code == 200, again.text
        assert again.json()["task_id"] == first.json()["task_id"]
        assert again.json()["result"] == done["result"]
        assert "report" in again.json()["result"]["content"].lower()
        # The retry's upload is not kept (the job's own went when it ended).
        assert _uploads(stack) == []

        # With no worker left, the job stays queued: both answers are 202 with its id.
        stack.stop("cpu0@test")
        body = {"url": PAGE, "gpu": False}
        url_1 = c.post("/process/url", json=body, headers={"Idempotency-Key": "proc-url-1"})
        url_2 = c.post("/process/url", json=body, headers={"Idempotency-Key": "proc-url-1"})
        assert url_1.status_code == url_2.status_code == 202, url_2.text
        assert url_2.json()["task_id"] == url_1.json()["task_id"]

        # The same key with another request, or on another route: refused, nothing created.
        changed = c.post(
            "/process/url",
            json={**body, "options": {"language": "de"}},
            headers={"Idempotency-Key": "proc-url-1"},
        )
        assert changed.status_code == 422, changed.text
        assert changed.json()["code"] == "idempotency_key_reused"
        assert "Idempotency-Key" in changed.json()["detail"]
        other_file = _process_file(c, speech_wav, "proc-file-1", gpu="true")
        assert other_file.status_code == 422, other_file.text
        assert other_file.json()["code"] == "idempotency_key_reused"
        elsewhere = c.post(
            "/api/v1/ingest/url", json=body, headers={"Idempotency-Key": "proc-url-1"}
        )
        assert elsewhere.status_code == 422, elsewhere.text
        assert elsewhere.json()["code"] == "idempotency_key_reused"

    assert _uploads(stack) == []  # nor the upload of the refused reuse of the key
    records = stack.jobs_in_redis()
    assert len(records) == 2, records
    ran = next(r for r in records if r["task_id"] == first.json()["task_id"])
    assert len(ran["attempts"]) == 1, ran["attempts"]
