"""``max_line_width`` / ``max_line_count`` on a real transcription: a real stack (uvicorn, a
Celery worker on a real Redis, the bundled tiny.en model) and espeak-ng speech."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer
from tests.integration.conftest import running_stack
from tests.integration.stack import Stack

TIMES = re.compile(r"^(\d\d):(\d\d):(\d\d)[,.](\d{3}) --> (\d\d):(\d\d):(\d\d)[,.](\d{3})$")


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("subtitle-lines")
    with running_stack(redis_server, root, {"cpu0@test": "celery"}) as s:
        yield s


def _process(stack: Stack, path: Path, options: dict[str, Any]) -> httpx.Response:
    with stack.client() as c, open(path, "rb") as f:
        return c.post(
            "/process/file",
            data={"options": json.dumps(options), "gpu": "false"},
            files={"file": (path.name, f)},
        )


def _cues(text: str) -> list[tuple[float, float, list[str]]]:
    """(start, end, lines) of each cue of an SRT or WebVTT file."""
    cues = []
    for block in text.removeprefix("WEBVTT\n\n").strip().split("\n\n"):
        lines = block.split("\n")
        if lines[0].isdigit():  # SRT's cue number
            lines = lines[1:]
        t = [int(x) for x in TIMES.fullmatch(lines[0]).groups()]  # type: ignore[union-attr]
        # Whole milliseconds, as the file and the result's segments have them (2 + 720 / 1000
        # is 2.7199999999999998).
        start = round(t[0] * 3600 + t[1] * 60 + t[2] + t[3] / 1000, 3)
        end = round(t[4] * 3600 + t[5] * 60 + t[6] + t[7] / 1000, 3)
        cues.append((start, end, lines[1:]))
    return cues


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z ]", "", text.lower()).split()


@pytest.mark.parametrize("word_timestamps", [True, False])
def test_a_job_returns_wrapped_cues(stack: Stack, speech_wav: Path, word_timestamps: bool) -> None:
    options = {
        "subtitles": ["srt", "vtt"],
        "word_timestamps": word_timestamps,
        "max_line_width": 16,
        "max_line_count": 1,
    }
    resp = _process(stack, speech_wav, options)
    assert resp.status_code == 200, resp.text
    result = resp.json()["result"]
    duration = result["metadata"]["duration"]
    for fmt in ("srt", "vtt"):
        cues = _cues(result["subtitles"][fmt])
        # "Please send the report to the office before Friday." does not fit one 16-wide line.
        assert len(cues) >= 3, result["subtitles"][fmt]
        for start, end, lines in cues:
            assert len(lines) == 1, lines
            assert len(lines[0]) <= 16 or " " not in lines[0], lines
            assert 0 <= start <= end <= duration + 0.01, (start, end, duration)
        starts = [c[0] for c in cues]
        assert starts == sorted(starts)
        # Every word of the transcript, once, in order.
        assert _words(" ".join(c[2][0] for c in cues)) == _words(result["content"])


def test_without_the_options_one_cue_per_segment(stack: Stack, speech_wav: Path) -> None:
    resp = _process(stack, speech_wav, {"subtitles": ["srt"]})
    assert resp.status_code == 200, resp.text
    result = resp.json()["result"]
    cues = _cues(result["subtitles"]["srt"])
    assert len(cues) == len([s for s in result["segments"] if s["text"].strip()])
    assert [(c[0], c[1]) for c in cues] == [(s["start"], s["end"]) for s in result["segments"]]


@pytest.mark.parametrize(
    ("options", "detail"),
    [
        ({"max_line_width": 0}, "options.max_line_width: Input should be greater than or equal"),
        ({"max_line_width": "wide"}, "options.max_line_width: Input should be a valid integer"),
        ({"max_line_count": 2}, "options.max_line_count: Value error, needs max_line_width"),
    ],
)
def test_bad_limits_are_a_422_with_a_readable_detail(
    stack: Stack, speech_wav: Path, options: dict[str, Any], detail: str
) -> None:
    resp = _process(stack, speech_wav, {"subtitles": ["srt"], **options})
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "invalid_input"
    assert resp.json()["detail"].startswith(detail), resp.json()
