"""Split extracted text into overlapping chunks, following Markdown structure.

Blocks are headings, tables and paragraphs (blank-line separated). A chunk never spans
two sections (a heading starts a new chunk) and tables stay whole when they fit. Blocks
longer than the chunk size are cut at sentence or word boundaries. Consecutive chunks of
a section share ``overlap`` characters of context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEADING = re.compile(r"^#{1,6}\s+\S")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    section: str


def _blocks(text: str) -> list[tuple[str, str]]:
    """(kind, text) blocks: ``heading``, ``table`` or ``text``."""
    blocks: list[tuple[str, str]] = []
    current: list[str] = []
    kind = "text"

    def flush() -> None:
        nonlocal current
        if current and "".join(current).strip():
            blocks.append((kind, "\n".join(current).strip()))
        current = []

    for line in text.splitlines():
        stripped = line.strip()
        if _HEADING.match(stripped):
            flush()
            blocks.append(("heading", stripped))
            kind = "text"
            continue
        is_table = stripped.startswith("|")
        if not stripped or (current and is_table != (kind == "table")):
            flush()
        if stripped:
            kind = "table" if is_table else "text"
            current.append(line.rstrip())
    flush()
    return blocks


def _split_long(text: str, size: int) -> list[str]:
    """Cut text longer than ``size`` at sentence ends, then at spaces, then hard."""
    pieces: list[str] = []
    unit_re = _SENTENCE_END if "\n" not in text else re.compile(r"\n")
    units = [u for u in unit_re.split(text) if u.strip()]
    buf = ""
    for unit in units:
        while len(unit) > size:
            cut = unit.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            if buf:
                pieces.append(buf)
                buf = ""
            pieces.append(unit[:cut].strip())
            unit = unit[cut:].strip()
        joiner = "\n" if unit_re.pattern == r"\n" else " "
        if buf and len(buf) + 1 + len(unit) > size:
            pieces.append(buf)
            buf = unit
        else:
            buf = f"{buf}{joiner}{unit}" if buf else unit
    if buf:
        pieces.append(buf)
    return pieces


def _tail(text: str, overlap: int) -> str:
    if overlap <= 0 or len(text) <= overlap:
        return text if overlap > 0 else ""
    cut = text.find(" ", len(text) - overlap)
    return text[cut + 1 :] if cut != -1 else text[-overlap:]


def chunk_markdown(text: str, size: int = 1000, overlap: int = 150) -> list[Chunk]:
    """Chunks of at most about ``size`` characters (plus the heading line and overlap)."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than size")
    chunks: list[str] = []
    sections: list[str] = []
    section = ""
    buf = ""

    def emit() -> None:
        nonlocal buf
        body = buf.strip()
        if body:
            chunks.append(f"{section}\n\n{body}" if section else body)
            sections.append(section.lstrip("# ").strip())
        buf = ""

    for kind, block in _blocks(text):
        if kind == "heading":
            emit()
            section = block
            continue
        parts = [block] if len(block) <= size else _split_long(block, size)
        for part in parts:
            if buf and len(buf) + 2 + len(part) > size:
                previous = buf
                emit()
                # Tables are not cut into overlap fragments; prose carries its tail on.
                buf = "" if kind == "table" else _tail(previous, overlap)
            buf = f"{buf}\n\n{part}" if buf else part
    emit()
    return [Chunk(i, t, s) for i, (t, s) in enumerate(zip(chunks, sections, strict=True))]
