"""The API's models and request helpers: job records validate, options are checked, errors
carry a code, OpenAI answers are shaped from results."""

from __future__ import annotations

import json

import pytest
from fastapi import HTTPException
from morag import jobs
from morag.api import errors
from morag.api.params import Paging, check_options, one_gpu_flag
from morag.api.routers import openai_audio
from morag.api.schemas import Job, JobOptions, JobStatus
from morag.job_record import JobRecord, Result, Route, Source
from morag.processors.audio import transcribe_kwargs
from morag.processors.base import ProcessingError
from morag.routing import ROUTE_CODES
from pydantic import ValidationError


def _record() -> JobRecord:
    return jobs.new_record(
        kind="process",
        content_type="audio",
        source=Source.upload(file_id="f", sha256="0" * 64, size=3, filename="a.wav"),
        options={},
        route=Route(queue="celery", gpu_requested=False, code="not_requested", reason="x"),
    )


def test_status_enum_is_the_job_store_states() -> None:
    states = {jobs.QUEUED, jobs.RUNNING, jobs.SUCCEEDED, jobs.FAILED, jobs.CANCELLED}
    assert set(JobStatus) == states
    assert {s for s in JobStatus if s.final} == set(jobs.TERMINAL)
    assert f"{JobStatus.queued}" == str(JobStatus.queued) == "queued"  # labels, logs, messages


def test_a_stored_record_is_a_valid_job_and_extra_members_pass_through() -> None:
    stored = _record().model_dump(mode="json")
    stored["attempts"].append(
        {
            "queue": "celery",
            "worker": "w",
            "device": "cpu",
            "started_at": "t",
            "finished_at": None,
            "error": None,
            "gpu_uuid": "GPU-1",
        }
    )
    stored["status"] = "succeeded"
    stored["result"] = {
        "content": "hi",
        "metadata": {"device": "cpu"},
        "segments": [
            {
                "start": 0,
                "end": 1,
                "text": "hi",
                "words": [{"start": 0, "end": 1, "word": "hi", "probability": 0.9}],
            }
        ],
        "pages": 3,
    }
    stored["written_by_a_newer_api"] = {"x": 1}
    record = JobRecord.from_json(json.dumps(stored))
    assert record.status is JobStatus.succeeded and record.result is not None
    assert record.result.segments and record.result.segments[0].words
    job = record.public()
    assert type(job) is Job and "kind" not in job.model_dump() and "owner" not in job.model_dump()
    dumped = job.model_dump(mode="json")
    assert dumped["attempts"][0]["gpu_uuid"] == "GPU-1"  # a new stored field is not lost
    assert dumped["result"]["pages"] == 3
    assert dumped["result"]["segments"][0]["words"][0]["word"] == "hi"
    # An older worker rewrites the record without dropping what it does not know.
    assert json.loads(record.to_json())["written_by_a_newer_api"] == {"x": 1}


def test_an_unknown_state_is_refused() -> None:
    stored = _record().model_dump(mode="json")
    stored["status"] = "sleeping"
    with pytest.raises(ValidationError, match="status"):
        JobRecord.model_validate(stored)


def test_options_known_members_are_checked_unknown_pass() -> None:
    opts = {"subtitles": ["srt"], "vad_filter": True, "fault": "slow:1", "custom": {"a": 1}}
    assert check_options(opts) is opts
    with pytest.raises(HTTPException) as exc:
        check_options({"subtitles": ["ass"], "temperature": 3, "task": "summarise"})
    assert exc.value.status_code == 422 and exc.value.code == "invalid_input"
    for field in ("options.subtitles.0", "options.temperature", "options.task"):
        assert field in exc.value.detail
    assert JobOptions().task == "transcribe"


@pytest.mark.parametrize(
    ("body", "query", "expected"),
    [(None, None, False), (True, None, True), (None, True, True), (False, False, False)],
)
def test_gpu_flag(body: bool | None, query: bool | None, expected: bool) -> None:
    assert one_gpu_flag(body, query) is expected


def test_gpu_flag_given_twice_differently_is_refused() -> None:
    with pytest.raises(HTTPException, match="gpu given twice"):
        one_gpu_flag(True, False)


def test_paging_cuts_a_page() -> None:
    assert Paging(limit=2, offset=1).cut([1, 2, 3, 4]) == [2, 3]
    assert Paging(limit=5, offset=9).cut([1, 2]) == []


def test_error_codes_by_status() -> None:
    assert errors.code_for(404) == "not_found"
    assert errors.code_for(418) == "bad_request"
    assert errors.code_for(500) == "internal_error"
    assert errors.ApiError(409, "x", "already_ended").code == "already_ended"
    assert errors.ApiError(413, "x").code == "too_large"


