"""Bad input gets a clear 4xx or a failed job with the reason, and the worker keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest
from morag.job_writes import host_token

from tests.integration.stack import WORKER_TOKEN, Stack


def _post_file(stack: Stack, name: str, data: bytes, **params: str):
    with stack.client() as c:
        return c.post("/process/file", params=params, files={"file": (name, data)})


def test_empty_file_is_422(stack: Stack) -> None:
    resp = _post_file(stack, "empty.wav", b"")
    assert resp.status_code == 422
    assert resp.json()["detail"] == "the uploaded file is empty"


def test_non_audio_file_is_415(stack: Stack) -> None:
    resp = _post_file(stack, "notes.wav", b"just some text pretending to be audio\n" * 10)
    assert resp.status_code == 415
    assert "not a recognised format" in resp.json()["detail"]
    assert not any((stack.shared / "uploads").iterdir()), "a refused upload must not stay"


def test_corrupt_wav_fails_the_job_with_a_reason(stack: Stack, speech_wav: Path) -> None:
    corrupt = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 40
    resp = _post_file(stack, "corrupt.wav", corrupt, gpu="true")
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert "processing failed" in detail and "cannot decode audio" in detail
    # Both workers are still serving.
    for gpu in ("true", "false"):
        ok = _post_file(stack, "speech.wav", speech_wav.read_bytes(), gpu=gpu)
        assert ok.status_code == 200, ok.text


def test_upload_over_the_limit_is_413(stack: Stack) -> None:
    big = b"RIFF" + b"\x00" * 2_500_000  # the module stack allows 2,000,000 bytes
    resp = _post_file(stack, "big.wav", big)
    assert resp.status_code == 413
    assert "exceeds the limit" in resp.json()["detail"]


def test_unknown_task_and_batch_ids_are_404(stack: Stack) -> None:
    with stack.client() as c:
        job = c.get("/api/v1/status/ffffffffffffffffffffffffffffffff")
        batch = c.get("/api/v1/status/batch/nope")
    assert job.status_code == 404 and "unknown task id" in job.json()["detail"]
    assert batch.status_code == 404


@pytest.mark.parametrize("key,status", [(None, 401), ("wrong-key", 403)])
def test_every_route_but_health_needs_an_api_key(stack: Stack, key, status) -> None:
    # /metrics takes its own bearer token instead (test_metrics.py).
    with stack.client(key) as c:
        for method, path in [
            ("GET", "/api/v1/status/"),
            ("GET", "/api/v1/workers"),
            ("GET", "/api/v1/status/stats/queues"),
            ("POST", "/process/url"),
            ("POST", "/api/v1/ingest/url"),
            ("DELETE", "/api/v1/ingest/abc"),
            ("GET", "/api/v1/status/abc"),
        ]:
            resp = c.request(method, path)
            assert resp.status_code == status, (method, path, resp.text)
            assert "detail" in resp.json()
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200


def test_openapi_schema_needs_the_key(stack: Stack) -> None:
    with stack.client(None) as anonymous, stack.client() as c:
        assert anonymous.get("/openapi.json").status_code == 401
        assert anonymous.get("/docs").status_code == 401
        schema = c.get("/openapi.json")
        ui = c.get("/docs")
    assert schema.status_code == 200
    assert {"/process/file", "/api/v1/status/{task_id}"} <= set(schema.json()["paths"])
    assert ui.status_code == 200 and "swagger" in ui.text.lower()


def test_second_api_key_works(stack: Stack) -> None:
    with stack.client("second-key") as c:
        assert c.get("/api/v1/workers").status_code == 200


@pytest.mark.parametrize("value", ["banana", "cpu", "2", "yes please"])
def test_gpu_flag_must_be_a_boolean(stack: Stack, speech_wav: Path, value: str) -> None:
    resp = _post_file(stack, "speech.wav", speech_wav.read_bytes(), gpu=value)
    assert resp.status_code == 422
    with stack.client() as c:
        form = c.post(
            "/api/v1/ingest/file",
            data={"gpu": value},
            files={"file": ("speech.wav", speech_wav.read_bytes())},
        )
        body = c.post("/api/v1/ingest/url", json={"url": "http://127.0.0.1/x.wav", "gpu": value})
    assert form.status_code == 422 and body.status_code == 422


def test_options_must_be_a_json_object(stack: Stack, speech_wav: Path) -> None:
    with stack.client() as c:
        resp = c.post(
            "/process/file",
            data={"options": "[1, 2]"},
            files={"file": ("speech.wav", speech_wav.read_bytes())},
        )
        broken = c.post(
            "/process/file",
            data={"options": "{nope"},
            files={"file": ("speech.wav", speech_wav.read_bytes())},
        )
    assert resp.status_code == 422 and "JSON object" in resp.json()["detail"]
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["detail"]


def test_refused_urls(stack: Stack) -> None:
    with stack.client() as c:
        scheme = c.post("/process/url", json={"url": "file:///etc/passwd"})
        private = c.post("/api/v1/ingest/url", json={"url": "http://10.1.2.3/a.wav"})
        link_local = c.post("/api/v1/ingest/url", json={"url": "http://169.254.169.254/x.wav"})
    assert scheme.status_code == 422 and "http and https" in scheme.json()["detail"]
    assert private.status_code == 422 and "private" in private.json()["detail"]
    assert link_local.status_code == 422


def test_file_route_needs_the_worker_token_and_takes_no_paths(
    stack: Stack, speech_wav: Path
) -> None:
    accepted = stack.ingest(speech_wav, gpu=False, options={"fault": "slow:3"})
    job = stack.wait_job(accepted["task_id"], states=("running",))
    assert job["status"] == "running"
    file_id = next(p.name for p in (stack.shared / "uploads").iterdir())
    with stack.client(None) as c:
        no_token = c.get(f"/api/v1/files/{file_id}")
        api_key_only = c.get(f"/api/v1/files/{file_id}", headers={"X-API-Key": "test-api-key"})
        wrong = c.get(f"/api/v1/files/{file_id}", headers={"X-Worker-Token": "nope"})
        good = c.get(f"/api/v1/files/{file_id}", headers={"X-Worker-Token": WORKER_TOKEN})
        traversal = [
            c.get(f"/api/v1/files/{p}", headers={"X-Worker-Token": WORKER_TOKEN})
            for p in ("..%2F..%2Fetc%2Fpasswd", "%2E%2E", "..", f"{file_id}.part")
        ]
    assert no_token.status_code == 401 and api_key_only.status_code == 401
    assert wrong.status_code == 403
    assert good.status_code == 200 and good.content == speech_wav.read_bytes()
    assert all(r.status_code == 404 for r in traversal), [r.status_code for r in traversal]
    assert stack.wait_job(accepted["task_id"])["status"] == "succeeded"


def test_worker_without_the_share_downloads_over_http(make_stack, speech_wav: Path, tmp_path):
    stack = make_stack()
    stack.start_api()
    stack.start_worker("gpu0@test", "gpu-tasks", shared_dir=tmp_path / "not-shared")
    job = stack.wait_job(stack.ingest(speech_wav, gpu=True)["task_id"])
    assert job["status"] == "succeeded"
    assert job["result"]["metadata"]["file_transfer"] == "http"
    assert "report" in job["result"]["content"].lower()


def test_worker_with_a_wrong_token_fails_the_job_with_the_reason(
    make_stack, speech_wav: Path, tmp_path
) -> None:
    # Workers writing their records on Redis meet the API first at the download.
    stack = make_stack(job_writes="redis")
    stack.start_api()
    stack.start_worker(
        "gpu0@test",
        "gpu-tasks",
        shared_dir=tmp_path / "not-shared",
        worker_token="wrong",
    )
    job = stack.wait_job(stack.ingest(speech_wav, gpu=True)["task_id"])
    assert job["status"] == "failed"
    assert "download of the upload failed: HTTP 403" in job["error"]


@pytest.mark.parametrize("token", ["wrong", host_token(WORKER_TOKEN, "otherhost")])
def test_worker_whose_token_the_api_refuses_does_not_start(
    make_stack, speech_wav: Path, token: str
) -> None:
    """Writing through the API (the default): a wrong token, or another host's, would let the
    worker take jobs it can neither record nor fail. It exits 78 (the unit's
    RestartPreventExitStatus) saying what to set, and a gpu=true job runs on the CPU."""
    stack = make_stack()
    stack.start_api()
    stack.start_worker("cpu0@test", "celery")
    stack.start_worker("gpu0@test", "gpu-tasks", wait=False, worker_token=token)
    assert stack.procs["gpu0@test"].wait(60) == 78
    log = (stack.logs / "gpu0_test.log").read_text()
    assert "refuses this worker's token as host test (403: invalid worker token)" in log, log
    assert "morag worker-token test" in log
    assert stack.heartbeat("gpu0@test") is None
    job = stack.wait_job(stack.ingest(speech_wav, gpu=True)["task_id"])
    assert job["status"] == "succeeded", job
    assert [a["worker"] for a in job["attempts"]] == ["cpu0@test"]


def test_unknown_queue_is_refused_by_the_cli(stack: Stack) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "morag.cli", "worker", "--queue", "gpu-task"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "unknown queue(s): gpu-task" in out.stderr


def test_api_refuses_to_start_without_keys(stack: Stack) -> None:
    import subprocess
    import sys

    env = {**stack.env, "MORAG_API_KEYS": ""}
    out = subprocess.run(
        [sys.executable, "-m", "morag.cli", "api", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and "MORAG_API_KEYS is empty" in out.stderr
