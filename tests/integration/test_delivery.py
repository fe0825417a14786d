"""Delivery guarantees with real workers: lost workers, crashing jobs, GPU failures, rescue,
cancellation. Faults come from MORAG_FAULT_INJECTION (on in test stacks only)."""

from __future__ import annotations

from pathlib import Path

from tests.integration.stack import FLEET, Stack, wait_until


def _started(stack: Stack, stack_job: dict, worker: str) -> dict:
    return stack.wait_job(stack_job["task_id"], timeout=30, states=("running",))


def test_sigkill_mid_job_redelivers_and_completes_once(make_stack, speech_wav: Path) -> None:
    stack = make_stack()
    stack.start(FLEET)
    accepted = stack.ingest(speech_wav, gpu=True, options={"fault": "slow:4"})
    assert accepted["route"]["queue"] == "gpu-tasks"
    running = _started(stack, accepted, "gpu0@test")
    assert running["attempts"][0]["worker"] == "gpu0@test"
    stack.kill("gpu0@test")
    job = stack.wait_job(accepted["task_id"], timeout=60)
    assert job["status"] == "succeeded", job
    assert [a["worker"] for a in job["attempts"]] == ["gpu0@test", "cpu0@test"]
    assert "lost" in job["attempts"][0]["error"]
    assert job["attempts"][1]["error"] is None
    assert job["route"]["queue"] == "celery" and "lost" in job["route"]["reason"]
    assert job["route"]["code"] == "worker_lost"
    assert "report" in job["result"]["content"].lower()
    m = stack.scrape()
    assert m.value("morag_orphan_requeues_total", queue="celery") == 1
    assert m.value("morag_route_decisions_total", code="worker_lost", queue="celery") == 1
    assert m.value("morag_gpu_fallbacks_total", code="worker_lost", content_type="audio") == 1


def test_job_that_kills_its_worker_every_time_fails_after_the_cap(
    make_stack, speech_wav: Path
) -> None:
    stack = make_stack(max_deliveries=2)
    stack.start_api()
    stack.start_worker("cpu0@test", "celery")
    accepted = stack.ingest(speech_wav, gpu=False, options={"fault": "crash"})
    job = stack.wait_job(accepted["task_id"], timeout=60)
    assert job["status"] == "failed"
    assert "gave up after 2 deliveries" in job["error"]
    assert len(job["attempts"]) == 2
    m = stack.scrape()
    assert m.value("morag_redeliveries_total", content_type="audio") >= 1
    assert m.value("morag_jobs_finished_total", state="failed", content_type="audio") == 1
    # The worker survived its children dying and still serves.
    assert stack.alive("cpu0@test")
    ok = stack.wait_job(stack.ingest(speech_wav, gpu=False)["task_id"])
    assert ok["status"] == "succeeded"


