"""`morag workers` in an 80-column terminal: names and queues whole (issue 22 item 8).

The queue column used to be cut to `gpu-ta…` when the processors list was long."""

from __future__ import annotations

from morag.cli import workers_table
from rich.console import Console

BEATS = [
    {
        "name": "gpu0@gpu-01.example.com",
        "consuming": ["gpu-tasks", "celery"],
        "device": "cuda",
        "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3"}],
        "busy": True,
        "processors": ["audio", "video", "youtube", "document", "image", "web"],
        "updated_at": "2026-12-03T09:30:00+00:00",
        "cuda_check": {"passed": True},
    },
    {
        "name": "cpu0@morag.example.com",
        "queues": ["celery"],
        "device": "cpu",
        "processors": ["audio", "video", "document", "image", "web", "youtube"],
        "updated_at": "2026-12-03T09:30:01+00:00",
    },
]


def render(width: int) -> str:
    console = Console(width=width, record=True, color_system=None)
    table, _ = workers_table(BEATS)
    console.print(table)
    return console.export_text()


def test_queue_and_worker_names_are_never_cut_at_80_columns() -> None:
    text = render(80)
    assert "gpu-tasks,celery" in text
    assert "gpu0@gpu-01.example.com" in text and "cpu0@morag.example.com" in text
    assert "…" not in text.split("processors")[0]  # nothing cut left of the processors
    assert max(len(line) for line in text.splitlines()) <= 80


def test_every_processor_is_said_as_all_and_a_partial_list_in_full() -> None:
    partial = [BEATS[1] | {"processors": ["audio", "video"]}]
    table, _ = workers_table(partial)
    console = Console(width=120, record=True, color_system=None)
    console.print(table)
    assert "audio, video" in console.export_text()
    assert " all " in render(120)


def test_why_a_worker_is_not_on_its_gpu_comes_below() -> None:
    beats = [BEATS[0] | {"device": "cpu", "device_reason": "CUDA error 802"}]
    _, reasons = workers_table(beats)
    assert reasons == ["gpu0@gpu-01.example.com: cpu because CUDA error 802"]
