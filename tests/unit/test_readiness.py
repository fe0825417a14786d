"""/ready within MORAG_READY_TIMEOUT whatever Redis does, its grace during a Sentinel failover
(morag.api.readiness), and the Sentinel clients' retry that lasts a failover, not a count
(morag.redis_client.FailoverRetry). Against real sockets: one that refuses, one that accepts
and never answers (a frozen primary). The failover itself: tests/integration/test_sentinel.py.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from morag.api.readiness import Checks, ReadinessProbe
from morag.config import Settings
from morag.redis_client import FailoverRetry, redis_client
from morag.submission import build_services


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(tmp_path: Path, port: int, **settings: Any) -> ReadinessProbe:
    values: dict[str, Any] = {
        "redis_url": f"redis://127.0.0.1:{port}/0",
        "uploads_dir": tmp_path / "uploads",
        "ready_timeout": 0.5,
    }
    return ReadinessProbe(build_services(Settings(**{**values, **settings})))


def test_an_unanswered_check_answers_at_the_timeout(tmp_path: Path, silent_port: int) -> None:
    probe = _probe(tmp_path, silent_port)
    try:
        t0 = time.monotonic()
        status, body = asyncio.run(probe.report())
        took = time.monotonic() - t0
    finally:
        probe.close()
    assert status == 503, body
    assert body["status"] == "not ready"
    assert body["checks"]["redis"].startswith("unavailable: no answer within MORAG_READY_TIMEOUT")
    assert body["checks"]["shared_dir"] == "ok"
    # Its own timeout, not the API client's 5 s socket timeout and retries.
    assert took < 3, took


def test_concurrent_requests_share_one_check(tmp_path: Path, silent_port: int) -> None:
    """A balancer checking every second while Redis hangs must not pile up threads."""
    probe = _probe(tmp_path, silent_port, ready_timeout=0.3)

    async def many() -> list[tuple[int, dict[str, Any]]]:
        return await asyncio.gather(*(probe.report() for _ in range(20)))

    try:
        answers = asyncio.run(many())
        assert probe._executor._max_workers == 1
        assert {status for status, _ in answers} == {503}
    finally:
        probe.close()


def test_a_refused_redis_is_not_ready_without_sentinel(tmp_path: Path) -> None:
    probe = _probe(tmp_path, _closed_port())
    try:
        status, body = asyncio.run(probe.report())
    finally:
        probe.close()
    assert (status, body["checks"]["redis"]) == (503, "unavailable: ConnectionError"), body


def test_a_failover_is_degraded_within_the_grace(tmp_path: Path) -> None:
    probe = _probe(tmp_path, _closed_port(), ready_redis_grace=10)
    down = Checks(redis="TimeoutError")
    try:
        assert probe._verdict(Checks(), 100.0)[1]["status"] == "ready"
        status, body = probe._verdict(down, 200.0)
        assert (status, body["status"], body["checks"]["redis"]) == (200, "degraded", "ok")
        assert "MORAG_READY_REDIS_GRACE" in body["checks"]["redis_failover"]
        assert probe._verdict(down, 209.5)[0] == 200
        # Still down once the grace has passed: out of the balancer.
        status, body = probe._verdict(down, 210.0)
        assert (status, body["checks"]["redis"]) == (503, "unavailable: TimeoutError"), body
        # Back: ready, and a new outage has the whole grace again.
        assert probe._verdict(Checks(), 211.0)[0] == 200
        assert probe._verdict(down, 300.0)[0] == 200
    finally:
        probe.close()


def test_the_grace_defaults_to_the_failover_seconds_with_sentinel_only() -> None:
    assert Settings().ready_redis_grace_seconds() == 0
    assert Settings(redis_sentinels="10.0.0.5:26379").ready_redis_grace_seconds() == 15
    assert (
        Settings(redis_sentinels="10.0.0.5:26379", ready_redis_grace=3).ready_redis_grace_seconds()
        == 3
    )


class _Flaky:
    """Fails ``times`` times (a connection error), then answers."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.times:
            raise redis.ConnectionError("gone")
        return "ok"


def test_the_failover_retry_lasts_its_seconds_not_a_count() -> None:
    flaky = _Flaky(4)  # more failures than the two retries of before
    failed: list[Exception] = []
    assert FailoverRetry(30).call_with_retry(flaky, failed.append) == "ok"
    assert flaky.calls == 5 and len(failed) == 4

    never = _Flaky(10**6)
    t0 = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        FailoverRetry(1.5).call_with_retry(never, lambda _e: None)
    took = time.monotonic() - t0
    assert 0.5 < took < 5, took  # about its 1.5 s (backoffs of 0.25-1 s), not for ever
    assert never.calls >= 2

    # Other errors are not retried.
    def refused() -> None:
        raise redis.ResponseError("NOPERM")

    with pytest.raises(redis.ResponseError):
        FailoverRetry(30).call_with_retry(refused, lambda _e: None)


def test_sentinel_clients_get_the_failover_retry() -> None:
    s = Settings(
        redis_url="redis://u:p@ignored:6379/0",
        redis_sentinels="127.0.0.1:26379",
        redis_failover_seconds=42,
    )
    retry = redis_client(s).connection_pool.connection_kwargs["retry"]
    assert isinstance(retry, FailoverRetry) and retry.seconds == 42
    assert redis_client(s).connection_pool.connection_kwargs["socket_connect_timeout"] == 3.0
    # Without Sentinel the client is MORAG_REDIS_URL's as it stands.
    plain = redis_client(Settings(redis_url="redis://127.0.0.1:6379/0"))
    assert not isinstance(plain.connection_pool.connection_kwargs.get("retry"), FailoverRetry)


def test_a_hung_shared_dir_is_named_not_redis(
    tmp_path: Path, redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hard NFS mount whose server is gone hangs the directory check, not Redis."""
    db = redis_server.fresh_db()
    probe = _probe(tmp_path, 0, redis_url=redis_server.role_urls(db)["api"])  # the role's user
    release = threading.Event()
    real_mkdir = Path.mkdir

    def hanging_mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == probe.services.settings.uploads_dir:
            release.wait(30)
        real_mkdir(self, *args, **kwargs)

    try:
        assert asyncio.run(probe.report())[0] == 200
        monkeypatch.setattr(Path, "mkdir", hanging_mkdir)
        status, body = asyncio.run(probe.report())
        assert status == 503, body
        assert body["checks"]["redis"] == "ok"
        assert body["checks"]["shared_dir"].startswith("unavailable: no answer within"), body
    finally:
        release.set()
        probe.close()
