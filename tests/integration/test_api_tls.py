"""The API over HTTPS (issue 18 item 5): a real uvicorn with a certificate from a CA made
here. A client that does not trust the CA is refused, one that does is served; a worker
without the shared directory downloads the upload over HTTPS with the worker token; one that
trusts another CA does not start (or, writing its records on Redis, fails the job saying why);
the CLI verifies the certificate."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.stack import API_KEY, Stack
from tests.tls import ca_and_server_cert


@pytest.fixture
def tls_stack(make_stack: Callable[..., Stack], tmp_path: Path) -> Stack:
    ca, crt, key = ca_and_server_cert(tmp_path / "pki")
    stack = make_stack(api_tls_cert_file=crt, api_tls_key_file=key, api_ca_file=ca)
    stack.start_api()
    return stack


def test_https_is_served_to_clients_that_trust_the_ca_only(tls_stack: Stack) -> None:
    assert tls_stack.api_url.startswith("https://")
    with tls_stack.client() as trusted:
        assert trusted.get("/api/v1/workers").status_code == 200
    # The system's trust store does not know the role's CA.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_stack.api_url}/health", timeout=10)
    # No plain HTTP on the TLS port: the API key would cross the network in clear.
    plain = tls_stack.api_url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/health", headers={"X-API-Key": API_KEY}, timeout=10)


def test_worker_downloads_the_upload_over_https(
    tls_stack: Stack, speech_wav: Path, tmp_path: Path
) -> None:
    tls_stack.start_worker("gpu0@test", "gpu-tasks", shared_dir=tmp_path / "not-shared")
    job = tls_stack.wait_job(tls_stack.ingest(speech_wav, gpu=True)["task_id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["metadata"]["file_transfer"] == "http"


def test_worker_that_trusts_another_ca_fails_the_job_saying_why(
    tls_stack: Stack, speech_wav: Path, tmp_path: Path
) -> None:
    """A worker writing its records on Redis (job_writes=redis) meets the API first at the
    download of the upload."""
    other_ca, _, _ = ca_and_server_cert(tmp_path / "other-pki")
    tls_stack.start_worker(
        "gpu0@test",
        "gpu-tasks",
        shared_dir=tmp_path / "not-shared",
        api_ca_file=other_ca,
        job_writes="redis",
    )
    job = tls_stack.wait_job(tls_stack.ingest(speech_wav, gpu=True)["task_id"])
    assert job["status"] == "failed"
    assert "download of the upload failed" in job["error"]
    assert "CERTIFICATE_VERIFY_FAILED" in job["error"]


def test_worker_that_trusts_another_ca_does_not_start(
    tls_stack: Stack, speech_wav: Path, tmp_path: Path
) -> None:
    """Writing its records through the API (the default), such a worker could record no job
    it took: it exits 78 (the unit's RestartPreventExitStatus) saying why before it takes
    one, and a gpu=true job runs on the CPU worker instead."""
    other_ca, _, _ = ca_and_server_cert(tmp_path / "other-pki")
    tls_stack.start_worker("cpu0@test", "celery")
    tls_stack.start_worker("gpu0@test", "gpu-tasks", wait=False, api_ca_file=other_ca)
    assert tls_stack.procs["gpu0@test"].wait(60) == 78
    log = (tls_stack.logs / "gpu0_test.log").read_text()
    assert "TLS certificate" in log and "is not trusted by" in log, log
    assert "CERTIFICATE_VERIFY_FAILED" in log and str(other_ca) in log
    job = tls_stack.wait_job(tls_stack.ingest(speech_wav, gpu=True)["task_id"])
    assert job["status"] == "succeeded", job
    assert [a["worker"] for a in job["attempts"]] == ["cpu0@test"]


def _cli(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**stack.env, "MORAG_API_KEY": API_KEY, "COLUMNS": "200", **env}
    return subprocess.run(
        [sys.executable, "-m", "morag.cli", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_verifies_the_api_certificate(tls_stack: Stack, tmp_path: Path) -> None:
    trusted = _cli(tls_stack, "workers", "--json")
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.strip() == "[]"
    other_ca, _, _ = ca_and_server_cert(tmp_path / "other-pki")
    refused = _cli(tls_stack, "workers", "--json", MORAG_API_CA_FILE=str(other_ca))
    assert refused.returncode == 1
    # --json: the error is one JSON object on stdout, where the command's answer goes.
    error = json.loads(refused.stdout)
    assert "CERTIFICATE_VERIFY_FAILED" in error["error"] and error["code"] == "unreachable"
    missing = _cli(tls_stack, "workers", "--json", MORAG_API_CA_FILE=str(tmp_path / "none"))
    assert missing.returncode == 2
    error = json.loads(missing.stdout)
    assert "cannot load MORAG_API_CA_FILE" in error["error"] and error["code"] == "ca_file"
