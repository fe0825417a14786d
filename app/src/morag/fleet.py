"""Worker heartbeats: workers publish them, the API reads them (cached about a second).

A heartbeat is a JSON value under ``morag:worker:<name>`` that expires after the TTL, so a
worker killed with SIGKILL disappears within one TTL without anyone broadcasting a ping.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from morag.config import DECLARED_QUEUES, GPU_QUEUE
from morag.routing import FleetSnapshot, WorkerView

PREFIX = "morag:worker:"
REGISTRY = "morag:workers"  # names ever seen; expired ones are pruned when read


def heartbeat_key(name: str) -> str:
    return PREFIX + name


def publish(client: redis.Redis, payload: dict[str, Any], ttl: float) -> None:
    pipe = client.pipeline()
    pipe.set(heartbeat_key(payload["name"]), json.dumps(payload), px=int(ttl * 1000))
    pipe.sadd(REGISTRY, payload["name"])
    pipe.execute()


def withdraw(client: redis.Redis, name: str) -> None:
    pipe = client.pipeline()
    pipe.delete(heartbeat_key(name))
    pipe.srem(REGISTRY, name)
    pipe.execute()


def read_heartbeats(client: redis.Redis) -> list[dict[str, Any]]:
    names = sorted(n.decode() if isinstance(n, bytes) else n for n in client.smembers(REGISTRY))
    if not names:
        return []
    raws = client.mget([heartbeat_key(n) for n in names])
    live, gone = [], []
    for name, raw in zip(names, raws, strict=True):
        if raw:
            live.append(json.loads(raw))
        else:
            gone.append(name)
    if gone:
        client.srem(REGISTRY, *gone)
    return live


def queue_lengths(client: redis.Redis, queues: tuple[str, ...] = DECLARED_QUEUES) -> dict[str, int]:
    pipe = client.pipeline()
    for queue in queues:
        pipe.llen(queue)
    return dict(zip(queues, pipe.execute(), strict=True))


def to_view(hb: dict[str, Any]) -> WorkerView:
    return WorkerView(
        name=hb["name"],
        queues=tuple(hb.get("queues", ())),
        processors=tuple(hb.get("processors", ())),
        device=hb.get("device", "cpu"),
        busy=bool(hb.get("busy")),
    )


def cuda_check_passed(hb: dict[str, Any]) -> bool:
    """Does a heartbeat carry a passed CUDA check (morag.cuda_check)? Heartbeats of workers
    from before the check have no ``cuda_check`` field: not passed."""
    check = hb.get("cuda_check")
    return isinstance(check, dict) and check.get("passed") is True


@dataclass(frozen=True)
class GpuWorkers:
    """The GPU side of the fleet as ``/ready`` counts it."""

    checked: tuple[str, ...]  # device cuda with a passed CUDA check: the GPU workers counted
    unchecked: tuple[str, ...]  # device cuda without one (started before the check existed)
    on_cpu: tuple[str, ...]  # consume gpu-tasks but compute on the CPU (MORAG_DEVICE=auto)


def gpu_workers(heartbeats: list[dict[str, Any]]) -> GpuWorkers:
    checked, unchecked, on_cpu = [], [], []
    for hb in heartbeats:
        name = str(hb.get("name"))
        if hb.get("device") == "cuda":
            (checked if cuda_check_passed(hb) else unchecked).append(name)
        elif GPU_QUEUE in (hb.get("queues") or ()):
            on_cpu.append(name)
    return GpuWorkers(tuple(sorted(checked)), tuple(sorted(unchecked)), tuple(sorted(on_cpu)))


@dataclass(frozen=True)
class FleetState:
    snapshot: FleetSnapshot
    heartbeats: list[dict[str, Any]]


def read_fleet(client: redis.Redis) -> FleetState:
    beats = read_heartbeats(client)
    snap = FleetSnapshot(tuple(to_view(b) for b in beats), queue_lengths(client))
    return FleetState(snap, beats)


class CachedFleet:
    """The API's view of the fleet, refreshed at most every ``max_age`` seconds."""

    def __init__(self, client: redis.Redis, max_age: float) -> None:
        self.client = client
        self.max_age = max_age
        self._lock = threading.Lock()
        self._state: FleetState | None = None
        self._at = 0.0

    def get(self) -> FleetState:
        with self._lock:
            now = time.monotonic()
            if self._state is None or now - self._at >= self.max_age:
                self._state = read_fleet(self.client)
                self._at = now
            return self._state
