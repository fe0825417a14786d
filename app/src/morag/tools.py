"""External programs (ffmpeg, ffprobe, tesseract) always run with a time limit.

A hostile or broken file can make a decoder spin forever; the job's hard time limit would
end the job, but the child would outlive it. ``run_tool`` kills the program when its time
is up and turns that into a job error that says which tool ran out of time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from morag.processors.base import ProcessingError

PROBE_TIMEOUT = 60.0  # ffprobe reads headers only


def run_tool(args: list[str], *, timeout: float, what: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``args`` (no shell) with ``timeout`` seconds; kill its whole process group after.

    Raises ProcessingError on a timeout or a missing program; the caller reads the return
    code and stderr."""
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own group: children (e.g. helpers) die with it
        )
    except FileNotFoundError as exc:
        raise ProcessingError(f"{what}: {args[0]} is not installed on this worker") from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        proc.communicate()
        raise ProcessingError(f"{what} took longer than {timeout:g}s and was stopped") from exc
    except BaseException:
        _kill_group(proc)  # the job was cancelled or the worker is shutting down
        proc.wait()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def last_line(stderr: bytes, fallback: str) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else fallback


def ffmpeg_to_wav(source: Path, dest: Path, *, timeout: float, what: str) -> Path:
    """The first audio track as 16 kHz mono WAV (what Whisper wants), time-limited."""
    done = run_tool(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source),
         "-vn", "-ac", "1", "-ar", "16000", "-acodec", "pcm_s16le", str(dest)],
        timeout=timeout,
        what=what,
    )  # fmt: skip
    if done.returncode != 0:
        raise ProcessingError(f"{what} failed: {last_line(done.stderr, 'ffmpeg failed')}")
    return dest
