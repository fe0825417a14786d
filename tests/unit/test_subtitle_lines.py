"""Readable subtitles: ``max_line_width`` wraps cue text, ``max_line_count`` splits a segment
into several cues (times from word timestamps, or shared out by characters)."""

from __future__ import annotations

import itertools

import pytest
from morag import subtitles
from morag.api.errors import ApiError
from morag.api.params import check_options

TEXT = "Please send the quarterly report to the finance team before Friday noon"
WORDS = TEXT.split()


def _timed_segment() -> dict:
    # One word every 0.5 s from 10 s, each 0.4 s long; words carry Whisper's leading space.
    words = [
        {"start": 10 + 0.5 * i, "end": 10.4 + 0.5 * i, "word": f" {w}", "probability": 0.9}
        for i, w in enumerate(WORDS)
    ]
    return {"start": 10.0, "end": 16.0, "text": TEXT, "words": words}


def _srt_cues(out: str) -> list[tuple[str, list[str]]]:
    cues = []
    for block in out.strip().split("\n\n"):
        number, times, *lines = block.split("\n")
        assert number.isdigit()
        cues.append((times, lines))
    return cues


def test_without_limits_the_output_is_unchanged() -> None:
    seg = _timed_segment()
    assert subtitles.to_srt([seg]) == f"1\n00:00:10,000 --> 00:00:16,000\n{TEXT}\n"
    assert subtitles.render("vtt", [seg]) == subtitles.to_vtt([seg])


@pytest.mark.parametrize("width", [1, 5, 12, 20, 42])
def test_wrap_keeps_lines_within_the_width(width: int) -> None:
    lines = subtitles.wrap(WORDS, width)
    texts = [" ".join(WORDS[i] for i in line) for line in lines]
    assert " ".join(texts) == TEXT, "every word, once, in order"
    for text in texts:
        # Only a word longer than the width may pass it, alone on its line.
        assert len(text) <= width or " " not in text, (width, text)
    # Greedy: the next line's first word would not have fitted on this one.
    for a, b in itertools.pairwise(texts):
        assert len(a) + 1 + len(b.split()[0]) > width


def test_width_alone_wraps_a_segment_into_one_cue() -> None:
    out = subtitles.to_srt([_timed_segment()], max_line_width=20)
    assert _srt_cues(out) == [
        (
            "00:00:10,000 --> 00:00:16,000",
            ["Please send the", "quarterly report to", "the finance team", "before Friday noon"],
        )
    ]


def test_line_count_splits_into_cues_timed_by_their_words() -> None:
    out = subtitles.to_srt([_timed_segment()], max_line_width=20, max_line_count=2)
    # Lines: 3 + 3 words, then 3 + 3 words; cue times are those of the first and last word.
    assert _srt_cues(out) == [
        ("00:00:10,000 --> 00:00:12,900", ["Please send the", "quarterly report to"]),
        ("00:00:13,000 --> 00:00:15,900", ["the finance team", "before Friday noon"]),
    ]


def test_without_word_timestamps_time_is_shared_by_characters() -> None:
    seg = {"start": 0.0, "end": 10.0, "text": "aaaa bbbb cccc dddd eeee"}
    out = subtitles.to_vtt([seg], max_line_width=9, max_line_count=1)
    # Cues "aaaa bbbb" (9), "cccc dddd" (9), "eeee" (4): 22 characters over 10 s.
    assert out == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:04.091\naaaa bbbb\n\n"
        "00:00:04.091 --> 00:00:08.182\ncccc dddd\n\n"
        "00:00:08.182 --> 00:00:10.000\neeee\n"
    )


def test_cues_stay_within_their_segment_and_in_order() -> None:
    second = {"start": 20.0, "end": 21.0, "text": "Thanks --> bye", "words": []}
    out = subtitles.to_vtt([_timed_segment(), second], max_line_width=10, max_line_count=1)
    cues = out.removeprefix("WEBVTT\n\n").strip().split("\n\n")
    # "Thanks -->" (10 characters) and "bye" (3) share the second segment's second.
    assert cues[-2:] == [
        "00:00:20.000 --> 00:00:20.769\nThanks ->",
        "00:00:20.769 --> 00:00:21.000\nbye",
    ]
    starts = [c.split(" --> ")[0] for c in cues]
    assert starts == sorted(starts) and len(cues) > 2


def test_blank_segments_make_no_cue() -> None:
    out = subtitles.to_srt([{"start": 0, "end": 1, "text": "  "}], max_line_width=10)
    assert out == ""


def test_word_times_outside_the_segment_are_clamped() -> None:
    seg = {
        "start": 5.0,
        "end": 6.0,
        "text": "early late",
        "words": [
            {"start": 4.0, "end": 5.2, "word": " early"},
            {"start": 5.5, "end": 7.0, "word": " late"},
        ],
    }
    out = subtitles.to_srt([seg], max_line_width=5, max_line_count=1)
    assert _srt_cues(out) == [
        ("00:00:05,000 --> 00:00:05,200", ["early"]),
        ("00:00:05,500 --> 00:00:06,000", ["late"]),
    ]


@pytest.mark.parametrize("bad", [{"max_line_width": 0}, {"max_line_count": -1}])
def test_the_functions_refuse_non_positive_limits(bad: dict) -> None:
    with pytest.raises(ValueError, match="positive"):
        subtitles.render("srt", [_timed_segment()], **bad)


@pytest.mark.parametrize(
    ("options", "detail"),
    [
        ({"max_line_width": 0}, "options.max_line_width: Input should be greater than"),
        ({"max_line_width": "20"}, "options.max_line_width: Input should be a valid integer"),
        ({"max_line_width": True}, "options.max_line_width: Input should be a valid integer"),
        ({"max_line_width": 20, "max_line_count": 0}, "options.max_line_count: Input should"),
        ({"max_line_count": 2}, "options.max_line_count: Value error, needs max_line_width"),
    ],
)
def test_the_api_refuses_bad_limits_with_a_readable_detail(options: dict, detail: str) -> None:
    with pytest.raises(ApiError) as exc:
        check_options({"subtitles": ["srt"], **options})
    assert exc.value.status_code == 422
    assert exc.value.detail.startswith(detail), exc.value.detail


def test_the_api_takes_good_limits() -> None:
    options = {"subtitles": ["vtt"], "max_line_width": 42, "max_line_count": 2}
    assert check_options(options) == options
