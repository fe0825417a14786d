"""What every processor implements, and the errors that decide a job's fate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from morag.config import Settings


class ProcessingError(Exception):
    """The input cannot be processed; the message is shown to the client as the job error."""


class GpuFailure(Exception):
    """The GPU could not run the job (out of memory, CUDA unusable): retry on CPU."""


_GPU_ERROR_MARKERS = (
    "cuda failed with error out of memory",
    "cuda out of memory",
    "cublas_status_alloc_failed",
    "cuda error",
    "cudnn",
    "libcublas",
    "no cuda-capable device",
    "cuda driver version is insufficient",
)


def is_gpu_failure(exc: BaseException) -> bool:
    """Does this exception mean the GPU (not the input) failed?"""
    if isinstance(exc, GpuFailure):
        return True
    if isinstance(exc, (RuntimeError, OSError, MemoryError)):
        text = str(exc).lower()
        return any(marker in text for marker in _GPU_ERROR_MARKERS)
    return False


@dataclass
class ProcessContext:
    settings: Settings
    device: str  # "cpu" or "cuda"
    work_dir: Path  # private scratch directory for this job
    report_progress: Callable[[float], None]
    source_url: str | None = None  # the job's URL, for processors that fetch it themselves

    def nested(self, start: float, end: float) -> ProcessContext:
        """The context for a nested step (video and youtube call audio): the step reports
        0..1 of its own work, the job sees it as start..end of its progress. Clamped, so a
        step that starts over at 0 never moves the job's progress backwards."""
        outer = self.report_progress
        span = max(end - start, 0.0)

        def report(fraction: float) -> None:
            outer(start + span * min(max(fraction, 0.0), 1.0))

        return replace(self, report_progress=report)


class Processor(Protocol):
    content_type: str
    # True: the processor fetches ``ctx.source_url`` itself (yt-dlp, size-capped web fetch)
    # and gets the job's scratch directory instead of a downloaded file.
    fetches_url: bool

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        """Return ``{"content": str, "metadata": {...}, ...}`` or raise ProcessingError."""
        ...


class Transcriber(Protocol):
    """What video and youtube need from the audio processor: a WAV file in, a transcript
    (``content``, ``segments``, ``metadata``) out, progress reported 0..1 on ``ctx``."""

    def process(
        self, path: Path, options: dict[str, Any], ctx: ProcessContext
    ) -> dict[str, Any]: ...