def test_openai_error_shape() -> None:
    body = errors.openai_body(401, "no key", "no_api_key", None)
    assert body == {
        "error": {
            "message": "no key",
            "type": "authentication_error",
            "param": None,
            "code": "no_api_key",
        }
    }
    assert errors.openai_body(400, "m", "c", "model")["error"]["type"] == "invalid_request_error"
    assert errors.openai_body(503, "m", "c", None)["error"]["type"] == "server_error"


def test_bearer_key() -> None:
    openai_audio.bearer_key("Bearer k1", ["k0", "k1"])
    openai_audio.bearer_key("bearer  k1 ", ["k1"])
    for header, code in [
        # OpenAI's code for a missing key and a wrong one alike.
        (None, "invalid_api_key"),
        ("k1", "invalid_api_key"),
        ("Bearer", "invalid_api_key"),
        ("Basic k1", "invalid_api_key"),
        ("Bearer k2", "invalid_api_key"),
    ]:
        with pytest.raises(Exception) as exc:
            openai_audio.bearer_key(header, ["k1"])
        assert exc.value.code == code and exc.value.status == 401


RESULT = Result.model_validate(
    {
        "content": "Please send the report.",
        "metadata": {"language": "en", "duration": 2.4},
        "segments": [
            {
                "start": 0.0,
                "end": 1.0,
                "text": "Please send",
                "id": 0,
                "seek": 0,
                "tokens": [1, 2],
                "temperature": 0.0,
                "avg_logprob": -0.2,
                "compression_ratio": 1.1,
                "no_speech_prob": 0.01,
                "words": [
                    {"start": 0.0, "end": 0.4, "word": " Please", "probability": 0.9},
                    {"start": 0.5, "end": 1.0, "word": " send", "probability": 0.8},
                ],
            },
            {
                "start": 1.0,
                "end": 2.0,
                "text": "the report.",
                "words": [{"start": 1.0, "end": 2.0, "word": " report.", "probability": 0.7}],
            },
        ],
    }
)


def test_verbose_json_from_a_result() -> None:
    body = openai_audio.render(RESULT, "verbose_json", "transcribe", ["word"], {})
    out = body.model_dump()
    assert out["language"] == "english" and out["duration"] == 2.4 and out["task"] == "transcribe"
    assert [w["word"] for w in out["words"]] == ["Please", "send", "report."]
    assert out["segments"] is None  # only words were asked for
    both = openai_audio.render(RESULT, "verbose_json", "transcribe", ["segment", "word"], {})
    segments = both.model_dump()["segments"]
    assert [s["id"] for s in segments] == [0, 1] and segments[0]["tokens"] == [1, 2]
    assert both.usage.seconds == 3


def test_text_formats_from_a_result() -> None:
    text = openai_audio.render(RESULT, "text", "transcribe", [], {"X-MoRAG-Task-Id": "t"})
    assert text.body.decode() == "Please send the report.\n"
    assert text.headers["x-morag-task-id"] == "t"
    vtt = openai_audio.render(RESULT, "vtt", "transcribe", [], {})
    assert vtt.media_type == "text/vtt" and vtt.body.decode().startswith("WEBVTT")
    srt = openai_audio.render(RESULT, "srt", "transcribe", [], {})
    assert srt.body.decode().startswith("1\n00:00:00,000 --> 00:00:01,000\nPlease send\n")
    assert openai_audio.render(RESULT, "json", "transcribe", [], {}).text == RESULT.content


def test_transcribe_arguments() -> None:
    kwargs = transcribe_kwargs(
        {
            "task": "translate",
            "vad_filter": True,
            "word_timestamps": True,
            "prompt": "MoRAG",
            "temperature": 0.2,
            "beam_size": 3,
        },
        multilingual=True,
    )
    assert kwargs == {
        "beam_size": 3,
        "language": None,
        "task": "translate",
        "word_timestamps": True,
        "vad_filter": True,
        "initial_prompt": "MoRAG",
        "temperature": 0.2,
    }
    assert "temperature" not in transcribe_kwargs({}, multilingual=False)
    assert transcribe_kwargs({"language": "en"}, multilingual=False)["language"] == "en"
    with pytest.raises(ProcessingError, match="English-only"):
        transcribe_kwargs({"language": "de"}, multilingual=False)
    assert transcribe_kwargs({"language": "de"}, multilingual=True)["language"] == "de"


def test_route_codes_are_documented_on_the_route_model() -> None:
    from morag.api.schemas import Route

    doc = Route.__doc__ or ""
    assert all(code in doc for code in ROUTE_CODES)


def test_language_names_cover_what_faster_whisper_detects() -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES
    from morag.api.languages import WHISPER_LANGUAGES, language_name

    assert set(WHISPER_LANGUAGES) == set(_LANGUAGE_CODES)
    assert language_name("en") == "english" and language_name("yue") == "cantonese"
    assert language_name("xx") == "xx" and language_name(None) == "english"
