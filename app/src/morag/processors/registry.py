"""Processors by content type, imported lazily so a worker loads only what it runs."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass
from functools import cache

from morag.processors.base import Processor


@dataclass(frozen=True)
class ProcessorSpec:
    content_type: str
    factory: str  # "module:Class"
    python_modules: tuple[str, ...] = ()
    executables: tuple[str, ...] = ()

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.python_modules) and all(
            shutil.which(e) is not None for e in self.executables
        )


SPECS: dict[str, ProcessorSpec] = {
    spec.content_type: spec
    for spec in (
        ProcessorSpec("audio", "morag.processors.audio:AudioProcessor", ("faster_whisper",)),
        ProcessorSpec(
            "video",
            "morag.processors.video:VideoProcessor",
            ("faster_whisper", "ffmpeg"),
            ("ffmpeg", "ffprobe"),
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
        ),
    )
}


def known_types() -> list[str]:
    return sorted(SPECS)


@cache
def installed_types() -> tuple[str, ...]:
    """Content types this host can process (its extras and tools are installed)."""
    return tuple(sorted(ct for ct, spec in SPECS.items() if spec.installed()))


_instances: dict[str, Processor] = {}


def get_processor(content_type: str) -> Processor:
    if content_type not in SPECS:
        raise KeyError(f"no processor for content type {content_type!r}")
    if content_type not in _instances:
        module_name, class_name = SPECS[content_type].factory.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        _instances[content_type] = cls()
    return _instances[content_type]
