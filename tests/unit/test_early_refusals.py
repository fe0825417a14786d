"""What the API refuses before a job exists: a language the served Whisper model cannot
transcribe (OpenAI routes) and a misspelt native option."""

from __future__ import annotations

import pytest
from morag.api.errors import ApiError
from morag.api.languages import english_only, language_problem
from morag.api.params import check_options, misspelt_options


@pytest.mark.parametrize(
    ("model", "english"),
    [
        ("tiny.en", True),
        ("Systran/faster-whisper-small.en", True),
        ("/srv/morag/models/base.en/", True),
        ("distil-whisper/distil-small-en", True),
        ("large-v3", False),
        ("Systran/faster-whisper-medium", False),
        ("/srv/models/whisper", False),  # says nothing: the worker decides when it loads
    ],
)
def test_english_only_models_by_name(model: str, english: bool) -> None:
    assert english_only(model) is english


def test_language_problems() -> None:
    assert language_problem("en", "tiny.en") is None
    assert language_problem("EN", "tiny.en") is None
    assert language_problem("fr", "large-v3") is None
    assert "English-only" in (language_problem("fr", "tiny.en") or "")
    assert "not one Whisper knows" in (language_problem("xx", "large-v3") or "")


def test_a_near_miss_of_an_option_is_refused_with_the_right_name() -> None:
    problems = misspelt_options({"subtitle": ["srt"], "Word-Timestamps": True, "beamsize": 2})
    assert problems == [
        "options.subtitle: unknown option (did you mean subtitles?)",
        "options.Word-Timestamps: unknown option (did you mean word_timestamps?)",
        "options.beamsize: unknown option (did you mean beam_size?)",
    ]
    with pytest.raises(ApiError) as exc:
        check_options({"subtitle": ["srt"]})
    assert exc.value.status_code == 422 and "did you mean subtitles" in exc.value.detail


def test_other_unknown_options_still_pass() -> None:
    options = {"fault": "slow:1", "segment_details": True, "subtitles": ["srt"]}
    assert misspelt_options(options) == []
    assert check_options(options) == options
