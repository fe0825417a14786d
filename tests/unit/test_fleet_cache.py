"""The API's fleet cache (morag.fleet.CachedFleet) on a real Redis: a due read never stalls a
caller that has a state, and the freshness it promised before still holds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from morag import fleet

from tests.conftest import RedisServer, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url(redis_server.fresh_db()))
    yield client
    client.flushdb()
    client.close()


def beat(client: redis.Redis, name: str) -> None:
    fleet.publish(client, {"name": name, "queues": ["gpu-tasks"], "processors": ["audio"]}, 60)


def names(state: Any) -> list[str]:
    return sorted(w.name for w in state.snapshot.workers)


def test_a_due_read_does_not_stall_the_caller(admin: redis.Redis) -> None:
    """Redis answers nothing for 3 s (CLIENT PAUSE): a caller with a state gets it at once,
    and the read made in the background shows the new worker once Redis answers again.
    Before: get() read in the caller's thread, and waited the whole pause."""
    beat(admin, "gpu0@a")
    clock = Clock()
    cache = fleet.CachedFleet(admin, 1.0, 1.0, clock)
    assert names(cache.get()) == ["gpu0@a"]
    beat(admin, "gpu0@b")
    clock.now += 1.0  # due, not late (under twice max_age)
    admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")
    began = time.monotonic()
    assert names(cache.get()) == ["gpu0@a"]
    # Well inside the pause, even on a loaded machine.
    assert time.monotonic() - began < 1.5
    wait_until(lambda: names(cache.get()) == ["gpu0@a", "gpu0@b"], 15, "the background read")


def test_a_state_older_than_twice_max_age_is_read_at_once(admin: redis.Redis) -> None:
    """An API nobody asked for a while routes on what Redis says now (as before)."""
    beat(admin, "gpu0@a")
    clock = Clock()
    cache = fleet.CachedFleet(admin, 1.0, 0.25, clock)
    assert names(cache.get()) == ["gpu0@a"]
    fleet.withdraw(admin, "gpu0@a")
    clock.now += 0.5
    assert names(cache.get()) == ["gpu0@a"]  # fresh: served from the cache
    clock.now += 2.0
    assert names(cache.get()) == []


def test_max_age_zero_reads_every_time(admin: redis.Redis) -> None:
    cache = fleet.CachedFleet(admin, 0)
    assert names(cache.get()) == []
    beat(admin, "gpu0@a")
    assert names(cache.get()) == ["gpu0@a"]
    fleet.withdraw(admin, "gpu0@a")
    assert names(cache.get()) == []


def test_reused_heartbeats_are_the_values_read(admin: redis.Redis) -> None:
    """Heartbeats parsed at the previous read are reused only for the same bytes."""
    parsed: dict[bytes, dict[str, Any]] = {}
    beat(admin, "gpu0@a")
    first = fleet.read_fleet(admin, parsed).heartbeats
    assert fleet.read_fleet(admin, parsed).heartbeats[0] is first[0]
    fleet.publish(admin, {"name": "gpu0@a", "queues": ["celery"], "processors": []}, 60)
    again = fleet.read_fleet(admin, parsed)
    assert again.heartbeats[0]["queues"] == ["celery"] and len(parsed) == 1
    assert fleet.read_fleet(admin).heartbeats == again.heartbeats
