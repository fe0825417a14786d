"""External programs run with a time limit (their children too), and a page in an unknown
character set is a clear job error."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from morag.processors.base import ProcessingError
from morag.processors.video import probe
from morag.processors.web import page_charset
from morag.tools import ffmpeg_to_wav, run_tool


def test_a_program_that_runs_too_long_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(ProcessingError, match=r"decoding took longer than 0\.5s"):
        run_tool(
            ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"],
            timeout=0.5,
            what="decoding",
        )
    assert time.monotonic() - started < 10
    child = int(pid_file.read_text())
    # The background child was in the tool's process group: it is gone as well.
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the tool's child {child} outlived the time limit")


def test_a_missing_program_is_a_clear_job_error() -> None:
    with pytest.raises(ProcessingError, match="not installed"):
        run_tool(["morag-no-such-tool"], timeout=5, what="OCR")


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffmpeg is installed by make test")
def test_ffprobe_and_ffmpeg_failures_say_what_failed(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(ProcessingError, match="cannot read the video"):
        probe(junk)
    with pytest.raises(ProcessingError, match="extracting the audio failed"):
        ffmpeg_to_wav(junk, tmp_path / "out.wav", timeout=30, what="extracting the audio")


@pytest.mark.parametrize(
    "header,expected",
    [
        ("text/html", "utf-8"),
        ("text/html; charset=ISO-8859-1", "iso8859-1"),
        ('text/html; charset="windows-1252"', "cp1252"),
        ("text/html;CHARSET=utf-8;foo=bar", "utf-8"),
    ],
)
def test_known_charsets(header: str, expected: str) -> None:
    assert page_charset(header) == expected


@pytest.mark.parametrize("charset", ["x-unknown-42", "utf-99", "a" * 300])
def test_an_unknown_charset_is_a_clear_failure(charset: str) -> None:
    with pytest.raises(ProcessingError, match="unknown character set"):
        page_charset(f"text/html; charset={charset}")
