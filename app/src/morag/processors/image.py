"""Images: text by OCR (Debian's tesseract) plus size and format from Pillow."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from morag.processors.base import ProcessContext, ProcessingError
from morag.tools import last_line, run_tool

OCR_TIMEOUT = 300
LANGUAGES = re.compile(r"^[A-Za-z_]+(\+[A-Za-z_]+)*$")  # tesseract's -l syntax: eng+deu


def image_info(path: Path) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            return {
                "format": img.format,
                "width": img.width,
                "height": img.height,
                "mode": img.mode,
                "frames": getattr(img, "n_frames", 1),
            }
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ProcessingError(f"cannot read the image: {exc}") from exc


def ocr(path: Path, languages: str, timeout: float = OCR_TIMEOUT) -> str:
    done = run_tool(
        ["tesseract", str(path), "stdout", "-l", languages], timeout=timeout, what="OCR"
    )
    if done.returncode != 0:
        raise ProcessingError(f"OCR failed: {last_line(done.stderr, 'tesseract failed')}")
    return done.stdout.decode(errors="replace")


class ImageProcessor:
    content_type = "image"
    fetches_url = False

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        info = image_info(path)
        languages = str(options.get("ocr_languages") or ctx.settings.ocr_languages)
        if not LANGUAGES.fullmatch(languages):
            raise ProcessingError(f"invalid OCR language list {languages!r} (e.g. eng+deu)")
        text = ocr(path, languages, ctx.settings.tool_timeout)
        lines = [line.strip() for line in text.splitlines()]
        content = "\n".join(line for line in lines if line).strip()
        return {
            "content": content,
            "metadata": {**info, "ocr": "tesseract", "ocr_languages": languages, "device": "cpu"},
        }
