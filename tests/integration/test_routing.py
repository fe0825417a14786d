"""gpu=true/false routing with real workers, and the switch to CPU when GPU workers die."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.integration.stack import FLEET, Stack


def _process_file(stack: Stack, path: Path, gpu: str) -> dict:
    with stack.client() as c, open(path, "rb") as f:
        resp = c.post("/process/file", params={"gpu": gpu}, files={"file": (path.name, f)})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_gpu_true_runs_on_the_gpu_worker(stack: Stack, speech_wav: Path) -> None:
    body = _process_file(stack, speech_wav, "true")
    assert body["route"]["queue"] == "gpu-tasks"
    assert body["route"]["gpu_requested"] is True
    assert "gpu0@test" in body["route"]["reason"]
    assert body["route"]["code"] == "gpu_worker"
    result = body["result"]
    assert "report" in result["content"].lower() and "friday" in result["content"].lower()
    assert result["segments"] and result["segments"][0]["end"] > 0
    meta = result["metadata"]
    assert meta["device"] == "cpu" and meta["model"] == "tiny.en" and meta["duration"] > 1
    assert meta["language"] == "en"
    job = stack.job(body["task_id"])
    assert job["status"] == "succeeded"
    assert [(a["queue"], a["worker"]) for a in job["attempts"]] == [("gpu-tasks", "gpu0@test")]


def test_gpu_false_runs_on_the_cpu_worker(stack: Stack, speech_wav: Path) -> None:
    body = _process_file(stack, speech_wav, "false")
    assert body["route"] == {
        "queue": "celery",
        "gpu_requested": False,
        "code": "not_requested",
        "reason": "gpu not requested",
    }
    job = stack.job(body["task_id"])
    assert [(a["queue"], a["worker"]) for a in job["attempts"]] == [("celery", "cpu0@test")]


def test_ingest_records_the_route_on_the_job(stack: Stack, speech_wav: Path) -> None:
    accepted = stack.ingest(speech_wav, gpu=True)
    assert accepted["status"] == "queued" and accepted["content_type"] == "audio"
    assert accepted["route"]["queue"] == "gpu-tasks"
    job = stack.wait_job(accepted["task_id"])
    assert job["status"] == "succeeded" and job["route"] == accepted["route"]
    assert job["attempts"][-1]["worker"] == "gpu0@test"
    assert job["result"]["metadata"]["file_transfer"] == "shared"


@pytest.fixture
def media_server(speech_wav: Path) -> Iterator[str]:
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(speech_wav.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_process_url_honours_the_gpu_flag(stack: Stack, media_server: str) -> None:
    url = f"{media_server}/speech.wav"
    with stack.client() as c:
        gpu = c.post("/process/url", params={"gpu": "true"}, json={"url": url})
        cpu = c.post("/process/url", params={"gpu": "false"}, json={"url": url})
    assert gpu.status_code == 200, gpu.text
    assert gpu.json()["route"]["queue"] == "gpu-tasks"
    assert "report" in gpu.json()["result"]["content"].lower()
    assert gpu.json()["result"]["metadata"]["file_transfer"] == "url"
    assert cpu.json()["route"]["queue"] == "celery"


def test_batch_routes_every_item(stack: Stack, media_server: str) -> None:
    url = f"{media_server}/speech.wav"
    with stack.client() as c:
        resp = c.post(
            "/api/v1/ingest/batch",
            json={"items": [{"url": url}, {"url": url}], "gpu": True},
        )
        assert resp.status_code == 202, resp.text
        batch = resp.json()
        assert [r["queue"] for r in batch["routes"]] == ["gpu-tasks", "gpu-tasks"]
        for task_id in batch["task_ids"]:
            assert stack.wait_job(task_id)["status"] == "succeeded"
        summary = c.get(f"/api/v1/status/batch/{batch['batch_id']}").json()
    assert summary["counts"] == {"succeeded": 2} and summary["total"] == 2


def test_fixed_status_paths_are_not_task_ids(stack: Stack) -> None:
    with stack.client() as c:
        queues = c.get("/api/v1/status/stats/queues")
        workers = c.get("/api/v1/workers")
        active = c.get("/api/v1/status/")
    assert queues.status_code == 200
    stats = queues.json()["queues"]
    assert stats["gpu-tasks"]["workers"] == ["gpu0@test"]
    assert stats["celery"]["workers"] == ["cpu0@test"]
    names = {w["name"]: w for w in workers.json()["workers"]}
    assert set(names) == {"gpu0@test", "cpu0@test"}
    assert names["gpu0@test"]["queues"] == ["gpu-tasks"]
    assert "audio" in names["gpu0@test"]["processors"]  # plus every installed type
    assert names["gpu0@test"]["device"] == "cpu"
    assert "MORAG_DEVICE=cpu" in names["gpu0@test"]["device_reason"]
    assert active.status_code == 200 and "jobs" in active.json()


def test_no_gpu_worker_ever_started_routes_to_cpu(make_stack, speech_wav: Path) -> None:
    stack = make_stack()
    stack.start_api()
    stack.start_worker("cpu0@test", "celery")
    body = _process_file(stack, speech_wav, "true")
    assert body["route"]["queue"] == "celery"
    assert body["route"]["gpu_requested"] is True
    assert "no live GPU worker" in body["route"]["reason"]
    assert body["route"]["code"] == "no_gpu_worker"
    assert "report" in body["result"]["content"].lower()


def _route_for(stack: Stack, path: Path) -> str:
    accepted = stack.ingest(path, gpu=True)
    return accepted["route"]["queue"]


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_gpu_worker_death_switches_routing_within_one_ttl(
    make_stack, speech_wav: Path, how: str
) -> None:
    stack = make_stack()
    stack.start(FLEET)
    assert _route_for(stack, speech_wav) == "gpu-tasks"
    if how == "sigkill":
        stack.kill("gpu0@test")
    else:
        stack.stop("gpu0@test")
    # One TTL for the heartbeat to expire, plus the API's 0.2 s cache.
    time.sleep(stack.TTL + 0.4)
    accepted = stack.ingest(speech_wav, gpu=True)
    assert accepted["route"]["queue"] == "celery"
    assert "no live GPU worker" in accepted["route"]["reason"]
    job = stack.wait_job(accepted["task_id"])
    assert job["status"] == "succeeded" and job["attempts"][-1]["worker"] == "cpu0@test"


def test_cli_submit_and_workers(stack: Stack, speech_wav: Path) -> None:
    import subprocess
    import sys

    env = {**stack.env, "MORAG_API_KEY": "test-api-key"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "morag.cli",
            "submit",
            str(speech_wav),
            "--gpu",
            "--wait",
            "--json",
            "--api-url",
            stack.api_url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "succeeded" and job["route"]["queue"] == "gpu-tasks"
    listing = subprocess.run(
        [sys.executable, "-m", "morag.cli", "workers", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert {w["name"] for w in json.loads(listing.stdout)} == {"gpu0@test", "cpu0@test"}
