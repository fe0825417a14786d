"""Live transcripts: the worker publishes each segment to Redis as it transcribes (as the
role's `morag-worker` ACL user), the API streams them as Server-Sent Events (as
`morag-api`): OpenAI's `transcript.text.delta`/`done` through the `openai` SDK's streaming
interface, and the native `GET /api/v1/status/{id}/events`, which `morag status --wait`
follows. A real stack, the bundled tiny.en model and espeak-ng speech; nothing is mocked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration import media
from tests.integration.stack import API_KEY, Stack

EVENTS = "/api/v1/status/{task_id}/events"
STATUS = "/api/v1/status/{task_id}"


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 50 s of speech: several Whisper segments, so several events."""
    return media.long_speech(tmp_path_factory.mktemp("streaming") / "long.wav")


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    # The SDK's default retries on purpose: a stream is one request.
    return openai.OpenAI(api_key=API_KEY, base_url=f"{stack.api_url}/v1")


def sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of each Server-Sent Event; comments skipped."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def test_the_sdk_streams_deltas_then_the_whole_text(client: openai.OpenAI, long_wav: Path) -> None:
    with open(long_wav, "rb") as f:
        stream = client.audio.transcriptions.create(model="whisper-1", file=f, stream=True)
        events = list(stream)
    types = [e.type for e in events]
    assert types[-1] == "transcript.text.done", types
    assert types.count("transcript.text.done") == 1
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 2, f"one delta per segment as it is transcribed: {types}"
    done = events[-1].text
    assert "".join(deltas) == done
    assert "thunderstorm" in done.lower()
    # The same file without stream: the same transcript.
    with open(long_wav, "rb") as f:
        plain = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert done == plain.text


def test_a_failed_job_ends_the_stream_with_an_error_event(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    # An audio container that cannot be decoded: queued, then failed by the worker.
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 64)
    with open(broken, "rb") as f:
        stream = client.audio.transcriptions.create(model="whisper-1", file=f, stream=True)
        with pytest.raises(openai.APIError) as failure:
            list(stream)
    assert "transcription failed" in failure.value.message
    assert "cannot decode audio" in failure.value.message


def test_stream_refuses_subtitle_formats(stack: Stack, speech_wav: Path) -> None:
    with (
        httpx.Client(base_url=stack.api_url, timeout=60) as c,
        open(speech_wav, "rb") as f,
    ):
        resp = c.post(
            "/v1/audio/transcriptions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            files={"file": ("speech.wav", f)},
            data={"model": "whisper-1", "stream": "true", "response_format": "srt"},
        )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "response_format"


def _events(stack: Stack, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    with (
        stack.client() as c,
        c.stream("GET", EVENTS.format(task_id=task_id), timeout=120) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return list(sse(resp.iter_lines()))  # ends when the server closes the stream


def test_native_events_follow_a_job_to_its_end(stack: Stack, long_wav: Path) -> None:
    job = stack.ingest(long_wav, gpu=False)
    events = _events(stack, job["task_id"])
    names = [name for name, _ in events]
    assert names[0] == "status" and "route" in names, names
    assert names[-1] == "end", names
    end = events[-1][1]
    assert end["status"] == "succeeded" and end["task_id"] == job["task_id"]
    assert end["attempts"][-1]["worker"] == "cpu0@test"
    progress = [data["progress"] for name, data in events if name == "progress"]
    assert progress and progress == sorted(progress), progress
    assert progress[-1] == 1.0
    segments = [data for name, data in events if name == "segment"]
    assert len(segments) >= 2, names
    assert names.index("segment") < names.index("end")
    assert " ".join(s["text"] for s in segments) == end["result"]["content"]
    assert all(s["attempt"] == 1 for s in segments)
    # Late: a client that connects after the end still gets everything, then the end.
    again = _events(stack, job["task_id"])
    assert [d for n, d in again if n == "segment"] == segments
    assert again[-1] == events[-1]


def test_events_resume_after_last_event_id(stack: Stack, speech_wav: Path) -> None:
    job = stack.ingest(speech_wav, gpu=False)
    first = _events(stack, job["task_id"])
    assert first[-1][0] == "end"
    with stack.client() as c:
        resp = c.get(
            EVENTS.format(task_id=job["task_id"]),
            headers={"Last-Event-ID": "99999999999999-0"},
        )
    after = list(sse(iter(resp.text.splitlines())))
    assert [n for n, _ in after if n == "segment"] == [], "nothing after that id"
    assert after[-1][0] == "end"


def test_events_of_an_unknown_job_or_without_a_key(stack: Stack) -> None:
    with stack.client() as c:
        resp = c.get(EVENTS.format(task_id="0" * 32))
    assert resp.status_code == 404
    assert "unknown task id" in resp.json()["detail"]
    with stack.client(key=None) as c:
        resp = c.get(EVENTS.format(task_id="0" * 32))
    assert resp.status_code == 401
    assert resp.json()["detail"]


def _requests(stack: Stack, handler: str, **labels: str) -> float:
    """GET requests the API answered on ``handler`` (a route template) so far."""
    m = stack.scrape()
    return m.value("morag_http_requests_total", handler=handler, method="GET", **labels) or 0.0


def test_morag_status_wait_follows_the_events(stack: Stack, speech_wav: Path) -> None:
    job = stack.ingest(speech_wav, gpu=False)
    polls, streams = _requests(stack, STATUS), _requests(stack, EVENTS)
    env = {**stack.env, "MORAG_API_URL": stack.api_url, "MORAG_API_KEY": API_KEY}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "morag.cli",
            "status",
            job["task_id"],
            "--wait",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    final = json.loads(out.stdout)
    assert final["status"] == "succeeded" and final["result"]["content"]
    assert _requests(stack, EVENTS) == streams + 1
    assert _requests(stack, STATUS) == polls, "it followed the stream, it did not poll"


def test_morag_status_wait_polls_when_the_events_route_answers_404(
    stack: Stack,
) -> None:
    """An older API has no events route (404): the CLI polls instead, and the poll reports
    what is wrong. An unknown id takes the same path here: 404 on both."""
    unknown = "f" * 32
    before = {h: _requests(stack, h, status="404") for h in (EVENTS, STATUS)}
    env = {**stack.env, "MORAG_API_URL": stack.api_url, "MORAG_API_KEY": API_KEY}
    out = subprocess.run(
        [sys.executable, "-m", "morag.cli", "status", unknown, "--wait", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    error = json.loads(out.stdout or out.stderr)
    assert error["status"] == 404 and "unknown task id" in error["error"], error
    for handler in (EVENTS, STATUS):
        assert _requests(stack, handler, status="404") == before[handler] + 1, handler
