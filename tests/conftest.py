"""Shared fixtures: a real Redis server on a free loopback port, and real speech files."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import redis_acl

REDIS_PASSWORD = "test-redis-password"  # Redis' `default` user: the tests' own admin account


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self._dbs = itertools.count(1)

    def url(self, db: int = 0) -> str:
        """The admin (`default` user) URL: the tests' own reads, writes and cleanup."""
        return f"redis://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/{db}"

    def role_urls(self, db: int) -> dict[str, str]:
        """The URLs of the role's ACL users (api, worker, store) on database ``db``."""
        return redis_acl.urls(self.port, db)

    def fresh_db(self) -> int:
        db = next(self._dbs)
        admin = redis.Redis.from_url(self.url(db))
        admin.flushdb()
        redis_acl.allow_database(admin, db)
        return db


def spawn_redis(workdir: Path, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start redis-server on loopback without RDB snapshots, in ``workdir``; ``args`` add the
    port, persistence, password, ACL users, TLS. The one place tests start Redis."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run `make test` (it installs it)")
    command = [exe, "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir), *args]
    if log is None:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL)
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@contextlib.contextmanager
def running_redis(workdir: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server on a free loopback port, no persistence, with an admin
    password and the ACL users of roles/redis (the app's processes log in as those)."""
    port = free_port()
    proc = spawn_redis(
        workdir,
        *["--port", str(port), "--appendonly", "no", "--requirepass", REDIS_PASSWORD],
        *["--databases", "256", *redis_acl.server_args()],
    )
    server = RedisServer(port)
    try:
        wait_until(lambda: answers(redis.Redis.from_url(server.url())), 5, "redis-server", 0.05)
        yield server
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def speak(text: str, path: Path) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: run `make test` (it installs it)")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    return path


SENTENCE = "Please send the report to the office before Friday."


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def speech_wav(media_dir: Path) -> Path:
    return speak(SENTENCE, media_dir / "speech.wav")


@pytest.fixture(autouse=True, scope="session")
def _quiet_env() -> None:
    # Tests never reach a hub; the bundled model is used.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
