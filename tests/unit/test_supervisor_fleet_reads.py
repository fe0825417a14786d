"""Which workers read the whole fleet on a heartbeat tick (morag.supervisor.Supervisor.tick).

Every worker used to read every heartbeat on every tick, although only the workers that may
rescue gpu-tasks and the one holding the watchdog lock use it: the fleet's reads grew with
its square (1,000 workers: 200 reads a second of 1.2 MB, tests/bench/fleet_scale.py). A
real Redis; the only stand-in is Celery's consumer, of which the supervisor reads its name,
queues and pool size.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from morag import fleet, supervisor, watchdog
from morag.config import CPU_QUEUE, GPU_QUEUE, Settings

from tests.conftest import RedisServer


@pytest.fixture
def db_url(redis_server: RedisServer) -> Iterator[str]:
    db = redis_server.fresh_db()
    yield redis_server.url(db)
    redis.Redis.from_url(redis_server.url(db)).flushdb()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the supervisor's whole-fleet reads (the real function still runs)."""
    calls: list[int] = []
    real = fleet.read_fleet

    def counted(client: Any, *args: Any, **kwargs: Any) -> fleet.FleetState:
        calls.append(1)
        return real(client, *args, **kwargs)

    monkeypatch.setattr(supervisor.fleet, "read_fleet", counted)
    return calls


def make(url: str, name: str, queue: str) -> supervisor.Supervisor:
    consumer = SimpleNamespace(
        hostname=name,
        task_consumer=SimpleNamespace(queues=[SimpleNamespace(name=queue)]),
        pool=SimpleNamespace(num_processes=1),
    )
    settings = Settings(redis_url=url, device="cpu", liveness_channel=False)
    return supervisor.Supervisor(consumer, settings)


def test_a_gpu_worker_without_the_watchdog_lock_reads_no_fleet(
    db_url: str, reads: list[int]
) -> None:
    admin = redis.Redis.from_url(db_url)
    admin.set(watchdog.WATCHDOG_LOCK, "someone-else", px=60_000)
    gpu = make(db_url, "gpu0@host", GPU_QUEUE)
    gpu.tick()
    gpu.tick()
    assert reads == [], "a GPU worker read the whole fleet without using it"
    assert fleet.read_heartbeats(admin), "its heartbeat was not published"


def test_the_watchdog_and_rescuing_cpu_workers_read_it(db_url: str, reads: list[int]) -> None:
    admin = redis.Redis.from_url(db_url)
    admin.set(watchdog.WATCHDOG_LOCK, "someone-else", px=60_000)
    cpu = make(db_url, "cpu0@host", CPU_QUEUE)
    cpu.tick()
    assert len(reads) == 1 and cpu.state is not None  # it may rescue gpu-tasks
    admin.delete(watchdog.WATCHDOG_LOCK)
    gpu = make(db_url, "gpu0@host", GPU_QUEUE)
    gpu.tick()  # takes the lock: the watchdog's work needs the fleet
    assert len(reads) == 2
    assert admin.get(watchdog.WATCHDOG_LOCK) == b"gpu0@host"
