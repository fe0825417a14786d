"""Long recordings split across idle workers: the pure planning and merging (morag.splitting),
the cut finder on real speech with faster-whisper's VAD, and the ``split`` option's check."""

from __future__ import annotations

import itertools
import random
import wave
from pathlib import Path

import numpy as np
import pytest
from fastapi import HTTPException
from morag import splitting
from morag.api.params import check_options
from morag.split_jobs import JobSplitter
from morag.subtitles import render

from tests.conftest import speak

RATE = 16000


# -- the decision ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "duration", "threshold", "free", "pieces"),
    [
        (None, 3600, 300, 3, 4),  # 60 min, three idle slots: four pieces
        (None, 3600, 300, 0, 1),  # nobody idle: whole, as before
        (None, 299, 300, 3, 1),  # under the threshold
        (None, 300, 300, 3, 2),  # at the threshold: two halves at most
        (None, 3600, 300, 100, 16),  # capped at MAX_PIECES (and 3600 / 150 = 24)
        (None, 600, 300, 100, 4),  # 600 s in pieces of at least 150 s
        (False, 3600, 300, 3, 1),  # turned off by the job
        (None, 3600, 0, 3, 1),  # turned off on the worker
        (True, 3600, 0, 3, 1),  # the worker's 0 wins over the job's true
        (True, 60, 300, 3, 4),  # asked: under the threshold too, pieces of 10 s or more
        (True, 15, 300, 3, 1),  # asked, but too short for two 10 s pieces
        (True, 60, 300, 0, 1),  # asked, but nobody idle
    ],
)
def test_plan(
    requested: bool | None, duration: float, threshold: float, free: int, pieces: int
) -> None:
    plan = splitting.plan(requested, duration, threshold, free)
    assert plan.pieces == pieces, plan
    assert plan.reason


def test_the_reasons_say_why_not() -> None:
    assert "options.split" in splitting.plan(False, 3600, 300, 3).reason
    assert "MORAG_SPLIT_MIN_SECONDS" in splitting.plan(None, 10, 300, 3).reason
    assert "no idle worker" in splitting.plan(None, 3600, 300, 0).reason


def _beat(name: str, queue: str = "celery", active: list[str] | None = None, **kw: object) -> dict:
    return {
        "name": name,
        "queues": [queue],
        "consuming": [queue],
        "processors": ["audio", "document"],
        "concurrency": 1,
        "active": active or [],
        **kw,
    }


def test_free_slots_count_idle_workers_of_the_queue_only() -> None:
    beats = [
        _beat("me@h"),  # the job's own worker: its heartbeat predates the job
        _beat("idle@h"),
        _beat("busy@h", active=["other"]),
        _beat("gpu@h", queue="gpu-tasks"),  # another queue
        _beat("docs@h", processors=["document"]),  # cannot run audio
        _beat("wide@h", concurrency=3, active=["x"]),  # two of three slots idle
    ]
    assert splitting.free_slots(beats, "celery", "me@h", "job") == 3
    # A rescuing CPU worker consumes gpu-tasks without it being one of its queues.
    beats.append(_beat("rescuer@h", consuming=["celery", "gpu-tasks"]))
    assert splitting.free_slots(beats, "gpu-tasks", "me@h", "job") == 2
    # The job's own worker with a spare slot counts it, once the job is in its active list.
    mine = [_beat("me@h", concurrency=2, active=["job"])]
    assert splitting.free_slots(mine, "celery", "me@h", "job") == 1


# -- where to cut --------------------------------------------------------------------------------


def _inside_speech(cut: int, speech: list[tuple[int, int]]) -> bool:
    return any(s <= cut < e for s, e in speech)


def test_a_cut_lands_in_the_middle_of_the_nearest_long_enough_silence() -> None:
    speech = [(0, 100), (110, 300), (340, 600), (700, 1000)]
    # Gaps: 100-110 (too short), 300-340, 600-700. Target 500: 600-700 is nearer (650 vs 320).
    assert splitting.choose_cut(500, 0, 1000, speech, min_gap=20) == 650
    assert splitting.choose_cut(350, 0, 1000, speech, min_gap=20) == 320
    assert splitting.choose_cut(500, 0, 1000, speech, min_gap=200) is None


def test_the_windows_edges_count_as_speech() -> None:
    # Silence at the window's edges may be a word cut off by the window: no cut there.
    assert splitting.choose_cut(500, 0, 1000, [(200, 800)], min_gap=1) is None
    # A window without any speech is silence throughout.
    assert splitting.choose_cut(500, 0, 1000, [], min_gap=1) == 500


