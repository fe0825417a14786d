"""Images: text by OCR (Debian's tesseract) plus size and format from Pillow."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from morag.processors.base import ProcessContext, ProcessingError

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
    try:
        done = subprocess.run(
            ["tesseract", str(path), "stdout", "-l", languages],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProcessingError(f"OCR took longer than {timeout}s") from exc
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise ProcessingError(f"OCR failed: {detail[-1] if detail else 'tesseract failed'}")
    return done.stdout.decode(errors="replace")


class ImageProcessor:
    content_type = "image"
    fetches_url = False

    def process(self, path: Path, options: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
        info = image_info(path)
        languages = str(options.get("ocr_languages") or ctx.settings.ocr_languages)
        if not LANGUAGES.fullmatch(languages):
            raise ProcessingError(f"invalid OCR language list {languages!r} (e.g. eng+deu)")
        text = ocr(path, languages)
        lines = [line.strip() for line in text.splitlines()]
        content = "\n".join(line for line in lines if line).strip()
        return {
            "content": content,
            "metadata": {**info, "ocr": "tesseract", "ocr_languages": languages, "device": "cpu"},
        }
