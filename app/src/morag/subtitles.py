"""Subtitle files (SubRip ``srt``, WebVTT ``vtt``) from transcript segments.

A segment is a mapping with ``start`` and ``end`` in seconds and ``text``; pure functions,
shared by the audio processor (``options.subtitles``) and the OpenAI-compatible endpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

FORMATS = ("srt", "vtt")


def timestamp(seconds: float, *, decimal: str) -> str:
    """``HH:MM:SS<decimal>mmm``; negative times clamp to zero, milliseconds round."""
    total_ms = max(0, round(float(seconds) * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _cues(segments: Iterable[Mapping[str, Any]]) -> list[tuple[float, float, str]]:
    cues = []
    for seg in segments:
        # A blank line ends a cue in both formats, so text lines must not be blank.
        lines = [line.strip() for line in str(seg.get("text", "")).splitlines()]
        text = "\n".join(line for line in lines if line)
        if not text:
            continue
        start = float(seg["start"])
        end = max(start, float(seg["end"]))
        cues.append((start, end, text))
    return cues


def to_srt(segments: Iterable[Mapping[str, Any]]) -> str:
    blocks = [
        f"{n}\n{timestamp(start, decimal=',')} --> {timestamp(end, decimal=',')}\n{text}\n"
        for n, (start, end, text) in enumerate(_cues(segments), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: Iterable[Mapping[str, Any]]) -> str:
    # "-->" inside cue text would end the cue timing line early for some players.
    blocks = [
        f"{timestamp(start, decimal='.')} --> {timestamp(end, decimal='.')}\n"
        f"{text.replace('-->', '->')}\n"
        for start, end, text in _cues(segments)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(fmt: str, segments: Iterable[Mapping[str, Any]]) -> str:
    if fmt == "srt":
        return to_srt(segments)
    if fmt == "vtt":
        return to_vtt(segments)
    raise ValueError(f"unknown subtitle format {fmt!r}; known: {', '.join(FORMATS)}")