def test_cuts_are_never_inside_speech_random_layouts() -> None:
    rng = random.Random(7)
    for _ in range(500):
        total, at, speech = 100_000, 0, []
        while at < total:
            talk, pause = rng.randint(100, 5000), rng.randint(0, 1500)
            speech.append((at, min(total, at + talk)))
            at += talk + pause
        for target in splitting.targets(total, rng.randint(2, 6)):
            lo, hi = splitting.search_window(target, total, RATE // 10, 200.0)
            inside = [(s, e) for s, e in speech if e > lo and s < hi]
            cut = splitting.choose_cut(target, lo, hi, inside, min_gap=300)
            if cut is None:
                continue
            assert lo < cut < hi
            assert not _inside_speech(cut, speech)
            # At least half the minimum gap of silence on each side.
            assert not any(s - 150 < cut < e + 150 for s, e in speech)


def test_ranges_are_continuous_and_drop_cuts_that_leave_tiny_pieces() -> None:
    assert splitting.ranges(1000, [250, None, 750], min_samples=100) == [
        (0, 250),
        (250, 750),
        (750, 1000),
    ]
    assert splitting.ranges(1000, [None, None], min_samples=100) == [(0, 1000)]
    assert splitting.ranges(1000, [50, 500, 560, 980], min_samples=100) == [
        (0, 500),
        (500, 1000),
    ]
    pieces = splitting.ranges(10_000, [7000, 2000, 4500], min_samples=10)
    assert pieces[0][0] == 0 and pieces[-1][1] == 10_000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))


def test_targets_share_the_recording_equally() -> None:
    assert splitting.targets(1000, 4) == [250, 500, 750]
    assert splitting.targets(1000, 1) == []


def test_search_windows_of_neighbouring_cuts_never_overlap() -> None:
    for shortest in (10.0, 150.0, 600.0):
        total = int(shortest * 8 * RATE)
        wins = [
            splitting.search_window(t, total, RATE, shortest) for t in splitting.targets(total, 8)
        ]
        assert all(a[1] < b[0] for a, b in itertools.pairwise(wins))


def test_the_cut_finder_cuts_real_speech_only_in_its_pauses(tmp_path: Path) -> None:
    """faster-whisper's VAD on real espeak-ng speech: every cut lies in a pause we put there."""
    sentences = [
        "The lighthouse keeper painted the tower bright blue every spring.",
        "Our bakery sells sourdough bread made with wild yeast.",
        "A thunderstorm knocked out the power for most of the afternoon.",
    ]
    parts, pauses, at = [], [], 0
    for i in range(12):
        wav = speak(sentences[i % 3], tmp_path / f"s{i}.wav")
        with wave.open(str(wav)) as w:
            raw = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
            src_rate = w.getframerate()
        speech = np.interp(
            np.arange(0, len(raw), src_rate / RATE), np.arange(len(raw)), raw
        ).astype(np.float32)
        pause = np.zeros(int(0.8 * RATE), np.float32)
        parts += [speech, pause]
        at += len(speech)
        pauses.append((at, at + len(pause)))
        at += len(pause)
    audio = np.concatenate(parts)
    for pieces in (2, 3, 4):
        spans = JobSplitter._cut(audio, RATE, pieces, 10.0)
        assert len(spans) == pieces
        assert spans[0][0] == 0 and spans[-1][1] == len(audio)
        for _, cut in spans[:-1]:
            assert any(lo < cut < hi for lo, hi in pauses), (cut / RATE, pieces)


def test_wav_header_makes_a_readable_wav(tmp_path: Path) -> None:
    samples = (np.sin(np.arange(RATE) / 10) * 0.5).astype(np.float32)
    path = tmp_path / "piece.wav"
    sha, size = JobSplitter._write(samples, RATE, path)
    assert size == path.stat().st_size == 44 + 2 * RATE
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        back = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert np.array_equal(back, np.rint(samples * 32768).astype("<i2"))
    import hashlib

    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(tmp_path.glob(".*part"))


# -- progress ------------------------------------------------------------------------------------


def test_progress_is_weighted_and_never_goes_backwards() -> None:
    p = splitting.Progress([3.0, 1.0])
    assert p.update(0, 0.5) == pytest.approx(0.375)
    assert p.update(1, 1.0) == pytest.approx(0.625)
    # The piece starts over elsewhere (its worker died): the job's progress holds.
    assert p.update(1, 0.0) == pytest.approx(0.625)
    assert p.update(0, 0.2) == pytest.approx(0.625)
    assert p.update(0, 1.0) == pytest.approx(0.99)  # 1.0 is written by the job's end


# -- one transcript --------------------------------------------------------------------------------


def _seg(start: float, end: float, words: list[tuple[float, float, str]], **kw: object) -> dict:
    return {
        "start": start,
        "end": end,
        "text": " ".join(w for _, _, w in words),
        "words": [{"start": s, "end": e, "word": " " + w, "probability": 0.9} for s, e, w in words],
        **kw,
    }


def _piece(start: float, end: float, segments: list[dict], worker: str, **meta: object):
    result = {
        "content": " ".join(s["text"] for s in segments),
        "segments": segments,
        "metadata": {
            "duration": end - start,
            "language": "en",
            "model": "tiny.en",
            **meta,
        },
    }
    return splitting.Piece(start, end, result, worker)


