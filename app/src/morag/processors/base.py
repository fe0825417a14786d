"""What every processor implements, and the errors that decide a job's fate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


class Processor(Protocol):
    content_type: str
    # True: the processor fetches ``ctx.source_url`` itself (yt-dlp, size-capped web fetch)
    # and gets the job's scratch directory instead of a downloaded file.
    fetches_url: bool

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        """Return ``{"content": str, "metadata": {...}, ...}`` or raise ProcessingError."""
        ...
