"""The workers' routing summaries (morag.fleet): what the API routes on at a thousand
workers instead of parsing every full heartbeat, on a real Redis.

Before them the API's routing read parsed 1.2 MB of heartbeats (GPU telemetry, CUDA check,
warm-up...) a second at a thousand workers, holding the GIL its request threads needed:
routing p99 108 ms (docs/architecture.md, "Control-plane scale")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from morag import fleet, liveness

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


def heartbeat(name: str, channel: str | None = None, utilization: float = 0.5) -> dict[str, Any]:
    """A GPU worker's heartbeat as Supervisor.heartbeat writes it (the fields that matter)."""
    return {
        "name": name,
        "hostname": "gpu-host",
        "queues": ["gpu-tasks"],
        "consuming": ["gpu-tasks"],
        "device": "cuda",
        "processors": ["audio", "video"],
        "gpu_telemetry": [{"index": 0, "utilization": utilization}],
        "liveness": channel,
        "busy": False,
        "active": [],
        "updated_at": f"2026-12-03T00:00:{int(utilization * 10):02d}+00:00",
    }


def test_publish_writes_the_summary_beside_the_heartbeat(admin: redis.Redis) -> None:
    fleet.publish(admin, heartbeat("gpu0@a", "ch:a"), 60)
    summary = json.loads(admin.get(fleet.routing_key("gpu0@a")))
    assert summary == {
        "name": "gpu0@a",
        "queues": ["gpu-tasks"],
        "processors": ["audio", "video"],
        "device": "cuda",
        "busy": False,
        "liveness": "ch:a",
    }
    # Expires with the heartbeat: a host that vanished leaves routing within one TTL.
    assert abs(admin.pttl(fleet.routing_key("gpu0@a")) - admin.pttl("morag:worker:gpu0@a")) < 1000
    # The full heartbeat is where it always was (the workers page, /metrics, molecule).
    assert json.loads(admin.get("morag:worker:gpu0@a"))["gpu_telemetry"]
    fleet.withdraw(admin, "gpu0@a")
    assert admin.get(fleet.routing_key("gpu0@a")) is None
    assert fleet.read_routing(admin).workers == ()


def test_a_beat_that_changes_only_telemetry_writes_the_same_summary(admin: redis.Redis) -> None:
    """Unchanged bytes are not parsed again: the same view object comes back."""
    views: dict[bytes, fleet.WorkerView] = {}
    fleet.publish(admin, heartbeat("gpu0@a", utilization=0.1), 60)
    first_bytes = admin.get(fleet.routing_key("gpu0@a"))
    (first,) = fleet.read_routing(admin, views).workers
    fleet.publish(admin, heartbeat("gpu0@a", utilization=0.9), 60)
    assert admin.get(fleet.routing_key("gpu0@a")) == first_bytes
    (again,) = fleet.read_routing(admin, views).workers
    assert again is first
    fleet.publish(admin, {**heartbeat("gpu0@a"), "busy": True}, 60)
    (busy,) = fleet.read_routing(admin, views).workers
    assert busy.busy and len(views) == 1


def test_routing_does_not_parse_the_full_heartbeats(admin: redis.Redis) -> None:
    fleet.publish(admin, heartbeat("gpu0@a"), 60)
    admin.set("morag:worker:gpu0@a", b"\xff not JSON", keepttl=True)
    (view,) = fleet.read_routing(admin).workers
    assert (view.name, view.queues, view.device) == ("gpu0@a", ("gpu-tasks",), "cuda")


def test_a_worker_from_before_the_summaries_is_routed_on_its_heartbeat(
    admin: redis.Redis,
) -> None:
    """A rolling upgrade: an older worker writes its heartbeat and registry entry only."""
    fleet.publish(admin, heartbeat("gpu0@new"), 60)
    admin.set("morag:worker:gpu0@old", json.dumps(heartbeat("gpu0@old")), px=60_000)
    admin.sadd(fleet.REGISTRY, "gpu0@old")
    snap = fleet.read_routing(admin)
    assert [w.name for w in snap.workers] == ["gpu0@new", "gpu0@old"]
    assert snap.workers[1].processors == ("audio", "video")
    assert snap.queue_lengths == {"gpu-tasks": 0, "celery": 0, "morag-store": 0}


def test_an_expired_worker_leaves_routing_and_the_registry(admin: redis.Redis) -> None:
    fleet.publish(admin, heartbeat("gpu0@a"), 60)
    fleet.publish(admin, heartbeat("gpu0@gone"), 60)
    admin.delete("morag:worker:gpu0@gone", fleet.routing_key("gpu0@gone"))  # as at expiry
    assert [w.name for w in fleet.read_routing(admin).workers] == ["gpu0@a"]
    assert admin.smembers(fleet.REGISTRY) == {b"gpu0@a"}


def test_a_killed_worker_leaves_the_routing_snapshot_at_the_next_liveness_check(
    admin: redis.Redis,
) -> None:
    """The API's routing cache (CachedFleet.routing): the worker's process died (its
    subscription closed), its heartbeat and summary still live; at the next liveness check
    (here: the clock moved one interval) routing no longer counts it."""
    db = int(admin.connection_pool.connection_kwargs.get("db") or 0)
    subscriber = redis.Redis(connection_pool=admin.connection_pool).pubsub()
    channel = liveness.channel("gpu0@a", db)
    subscriber.subscribe(channel)
    wait_until(lambda: admin.pubsub_numsub(channel)[0][1] == 1, 15, "the subscription")
    fleet.publish(admin, heartbeat("gpu0@a", channel), 60)
    fleet.publish(admin, heartbeat("gpu0@b"), 60)  # no channel: its heartbeat alone says
    clock = Clock()
    cache = fleet.CachedFleet(admin, 1.0, 0.25, clock)
    assert [w.name for w in cache.routing().workers] == ["gpu0@a", "gpu0@b"]
    subscriber.close()
    wait_until(lambda: admin.pubsub_numsub(channel)[0][1] == 0, 15, "the subscription's end")
    clock.now += 0.25  # due: checked in the background, the caller keeps its state
    wait_until(
        lambda: [w.name for w in cache.routing().workers] == ["gpu0@b"],
        15,
        "the liveness check",
    )
    # The full view (the workers page) is its own read, checked the same way.
    assert [b["name"] for b in cache.get().heartbeats] == ["gpu0@b"]