def test_merge_moves_times_by_offset_and_renumbers() -> None:
    first = _piece(
        0.0,
        10.0,
        [
            _seg(0.0, 4.0, [(0.0, 1.0, "one"), (1.5, 4.0, "two")], id=1, seek=0),
            _seg(5.0, 9.5, [(5.0, 9.5, "three")], id=2, seek=0),
        ],
        "a@h",
        speech_duration=8.0,
    )
    # Whisper stamped the last word a little past the piece's end: clamped to it.
    second = _piece(
        10.0,
        20.0,
        [_seg(0.2, 10.3, [(0.2, 3.0, "four"), (3.5, 10.3, "five")], id=1, seek=0)],
        "b@h",
        speech_duration=9.0,
    )
    merged = splitting.merge([second, first], duration=20.0)  # any order in
    segs = merged["segments"]
    assert [s["id"] for s in segs] == [1, 2, 3]
    assert [s["start"] for s in segs] == [0.0, 5.0, 10.2]
    assert segs[2]["end"] == 20.0 and segs[2]["words"][-1]["end"] == 20.0
    assert segs[2]["words"][0] == {
        "start": 10.2,
        "end": 13.0,
        "word": " four",
        "probability": 0.9,
    }
    assert segs[2]["seek"] == 1000
    assert merged["content"] == "one two three four five"
    meta = merged["metadata"]
    assert meta["duration"] == 20.0 and meta["speech_duration"] == 17.0
    assert meta["split"] == {"pieces": 2, "workers": 2, "worker_names": ["a@h", "b@h"]}
    assert meta["language"] == "en"
    assert "warnings" not in merged


def test_merge_keeps_every_word_once_and_in_order_at_the_seams() -> None:
    rng = random.Random(3)
    words_in, pieces, at = [], [], 0.0
    for p in range(5):
        start, end = at, at + rng.uniform(20, 40)
        segs, t = [], 0.5
        while t < end - start - 2:
            ws = []
            for _ in range(rng.randint(1, 4)):
                word = f"w{len(words_in)}"
                ws.append((round(t, 3), round(t + 0.3, 3), word))
                words_in.append(word)
                t += 0.4
            segs.append(_seg(ws[0][0], ws[-1][1], ws))
            t += 0.5
        pieces.append(_piece(start, end, segs, f"w{p % 2}@h"))
        at = end
    merged = splitting.merge(pieces, duration=at)
    words = [w for s in merged["segments"] for w in s["words"]]
    assert [w["word"].strip() for w in words] == words_in  # none lost, none doubled
    assert merged["content"].split() == words_in
    times = [t for w in words for t in (w["start"], w["end"])]
    assert times == sorted(times)  # continuous time, no jump back at a seam
    assert merged["metadata"]["split"]["workers"] == 2


def test_merge_rebuilds_subtitles_and_warnings() -> None:
    silent = _piece(0.0, 30.0, [], "a@h")
    silent.result["warnings"] = [
        "no speech found in 30.0 s of audio: the transcript holds no words"
    ]
    speech = _piece(30.0, 60.0, [_seg(1.0, 3.0, [(1.0, 3.0, "hello")])], "b@h")
    speech.result["warnings"] = ["something else"]
    merged = splitting.merge(
        [silent, speech],
        duration=60.0,
        formats=["srt", "vtt"],
        limits={"max_line_width": 20},
    )
    # A silent piece is no warning for a recording that has speech.
    assert merged["warnings"] == ["something else"]
    assert merged["subtitles"]["srt"] == render("srt", merged["segments"], max_line_width=20)
    assert "00:00:31,000 --> 00:00:33,000" in merged["subtitles"]["srt"]
    assert merged["subtitles"]["vtt"].startswith("WEBVTT")
    # All pieces silent: the recording's own warning, with the whole duration.
    quiet = splitting.merge([silent, _piece(30.0, 60.0, [], "b@h")], duration=60.0)
    assert quiet["warnings"] == [
        "no speech found in 60.0 s of audio: the transcript holds no words"
    ]


def test_merge_drops_speech_duration_when_a_piece_did_not_measure_it() -> None:
    merged = splitting.merge(
        [_piece(0, 10, [], "a", speech_duration=3.0), _piece(10, 20, [], "a")],
        duration=20,
    )
    assert "speech_duration" not in merged["metadata"]
    assert merged["metadata"]["split"]["workers"] == 1


# -- the option ------------------------------------------------------------------------------------


def test_split_option_is_a_boolean_or_null() -> None:
    for ok in ({"split": True}, {"split": False}, {"split": None}, {}):
        check_options(ok)
    for bad in ("yes", 1, "true"):
        with pytest.raises(HTTPException) as exc:
            check_options({"split": bad})
        assert exc.value.status_code == 422 and "options.split" in exc.value.detail
