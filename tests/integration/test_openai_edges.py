"""The OpenAI-compatible routes at their edges, driven by the real ``openai`` SDK (at its
default retries) and httpx: one call never starts more than one job, refusals come before a
job is queued and in OpenAI's error shape, ``/v1/models`` lists the served model; and the
native API refuses a misspelt option.

A real API (uvicorn) on a real Redis with the role's ACL users; no worker runs here, so an
accepted job stays queued and the answer waits for nothing but MORAG_OPENAI_WAIT.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RedisServer, wait_until
from tests.integration.conftest import running_stack
from tests.integration.stack import API_KEY, Stack, stack_on_own_redis

WAIT = 1  # MORAG_OPENAI_WAIT here: a job nobody runs answers 504 after a second


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API alone, shared by the module; tests that count jobs use their own stack."""
    with running_stack(
        redis_server, tmp_path_factory.mktemp("edges"), {}, openai_wait=WAIT
    ) as stack:
        yield stack


def sdk(stack: Stack, key: str = API_KEY, **kwargs: Any) -> openai.OpenAI:
    # No max_retries: the SDK's default (2 retries of any 5xx, 408, 409, 429).
    return openai.OpenAI(api_key=key, base_url=f"{stack.api_url}/v1", **kwargs)


def sent_retry_count(exc: openai.APIStatusError) -> str:
    """Which attempt the SDK's error came from (0: the first, no retry)."""
    return exc.response.request.headers["x-stainless-retry-count"]


# -- item 1: one call, one job -------------------------------------------------------------


def test_a_timed_out_transcription_is_not_retried_into_more_jobs(
    make_stack: Any, speech_wav: Path
) -> None:
    stack = make_stack(openai_wait=WAIT)
    stack.start_api()
    client = sdk(stack)
    with open(speech_wav, "rb") as f, pytest.raises(openai.APIStatusError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=f)
    assert exc.value.status_code == 504 and exc.value.body["code"] == "timeout"
    jobs = stack.jobs_in_redis()
    assert len(jobs) == 1, [j["task_id"] for j in jobs]
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert sent_retry_count(exc.value) == "0", "the SDK retried a 504 whose job goes on"
    assert jobs[0]["task_id"] == exc.value.response.headers["x-morag-task-id"]
    assert jobs[0]["status"] == "queued"

    # The SDK sends no Idempotency-Key of its own; a client that sends one gets the same
    # job back when it repeats the call (OpenAI's SDKs: extra_headers).
    repeats = []
    for _ in range(2):
        with open(speech_wav, "rb") as f, pytest.raises(openai.APIStatusError) as again:
            client.audio.transcriptions.create(
                model="whisper-1", file=f, extra_headers={"Idempotency-Key": "edge-retry-1"}
            )
        assert again.value.status_code == 504
        repeats.append(again.value.response.headers["x-morag-task-id"])
    assert repeats[0] == repeats[1]
    assert len(stack.jobs_in_redis()) == 2


def test_redis_failing_while_the_answer_waits_is_not_retried(
    tmp_path: Path, speech_wav: Path
) -> None:
    """The job is queued, then the API loses access to the job records: the 503 says the
    job goes on and the SDK does not send the upload again."""
    with stack_on_own_redis(tmp_path, openai_wait=60) as (stack, server):
        stack.start_api()
        outcome: dict[str, BaseException] = {}

        def call() -> None:
            with open(speech_wav, "rb") as f:
                try:
                    sdk(stack).audio.transcriptions.create(model="whisper-1", file=f)
                except BaseException as exc:  # handed to the test's thread
                    outcome["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        try:
            wait_until(stack.jobs_in_redis, 30, "the job to be queued")
            server.restrict_keys("api")  # no key at all: the next poll of the record fails
            caller.join(60)
        finally:
            server.restore_keys("api")
        assert not caller.is_alive()
        error = outcome["error"]
        assert isinstance(error, openai.APIStatusError), repr(error)
        assert error.status_code == 503 and "the job goes on" in error.message
        assert error.response.headers["x-should-retry"] == "false"
        assert sent_retry_count(error) == "0"
        assert len(stack.jobs_in_redis()) == 1


# -- item 3: refusals in OpenAI's shape, before any job ------------------------------------


def _no_job_and_no_upload(stack: Stack) -> None:
    # Only the misspelt-option test queues a job here, and cancels it (its upload goes).
    assert [j for j in stack.jobs_in_redis() if j["status"] != "cancelled"] == []
    assert not any((stack.shared / "uploads").glob("*"))


def test_a_file_that_is_not_audio_is_a_bad_request(api: Stack) -> None:
    client = sdk(api)
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"hello " * 50))
    assert exc.value.status_code == 400
    assert exc.value.body["type"] == "invalid_request_error"
    assert exc.value.body["param"] == "file" and exc.value.body["code"] == "unsupported_type"
    assert "not audio or video" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as empty:
        client.audio.transcriptions.create(model="whisper-1", file=("empty.wav", b""))
    assert "empty" in empty.value.body["message"]
    _no_job_and_no_upload(api)


