"""Subtitle files from transcript segments (SubRip and WebVTT)."""

from __future__ import annotations

import pytest
from morag import subtitles

SEGMENTS = [
    {"start": 0.0, "end": 2.5, "text": " Please send the report."},
    {"start": 2.5, "end": 2.5, "text": "   "},  # blank: no cue
    {"start": 3661.001, "end": 3663.2, "text": "Before Friday --> noon"},
]


@pytest.mark.parametrize(
    ("seconds", "srt", "vtt"),
    [
        (0, "00:00:00,000", "00:00:00.000"),
        (1.2345, "00:00:01,234", "00:00:01.234"),
        (59.9996, "00:01:00,000", "00:01:00.000"),
        (3661.5, "01:01:01,500", "01:01:01.500"),
        (-3, "00:00:00,000", "00:00:00.000"),
        (100 * 3600, "100:00:00,000", "100:00:00.000"),
    ],
)
def test_timestamps(seconds: float, srt: str, vtt: str) -> None:
    assert subtitles.timestamp(seconds, decimal=",") == srt
    assert subtitles.timestamp(seconds, decimal=".") == vtt


def test_srt_numbers_cues_and_skips_blank_text() -> None:
    assert subtitles.to_srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:02,500\nPlease send the report.\n"
        "\n"
        "2\n01:01:01,001 --> 01:01:03,200\nBefore Friday --> noon\n"
    )


def test_vtt_has_its_header_and_no_arrow_in_text() -> None:
    assert subtitles.to_vtt(SEGMENTS) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:02.500\nPlease send the report.\n"
        "\n"
        "01:01:01.001 --> 01:01:03.200\nBefore Friday -> noon\n"
    )


def test_blank_lines_inside_a_segment_do_not_end_the_cue() -> None:
    out = subtitles.to_srt([{"start": 1, "end": 0.5, "text": "one\n\n two"}])
    # An end before the start is clamped to the start.
    assert out == "1\n00:00:01,000 --> 00:00:01,000\none\ntwo\n"


def test_empty_transcript() -> None:
    assert subtitles.to_srt([]) == ""
    assert subtitles.to_vtt([]) == "WEBVTT\n\n"


def test_render_refuses_unknown_formats() -> None:
    assert subtitles.render("srt", SEGMENTS[:1]).startswith("1\n")
    with pytest.raises(ValueError, match="unknown subtitle format 'ass'"):
        subtitles.render("ass", SEGMENTS)
