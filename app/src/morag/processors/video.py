"""Video: probe the streams with ffprobe, extract the audio track with ffmpeg, transcribe it.

Both programs run with a time limit (``morag.tools``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from morag.processors.base import ProcessContext, ProcessingError
from morag.tools import PROBE_TIMEOUT, ffmpeg_to_wav, last_line, run_tool


def probe(path: Path) -> dict[str, Any]:
    done = run_tool(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
        timeout=PROBE_TIMEOUT,
        what="reading the video (ffprobe)",
    )
    if done.returncode != 0:
        raise ProcessingError(f"cannot read the video: {last_line(done.stderr, 'ffprobe failed')}")
    try:
        return json.loads(done.stdout)
    except ValueError as exc:
        raise ProcessingError("cannot read the video: ffprobe gave no readable answer") from exc


def describe(info: dict[str, Any]) -> dict[str, Any]:
    """Duration, container, codecs and resolution from ffprobe's answer."""
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    fmt = info.get("format", {})
    meta: dict[str, Any] = {
        "duration": round(float(fmt.get("duration") or 0.0), 3),
        "container": fmt.get("format_name"),
        "video_codec": video.get("codec_name") if video else None,
        "audio_codec": audio.get("codec_name") if audio else None,
        "width": int(video["width"]) if video and video.get("width") else None,
        "height": int(video["height"]) if video and video.get("height") else None,
    }
    if meta["width"] and meta["height"]:
        meta["resolution"] = f"{meta['width']}x{meta['height']}"
    return meta


def extract_audio(path: Path, dest: Path, timeout: float) -> Path:
    """The first audio track as 16 kHz mono WAV (what Whisper wants)."""
    try:
        return ffmpeg_to_wav(path, dest, timeout=timeout, what="extracting the audio track")
    except ProcessingError as exc:
        raise ProcessingError(f"cannot extract the audio track: {exc}") from exc


EXTRACTED = 0.1  # the job's progress once the audio track is extracted


class VideoProcessor:
    content_type = "video"
    fetches_url = False

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        from morag.processors.registry import transcriber

        video_meta = describe(probe(path))
        if video_meta["audio_codec"] is None:
            raise ProcessingError("the video has no audio track: nothing to transcribe")
        wav = extract_audio(path, ctx.work_dir / "audio.wav", ctx.settings.tool_timeout)
        ctx.report_progress(EXTRACTED)
        result = transcriber().process(wav, options, ctx.nested(EXTRACTED, 1.0))
        meta = result.setdefault("metadata", {})
        speech_duration = meta.pop("duration", None)
        meta.update({k: v for k, v in video_meta.items() if v is not None})
        if not meta.get("duration") and speech_duration:
            meta["duration"] = speech_duration
        return result
