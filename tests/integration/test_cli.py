"""The `morag` command against a real stack: submit files and URLs with options, metadata
and a webhook, follow them, search, list workers, cancel; --json everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.integration import media
from tests.integration.conftest import running_stack
from tests.integration.stack import API_KEY, Stack


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clidocs")
    return {"docx": media.docx_file(d / "harbour.docx"), "html": media.html_page(d / "island.html")}


@pytest.fixture(scope="module")
def web(docs: dict[str, Path]) -> Iterator[str]:
    with media.http_server(docs["html"].parent) as url:
        yield url


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("clistack")
    workers = {"gpu0@cli": "gpu-tasks", "cpu0@cli": "celery", "store@cli": "morag-store"}
    settings = {"qdrant_path": root / "qdrant", "store_ingested": "true"}
    with running_stack(redis_server, root, workers, **settings) as s:
        yield s


def morag(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **stack.env,
        "MORAG_API_URL": stack.api_url,
        "MORAG_API_KEY": API_KEY,
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "morag.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_submit_file_and_url_wait_json_then_search(
    stack: Stack, docs: dict[str, Path], web: str
) -> None:
    url = f"{web}/{docs['html'].name}"
    done = morag(
        stack,
        "submit",
        str(docs["docx"]),
        url,
        "--gpu",
        "--metadata",
        '{"project": "cli-test"}',
        "--options",
        "{}",
        "--wait",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    jobs = json_lines(done.stdout)
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    assert "lighthouse" in jobs[0]["result"]["content"].lower()
    assert jobs[0]["route"]["gpu_requested"] is True
    assert jobs[1]["content_type"].startswith("text/html") or jobs[1]["result"]["content"]

    found = morag(stack, "search", media.WEB_SENTENCE, "--limit", "3", "--json")
    assert found.returncode == 0, found.stderr
    answer = json.loads(found.stdout)
    assert answer["count"] >= 1
    assert any("volcano" in r["text"].lower() for r in answer["results"])

    one = morag(stack, "status", jobs[0]["task_id"], "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["task_id"] == jobs[0]["task_id"]

    # A finished job cannot be cancelled: exit 1 and the API's reason.
    late = morag(stack, "cancel", jobs[0]["task_id"])
    assert late.returncode == 1
    assert "already ended" in late.stderr


def test_submit_without_wait_prints_each_job(stack: Stack, docs: dict[str, Path]) -> None:
    out = morag(stack, "submit", str(docs["docx"]), "--json")
    assert out.returncode == 0, out.stderr
    (job,) = json_lines(out.stdout)
    assert job["task_id"] and job["route"]["queue"] == "celery"
    final = morag(stack, "status", job["task_id"], "--wait", "--json")
    assert json.loads(final.stdout)["status"] == "succeeded", final.stdout + final.stderr


def test_workers_through_the_api(stack: Stack) -> None:
    out = morag(stack, "workers", "--json")
    assert out.returncode == 0, out.stderr
    names = {w["name"] for w in json.loads(out.stdout)}
    assert {"gpu0@cli", "cpu0@cli", "store@cli"} <= names
    table = morag(stack, "workers")
    assert "gpu0@cli" in table.stdout


def test_bad_input_is_refused_before_any_request(stack: Stack, tmp_path: Path) -> None:
    bad_json = morag(stack, "submit", "http://127.0.0.1/x", "--options", "{not json")
    assert bad_json.returncode == 2
    assert "--options" in bad_json.stderr
    not_object = morag(stack, "submit", "http://127.0.0.1/x", "--metadata", "[1, 2]")
    assert not_object.returncode == 2
    assert "JSON object" in not_object.stderr
    missing = morag(stack, "submit", str(tmp_path / "nope.wav"))
    assert missing.returncode == 2
    assert "not a file" in missing.stderr


def test_wrong_key_and_unreachable_api(stack: Stack) -> None:
    wrong = morag(stack, "workers", "--api-key", "wrong-key")
    assert wrong.returncode == 1
    assert "HTTP 401" in wrong.stderr or "HTTP 403" in wrong.stderr
    down = morag(stack, "workers", "--api-url", "http://127.0.0.1:9")
    assert down.returncode == 1
    assert "cannot reach the API" in down.stderr


def test_a_webhook_without_a_server_secret_is_said_to_be_unsigned(
    stack: Stack, docs: dict[str, Path]
) -> None:
    out = morag(
        stack, "submit", str(docs["docx"]), "--webhook", "http://127.0.0.1:9/hook", "--json"
    )
    assert out.returncode == 0, out.stderr
    (job,) = json_lines(out.stdout)
    assert job["webhook"]["url"] == "http://127.0.0.1:9/hook"
    assert job["webhook"]["signed"] is False
    assert "MORAG_WEBHOOK_SECRET" in job["webhook"]["note"]
    final = json.loads(morag(stack, "status", job["task_id"], "--wait", "--json").stdout)
    assert final["webhook"]["signed"] is False
