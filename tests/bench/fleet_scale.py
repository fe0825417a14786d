"""Control-plane scale: routing, Redis load and memory at 10, 100 and 1,000 GPU workers.

Starts a redis-server with the role's ACL users. For each fleet size N it simulates N GPU
workers as the server sees them: each one's heartbeat (the fields of Supervisor.heartbeat,
GPU telemetry included, written with morag.fleet.publish as the worker user) and its
liveness channel (one Pub/Sub connection per worker, as each worker process holds). A load
process beats for all of them at the real rate (every MORAG_HEARTBEAT_TTL / 3 seconds, the
beats spread over the interval) with what a worker's tick writes: the heartbeat and the
watchdog lock. Meanwhile the API's own services (morag.submission.build_services, production
defaults: fleet cache 1 s, liveness checks 0.25 s) route gpu=true jobs from several threads
at a steady rate, as the API's request threads do (decide_route on services.fleet.routing(),
the snapshot read from the workers' routing summaries).

Per size: routing p50/p99 at that rate, routing decisions/s flat out (one thread), Redis
commands/s and Redis CPU during the steady load, used_memory per worker (keys alone, and
with the liveness connection), the time of one uncached routing read (the routing summaries
and the liveness channels: the API's routing cache refresh) and of one full fleet read
(SMEMBERS, MGET of the heartbeats, LLEN, PUBSUB NUMSUB: what /metrics, /ready and the
watchdog's tick do), the length of a gpu_worker route's reason, and of one /metrics fleet
scrape. The baseline is the smallest size, run in the same process: the
ratios say how each figure grows with the fleet. Goal: p99 routing under 5 ms at 1,000.

    make bench      # or: .venv/bin/python tests/bench/fleet_scale.py --sizes 10,100,1000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from prometheus_client import generate_latest
from pydantic import SecretStr
from redis.utils import HIREDIS_AVAILABLE

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from morag import fleet, liveness, metrics_export  # noqa: E402
from morag.config import GPU_QUEUE, Settings  # noqa: E402
from morag.processors.registry import known_types  # noqa: E402
from morag.routing import GPU_WORKER, decide_route  # noqa: E402
from morag.submission import build_services  # noqa: E402
from morag.watchdog import WATCHDOG_LOCK  # noqa: E402

from tests.conftest import redis_tls, running_redis, wait_until  # noqa: E402

GOAL_MS = 5.0
GOAL_SIZE = 1000


def worker_name(i: int) -> str:
    return f"gpu0@gpu-host-{i:04d}"


def heartbeat(i: int, channel: str | None, rng: random.Random) -> dict[str, Any]:
    """What Supervisor.heartbeat publishes for an idle one-GPU worker (an A100, CUDA checked)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    uuid = f"GPU-{i:08x}-0000-4000-8000-{rng.getrandbits(48):012x}"
    return {
        "name": worker_name(i),
        "hostname": f"gpu-host-{i:04d}",
        "pid": 1000 + i,
        "version": "bench",
        "queues": [GPU_QUEUE],
        "consuming": [GPU_QUEUE],
        "rescuing": False,
        "device": "cuda",
        "device_reason": "MORAG_DEVICE=auto: CUDA works",
        "gpus": [
            {
                "index": 0,
                "uuid": uuid,
                "pci_bus_id": f"00000000:{i % 256:02X}:00.0",
                "name": "NVIDIA A100-SXM4-80GB",
                "memory_mb": 81920,
                "mig": False,
                "parent_uuid": None,
            }
        ],
        "cuda_libraries": {"libcublas.so.12": "12.4.5", "libcudnn.so.9": "9.1.0"},
        "cuda_check": {
            "passed": True,
            "reason": "matmul on cuda:0",
            "checked_at": now,
            "seconds": 1.2,
        },
        "gpu_telemetry": [
            {
                "index": 0,
                "uuid": uuid,
                "name": "NVIDIA A100-SXM4-80GB",
                "utilization": round(rng.random(), 2),
                "memory_used_bytes": rng.randrange(1 << 30, 60 << 30),
                "memory_total_bytes": 85899345920,
            }
        ],
        "processors": known_types(),
        "warmup": {"state": "warm", "model": "large-v3", "seconds": 9.8},
        "liveness": channel,
        "busy": False,
        "active": [],
        "concurrency": 1,
        "started_at": now,
        "updated_at": now,
    }


