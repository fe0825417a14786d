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
from tests.tls import ca_and_server_cert

REDIS_PASSWORD = "test-redis-password"  # Redis' `default` user: the tests' own admin account


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_tls() -> bool:
    """Whether the tests' Redis speaks TLS only, as the redis role ships it for a Redis the
    fleet reaches over the network (the default; MORAG_TEST_REDIS_TLS=0 for plain TCP)."""
    return os.environ.get("MORAG_TEST_REDIS_TLS", "1") != "0"


def redis_listen_args(workdir: Path, port: int) -> tuple[list[str], Path | None]:
    """redis-server arguments for ``port`` and the CA its clients verify (None: plain TCP).
    With TLS, as the role configures it: the TLS port only, server certificate from a CA,
    clients authenticated by their ACL password (not by certificate)."""
    if not redis_tls():
        return ["--port", str(port)], None
    ca, crt, key = ca_and_server_cert(workdir / "tls")
    args = ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
    args += ["--tls-cert-file", str(crt), "--tls-key-file", str(key)]
    args += ["--tls-ca-cert-file", str(ca)]
    return args, ca


def admin_url(port: int, db: int = 0, ca: Path | None = None) -> str:
    """The admin (`default` user) URL: the tests' own reads, writes and cleanup."""
    if ca is None:
        return f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/{db}"
    return f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{port}/{db}{redis_acl.tls_query(ca)}"


class RedisServer:
    def __init__(self, port: int, ca: Path | None = None) -> None:
        self.port = port
        self.ca = ca
        self._dbs = itertools.count(1)

    def url(self, db: int = 0) -> str:
        """The admin (`default` user) URL: the tests' own reads, writes and cleanup."""
        return admin_url(self.port, db, self.ca)

    def role_urls(self, db: int) -> dict[str, str]:
        """The URLs of the role's ACL users (api, worker, store) on database ``db``."""
        return redis_acl.urls(self.port, db, self.ca)

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
    password and the ACL users of roles/redis (the app's processes log in as those), over
    TLS unless MORAG_TEST_REDIS_TLS=0."""
    port = free_port()
    listen, ca = redis_listen_args(workdir, port)
    proc = spawn_redis(
        workdir,
        *[*listen, "--appendonly", "no", "--requirepass", REDIS_PASSWORD],
        *["--databases", "256", *redis_acl.server_args()],
    )
    server = RedisServer(port, ca)
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