def test_gpu_out_of_memory_reruns_on_cpu_under_the_same_id(make_stack, speech_wav: Path) -> None:
    stack = make_stack()
    stack.start(FLEET)
    with stack.client() as c, open(speech_wav, "rb") as f:
        resp = c.post(
            "/process/file",
            params={"gpu": "true"},
            files={"file": ("speech.wav", f)},
            data={"options": '{"fault": "cuda_oom"}'},
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "report" in body["result"]["content"].lower()
    job = stack.job(body["task_id"])
    assert job["status"] == "succeeded"
    attempts = [(a["queue"], a["worker"], a["error"]) for a in job["attempts"]]
    assert attempts == [
        ("gpu-tasks", "gpu0@test", "CUDA failed with error out of memory"),
        ("celery", "cpu0@test", None),
    ]
    assert job["route"]["queue"] == "celery"
    assert "GPU failure on gpu0@test" in job["route"]["reason"]
    assert job["route"]["code"] == "gpu_failure"
    assert job["result"]["metadata"]["device"] == "cpu"


def test_queued_gpu_jobs_are_rescued_by_cpu_workers_and_given_back(
    make_stack, speech_wav: Path
) -> None:
    stack = make_stack()
    stack.start(FLEET)
    busy = stack.ingest(speech_wav, gpu=True, options={"fault": "slow:5"})
    _started(stack, busy, "gpu0@test")
    waiting = [stack.ingest(speech_wav, gpu=True) for _ in range(2)]
    assert all(w["route"]["queue"] == "gpu-tasks" for w in waiting)
    assert stack.redis.llen("gpu-tasks") == 2
    stack.kill("gpu0@test")
    # Heartbeat expiry (one TTL) + grace, then a CPU worker consumes gpu-tasks.
    for w in waiting:
        job = stack.wait_job(w["task_id"], timeout=stack.TTL + stack.GRACE + 30)
        assert job["status"] == "succeeded"
        assert [(a["queue"], a["worker"]) for a in job["attempts"]] == [("gpu-tasks", "cpu0@test")]
        assert job["route"]["code"] == "rescued" and job["route"]["queue"] == "gpu-tasks"
    assert stack.heartbeat("cpu0@test")["rescuing"] is True
    m = stack.scrape()
    assert m.value("morag_gpu_fallbacks_total", code="rescued", content_type="audio") >= 2
    assert m.value("morag_route_decisions_total", code="rescued", queue="gpu-tasks") >= 2
    assert m.value("morag_workers", queue="gpu-tasks") == 0
    assert m.value("morag_queue_consumers", queue="gpu-tasks") == 1  # the rescuing CPU worker
    assert "gpu-tasks" in stack.heartbeat("cpu0@test")["consuming"]
    # The orphaned running job was redelivered too (the crash happened mid-job).
    assert stack.wait_job(busy["task_id"], timeout=60)["attempts"][-1]["worker"] == "cpu0@test"
    # A GPU worker comes back: the CPU worker hands gpu-tasks back, gpu=true goes there.
    stack.start_worker("gpu1@test", "gpu-tasks")
    wait_until(lambda: not stack.heartbeat("cpu0@test")["rescuing"], 15, "rescue to stop")
    assert stack.heartbeat("cpu0@test")["consuming"] == ["celery"]
    again = stack.ingest(speech_wav, gpu=True)
    assert again["route"]["queue"] == "gpu-tasks"
    assert stack.wait_job(again["task_id"])["attempts"][-1]["worker"] == "gpu1@test"


def test_cancel_queued_and_running_jobs(make_stack, speech_wav: Path) -> None:
    stack = make_stack()
    stack.start_api()
    stack.start_worker("cpu0@test", "celery")
    running = stack.ingest(speech_wav, gpu=False, options={"fault": "slow:30"})
    _started(stack, running, "cpu0@test")
    queued = stack.ingest(speech_wav, gpu=False)
    with stack.client() as c:
        first = c.delete(f"/api/v1/ingest/{queued['task_id']}")
        second = c.delete(f"/api/v1/ingest/{running['task_id']}")
        again = c.delete(f"/api/v1/ingest/{running['task_id']}")
        unknown = c.delete("/api/v1/ingest/0123456789abcdef0123456789abcdef")
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    assert second.status_code == 200 and second.json()["status"] == "cancelled"
    assert again.status_code == 409 and "already ended" in again.json()["detail"]
    assert unknown.status_code == 404
    # The worker stays up, finishes nothing it was told to drop, and serves the next job.
    ok = stack.wait_job(stack.ingest(speech_wav, gpu=False)["task_id"], timeout=60)
    assert ok["status"] == "succeeded"
    for task_id in (queued["task_id"], running["task_id"]):
        job = stack.job(task_id)
        assert job["status"] == "cancelled" and job["result"] is None
    assert stack.job(queued["task_id"])["attempts"] == []
    assert stack.alive("cpu0@test")


def test_graceful_stop_finishes_the_running_job(make_stack, speech_wav: Path) -> None:
    stack = make_stack()
    stack.start_api()
    stack.start_worker("gpu0@test", "gpu-tasks")
    accepted = stack.ingest(speech_wav, gpu=True, options={"fault": "slow:2"})
    _started(stack, accepted, "gpu0@test")
    stack.stop("gpu0@test")  # SIGTERM returns once the job is done
    job = stack.job(accepted["task_id"])
    assert job["status"] == "succeeded"
    assert [a["worker"] for a in job["attempts"]] == ["gpu0@test"]
    assert stack.heartbeat("gpu0@test") is None
