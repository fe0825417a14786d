"""Processors by content type, imported lazily so a worker loads only what it runs."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shutil
from dataclasses import dataclass
from functools import cache

from morag.processors.base import Processor, Transcriber

log = logging.getLogger("morag.processors")


@dataclass(frozen=True)
class ProcessorSpec:
    content_type: str
    factory: str  # "module:Class"
    python_modules: tuple[str, ...] = ()
    executables: tuple[str, ...] = ()
    needs_whisper_model: bool = False  # advertised only when MORAG_WHISPER_MODEL loads

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.python_modules) and all(
            shutil.which(e) is not None for e in self.executables
        )


SPECS: dict[str, ProcessorSpec] = {
    spec.content_type: spec
    for spec in (
        ProcessorSpec(
            "audio",
            "morag.processors.audio:AudioProcessor",
            ("faster_whisper",),
            needs_whisper_model=True,
        ),
        ProcessorSpec(
            "video",
            "morag.processors.video:VideoProcessor",
            ("faster_whisper", "ffmpeg"),
            ("ffmpeg", "ffprobe"),
            needs_whisper_model=True,
        ),
        ProcessorSpec(
            "document", "morag.processors.document:DocumentProcessor", ("docling", "pypdf")
        ),
        ProcessorSpec("image", "morag.processors.image:ImageProcessor", ("PIL",), ("tesseract",)),
        ProcessorSpec("web", "morag.processors.web:WebProcessor", ("trafilatura",)),
        ProcessorSpec(
            "youtube",
            "morag.processors.youtube:YoutubeProcessor",
            ("yt_dlp", "faster_whisper"),
            ("ffmpeg",),
            needs_whisper_model=True,
        ),
    )
}


def known_types() -> list[str]:
    return sorted(SPECS)


@cache
def installed_types() -> tuple[str, ...]:
    """Content types this host can process (its extras and tools are installed)."""
    return tuple(sorted(ct for ct, spec in SPECS.items() if spec.installed()))


def advertised_types(whisper_model: str) -> tuple[str, ...]:
    """What a worker offers in its heartbeat: installed types whose model is usable.

    Checked once at worker start (files present, checksums of the staged manifest): a
    worker whose Whisper model cannot load must not attract audio, video or media-URL jobs
    that would only fail when it picks them up.
    """
    installed = installed_types()
    needing = [ct for ct in installed if SPECS[ct].needs_whisper_model]
    if not needing:
        return installed
    from morag.models import check_whisper_model

    status = check_whisper_model(whisper_model)
    if status.ok:
        return installed
    log.error("not offering %s: %s", ", ".join(needing), status.problem)
    return tuple(ct for ct in installed if ct not in needing)


_instances: dict[str, Processor] = {}


def get_processor(content_type: str) -> Processor:
    if content_type not in SPECS:
        raise KeyError(f"no processor for content type {content_type!r}")
    if content_type not in _instances:
        module_name, class_name = SPECS[content_type].factory.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        _instances[content_type] = cls()
    return _instances[content_type]


def transcriber() -> Transcriber:
    """The audio processor, as video and youtube use it (through ``ProcessContext.nested``)."""
    return get_processor("audio")
