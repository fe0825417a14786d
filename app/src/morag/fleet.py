"""Worker heartbeats: workers publish them, the API reads them (cached about a second).

A heartbeat is a JSON value under ``morag:worker:<name>`` that expires after the TTL, so a
worker killed with SIGKILL disappears within one TTL without anyone broadcasting a ping.
Sooner still: a heartbeat names the worker's liveness channel (morag.liveness), and a worker
whose channel has no subscriber left is dead whatever its heartbeat says (``PUBSUB NUMSUB``,
one command for the whole fleet, checked every ``MORAG_LIVENESS_INTERVAL`` seconds).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from morag.config import DECLARED_QUEUES, GPU_QUEUE
from morag.routing import FleetSnapshot, WorkerView, connected

log = logging.getLogger("morag.fleet")
_refusal_logged_until = [0.0]  # monotonic time before which a NUMSUB refusal is not logged again

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
    """The heartbeats of the live workers: unexpired, and still connected."""
    beats = _unexpired_heartbeats(client)
    snap = FleetSnapshot(tuple(to_view(b) for b in beats))
    return recheck(client, FleetState(snap, beats)).heartbeats


def _unexpired_heartbeats(
    client: redis.Redis, parsed: dict[bytes, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """``parsed``: the heartbeats of the previous read by their raw value, kept up to date:
    a worker beats every few seconds, so most values read again are the same bytes, and
    parsing a thousand of them holds the GIL for milliseconds the API's requests wait on."""
    names = sorted(n.decode() if isinstance(n, bytes) else n for n in client.smembers(REGISTRY))
    if not names:
        return []
    raws = client.mget([heartbeat_key(n) for n in names])
    live, gone = [], []
    seen: dict[bytes, dict[str, Any]] = {}
    for name, raw in zip(names, raws, strict=True):
        if raw:
            hb = parsed.get(raw) if parsed is not None else None
            seen[raw] = hb = json.loads(raw) if hb is None else hb
            live.append(hb)
        else:
            gone.append(name)
    if parsed is not None:
        parsed.clear()
        parsed.update(seen)
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
        liveness=hb.get("liveness") or None,
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


def read_fleet(
    client: redis.Redis, parsed: dict[bytes, dict[str, Any]] | None = None
) -> FleetState:
    beats = _unexpired_heartbeats(client, parsed)
    snap = FleetSnapshot(tuple(to_view(b) for b in beats), queue_lengths(client))
    return recheck(client, FleetState(snap, beats))


def subscribers(client: redis.Redis, channels: list[str]) -> dict[str, int] | None:
    """PUBSUB NUMSUB of ``channels``; None when Redis refuses it (a Redis role from before
    liveness channels): then the heartbeats' TTL alone decides."""
    if not channels:
        return {}
    try:
        counts = client.pubsub_numsub(*channels)
    except redis.exceptions.NoPermissionError as exc:
        # Asked a few times a second: say it once a minute, not at every call.
        now = time.monotonic()
        if now >= _refusal_logged_until[0]:
            _refusal_logged_until[0] = now + 60
            log.warning("PUBSUB NUMSUB refused (%s): dead workers are noticed by TTL only", exc)
        return None
    return {_text(name): int(count) for name, count in counts}


def recheck(client: redis.Redis, state: FleetState) -> FleetState:
    """``state`` without the workers whose process died since it was read (one command)."""
    channels = sorted({w.liveness for w in state.snapshot.workers if w.liveness})
    if not channels:
        return state
    alive = connected(state.snapshot.workers, subscribers(client, channels))
    if len(alive) == len(state.snapshot.workers):
        return state
    names = {w.name for w in alive}
    beats = [b for b in state.heartbeats if b.get("name") in names]
    return FleetState(FleetSnapshot(alive, state.snapshot.queue_lengths), beats)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class CachedFleet:
    """The API's view of the fleet: heartbeats and queue lengths read at most every
    ``max_age`` seconds, and the liveness channels of the workers in it counted at most every
    ``liveness_interval`` seconds, so a killed worker leaves routing within that.

    A due read runs in a background thread while callers keep the state they have: at a
    thousand workers a read takes tens of milliseconds and would stall every request that
    arrives meanwhile (tests/bench/fleet_scale.py). A state older than twice those intervals
    (an API nobody asked for a while) is read at once, as is the first, and one whose
    background read failed (the next call raises as Redis does); while a read is under way,
    callers keep the state they have.
    ``max_age`` 0: every call reads."""

    def __init__(
        self,
        client: redis.Redis,
        max_age: float,
        liveness_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.max_age = max_age
        self.liveness_interval = max_age if liveness_interval is None else liveness_interval
        self.clock = clock
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()  # one read at a time, in the background or not
        self._state: FleetState | None = None
        self._at = 0.0
        self._checked = 0.0
        self._refreshing = False
        self._parsed: dict[bytes, dict[str, Any]] = {}  # read_fleet's, under _read_lock

    def get(self) -> FleetState:
        with self._lock:
            now = self.clock()
            state, age, unchecked = self._state, now - self._at, now - self._checked
            if self._fresh(now):
                return state
            late = age >= 2 * self.max_age or unchecked >= 2 * self.liveness_interval
            if state is not None and (self._refreshing or not late):
                if not self._refreshing:
                    self._refreshing = True
                    full = age >= self.max_age
                    threading.Thread(
                        target=self._refresh, args=(full,), name="morag-fleet", daemon=True
                    ).start()
                return state
        return self._read(full=state is None or age >= self.max_age)

    def _fresh(self, now: float) -> bool:
        return (
            self._state is not None
            and now - self._at < self.max_age
            and now - self._checked < self.liveness_interval
        )

    def _read(self, full: bool) -> FleetState:
        with self._read_lock:
            with self._lock:
                state, started = self._state, self.clock()
                if self._fresh(started):  # read by the caller this one waited for
                    return state
            if full or state is None:
                state = read_fleet(self.client, self._parsed)
                with self._lock:
                    self._state, self._at, self._checked = state, started, started
            else:
                state = recheck(self.client, state)
                with self._lock:
                    self._state, self._checked = state, started
            return state

    def _refresh(self, full: bool) -> None:
        try:
            self._read(full)
        except Exception as exc:  # the next get() reads in its own thread and raises
            log.warning("fleet read failed: %s", exc)
            with self._lock:
                self._state = None
        finally:
            with self._lock:
                self._refreshing = False
