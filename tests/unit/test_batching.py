"""The batching decision (morag.batching) and the batched option's validation."""

from __future__ import annotations

import pytest
from fastapi import HTTPException
from morag import batching
from morag.api.params import check_options
from morag.processors.audio import model_bytes

GIB = 1024**3
LARGE = 3_100_000_000  # large-v3 in fp16
TINY = 75_537_502  # the bundled tiny.en's model.bin


def test_cpu_batch_is_fixed_whatever_the_memory() -> None:
    assert batching.batch_size_for("cpu", None, LARGE) == batching.CPU_BATCH
    assert batching.batch_size_for("cpu", 100 * GIB, TINY) == batching.CPU_BATCH


def test_unknown_gpu_memory_takes_faster_whispers_default() -> None:
    assert batching.batch_size_for("cuda", None, LARGE) == 8


def test_gpu_batch_grows_with_free_memory_and_shrinks_with_the_model() -> None:
    sizes = [batching.batch_size_for("cuda", free * GIB, LARGE) for free in (1, 2, 4, 8, 16)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    # 4.5 GiB free beside large-v3: each piece ~390 MB, 3/4 of the free memory -> 9.
    assert batching.batch_size_for("cuda", int(4.5 * GIB), LARGE) == 9
    assert batching.batch_size_for("cuda", 2 * GIB, TINY) > batching.batch_size_for(
        "cuda", 2 * GIB, LARGE
    )


@pytest.mark.parametrize("free", [0, 1, 100 * 1024**2])
def test_gpu_batch_is_at_least_one(free: int) -> None:
    assert batching.batch_size_for("cuda", free, LARGE) == 1


def test_gpu_batch_is_capped() -> None:
    # An H200 with 139 GiB free would fit hundreds of tiny.en pieces.
    assert batching.batch_size_for("cuda", 139 * GIB, TINY) == batching.MAX_BATCH


def test_small_models_still_count_a_minimum_per_piece() -> None:
    # 1 GiB * 0.75 / 64 MiB = 12, whatever tiny the model.
    assert batching.batch_size_for("cuda", GIB, 1000) == 12


@pytest.mark.parametrize(
    ("requested", "device", "duration", "batched"),
    [
        (None, "cuda", 120.0, True),
        (None, "cuda", 29.0, False),  # one 30 s piece: nothing to batch
        (None, "cpu", 119.0, False),  # measured no gain on CPU below a full batch (4 x 30 s)
        (None, "cpu", 120.0, True),
        (False, "cuda", 3600.0, False),
        (True, "cpu", 5.0, True),
        (True, "cuda", 5.0, True),
    ],
)
def test_plan(requested: bool | None, device: str, duration: float, batched: bool) -> None:
    plan = batching.plan(requested, device, duration, 8 * GIB, LARGE)
    assert plan.batched is batched
    assert (plan.batch_size is not None) is batched
    assert plan.reason


def test_plan_takes_the_batch_size_from_free_memory() -> None:
    assert batching.plan(None, "cuda", 600.0, 2 * GIB, LARGE).batch_size == 4
    assert batching.plan(True, "cpu", 600.0, None, LARGE).batch_size == batching.CPU_BATCH


def _w(start: float, end: float, word: str) -> dict:
    return {"start": start, "end": end, "word": word, "probability": 0.9}


def test_a_piece_is_cut_after_sentence_ends() -> None:
    words = [
        _w(0.0, 0.4, " Hello"),
        _w(0.4, 0.9, " world."),
        _w(1.5, 1.9, " How"),
        _w(1.9, 2.2, " are"),
        _w(2.2, 2.6, " you?"),
        _w(3.0, 3.5, " Fine"),
    ]
    seg = {"start": 0.0, "end": 3.5, "text": "Hello world. How are you? Fine", "words": words}
    parts = batching.split_segment(seg)
    assert [p["text"] for p in parts] == ["Hello world.", "How are you?", "Fine"]
    assert [(p["start"], p["end"]) for p in parts] == [(0.0, 0.9), (1.5, 2.6), (3.0, 3.5)]
    assert sum(len(p["words"]) for p in parts) == len(words)


def test_a_long_sentence_is_cut_before_it_outgrows_the_limit() -> None:
    words = [_w(i * 1.0, i * 1.0 + 0.8, f" w{i}") for i in range(25)]
    seg = {"start": 0.0, "end": 24.8, "text": "...", "words": words, "avg_logprob": -0.2}
    parts = batching.split_segment(seg, max_seconds=10.0)
    assert all(p["end"] - p["start"] <= 10.0 for p in parts)
    assert [w for p in parts for w in p["words"]] == words
    assert all(p["avg_logprob"] == -0.2 for p in parts)  # other members copied


def test_a_piece_without_words_stays_whole() -> None:
    seg = {"start": 0.0, "end": 28.0, "text": "no words asked"}
    assert batching.split_segment(seg) == [seg]


def test_batched_option_is_a_boolean_or_null() -> None:
    for ok in ({"batched": True}, {"batched": False}, {"batched": None}, {}):
        assert check_options(ok) is ok
    for bad in ("yes", 1, "true"):
        with pytest.raises(HTTPException) as exc:
            check_options({"batched": bad})
        assert exc.value.status_code == 422 and "options.batched" in exc.value.detail


def test_model_size_from_the_weights_or_the_name() -> None:
    assert model_bytes("tiny.en") == TINY  # the bundled model's model.bin
    assert model_bytes("large-v3") == 3_100_000_000
    assert model_bytes("Systran/faster-whisper-medium") == 1_538_000_000
    assert model_bytes("large-v3-turbo") == 1_618_000_000
    assert model_bytes("someone/unknown") == 3_100_000_000  # the safe side: the largest
