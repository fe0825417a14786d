"""Nested processors (video and youtube call audio) report progress in a sub-range, so the
job's progress never goes backwards when the inner step starts at 0."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from morag.config import Settings
from morag.processors import video, youtube
from morag.processors.base import ProcessContext


def context(seen: list[float]) -> ProcessContext:
    return ProcessContext(Settings(), "cpu", Path("/nonexistent"), seen.append)


def test_nested_maps_the_inner_range_onto_the_outer_one() -> None:
    seen: list[float] = []
    inner = context(seen).nested(0.3, 1.0)
    for fraction in (0.0, 0.5, 0.99, 1.0):
        inner.report_progress(fraction)
    assert seen == pytest.approx([0.3, 0.65, 0.3 + 0.7 * 0.99, 1.0])


def test_nested_is_clamped_and_composes() -> None:
    seen: list[float] = []
    inner = context(seen).nested(0.1, 0.5).nested(0.5, 1.0)
    inner.report_progress(-1.0)
    inner.report_progress(2.0)
    assert seen == pytest.approx([0.3, 0.5])


def test_outer_step_then_transcript_never_goes_backwards() -> None:
    for start in (video.EXTRACTED, youtube.DOWNLOADED):
        seen: list[float] = []
        ctx = context(seen)
        ctx.report_progress(start)
        audio = ctx.nested(start, 1.0)
        for fraction in (0.0, 0.2, 0.2, 0.7, 0.99):  # what the audio processor reports
            audio.report_progress(fraction)
        assert all(a <= b for a, b in itertools.pairwise(seen)), seen
        assert seen[0] == start and seen[-1] < 1.0
