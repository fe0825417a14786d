"""Uploads in the shared directory, and how a worker gets them.

A file is known by a server-chosen id (32 hex digits) and its SHA-256; a client-supplied
name is only ever displayed. Workers read ``<shared>/uploads/<id>`` when they see the
share, and otherwise download it from the API with the worker token.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from morag.config import Settings
from morag.job_record import Source

log = logging.getLogger(__name__)

FILE_ID = re.compile(r"^[0-9a-f]{32}$")
CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    pass


class FileUnavailable(Exception):
    pass


@dataclass(frozen=True)
class StoredFile:
    file_id: str
    sha256: str
    size: int
    head: bytes


def upload_path(uploads_dir: Path, file_id: str) -> Path:
    """The only way from a file id to a path: the id must be exactly 32 hex digits."""
    if not FILE_ID.fullmatch(file_id):
        raise FileUnavailable(f"invalid file id {file_id!r}")
    return uploads_dir / file_id


def store_upload(src: BinaryIO, uploads_dir: Path, file_id: str, max_bytes: int) -> StoredFile:
    """Stream ``src`` into the shared dir, hashing as it goes; refuse past ``max_bytes``."""
    uploads_dir.mkdir(parents=True, exist_ok=True)
    final = upload_path(uploads_dir, file_id)
    partial = final.with_suffix(".part")
    digest = hashlib.sha256()
    size = 0
    head = b""
    try:
        with open(partial, "wb") as out:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise UploadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                if len(head) < 64:
                    head = (head + chunk)[:64]
                digest.update(chunk)
                out.write(chunk)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return StoredFile(file_id, digest.hexdigest(), size, head)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def remove_upload(uploads_dir: Path, file_id: str) -> None:
    with contextlib.suppress(FileUnavailable, OSError):
        upload_path(uploads_dir, file_id).unlink(missing_ok=True)


def fetch_for_worker(settings: Settings, source: Source, dest_dir: Path) -> tuple[Path, str]:
    """Return a local path for the job's upload and how it got here (``shared`` or ``http``)."""
    if not source.file_id or not source.sha256:
        raise FileUnavailable("the job names no upload (file_id and sha256 are missing)")
    file_id, sha = source.file_id, source.sha256
    shared = upload_path(settings.uploads_dir, file_id)
    if shared.is_file() and sha256_of(shared) == sha:
        return shared, "shared"
    if settings.worker_token is None:
        raise FileUnavailable(
            "the upload is not in the shared directory and MORAG_WORKER_TOKEN is not set"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / file_id
    url = f"{settings.api_url.rstrip('/')}/api/v1/files/{file_id}"
    headers = settings.worker_headers()
    try:
        verify = settings.api_tls_verify()
    except OSError as exc:  # a missing or unreadable MORAG_API_CA_FILE
        raise FileUnavailable(f"cannot load MORAG_API_CA_FILE: {exc}") from exc
    deadline = time.monotonic() + settings.download_retry_seconds
    pause = 0.5
    while True:
        try:
            digest = _download(url, headers, verify, dest)
            break
        except _Transient as exc:
            if time.monotonic() + pause > deadline:
                raise FileUnavailable(f"download of the upload failed: {exc}") from exc
            log.warning("download of upload %s failed (%s); again in %.1fs", file_id, exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
    if digest.hexdigest() != sha:
        dest.unlink(missing_ok=True)
        raise FileUnavailable("the downloaded upload does not match its checksum")
    return dest, "http"


class _Transient(Exception):
    """A download failure that another try may not meet (connection, 502/503/504)."""


# What a load balancer or an API answers while a host is lost or Redis fails over.
TRANSIENT_STATUS = frozenset({502, 503, 504})


def tls_refused(exc: BaseException, kind: type[ssl.SSLError] = ssl.SSLError) -> bool:
    """Did TLS itself fail (any ``kind``: an untrusted certificate, a wrong name), somewhere
    in the chain?"""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _download(url: str, headers: dict[str, str], verify: Any, dest: Path) -> Any:
    """GET url into dest; the sha256 of what arrived. _Transient for what a retry may mend,
    FileUnavailable for an answer that will not change (404, 403, ...)."""
    digest = hashlib.sha256()
    try:
        with httpx.stream("GET", url, headers=headers, timeout=60.0, verify=verify) as resp:
            if resp.status_code in TRANSIENT_STATUS:
                raise _Transient(f"HTTP {resp.status_code}")
            if resp.status_code != 200:
                raise FileUnavailable(f"download of the upload failed: HTTP {resp.status_code}")
            with open(dest, "wb") as out:
                for chunk in resp.iter_bytes(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    except httpx.TransportError as exc:
        if tls_refused(exc):  # a certificate that does not verify will not start to
            raise FileUnavailable(f"download of the upload failed: {exc}") from exc
        raise _Transient(str(exc) or type(exc).__name__) from exc
    except httpx.HTTPError as exc:
        raise FileUnavailable(f"download of the upload failed: {exc}") from exc
    return digest


def scratch_dir(settings: Settings, task_id: str) -> Path:
    path = settings.work_dir / task_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def drop_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
