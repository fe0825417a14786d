"""Pure input handling: content detection, file ids, URLs, GPU error classification."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from morag import files, urls
from morag.execution import owner_is_dead
from morag.processors.base import GpuFailure, is_gpu_failure
from morag.processors.detect import detect_content_type


@pytest.mark.parametrize(
    "head,name,expected",
    [
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "a.wav", "audio"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "", "audio"),
        (b"ID3\x04\x00", "a.mp3", "audio"),
        (b"fLaC\x00\x00", "x", "audio"),
        (b"OggS\x00\x02", "x.ogg", "audio"),
        (b"hello world", "a.wav", None),
        (b"\x00\x01\x02binary", "a.wav", None),
    ],
)
def test_detect_content_type(head: bytes, name: str, expected: str | None) -> None:
    assert detect_content_type(head, name) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "../etc/passwd",
        "..",
        "",
        "A" * 32,
        "0" * 31,
        "0" * 32 + "/x",
        "0" * 32 + ".part",
    ],
)
def test_file_ids_cannot_become_other_paths(bad: str, tmp_path: Path) -> None:
    with pytest.raises(files.FileUnavailable):
        files.upload_path(tmp_path, bad)


def test_store_upload_hashes_and_caps(tmp_path: Path) -> None:
    stored = files.store_upload(io.BytesIO(b"abc" * 10), tmp_path, "a" * 32, max_bytes=100)
    assert stored.size == 30 and stored.head == (b"abc" * 10)
    assert stored.sha256 == files.sha256_of(tmp_path / ("a" * 32))
    with pytest.raises(files.UploadTooLarge):
        files.store_upload(io.BytesIO(b"x" * 101), tmp_path, "b" * 32, max_bytes=100)
    assert not (tmp_path / ("b" * 32)).exists() and not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize(
    "url,allow",
    [
        ("ftp://example.com/a", []),
        ("http://127.0.0.1/a.wav", []),
        ("http://localhost/a.wav", []),
        ("http://10.0.0.1/a", []),
        ("http://192.168.1.5/a", ["10.0.0.0/8"]),
        ("http://169.254.169.254/latest", []),
        ("http://[::1]/a", []),
        ("http:///nohost", []),
    ],
)
def test_refused_urls(url: str, allow: list[str]) -> None:
    with pytest.raises(urls.UrlRefused):
        urls.check_url(url, allow)


@pytest.mark.parametrize("allow", [["127.0.0.1"], ["127.0.0.0/8"], ["localhost"]])
def test_allowlist_permits_local_targets(allow: list[str]) -> None:
    host = "localhost" if allow == ["localhost"] else "127.0.0.1"
    assert urls.check_url(f"http://{host}:8000/a.wav", allow)


@pytest.mark.parametrize(
    "exc,gpu",
    [
        (RuntimeError("CUDA failed with error out of memory"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (
            RuntimeError("Library libcublas.so.12 is not found or cannot be loaded"),
            True,
        ),
        (GpuFailure("no device"), True),
        (RuntimeError("invalid data found when processing input"), False),
        (ValueError("CUDA out of memory"), False),
    ],
)
def test_gpu_failure_classification(exc: BaseException, gpu: bool) -> None:
    assert is_gpu_failure(exc) is gpu


def test_lease_takeover_only_for_dead_children_of_this_worker() -> None:
    import os

    assert owner_is_dead("gpu0@h/999999999", "gpu0@h") is True
    assert owner_is_dead(f"gpu0@h/{os.getpid()}", "gpu0@h") is False
    assert owner_is_dead("gpu1@h/999999999", "gpu0@h") is False
