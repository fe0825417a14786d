"""Content type from a file's first bytes (and, as a tie-breaker, its name).

The client's file name never decides alone: a ``.wav`` that holds text is not audio.
"""

from __future__ import annotations

AUDIO_EXTENSIONS = {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff"}


def _is_mp3_frame(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0


def detect_content_type(head: bytes, filename: str = "") -> str | None:
    """Return ``audio`` (or another registered type) for these leading bytes, else None."""
    name = filename.lower()
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio"
    if head[:4] in (b"fLaC", b"OggS") or head[:3] == b"ID3":
        return "audio"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio"
    if head[4:8] == b"ftyp" and head[8:11] in (b"M4A", b"M4B"):
        return "audio"
    if _is_mp3_frame(head) and (name.endswith((".mp3", ".aac")) or not name):
        return "audio"
    return None