def beat_load(
    url: str, size: int, db: int, interval: float, ttl: float, stop: Any, out: Any
) -> None:
    """The fleet's writes at the real rate, in a process of its own: worker i beats at
    (i / size) of each interval, publishing its heartbeat and trying the watchdog lock."""
    client = redis.Redis.from_url(url)
    rng = random.Random(size)
    beats = [heartbeat(i, liveness.channel(worker_name(i), db), rng) for i in range(size)]
    lock_ms = max(100, int(interval * 900))
    for hb in beats:  # at once: the setup may have outlasted the first heartbeats' TTL
        fleet.publish(client, hb, ttl)
    started = time.monotonic()
    done = 0
    late = 0.0
    out.put("started")
    while not stop.is_set():
        due = started + (done // size) * interval + (done % size) * interval / size
        pause = due - time.monotonic()
        if pause > 0:
            stop.wait(pause)
            continue
        late = max(late, -pause)
        hb = beats[done % size]
        hb["gpu_telemetry"][0]["utilization"] = round(rng.random(), 2)
        hb["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        fleet.publish(client, hb, ttl)
        client.set(WATCHDOG_LOCK, hb["name"], nx=True, px=lock_ms)
        done += 1
    out.put((done, time.monotonic() - started, late))


def spin(stop: Any) -> None:
    """A CPU-bound process (``--cpu-hogs``): the load of a busy machine, reproducibly."""
    while not stop.is_set():
        for _ in range(100_000):
            pass


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def info(admin: redis.Redis) -> dict[str, Any]:
    return admin.info("all")


def redis_cpu(stats: dict[str, Any]) -> float:
    return float(stats["used_cpu_sys"] + stats["used_cpu_user"])


def read_usec(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Redis CPU microseconds spent on the fleet read's commands between two INFOs."""
    total = 0.0
    for cmd in ("smembers", "mget", "llen", "pubsub|numsub", "srem"):
        key = f"cmdstat_{cmd}"
        total += after.get(key, {}).get("usec", 0) - before.get(key, {}).get("usec", 0)
    return total


@dataclass
class Row:
    size: int
    decisions: int
    p50_ms: float
    p99_ms: float
    max_rate: float
    commands_per_s: float
    redis_cpu: float
    beats_per_s: float
    beat_target: float
    key_bytes: float  # the heartbeat key and its registry entry
    channel_bytes: float  # the liveness channel's subscription
    conn_bytes: float  # one client connection (a worker process holds several)
    routing_read_ms: float
    read_ms: float
    read_redis_us: float
    reason_bytes: int  # a gpu_worker route's reason, stored on every job record
    scrape_ms: float
    scrape_bytes: int


class Router:
    """gpu=true routing decisions as the API makes them, from ``threads`` request threads at
    ``rate`` decisions per second in all, for ``seconds``."""

    def __init__(self, services: Any, content_type: str) -> None:
        self.services = services
        self.content_type = content_type

    def route(self) -> Any:
        return decide_route(
            gpu_requested=True,
            content_type=self.content_type,
            fleet=self.services.fleet.routing(),
            gpu_backlog_limit=self.services.settings.gpu_backlog_limit,
        )

    def decide(self) -> str:
        return self.route().code

    def paced(self, rate: float, threads: int, seconds: float) -> list[float]:
        latencies: list[float] = []
        codes: set[str] = set()
        lock = threading.Lock()
        start = time.monotonic() + 0.05
        period = threads / rate

        def run(k: int) -> None:
            mine, seen = [], set()
            due = start + k * period / threads
            while due < start + seconds:
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                began = time.perf_counter()
                seen.add(self.decide())
                mine.append(time.perf_counter() - began)
                due += period
            with lock:
                latencies.extend(mine)
                codes.update(seen)

        pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if codes != {GPU_WORKER}:
            raise SystemExit(f"routing did not pick the GPU workers: {codes}")
        return latencies

    def flat_out(self, seconds: float) -> float:
        done, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            self.decide()
            done += 1
        return done / seconds


def measure(
    server: Any,
    size: int,
    *,
    rate: float,
    threads: int,
    seconds: float,
    ttl: float,
    reads: int,
    connections: int,
) -> Row:
    db = server.fresh_db()
    admin = redis.Redis.from_url(server.url(db))
    urls = server.role_urls(db)
    settings = Settings(
        redis_url=SecretStr(urls["api"]),
        shared_dir=Path(tempfile.gettempdir()),
        heartbeat_ttl=ttl,
        fleet_cache_seconds=1.0,
        liveness_interval=0.25,
    )
    services = build_services(settings)
    worker = redis.Redis.from_url(urls["worker"])
    rng = random.Random(size)
    pubsubs: list[Any] = []
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    load = None
    try:
        services.redis.ping()
        worker.ping()
        channels = [liveness.channel(worker_name(i), db) for i in range(size)]
        # Each worker process holds its channel on a connection of its own. A TLS handshake
        # costs a fifth of a second on these 2 cores, so the channels share ``connections``
        # connections here, and a connection's memory is measured on its own.
        base = info(admin)["used_memory"]
        conns = [redis.Redis.from_url(urls["worker"]) for _ in range(min(size, connections))]
        for conn in conns:
            pubsubs.append(conn.pubsub())
            pubsubs[-1].ping()  # connects (PING is allowed in the subscribed state too)
        with_conns = info(admin)["used_memory"]
        for k, pubsub in enumerate(pubsubs):
            pubsub.subscribe(*channels[k :: len(pubsubs)])
        wait_until(
            lambda: all(n == 1 for _, n in admin.pubsub_numsub(*channels)),
            60,
            "subscriptions",
        )
        with_subs = info(admin)["used_memory"]
        for i in range(size):
            fleet.publish(worker, heartbeat(i, channels[i], rng), ttl)
        with_keys = info(admin)["used_memory"]

        interval = settings.heartbeat_interval
        load = ctx.Process(
            target=beat_load,
            args=(urls["worker"], size, db, interval, ttl, stop, out),
            daemon=True,
        )
        load.start()
        if out.get(timeout=60) != "started":
            raise SystemExit("the heartbeat load did not start")
        router = Router(services, "audio")
        router.paced(rate, threads, min(2.0, seconds))  # warm up: caches, connections
        before, t0 = info(admin), time.monotonic()
        latencies = router.paced(rate, threads, seconds)
        after, t1 = info(admin), time.monotonic()
        max_rate = router.flat_out(min(2.0, seconds))
        reason = router.route().reason

        routing_times = []
        for _ in range(reads):
            began = time.perf_counter()
            snap = fleet.recheck(
                services.redis, fleet.FleetState(fleet.read_routing(services.redis), [])
            )
            routing_times.append(time.perf_counter() - began)
            if len(snap.snapshot.workers) != size:
                raise SystemExit(f"routing read saw {len(snap.snapshot.workers)} of {size} workers")
        read_times = []
        r0 = info(admin)
        for _ in range(reads):
            began = time.perf_counter()
            state = fleet.read_fleet(services.redis)
            read_times.append(time.perf_counter() - began)
            if len(state.heartbeats) != size:
                raise SystemExit(f"fleet read saw {len(state.heartbeats)} of {size} workers")
        r1 = info(admin)
        # /metrics with a cold fleet cache, as a scrape every 15 s usually finds it.
        registry = metrics_export.build_registry(
            services.redis,
            fleet.CachedFleet(services.redis, 0),
            settings,
            known_types(),
        )
        scrapes, body = [], b""
        for _ in range(max(3, reads // 4)):
            began = time.perf_counter()
            body = generate_latest(registry)
            scrapes.append(time.perf_counter() - began)

        stop.set()
        beats, beat_seconds, _late = out.get(timeout=30)
        load.join(10)
        wall = t1 - t0
        return Row(
            size=size,
            decisions=len(latencies),
            p50_ms=statistics.median(latencies) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            max_rate=max_rate,
            commands_per_s=(after["total_commands_processed"] - before["total_commands_processed"])
            / wall,
            redis_cpu=(redis_cpu(after) - redis_cpu(before)) / wall,
            beats_per_s=beats / beat_seconds,
            beat_target=size / interval,
            key_bytes=(with_keys - with_subs) / size,
            channel_bytes=(with_subs - with_conns) / size,
            conn_bytes=(with_conns - base) / len(pubsubs),
            routing_read_ms=statistics.median(routing_times) * 1000,
            read_ms=statistics.median(read_times) * 1000,
            read_redis_us=read_usec(r0, r1) / reads,
            reason_bytes=len(reason.encode()),
            scrape_ms=statistics.median(scrapes) * 1000,
            scrape_bytes=len(body),
        )
    finally:
        stop.set()
        if load is not None and load.is_alive():
            load.join(10)
            if load.is_alive():
                load.kill()
        for pubsub in pubsubs:
            pubsub.close()
        admin.flushdb()
        services.redis.close()


def run(
    sizes: list[int],
    *,
    rate: float = 200.0,
    threads: int = 8,
    seconds: float = 10.0,
    ttl: float = 15.0,
    reads: int = 20,
    connections: int = 50,
    cpu_hogs: int = 0,
) -> list[Row]:
    """``cpu_hogs``: CPU-bound processes running beside the whole measurement."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    hogs = [ctx.Process(target=spin, args=(stop,), daemon=True) for _ in range(cpu_hogs)]
    for hog in hogs:
        hog.start()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="morag-fleet-scale-") as tmp,
            running_redis(Path(tmp)) as server,
        ):
            rows = []
            for size in sizes:
                row = measure(
                    server,
                    size,
                    rate=rate,
                    threads=threads,
                    seconds=seconds,
                    ttl=ttl,
                    reads=reads,
                    connections=connections,
                )
                print(json.dumps(row.__dict__), flush=True)
                rows.append(row)
            return rows
    finally:
        stop.set()
        for hog in hogs:
            hog.join(10)


def report(rows: list[Row], rate: float, threads: int, cpu_hogs: int = 0) -> bool:
    """Print the table and the ratios against the smallest size; True when the goal is met."""
    hogs = f", {cpu_hogs} CPU-bound processes beside it" if cpu_hogs else ""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{os.cpu_count()} cores, load average {load} (1, 5, 15 min){hogs}")
    print(
        f"routing gpu=true at {rate:g}/s from {threads} threads (API fleet cache 1 s, liveness "
        f"checks 0.25 s) while every simulated GPU worker beats every TTL/3 s; Redis "
        f"{'over TLS' if redis_tls() else 'over plain TCP'}, redis-py's "
        f"{'hiredis' if HIREDIS_AVAILABLE else 'pure-Python'} reply parser"
    )
    header = (
        f"{'workers':>7} {'p50 ms':>7} {'p99 ms':>7} {'max dec/s':>9} {'redis cmd/s':>11} "
        f"{'redis cpu':>9} {'beats/s':>9} {'B/worker':>8} {'B/conn':>7} {'routing read':>12} "
        f"{'fleet read ms':>13} {'redis us':>8} {'reason B':>8} {'scrape ms':>9} {'scrape KB':>9}"
    )
    print(header)
    for r in rows:
        print(
            f"{r.size:>7} {r.p50_ms:>7.3f} {r.p99_ms:>7.2f} {r.max_rate:>9.0f} "
            f"{r.commands_per_s:>11.0f} {r.redis_cpu:>8.1%} "
            f"{r.beats_per_s:>4.0f}/{r.beat_target:<4.0f} {r.key_bytes + r.channel_bytes:>8.0f} "
            f"{r.conn_bytes:>7.0f} {r.routing_read_ms:>12.2f} {r.read_ms:>13.2f} "
            f"{r.read_redis_us:>8.0f} {r.reason_bytes:>8} {r.scrape_ms:>9.1f} "
            f"{r.scrape_bytes / 1024:>9.0f}"
        )
    base, top = rows[0], rows[-1]
    if top is not base:
        print(
            f"\n{top.size} vs {base.size} workers: p99 routing {top.p99_ms / base.p99_ms:.1f}x, "
            f"decisions/s {top.max_rate / base.max_rate:.2f}x, fleet read "
            f"{top.read_ms / base.read_ms:.0f}x, scrape {top.scrape_ms / base.scrape_ms:.0f}x, "
            f"redis cmd/s {top.commands_per_s / base.commands_per_s:.1f}x"
        )
    # Only the watchdog and the CPU workers that may rescue read the whole fleet on a tick
    # (one read per interval each); had every worker's tick read it, as it once did:
    print(
        f"if every worker's tick read the fleet at {top.size} workers: "
        f"{top.beat_target:.0f}/s x {top.read_redis_us:.0f} us of Redis = "
        f"{top.beat_target * top.read_redis_us / 1e6:.0%} of a Redis core (the square of the "
        f"fleet; now only the watchdog and rescuing CPU workers do)"
    )
    at_goal = [r for r in rows if r.size >= GOAL_SIZE]
    if not at_goal:
        return True
    met = all(r.p99_ms < GOAL_MS for r in at_goal)
    print(
        f"goal: p99 routing under {GOAL_MS:g} ms at {GOAL_SIZE} workers "
        f"({'met' if met else 'NOT met'})"
    )
    return met


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10,100,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--rate", type=float, default=200.0, help="routing decisions per second")
    parser.add_argument("--threads", type=int, default=8, help="request threads routing")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per size")
    parser.add_argument("--ttl", type=float, default=15.0, help="MORAG_HEARTBEAT_TTL")
    parser.add_argument("--reads", type=int, default=20, help="uncached fleet reads timed")
    parser.add_argument(
        "--connections",
        type=int,
        default=50,
        help="connections holding the liveness channels",
    )
    parser.add_argument(
        "--cpu-hogs",
        type=int,
        default=0,
        help="CPU-bound processes beside the measurement (a loaded machine, reproducibly)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = run(
        sizes,
        rate=args.rate,
        threads=args.threads,
        seconds=args.seconds,
        ttl=args.ttl,
        reads=args.reads,
        connections=args.connections,
        cpu_hogs=args.cpu_hogs,
    )
    return 0 if report(rows, args.rate, args.threads, args.cpu_hogs) else 1


if __name__ == "__main__":
    sys.exit(main())
