"""Subtitle files (SubRip ``srt``, WebVTT ``vtt``) from transcript segments.

A segment is a mapping with ``start`` and ``end`` in seconds and ``text`` (and ``words``,
each with ``start``, ``end`` and ``word``, when word timestamps were asked for); pure
functions, shared by the audio processor (``options.subtitles``) and the OpenAI-compatible
endpoint.

Without limits a segment is one cue, as Whisper cut it. ``max_line_width`` wraps a
segment's words into lines of at most that many characters (a longer word keeps a line of
its own, words are never cut); ``max_line_count`` then splits a segment into cues of at
most that many lines, as openai/whisper's writers do. A cue's times are its first word's
start and its last word's end when the segment has word timestamps; otherwise the
segment's time is shared out in proportion to the characters of each cue. Cues never
span two segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

FORMATS = ("srt", "vtt")


class _Word(NamedTuple):
    text: str
    start: float | None  # None: the segment has no word timestamps
    end: float | None


def timestamp(seconds: float, *, decimal: str) -> str:
    """``HH:MM:SS<decimal>mmm``; negative times clamp to zero, milliseconds round."""
    total_ms = max(0, round(float(seconds) * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _cues(
    segments: Iterable[Mapping[str, Any]],
    max_line_width: int | None = None,
    max_line_count: int | None = None,
) -> list[tuple[float, float, str]]:
    if max_line_width is not None and max_line_width < 1:
        raise ValueError(f"max_line_width must be a positive number, not {max_line_width}")
    if max_line_count is not None and max_line_count < 1:
        raise ValueError(f"max_line_count must be a positive number, not {max_line_count}")
    cues = []
    for seg in segments:
        start = float(seg["start"])
        end = max(start, float(seg["end"]))
        if max_line_width is None and max_line_count is None:
            # A blank line ends a cue in both formats, so text lines must not be blank.
            lines = [line.strip() for line in str(seg.get("text", "")).splitlines()]
            text = "\n".join(line for line in lines if line)
            if text:
                cues.append((start, end, text))
            continue
        cues.extend(_split_segment(seg, start, end, max_line_width, max_line_count))
    return cues


def _timed_words(seg: Mapping[str, Any], start: float, end: float) -> list[_Word]:
    """The segment's words with their times, or its text's words with none."""
    timed = [
        _Word(str(w.get("word", "")).strip(), float(w["start"]), float(w["end"]))
        for w in seg.get("words") or []
        if str(w.get("word", "")).strip()
    ]
    if timed:
        # Word times sit inside their segment; clamp what a decoder puts outside.
        return [
            _Word(w.text, min(max(w.start, start), end), min(max(w.end, w.start, start), end))
            for w in timed
        ]
    return [_Word(word, None, None) for word in str(seg.get("text", "")).split()]


def wrap(words: Sequence[str], max_line_width: int | None) -> list[list[int]]:
    """Greedy wrap: the indexes of ``words`` on each line, lines at most ``max_line_width``
    characters with one space between words; a longer word is a line of its own."""
    lines: list[list[int]] = []
    width = 0
    for i, word in enumerate(words):
        if lines and (max_line_width is None or width + 1 + len(word) <= max_line_width):
            lines[-1].append(i)
            width += 1 + len(word)
        else:
            lines.append([i])
            width = len(word)
    return lines


def _split_segment(
    seg: Mapping[str, Any],
    start: float,
    end: float,
    max_line_width: int | None,
    max_line_count: int | None,
) -> list[tuple[float, float, str]]:
    words = _timed_words(seg, start, end)
    if not words:
        return []
    lines = wrap([w.text for w in words], max_line_width)
    per_cue = max_line_count or len(lines)
    groups = [lines[i : i + per_cue] for i in range(0, len(lines), per_cue)]
    texts = ["\n".join(" ".join(words[i].text for i in line) for line in group) for group in groups]
    if len(groups) == 1:  # the whole segment in one cue: its own times, as without limits
        times = [(start, end)]
    elif words[0].start is not None:
        times = [(words[g[0][0]].start, words[g[-1][-1]].end) for g in groups]
    else:
        times = _proportional(start, end, [len(t) for t in texts])
    return [(float(a), max(float(a), float(b)), t) for (a, b), t in zip(times, texts, strict=True)]


def _proportional(start: float, end: float, sizes: list[int]) -> list[tuple[float, float]]:
    """``[start, end)`` cut into consecutive spans in proportion to ``sizes``."""
    total = sum(sizes) or 1
    spans, done = [], 0
    for size in sizes:
        a = start + (end - start) * done / total
        done += size
        spans.append((a, start + (end - start) * done / total))
    return spans


def to_srt(
    segments: Iterable[Mapping[str, Any]],
    *,
    max_line_width: int | None = None,
    max_line_count: int | None = None,
) -> str:
    blocks = [
        f"{n}\n{timestamp(start, decimal=',')} --> {timestamp(end, decimal=',')}\n{text}\n"
        for n, (start, end, text) in enumerate(
            _cues(segments, max_line_width, max_line_count), start=1
        )
    ]
    return "\n".join(blocks)


def to_vtt(
    segments: Iterable[Mapping[str, Any]],
    *,
    max_line_width: int | None = None,
    max_line_count: int | None = None,
) -> str:
    # "-->" inside cue text would end the cue timing line early for some players.
    blocks = [
        f"{timestamp(start, decimal='.')} --> {timestamp(end, decimal='.')}\n"
        f"{text.replace('-->', '->')}\n"
        for start, end, text in _cues(segments, max_line_width, max_line_count)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(
    fmt: str,
    segments: Iterable[Mapping[str, Any]],
    *,
    max_line_width: int | None = None,
    max_line_count: int | None = None,
) -> str:
    limits = {"max_line_width": max_line_width, "max_line_count": max_line_count}
    if fmt == "srt":
        return to_srt(segments, **limits)
    if fmt == "vtt":
        return to_vtt(segments, **limits)
    raise ValueError(f"unknown subtitle format {fmt!r}; known: {', '.join(FORMATS)}")
