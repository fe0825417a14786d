"""Warm workers: each pool process loads its Whisper model before the worker advertises itself.

Without it the first job of every pool process (and of each one Celery replaces after
MORAG_MAX_TASKS_PER_CHILD jobs) paid the model's load and its first run: about a second for
tiny.en on CPU, tens of seconds for a large model on a GPU. Now ``prepare`` (the worker's
parent, before the pool forks) opens a pipe; ``warm_child`` (each pool process, Celery's
``worker_process_init``) loads the model into the process's audio processor, transcribes a
second of silence and reports on the pipe; the supervisor waits for the first reports before
its first heartbeat (``MORAG_WARMUP_TIMEOUT`` at most) and carries the last one in the
heartbeat (``warmup``). CUDA is touched in the pool processes only, never in the parent.

A failure leaves the worker up and says why (log and heartbeat). A GPU failure with
MORAG_DEVICE=auto falls back as the CUDA check does: the process warms up on the CPU and
runs its jobs there, and the parent advertises ``cpu`` from then on (forked processes
inherit it); with MORAG_DEVICE=cuda the worker stays on CUDA and a job's GPU failure falls
back to a CPU worker as before. MORAG_WARMUP=false: the first job loads the model.
"""

from __future__ import annotations

import json
import logging
import os
import select
import time
from dataclasses import replace
from typing import Any

from morag import runtime
from morag.config import CPU_QUEUE, GPU_QUEUE, Settings
from morag.processors.base import is_gpu_failure

log = logging.getLogger("morag.warmup")

_pipe: tuple[int, int] | None = None  # (read, write), opened in the parent before the fork
_buffer = b""


def wanted(settings: Settings, queues: list[str]) -> bool:
    """Does this worker warm up: it is on, it runs jobs (not morag-store) and transcribes."""
    from morag.processors.registry import installed_types

    runs_jobs = bool({CPU_QUEUE, GPU_QUEUE} & set(queues))
    return settings.warmup and runs_jobs and "audio" in installed_types()


def prepare(settings: Settings, queues: list[str]) -> bool:
    """In the parent, before the pool forks: open the pipe the pool processes report on."""
    global _pipe
    if _pipe is None and wanted(settings, queues):
        _pipe = os.pipe()
        os.set_blocking(_pipe[0], False)
    return _pipe is not None


def enabled() -> bool:
    return _pipe is not None


def warm_up(settings: Settings) -> dict[str, Any]:
    """Load the model and run it once in this process; the report (never raises)."""
    device = runtime.decide_device(settings)
    started = time.monotonic()
    try:
        _run_once(settings, device.device)
    except Exception as exc:  # CTranslate2 raises RuntimeError, faster-whisper others
        error = f"{type(exc).__name__}: {exc}"
        if not (device.device == "cuda" and is_gpu_failure(exc) and settings.device == "auto"):
            log.error(
                "warm-up failed on %s (the first job loads the model): %s", device.device, error
            )
            return _report("failed", device.device, started, error=error)
        reason = f"warm-up on CUDA failed: {error}"
        log.warning("%s; running on CPU", reason)
        runtime.use_device(replace(device, device="cpu", reason=reason))
        try:
            _run_once(settings, "cpu")
        except Exception as cpu_exc:
            error = f"{type(cpu_exc).__name__}: {cpu_exc}"
            log.error("warm-up failed on cpu too: %s", error)
            return _report("failed", "cpu", started, error=error, fallback=reason)
        return _report("warm", "cpu", started, fallback=reason)
    return _report("warm", device.device, started)


def _run_once(settings: Settings, device: str) -> None:
    import numpy as np

    from morag.processors.audio import compute_type_for
    from morag.processors.registry import transcriber

    processor: Any = transcriber()
    compute_type = compute_type_for(device, settings.whisper_compute_type)
    model = processor._model(
        settings.whisper_model, device, compute_type, settings.whisper_cpu_threads
    )
    # A second of silence: allocates the decoder's buffers (and on a GPU its kernels).
    segments, _info = model.transcribe(np.zeros(16000, np.float32), beam_size=1, language="en")
    list(segments)


def _report(state: str, device: str, started: float, **extra: str) -> dict[str, Any]:
    return {
        "state": state,
        "device": device,
        "pid": os.getpid(),
        "seconds": round(time.monotonic() - started, 3),
        **extra,
    }


def warm_child(settings: Settings) -> None:
    """In a pool process at its start: warm up and report to the parent."""
    if _pipe is None:
        return
    report = warm_up(settings)
    if report["state"] == "warm":
        log.info(
            "warm: %s loaded on %s in %.2fs",
            settings.whisper_model,
            report["device"],
            report["seconds"],
        )
    line = (json.dumps(report) + "\n").encode()[: select.PIPE_BUF]  # one atomic write
    os.write(_pipe[1], line)


def reports(timeout: float = 0.0, count: int = 0) -> list[dict[str, Any]]:
    """In the parent: the reports written since the last call; waits up to ``timeout``
    seconds until ``count`` of them came."""
    global _buffer
    if _pipe is None:
        return []
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            while chunk := os.read(_pipe[0], 65536):
                _buffer += chunk
        except BlockingIOError:
            pass
        *lines, _buffer = _buffer.split(b"\n")
        for line in lines:
            try:
                found.append(json.loads(line))
            except ValueError:
                log.warning("unreadable warm-up report: %r", line[:200])
        left = deadline - time.monotonic()
        if len(found) >= count or left <= 0:
            return found
        select.select([_pipe[0]], [], [], left)
