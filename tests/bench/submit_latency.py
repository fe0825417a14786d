"""Submit latency: what the gpu routing decision costs, against an `inspect` broadcast baseline.

Starts Redis, the real API (uvicorn), a live `gpu-tasks` worker and a `celery` worker, then
fires N submissions at concurrency C at POST /api/v1/ingest/url for gpu=false and gpu=true,
and the same for gpu=true against a baseline API process whose router learns the fleet from
`celery_app.control.inspect().active_queues()` on every request (what the first attempt did).
Prints p50/p99 latency, throughput, and the ratios.

    make bench            # or: .venv/bin/python tests/bench/submit_latency.py --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402
from tests.integration.stack import API_KEY, standalone_stack  # noqa: E402

BASELINE = '''
import sys
import threading
from contextlib import asynccontextmanager
import uvicorn
from morag.api.app import create_app
from morag.config import get_settings
from morag.fleet import FleetState
from morag.processors.registry import known_types
from morag.routing import FleetSnapshot, WorkerView
from morag.worker import celery_app

class InspectFleet:
    """The fleet as a per-request Celery broadcast sees it.

    One broadcast at a time: the first attempt ran it inside async endpoints, blocking the
    event loop; unserialised, concurrent broadcasts also exhaust Celery's connection pool
    and deadlock against the producers that enqueue the jobs.
    """
    def __init__(self, timeout):
        self.timeout = timeout
        self.lock = threading.Lock()
    def get(self):
        with self.lock:
            replies = celery_app.control.inspect(timeout=self.timeout).active_queues() or {}
        workers = tuple(
            WorkerView(name, tuple(q["name"] for q in queues), tuple(known_types()))
            for name, queues in replies.items())
        return FleetState(FleetSnapshot(workers, {}), [])

app = create_app(get_settings())
inner = app.router.lifespan_context

@asynccontextmanager
async def lifespan(a):
    async with inner(a):
        a.state.services.fleet = InspectFleet(float(sys.argv[2]))
        yield

app.router.lifespan_context = lifespan
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


class Sample:
    """Latencies and routes of one variant, gathered over one or more rounds."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.elapsed = 0.0
        self.queues: dict[str, int] = {}

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        return {
            "p50": statistics.median(lat) * 1000,
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
            "throughput": len(lat) / self.elapsed,
            "requests": len(lat),
            "queues": self.queues,
        }


async def fire(
    base_url: str, url: str, *, gpu: bool, requests: int, concurrency: int, into: Sample
) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"X-API-Key": API_KEY}, limits=limits, timeout=900
    ) as client:
        todo = iter(range(requests))

        async def one_client() -> None:
            for _ in todo:
                started = time.perf_counter()
                resp = await client.post("/api/v1/ingest/url", json={"url": url, "gpu": gpu})
                into.latencies.append(time.perf_counter() - started)
                if resp.status_code != 202:
                    raise SystemExit(f"submission failed: {resp.status_code} {resp.text}")
                queue = resp.json()["route"]["queue"]
                into.queues[queue] = into.queues.get(queue, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        into.elapsed += time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--baseline-requests",
        type=int,
        default=64,
        help="the broadcast baseline is slow; fewer requests give its shape",
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds per variant")
    parser.add_argument("--inspect-timeout", type=float, default=1.0)
    args = parser.parse_args()

    settings = {"gpu_backlog_limit": 10**9, "fault_injection": "false", "heartbeat_ttl": 5}
    with standalone_stack("morag-bench-", **settings) as stack:
        stack.start({"gpu0@bench": "gpu-tasks", "cpu0@bench": "celery"})
        baseline = None
        try:
            # A .wav URL nobody serves: jobs are accepted, routed, and fail fast on the workers.
            target = f"http://127.0.0.1:{free_port()}/missing.wav"
            base_port = free_port()
            baseline = subprocess.Popen(
                [sys.executable, "-c", BASELINE, str(base_port), str(args.inspect_timeout)],
                env=stack.env,
                stdout=subprocess.DEVNULL,
            )
            for _ in range(100):
                try:
                    httpx.get(f"http://127.0.0.1:{base_port}/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)

            def burst(url: str, gpu: bool, n: int, into: Sample) -> None:
                c = args.concurrency
                asyncio.run(fire(url, target, gpu=gpu, requests=n, concurrency=c, into=into))

            # Warm up, then alternate gpu=false and gpu=true in rounds so both see the same
            # background (workers draining earlier jobs, a growing Redis).
            burst(stack.api_url, False, 64, Sample())
            burst(stack.api_url, True, 64, Sample())
            cpu, gpu = Sample(), Sample()
            per_round = max(1, args.requests // args.rounds)
            for _ in range(args.rounds):
                burst(stack.api_url, False, per_round, cpu)
                burst(stack.api_url, True, per_round, gpu)
            cast = Sample()
            burst(f"http://127.0.0.1:{base_port}", True, args.baseline_requests, cast)
            rows = {
                "gpu=false (heartbeats)": cpu.summary(),
                "gpu=true (heartbeats)": gpu.summary(),
                "gpu=true (inspect broadcast)": cast.summary(),
            }
        finally:
            if baseline is not None:
                baseline.kill()
                baseline.wait(10)

    print(f"\nsubmit latency, concurrency {args.concurrency}, POST /api/v1/ingest/url")
    print(f"{'variant':<30} {'requests':>8} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8}  queues")
    for name, r in rows.items():
        print(
            f"{name:<30} {r['requests']:>8} {r['p50']:>9.2f} {r['p99']:>9.2f} "
            f"{r['throughput']:>8.1f}  {r['queues']}"
        )
    cpu, gpu, cast = rows.values()
    print(
        f"\ngpu routing overhead (p50, gpu=true vs gpu=false): "
        f"{(gpu['p50'] / cpu['p50'] - 1) * 100:+.1f}%"
    )
    print(
        f"heartbeat routing vs inspect broadcast (p50): {cast['p50'] / gpu['p50']:.1f}x faster; "
        f"throughput {gpu['throughput'] / cast['throughput']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