@pytest.mark.parametrize(
    ("language", "says"),
    [("xx", "not one Whisper knows"), ("fr", "English-only"), ("klingon", "not one Whisper")],
)
def test_a_language_the_model_cannot_do_is_refused_at_once(
    api: Stack, speech_wav: Path, language: str, says: str
) -> None:
    with open(speech_wav, "rb") as f, pytest.raises(openai.BadRequestError) as exc:
        sdk(api).audio.transcriptions.create(model="whisper-1", file=f, language=language)
    body = exc.value.body
    assert body["param"] == "language" and body["code"] == "unsupported_language"
    assert body["type"] == "invalid_request_error" and says in body["message"]
    _no_job_and_no_upload(api)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("include", {"include": ["logprobs"]}),
        ("chunking_strategy", {"chunking_strategy": "auto"}),
        ("chunking_strategy", {"chunking_strategy": {"type": "server_vad", "threshold": 0.5}}),
    ],
)
def test_unsupported_openai_fields_are_refused_with_their_param(
    api: Stack, speech_wav: Path, field: str, value: dict[str, Any]
) -> None:
    with open(speech_wav, "rb") as f, pytest.raises(openai.BadRequestError) as exc:
        sdk(api).audio.transcriptions.create(model="whisper-1", file=f, **value)
    assert exc.value.body["param"] == field
    assert exc.value.body["code"] == "unsupported_parameter"
    _no_job_and_no_upload(api)


def test_error_bodies_have_openais_four_members(api: Stack, speech_wav: Path) -> None:
    url = f"{api.api_url}/v1/audio/transcriptions"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with open(speech_wav, "rb") as f:
        resp = httpx.post(
            url,
            headers=auth,
            files={"file": ("s.wav", f, "audio/wav")},
            data={"model": "whisper-1", "include[]": "logprobs"},
            timeout=30,
        )
    assert resp.status_code == 400
    assert set(resp.json()) == {"error"}
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert resp.json()["error"]["param"] == "include"
    _no_job_and_no_upload(api)


def test_missing_and_wrong_keys_are_invalid_api_key(api: Stack, speech_wav: Path) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        sdk(api, key="wrong").models.list()
    assert wrong.value.body["code"] == "invalid_api_key"
    for path, method in [("/v1/models", "GET"), ("/v1/audio/transcriptions", "POST")]:
        files = {"file": ("s.wav", speech_wav.read_bytes())} if method == "POST" else None
        resp = httpx.request(method, f"{api.api_url}{path}", files=files, timeout=30)
        assert resp.status_code == 401, (path, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"


def test_models_lists_the_served_model(api: Stack) -> None:
    client = sdk(api)
    models = client.models.list()
    assert [m.id for m in models.data] == ["whisper-1", "tiny.en"]  # MORAG_WHISPER_MODEL
    assert all(m.object == "model" and m.owned_by == "morag" for m in models.data)
    raw = httpx.get(
        f"{api.api_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    ).json()
    assert raw["object"] == "list" and raw["data"][0]["id"] == "whisper-1"
    assert client.models.retrieve("tiny.en").id == "tiny.en"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o-transcribe")
    assert missing.value.body["code"] == "model_not_found"


# -- the native API: a misspelt option -----------------------------------------------------


def test_a_misspelt_native_option_is_refused_by_name(api: Stack, speech_wav: Path) -> None:
    with api.client() as c:
        upload = c.post(
            "/api/v1/ingest/file",
            files={"file": ("s.wav", speech_wav.read_bytes())},
            data={"options": json.dumps({"subtitle": ["srt"]})},
        )
        url = c.post(
            "/api/v1/ingest/url",
            json={"url": "http://127.0.0.1:9/a.wav", "options": {"Word-Timestamps": True}},
        )
        # Other unknown members still pass to the processor (the documented contract).
        other = c.post(
            "/api/v1/ingest/file",
            files={"file": ("s.wav", speech_wav.read_bytes())},
            data={"options": json.dumps({"fault": "slow:1"})},
        )
    assert upload.status_code == 422, upload.text
    assert upload.json()["code"] == "invalid_input"
    assert "options.subtitle" in upload.json()["detail"]
    assert "did you mean subtitles" in upload.json()["detail"]
    assert url.status_code == 422 and "word_timestamps" in url.json()["detail"], url.text
    assert other.status_code == 202, other.text
    task_id = other.json()["task_id"]
    with api.client() as c:
        assert c.delete(f"/api/v1/ingest/{task_id}").status_code == 200
    wait_until(lambda: api.job(task_id)["status"] == "cancelled", 15, "the job to cancel")
