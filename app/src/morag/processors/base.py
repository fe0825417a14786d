"""What every processor implements, and the errors that decide a job's fate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
    # Long recordings: the audio processor offers its decoded audio here, which may have it
    # transcribed in pieces by idle workers (morag.split_jobs). None: always whole.
    split: Splitter | None = None
    # A finished transcript segment (start, end, text) for live readers (morag.live_events);
    # it carries through ``nested``: video and youtube stream their audio's segments.
    report_segment: Callable[[dict[str, Any]], None] = field(default=lambda segment: None)

    def nested(self, start: float, end: float) -> ProcessContext:
        """The context for a nested step (video and youtube call audio): the step reports
        0..1 of its own work, the job sees it as start..end of its progress. Clamped, so a
        step that starts over at 0 never moves the job's progress backwards."""
        outer = self.report_progress
        span = max(end - start, 0.0)

        def report(fraction: float) -> None:
            outer(start + span * min(max(fraction, 0.0), 1.0))

        return replace(self, report_progress=report)


@dataclass(frozen=True)
class SplitOutcome:
    """What a ``Splitter`` did: the merged transcript, or None and why it was not split."""

    result: dict[str, Any] | None
    reason: str


Transcribe = Callable[[Path, dict[str, Any], "ProcessContext"], dict[str, Any]]


class Splitter(Protocol):
    def __call__(
        self, audio: Any, rate: int, options: dict[str, Any], transcribe: Transcribe, ctx: Any
    ) -> SplitOutcome:
        """``audio``: the decoded samples at ``rate``; ``transcribe``: the processor itself,
        for the pieces this worker runs (with a context whose ``split`` is None)."""
        ...


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
