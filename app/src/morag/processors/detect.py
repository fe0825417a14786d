"""Content type from a file's first bytes (and, as a tie-breaker, its name).

The client's file name never decides alone: a ``.wav`` that holds text is not audio.
The name only separates formats that share a container (ZIP for Office files, plain
UTF-8 text for Markdown).
"""

from __future__ import annotations

AUDIO_EXTENSIONS = {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff"}
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"}
OFFICE_EXTENSIONS = {".docx", ".pptx", ".xlsx"}
TEXT_EXTENSIONS = {".md", ".markdown", ".txt"}
HTML_EXTENSIONS = {".html", ".htm"}


def _is_mp3_frame(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0


def _audio(head: bytes, name: str) -> bool:
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return True
    if head[:4] in (b"fLaC", b"OggS") or head[:3] == b"ID3":
        return True
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return True
    if head[4:8] == b"ftyp" and head[8:11] in (b"M4A", b"M4B"):
        return True
    return _is_mp3_frame(head) and (name.endswith((".mp3", ".aac")) or not name)


def _video(head: bytes) -> bool:
    if head[4:8] == b"ftyp":  # ISO base media (mp4, mov); M4A/M4B are caught as audio first
        return True
    if head[:4] == b"\x1a\x45\xdf\xa3":  # Matroska / WebM
        return True
    return head[:4] == b"RIFF" and head[8:12] == b"AVI "


def _image(head: bytes) -> bool:
    return (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")
        or head[:6] in (b"GIF87a", b"GIF89a")
        or head[:4] in (b"II*\x00", b"MM\x00*")
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        or (head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00")  # BMP, reserved zeros
    )


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end is fine
        return exc.start >= len(head) - 3
    return True


def _html(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def detect_content_type(head: bytes, filename: str = "") -> str | None:
    """Return ``audio``, ``video``, ``image`` or ``document`` for these leading bytes."""
    name = filename.lower()
    ext = name[name.rfind(".") :] if "." in name else ""
    if _audio(head, name):
        return "audio"
    if _video(head):
        return "video"
    if _image(head):
        return "image"
    if head.startswith(b"%PDF-"):
        return "document"
    if head.startswith(b"PK\x03\x04") and ext in OFFICE_EXTENSIONS:
        return "document"
    if _looks_like_text(head) and (_html(head) or ext in TEXT_EXTENSIONS | HTML_EXTENSIONS):
        return "document"
    return None
