"""The `morag` command's failures: with --json one JSON object on stdout and a non-zero exit,
whatever failed (an API answer, an unreachable API, a bad argument); without it a red line
on stderr. And `morag search` without a live morag-store worker answers at once.

A real API (uvicorn) on a real Redis; no worker runs here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer, free_port
from tests.integration.conftest import running_stack
from tests.integration.stack import API_KEY, Stack

# Far above what the test waits for the command: only an answer at once passes.
SEARCH_TIMEOUT = 300
COMMAND_LIMIT = 60


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("clijson")
    with running_stack(redis_server, root, {}, search_timeout=SEARCH_TIMEOUT) as stack:
        yield stack


def morag(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "MORAG_API_URL": stack.api_url, "MORAG_API_KEY": API_KEY}
    return subprocess.run(
        [sys.executable, "-m", "morag.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_LIMIT,
        check=False,
    )


def one_json_error(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert out.returncode != 0, out
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout
    body = json.loads(lines[0])
    assert set(body) >= {"error", "status", "code"}, body
    assert out.stderr.strip() == "", out.stderr  # nothing for people in between
    return body


def test_search_without_a_store_worker_answers_at_once(api: Stack) -> None:
    started = time.monotonic()
    out = morag(api, "search", "harbour", "--json")  # times out unless the API answers
    body = one_json_error(out)
    assert out.returncode == 1
    assert body["status"] == 503 and body["code"] == "store_unavailable"
    assert "no live morag-store worker" in body["error"]
    assert time.monotonic() - started < COMMAND_LIMIT


def test_api_errors_are_json_with_their_status(api: Stack) -> None:
    unknown = "f" * 32
    body = one_json_error(morag(api, "status", unknown, "--json"))
    assert body == {"error": f"unknown task id {unknown}", "status": 404, "code": "not_found"}
    body = one_json_error(morag(api, "cancel", unknown, "--json"))
    assert body["status"] == 404
    body = one_json_error(morag(api, "workers", "--json", "--api-key", "wrong"))
    assert body["status"] == 403 and body["code"] == "forbidden"


def test_local_failures_are_json_too(api: Stack, tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    body = one_json_error(morag(api, "workers", "--json", "--api-url", nowhere))
    assert body["status"] is None and body["code"] == "unreachable"
    assert body["error"].startswith(f"cannot reach the API at {nowhere}")
    missing = morag(api, "submit", str(tmp_path / "nope.wav"), "--json")
    assert missing.returncode == 2
    assert one_json_error(missing)["code"] == "not_a_file"
    bad = morag(api, "submit", "http://127.0.0.1/a.wav", "--options", "[1]", "--json")
    assert bad.returncode == 2
    body = one_json_error(bad)
    assert body["code"] == "bad_parameter" and body["param"] == "--options"


def test_without_json_errors_are_a_line_on_stderr(api: Stack) -> None:
    out = morag(api, "status", "f" * 32)
    assert out.returncode == 1 and out.stdout == ""
    assert "HTTP 404" in out.stderr and "unknown task id" in out.stderr
