"""Worker heartbeats: workers publish them, the API reads them (cached about a second).

A heartbeat is a JSON value under ``morag:worker:<name>`` that expires after the TTL, so a
worker killed with SIGKILL disappears within one TTL without anyone broadcasting a ping.
Sooner still: a heartbeat names the worker's liveness channel (morag.liveness), and a worker
whose channel has no subscriber left is dead whatever its heartbeat says (``PUBSUB NUMSUB``,
one command for the whole fleet, checked every ``MORAG_LIVENESS_INTERVAL`` seconds).

Next to each heartbeat, ``publish`` writes the worker's routing summary under
``morag:worker:routing:<name>``: only what routing decides on (name, queues, processors,
device, busy, liveness channel), a tenth of the heartbeat's bytes, and the same bytes from
one beat to the next while the worker's state does not change. The API routes on these
(``read_routing``), so routing a job never waits on GPU telemetry being parsed; the full
heartbeats are read for the pages that show them (``CachedFleet.get``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from morag.config import DECLARED_QUEUES, GPU_QUEUE
from morag.routing import FleetSnapshot, WorkerView, connected

log = logging.getLogger("morag.fleet")
_refusal_logged_until = [0.0]  # monotonic time before which a NUMSUB refusal is not logged again

PREFIX = "morag:worker:"
# Under PREFIX, so the workers' Redis user (~morag:worker:*) may write and delete it.
ROUTING_PREFIX = PREFIX + "routing:"
REGISTRY = "morag:workers"  # names ever seen; expired ones are pruned when read
# What a routing summary holds: WorkerView's fields, as the heartbeat has them.
ROUTING_FIELDS = ("name", "queues", "processors", "device", "busy", "liveness")


def heartbeat_key(name: str) -> str:
    return PREFIX + name


def routing_key(name: str) -> str:
    return ROUTING_PREFIX + name


def routing_summary(payload: dict[str, Any]) -> bytes:
    """The heartbeat's routing fields, serialised the same way every time: a worker whose
    state did not change writes the same bytes, which readers do not parse again."""
    summary = {k: payload[k] for k in ROUTING_FIELDS if k in payload}
    return json.dumps(summary, sort_keys=True, separators=(",", ":")).encode()


def publish(client: redis.Redis, payload: dict[str, Any], ttl: float) -> None:
    """The heartbeat and its routing summary, in one transaction and with the same TTL:
    a reader never sees one without the other from the same worker."""
    name, px = payload["name"], int(ttl * 1000)
    pipe = client.pipeline()
    pipe.set(heartbeat_key(name), json.dumps(payload), px=px)
    pipe.set(routing_key(name), routing_summary(payload), px=px)
    pipe.sadd(REGISTRY, name)
    pipe.execute()


def withdraw(client: redis.Redis, name: str) -> None:
    pipe = client.pipeline()
    pipe.delete(heartbeat_key(name), routing_key(name))
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


def read_routing(
    client: redis.Redis, parsed: dict[bytes, WorkerView] | None = None
) -> FleetSnapshot:
    """The fleet as routing sees it, from the workers' routing summaries (``publish``).

    ``parsed``: the views of the previous read by their raw value, kept up to date; a
    summary changes only when its worker's state does, so most are not parsed again.
    A worker that wrote no summary (one from before them, during a rolling upgrade) is read
    from its full heartbeat. Not yet filtered by the liveness channels: ``recheck`` does."""
    pipe = client.pipeline(transaction=False)
    pipe.smembers(REGISTRY)
    for queue in DECLARED_QUEUES:
        pipe.llen(queue)
    members, *lengths = pipe.execute()
    backlog = dict(zip(DECLARED_QUEUES, lengths, strict=True))
    names = sorted(members)  # as Redis answered them (bytes): nothing to decode
    if not names:
        return FleetSnapshot((), backlog)
    raws = client.mget(_prefixed(ROUTING_PREFIX, names))
    missing = [n for n, raw in zip(names, raws, strict=True) if not raw]
    full = (
        dict(zip(missing, client.mget(_prefixed(PREFIX, missing)), strict=True)) if missing else {}
    )
    views, gone = [], []
    seen: dict[bytes, WorkerView] = {}
    for name, raw in zip(names, raws, strict=True):
        raw = raw or full.get(name)
        if not raw:
            gone.append(name)
            continue
        view = parsed.get(raw) if parsed is not None else None
        seen[raw] = view = to_view(json.loads(raw)) if view is None else view
        views.append(view)
    if parsed is not None:
        parsed.clear()
        parsed.update(seen)
    if gone:
        client.srem(REGISTRY, *gone)
    return FleetSnapshot(tuple(views), backlog)


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
    client: redis.Redis,
    parsed: dict[bytes, dict[str, Any]] | None = None,
    *,
    checked: bool = True,
) -> FleetState:
    """The live workers' full heartbeats; ``checked`` False: not yet filtered by their
    liveness channels (the caller runs ``recheck``)."""
    beats = _unexpired_heartbeats(client, parsed)
    state = FleetState(
        FleetSnapshot(tuple(to_view(b) for b in beats), queue_lengths(client)), beats
    )
    return recheck(client, state) if checked else state


def subscribers(client: redis.Redis, channels: Sequence[str]) -> dict[str, int] | None:
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
    # Redis answers in the order asked: the names need no decoding.
    return {channel: int(count) for channel, (_, count) in zip(channels, counts, strict=True)}


def recheck(client: redis.Redis, state: FleetState) -> FleetState:
    """``state`` without the workers whose process died since it was read (one command)."""
    channels = state.snapshot.liveness_channels()
    if not channels:
        return state
    counts = subscribers(client, channels)
    if counts is None or all(counts.values()):  # the usual answer: all alive, nothing to do
        return state
    alive = connected(state.snapshot.workers, counts)
    if len(alive) == len(state.snapshot.workers):
        return state
    names = {w.name for w in alive}
    beats = [b for b in state.heartbeats if b.get("name") in names]
    return FleetState(FleetSnapshot(alive, state.snapshot.queue_lengths), beats)


def _prefixed(prefix: str, names: list[Any]) -> list[Any]:
    """The keys ``prefix + name`` of ``names``, all bytes or all str as a client answers."""
    if names and isinstance(names[0], bytes):
        head = prefix.encode()
        return [head + n for n in names]
    return [prefix + n for n in names]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Refreshed:
    """A fleet state read at most every ``max_age`` seconds (``read``) and checked against
    the liveness channels at most every ``liveness_interval`` seconds (``check``).

    A due read runs in a background thread while callers keep the state they have: at a
    thousand workers a read takes tens of milliseconds and would stall every request that
    arrives meanwhile (tests/bench/fleet_scale.py). A state older than twice those intervals
    (an API nobody asked for a while) is read at once, as is the first, and one whose
    background read failed (the next call raises as Redis does); while a read is under way,
    callers keep the state they have. ``max_age`` 0: every call reads."""

    def __init__(
        self,
        read: Callable[[], FleetState],
        check: Callable[[FleetState], FleetState],
        max_age: float,
        liveness_interval: float,
        clock: Callable[[], float],
    ) -> None:
        self.read, self.check = read, check
        self.max_age = max_age
        self.liveness_interval = liveness_interval
        self.clock = clock
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()  # one read at a time, in the background or not
        self._state: FleetState | None = None
        self._at = 0.0
        self._checked = 0.0
        self._refreshing = False

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
                state = self.check(self.read())
                with self._lock:
                    self._state, self._at, self._checked = state, started, started
            else:
                state = self.check(state)
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


class CachedFleet:
    """The API's view of the fleet, each part read at most every ``max_age`` seconds and
    the liveness channels of the workers in it counted at most every ``liveness_interval``
    seconds, so a killed worker leaves routing within that; due reads run in the background
    (``_Refreshed``).

    ``routing()``: the snapshot jobs are routed on, from the routing summaries alone
    (``read_routing``): at a thousand workers the full heartbeats are 1.2 MB of JSON, whose
    parsing held the GIL the request threads needed (routing p99 108 ms, docs/architecture.md
    "Control-plane scale"). ``get()``: the full heartbeats too (the workers page, queue
    stats, /ready, /metrics), read only when one of those asks."""

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
        # Each under its cache's read lock: the values parsed at the previous read.
        self._parsed: dict[bytes, dict[str, Any]] = {}
        self._views: dict[bytes, WorkerView] = {}
        interval = self.liveness_interval
        self._full = _Refreshed(
            lambda: read_fleet(client, self._parsed, checked=False),
            self._recheck,
            max_age,
            interval,
            clock,
        )
        self._routing = _Refreshed(
            lambda: FleetState(read_routing(client, self._views), []),
            self._recheck,
            max_age,
            interval,
            clock,
        )

    def get(self) -> FleetState:
        return self._full.get()

    def routing(self) -> FleetSnapshot:
        return self._routing.get().snapshot

    def _recheck(self, state: FleetState) -> FleetState:
        return recheck(self.client, state)
