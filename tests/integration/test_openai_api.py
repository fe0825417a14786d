"""The OpenAI-compatible endpoints, driven by the real ``openai`` SDK and by ``curl``, and the
native API's transcription options (subtitles, word timestamps, VAD, language detection).

A real stack (uvicorn, Celery workers on a real Redis, the bundled tiny.en model) and
espeak-ng speech; nothing is mocked.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import wave
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.media import speech_video
from tests.integration.stack import API_KEY, Stack, stack_on_own_redis, wait_until

SRT_CUE = re.compile(r"^1\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n\S", re.M)
VTT_CUE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\n\S", re.M)


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(api_key=API_KEY, base_url=f"{stack.api_url}/v1", max_retries=0)


def test_sdk_json_transcription_runs_on_the_fleet(client: openai.OpenAI, speech_wav: Path) -> None:
    with open(speech_wav, "rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=f)
    text = raw.parse().text.lower()
    assert "report" in text and "friday" in text
    # gpu defaults to MORAG_OPENAI_GPU (true): the GPU-queue worker took it.
    assert raw.headers["x-morag-route"] == "gpu_worker"
    assert raw.headers["x-morag-queue"] == "gpu-tasks"
    assert re.fullmatch(r"[0-9a-f]{32}", raw.headers["x-morag-task-id"])


def test_sdk_verbose_json_with_word_and_segment_timestamps(
    client: openai.OpenAI, speech_wav: Path
) -> None:
    with open(speech_wav, "rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            language="en",
            temperature=0,
        )
    assert result.language == "english" and result.duration > 1  # as OpenAI names it
    assert result.segments and result.segments[0].end > result.segments[0].start
    assert result.segments[0].tokens, "verbose segments carry their token ids"
    words = [w.word.lower().strip(".,") for w in result.words]
    assert "report" in words and "friday" in words
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and all(w.end >= w.start for w in result.words)
    assert result.words[-1].end <= result.duration + 0.5


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_sdk_text_formats(client: openai.OpenAI, speech_wav: Path, fmt: str) -> None:
    with open(speech_wav, "rb") as f:
        out = client.audio.transcriptions.create(model="whisper-1", file=f, response_format=fmt)
    assert isinstance(out, str) and "report" in out.lower()
    if fmt == "srt":
        assert SRT_CUE.search(out), out
    elif fmt == "vtt":
        assert out.startswith("WEBVTT\n\n") and VTT_CUE.search(out), out


def test_sdk_translation_and_cpu_choice(client: openai.OpenAI, speech_wav: Path) -> None:
    with open(speech_wav, "rb") as f:
        raw = client.audio.translations.with_raw_response.create(
            model="whisper-1", file=f, extra_body={"gpu": "false"}
        )
    assert "friday" in raw.parse().text.lower()
    assert raw.headers["x-morag-route"] == "not_requested"
    assert raw.headers["x-morag-queue"] == "celery"


def test_sdk_errors_are_openai_errors(stack: Stack, speech_wav: Path) -> None:
    wrong = openai.OpenAI(api_key="wrong", base_url=f"{stack.api_url}/v1", max_retries=0)
    with open(speech_wav, "rb") as f, pytest.raises(openai.AuthenticationError) as auth:
        wrong.audio.transcriptions.create(model="whisper-1", file=f)
    assert auth.value.body["code"] == "invalid_api_key"
    good = openai.OpenAI(api_key=API_KEY, base_url=f"{stack.api_url}/v1", max_retries=0)
    with open(speech_wav, "rb") as f, pytest.raises(openai.BadRequestError) as model:
        good.audio.transcriptions.create(model="gpt-9-audio", file=f)
    assert model.value.body["code"] == "model_not_found"
    assert model.value.body["param"] == "model"
    # OpenAI answers a file it cannot transcribe 400 (BadRequestError), never 415.
    with pytest.raises(openai.BadRequestError) as text_file:
        good.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"hello " * 50))
    assert text_file.value.body["param"] == "file"
    assert "not audio or video" in text_file.value.message


def test_sdk_undecodable_audio_is_a_400_with_the_reason(client: openai.OpenAI) -> None:
    corrupt = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 40
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=("bad.wav", corrupt))
    assert exc.value.body["code"] == "processing_failed"
    assert "cannot decode audio" in exc.value.body["message"]


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed")
    return subprocess.run(
        ["curl", "-sS", "--max-time", "120", "-w", "\n%{http_code}", *args],
        check=True,
        capture_output=True,
        text=True,
    )


def test_curl_srt_and_auth(stack: Stack, speech_wav: Path) -> None:
    url = f"{stack.api_url}/v1/audio/transcriptions"
    ok = _curl(
        url,
        "-H",
        f"Authorization: Bearer {API_KEY}",
        "-F",
        f"file=@{speech_wav}",
        "-F",
        "model=whisper-1",
        "-F",
        "response_format=srt",
        "-F",
        "gpu=false",
    )
    body, status = ok.stdout.rsplit("\n", 1)
    assert status == "200" and SRT_CUE.search(body), ok.stdout
    anonymous = _curl(url, "-F", f"file=@{speech_wav}", "-F", "model=whisper-1")
    body, status = anonymous.stdout.rsplit("\n", 1)
    assert status == "401"
    error = json.loads(body)["error"]
    assert error["type"] == "authentication_error" and "Bearer" in error["message"]
    # The native header is not OpenAI's: it does not open the OpenAI routes.
    native = _curl(url, "-H", f"X-API-Key: {API_KEY}", "-F", f"file=@{speech_wav}")
    assert native.stdout.rsplit("\n", 1)[1] == "401"


def test_curl_invalid_field_is_a_400_naming_it(stack: Stack, speech_wav: Path) -> None:
    out = _curl(
        f"{stack.api_url}/v1/audio/transcriptions",
        "-H",
        f"Authorization: Bearer {API_KEY}",
        "-F",
        f"file=@{speech_wav}",
        "-F",
        "model=whisper-1",
        "-F",
        "response_format=docx",
    )
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "400"
    error = json.loads(body)["error"]
    assert error["param"] == "response_format" and error["code"] == "invalid_input"


# -- the native API gains the same ---------------------------------------------------------


def _with_silence(src: Path, dest: Path, seconds: float) -> Path:
    """``seconds`` of digital silence, then the speech (same WAV format)."""
    with wave.open(str(src), "rb") as w:
        params = w.getparams()
        frames = w.readframes(w.getnframes())
    pad = b"\x00" * (int(params.framerate * seconds) * params.sampwidth * params.nchannels)
    with wave.open(str(dest), "wb") as out:
        out.setparams(params)
        out.writeframes(pad + frames)
    return dest


def _process(stack: Stack, path: Path, options: dict) -> httpx.Response:
    with stack.client() as c, open(path, "rb") as f:
        return c.post(
            "/process/file",
            data={"options": json.dumps(options), "gpu": "false"},
            files={"file": (path.name, f)},
        )


def test_native_subtitles_words_and_detected_language(stack: Stack, speech_wav: Path) -> None:
    resp = _process(stack, speech_wav, {"subtitles": ["srt", "vtt"], "word_timestamps": True})
    assert resp.status_code == 200, resp.text
    result = resp.json()["result"]
    assert SRT_CUE.search(result["subtitles"]["srt"])
    assert result["subtitles"]["vtt"].startswith("WEBVTT\n\n")
    words = [w["word"].strip(" .,").lower() for s in result["segments"] for w in s["words"]]
    assert "report" in words
    meta = result["metadata"]
    # No language given: detected (tiny.en is English-only, so with certainty).
    assert meta["language"] == "en" and meta["language_probability"] == 1.0
    assert meta["task"] == "transcribe"
    assert resp.json()["route"]["code"] == "not_requested"


def test_native_vad_filter_skips_leading_silence(
    stack: Stack, speech_wav: Path, tmp_path: Path
) -> None:
    padded = _with_silence(speech_wav, tmp_path / "padded.wav", 4.0)
    plain = _process(stack, padded, {})
    vad = _process(stack, padded, {"vad_filter": True})
    assert plain.status_code == 200 and vad.status_code == 200, (plain.text, vad.text)
    meta = vad.json()["result"]["metadata"]
    assert "speech_duration" not in plain.json()["result"]["metadata"]
    assert meta["speech_duration"] < meta["duration"] - 3, meta
    segments = vad.json()["result"]["segments"]
    # Times stay on the file's own clock: the speech starts after the 4 s of silence.
    assert segments[0]["start"] >= 3.0, segments
    assert "report" in vad.json()["result"]["content"].lower()


def test_native_options_are_checked(stack: Stack, speech_wav: Path) -> None:
    resp = _process(stack, speech_wav, {"subtitles": ["ass"], "vad_filter": "maybe"})
    assert resp.status_code == 422
    body = resp.json()
    assert body["code"] == "invalid_input"
    assert "options.subtitles" in body["detail"] and "options.vad_filter" in body["detail"]
    english_only = _process(stack, speech_wav, {"language": "fr"})
    assert english_only.status_code == 422
    assert english_only.json()["code"] == "processing_failed"
    assert "English-only" in english_only.json()["detail"]


def test_gpu_is_passed_once(stack: Stack, speech_wav: Path) -> None:
    with stack.client() as c:
        both = c.post(
            "/process/file",
            params={"gpu": "true"},
            data={"gpu": "false"},
            files={"file": ("s.wav", speech_wav.read_bytes())},
        )
        in_body = c.post(
            "/process/file",
            data={"gpu": "true"},
            files={"file": ("s.wav", speech_wav.read_bytes())},
        )
    assert both.status_code == 422 and both.json()["code"] == "invalid_input"
    assert "gpu given twice" in both.json()["detail"]
    assert in_body.status_code == 200 and in_body.json()["route"]["code"] == "gpu_worker"


def test_lists_are_paged(stack: Stack) -> None:
    with stack.client() as c:
        first = c.get("/api/v1/workers", params={"limit": 1}).json()
        second = c.get("/api/v1/workers", params={"limit": 1, "offset": 1}).json()
        jobs = c.get("/api/v1/status/", params={"limit": 5}).json()
        too_big = c.get("/api/v1/workers", params={"limit": 100000})
    assert first["total"] == 2 and first["count"] == 1 and first["limit"] == 1
    names = [first["workers"][0]["name"], second["workers"][0]["name"]]
    assert sorted(names) == ["cpu0@test", "gpu0@test"]
    assert set(jobs) == {"total", "count", "offset", "limit", "jobs"}
    assert too_big.status_code == 422 and too_big.json()["code"] == "invalid_input"
    assert "limit" in too_big.json()["detail"]


def test_sdk_transcribes_a_video_file(client: openai.OpenAI, tmp_path: Path) -> None:
    video = speech_video(tmp_path / "clip.mp4")
    with open(video, "rb") as f:
        out = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="text")
    assert "train" in out.lower() and "mountains" in out.lower()


def test_error_codes_are_the_same_with_and_without_a_body(stack: Stack) -> None:
    with stack.client(None) as anonymous, stack.client("wrong") as wrong:
        bodiless = anonymous.get("/api/v1/workers")  # refused by the route's dependency
        with_body = anonymous.post("/api/v1/ingest/url", json={"url": "http://x/a.wav"})
        bad_key = wrong.get("/api/v1/workers")
        bad_key_body = wrong.post("/api/v1/ingest/url", json={"url": "http://x/a.wav"})
    assert bodiless.status_code == with_body.status_code == 401
    assert bodiless.json()["code"] == with_body.json()["code"] == "unauthorized"
    assert bad_key.status_code == bad_key_body.status_code == 403
    assert bad_key.json()["code"] == bad_key_body.json()["code"] == "forbidden"
    with stack.client() as c:
        missing = c.get("/api/v1/status/ffffffffffffffffffffffffffffffff")
        batch = c.get("/api/v1/status/batch/nope")
    assert missing.json() == {
        "detail": "unknown task id ffffffffffffffffffffffffffffffff",
        "code": "not_found",
    }
    assert batch.json()["code"] == "not_found"


def test_a_client_that_disconnects_cancels_its_transcription(
    tmp_path: Path, speech_wav: Path
) -> None:
    """No worker runs here, so the job stays queued; the client gives up after 2 s. The
    answer was its only way to the result: the job ends cancelled and its upload goes."""
    with stack_on_own_redis(tmp_path) as (stack, _redis):
        stack.start_api()
        with open(speech_wav, "rb") as f, pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{stack.api_url}/v1/audio/transcriptions",
                headers={"Authorization": f"Bearer {API_KEY}"},
                files={"file": ("speech.wav", f, "audio/wav")},
                data={"model": "whisper-1"},
                timeout=httpx.Timeout(30, read=2),
            )

        def cancelled() -> dict | None:
            jobs = stack.jobs_in_redis()
            return jobs[0] if jobs and jobs[0]["status"] == "cancelled" else None

        job = wait_until(cancelled, 15, "the abandoned job to be cancelled")
        assert job["error"].startswith("cancelled: the client closed the connection")
        # The record ends first, the upload goes after the revoke broadcast: wait for it.
        wait_until(
            lambda: not any((stack.shared / "uploads").glob("*")),
            15,
            "the abandoned job's upload to be removed",
        )
        stack.close()
