"""Content detection, Markdown chunking and the vector store filter."""

from __future__ import annotations

import itertools

import pytest
from morag.processors.detect import detect_content_type
from morag.vectors.chunking import chunk_markdown
from morag.vectors.store import build_filter, point_id


@pytest.mark.parametrize(
    ("head", "name", "expected"),
    [
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "a.wav", "audio"),
        (b"\x00\x00\x00\x20ftypisom\x00\x00", "v.mp4", "video"),
        (b"\x00\x00\x00\x20ftypM4A \x00\x00", "a.m4a", "audio"),
        (b"\x1a\x45\xdf\xa3\x01\x00", "v.webm", "video"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "x.png", "image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "x.jpg", "image"),
        (b"%PDF-1.7\n", "x.pdf", "document"),
        (b"PK\x03\x04\x14\x00", "x.docx", "document"),
        (b"PK\x03\x04\x14\x00", "x.zip", None),
        (b"<!DOCTYPE html><html>", "", "document"),
        (b"# Title\n\nSome text", "notes.md", "document"),
        (b"# Title\n\nSome text", "notes.bin", None),
        (b"\x00\x01\x02\x03", "data.xyz", None),
        (b"BMx text that is not a bitmap", "x.md", "document"),
    ],
)
def test_detect(head: bytes, name: str, expected: str | None) -> None:
    assert detect_content_type(head, name) == expected


def test_chunks_follow_headings_and_keep_tables() -> None:
    table = "| a | b |\n|---|---|\n| 1 | 2 |"
    text = f"# One\n\nFirst para.\n\n{table}\n\n# Two\n\n" + ("Sentence here. " * 60)
    chunks = chunk_markdown(text, size=200, overlap=40)
    assert chunks[0].section == "One" and table in chunks[0].text
    rest = [c for c in chunks if c.section == "Two"]
    assert len(rest) > 2 and all(c.text.startswith("# Two") for c in rest)
    assert all(len(c.text) <= 200 + len("# Two\n\n") + 40 for c in rest)
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_chunk_overlap_carries_context() -> None:
    text = " ".join(f"Word{i}." for i in range(200))
    chunks = chunk_markdown(text, size=300, overlap=50)
    for a, b in itertools.pairwise(chunks):
        assert a.text.split()[-1] in b.text


def test_empty_text_has_no_chunks() -> None:
    assert chunk_markdown("", 100, 10) == []


def test_filter_keys_and_point_ids() -> None:
    flt = build_filter({"source": "a.pdf", "team": "x"})
    assert [c.key for c in flt.must] == ["source", "metadata.team"]
    assert point_id("job", 1) == point_id("job", 1) != point_id("job", 2)
