"""Batched transcription (faster-whisper's BatchedInferencePipeline) through the real API and
a real worker with the bundled tiny.en: the same words as sequential decoding, with word
timestamps and subtitles, and ``options.batched`` choosing between them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.integration import media
from tests.integration.conftest import running_stack
from tests.integration.stack import Stack

# tiny.en decodes espeak-ng speech differently once the 30 s windows are cut elsewhere
# (batched pieces end at silences, with no previous text as prompt): measured 16 % word
# error rate between the two on this recording; far above that would be a lost piece.
MAX_WER = 0.3


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # About 50 s of speech: at least two 30 s pieces, so a batch holds more than one.
    return media.long_speech(tmp_path_factory.mktemp("batched") / "long.wav")


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("btstack")
    with running_stack(redis_server, root, {"cpu0@bt": "celery"}, process_wait=240) as s:
        yield s


def _transcribe(stack: Stack, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    with stack.client() as c, open(path, "rb") as f:
        resp = c.post(
            "/process/file",
            files={"file": (path.name, f, "audio/wav")},
            data={"options": json.dumps(options)},
            timeout=300,
        )
    assert resp.status_code == 200, resp.text
    return resp.json()["result"]


def _words(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


def _check_segments(result: dict[str, Any], with_words: bool) -> None:
    duration = result["metadata"]["duration"]
    previous_end = 0.0
    for seg in result["segments"]:
        assert 0 <= seg["start"] <= seg["end"] <= duration + 0.5, seg
        assert seg["start"] >= previous_end - 0.5, "segments out of order"
        previous_end = seg["end"]
        if with_words:
            assert seg["words"], seg
            assert all(seg["start"] <= w["start"] <= w["end"] <= seg["end"] for w in seg["words"])
        else:
            assert not seg.get("words"), seg


def test_batched_gives_the_same_words_as_sequential(stack: Stack, recording: Path) -> None:
    options = {"word_timestamps": True, "subtitles": ["srt", "vtt"]}
    sequential = _transcribe(stack, recording, dict(options, batched=False))
    batched = _transcribe(stack, recording, dict(options, batched=True))

    assert sequential["metadata"]["batched"] is False
    assert sequential["metadata"]["batch_size"] is None
    assert "speech_duration" not in sequential["metadata"]  # no VAD ran
    assert batched["metadata"]["batched"] is True
    assert batched["metadata"]["batch_size"] >= 1
    assert 0 < batched["metadata"]["speech_duration"] <= batched["metadata"]["duration"]

    seq_words, bat_words = _words(sequential["content"]), _words(batched["content"])
    assert "lighthouse" in bat_words and "conference room" in bat_words
    wer = media.word_error_rate(seq_words, bat_words)
    assert wer <= MAX_WER, f"{wer:.0%} apart:\n{seq_words}\n{bat_words}"

    for result in (sequential, batched):
        _check_segments(result, with_words=True)
        assert result["subtitles"]["srt"].startswith("1\n")
        assert result["subtitles"]["vtt"].startswith("WEBVTT")
    # The 30 s pieces come back cut into sentence-like segments, not one cue per piece.
    assert len(batched["segments"]) >= 8
    assert max(s["end"] - s["start"] for s in batched["segments"]) <= 10.5
    assert batched["subtitles"]["srt"].count(" --> ") == len(batched["segments"])


def test_subtitles_without_word_timestamps_and_the_cpu_default(
    stack: Stack, recording: Path
) -> None:
    # Subtitles alone: words are computed to cut the pieces but not returned.
    batched = _transcribe(stack, recording, {"batched": True, "subtitles": ["vtt"]})
    assert batched["metadata"]["batched"] is True
    _check_segments(batched, with_words=False)
    assert batched["subtitles"]["vtt"].count(" --> ") == len(batched["segments"]) >= 8

    # Unset: on a CPU worker, audio under 120 s stays sequential (docs/performance.md).
    auto = _transcribe(stack, recording, {})
    assert auto["metadata"]["batched"] is False
    assert auto["metadata"]["batching_reason"].startswith("auto")
