"""Failover: from SIGKILL of the last GPU worker until a gpu=true job is routed to `celery`.

Two stacks side by side, each its own Redis (the role's ACL users) and real API with the
production defaults (MORAG_HEARTBEAT_TTL 15 s, MORAG_FLEET_CACHE_SECONDS 1,
MORAG_LIVENESS_INTERVAL 0.25): one whose GPU workers hold a liveness channel (a subscription
that dies with the worker, counted with PUBSUB NUMSUB), one whose workers run with
MORAG_LIVENESS_CHANNEL=false (today's heartbeat TTL path). Each trial starts one fresh
`gpu-tasks` worker in each, waits until gpu=true is routed to it, lets both live a random
fraction of a heartbeat interval, SIGKILLs both (with their pool children) and submits
gpu=true jobs to both, back to back, until each answers `celery`: the time from its kill to
that answer. Prints p50/p99 per path and the ratio.

    make bench      # or: .venv/bin/python tests/bench/failover.py --trials 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port, wait_until  # noqa: E402
from tests.integration.stack import API_KEY, Stack, standalone_stack  # noqa: E402

PATHS = {
    "liveness channel": {"liveness_channel": "true"},
    "heartbeat TTL": {"liveness_channel": "false"},
}


def route(client: httpx.Client, target: str) -> str:
    resp = client.post("/api/v1/ingest/url", json={"url": target, "gpu": True})
    if resp.status_code != 202:
        raise SystemExit(f"submission failed: {resp.status_code} {resp.text}")
    return resp.json()["route"]["queue"]


class Side:
    """One path: its stack, an HTTP client of its API, the worker of the current trial."""

    def __init__(self, path: str, stack: Stack, target: str) -> None:
        self.path = path
        self.stack = stack
        self.target = target
        self.client = httpx.Client(base_url=stack.api_url, headers={"X-API-Key": API_KEY})
        self.worker = ""

    def start(self, name: str) -> None:
        self.worker = name
        self.stack.start_worker(name, "gpu-tasks", wait=False, **PATHS[self.path])

    def ready(self) -> bool:
        """Advertised (with a channel or without, as the path says) and routed to."""
        hb = self.stack.heartbeat(self.worker)
        wants = PATHS[self.path]["liveness_channel"] == "true"
        return bool(hb) and bool(hb.get("liveness")) == wants

    def kill(self) -> float:
        proc = self.stack.procs.pop(self.worker)
        killed = time.perf_counter()
        os.killpg(proc.pid, signal.SIGKILL)
        return killed


def trial(sides: list[Side], i: int, phase: float) -> dict[str, float]:
    """Seconds from each side's SIGKILL until its gpu=true is routed to celery."""
    for n, side in enumerate(sides):
        side.start(f"gpu{n}-{i}@bench")
    for side in sides:
        wait_until(side.ready, 120, f"{side.worker} to advertise itself")
        wait_until(
            lambda s=side: route(s.client, s.target) == "gpu-tasks", 30, f"routing to {side.worker}"
        )
    time.sleep(phase)  # the kill falls anywhere between two heartbeats, as a real death does
    killed = {side.path: side.kill() for side in sides}
    took: dict[str, float] = {}
    while len(took) < len(sides):
        for side in sides:
            if side.path not in took and route(side.client, side.target) == "celery":
                took[side.path] = time.perf_counter() - killed[side.path]
        time.sleep(0.005)
    return took


def summary(samples: list[float]) -> dict[str, float]:
    lat = sorted(samples)
    return {
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "min": lat[0],
        "max": lat[-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20, help="trials per path")
    parser.add_argument("--ttl", type=float, default=15.0, help="MORAG_HEARTBEAT_TTL")
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args()
    phases = random.Random(args.seed)
    # SIGTERM unwinds like Ctrl-C, so the stacks' processes and Redis go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    settings = {
        "heartbeat_ttl": args.ttl,
        "fleet_cache_seconds": 1.0,
        "liveness_interval": 0.25,
        "gpu_backlog_limit": 10**9,
        "fault_injection": "false",
    }
    samples: dict[str, list[float]] = {path: [] for path in PATHS}
    with contextlib.ExitStack() as stacks:
        sides = []
        for path in PATHS:
            stack = stacks.enter_context(standalone_stack("morag-failover-", **settings))
            stack.start_api()
            # A .wav URL nobody serves: jobs are accepted and routed; no CPU worker runs them.
            sides.append(Side(path, stack, f"http://127.0.0.1:{free_port()}/missing.wav"))
        for i in range(args.trials):
            took = trial(sides, i, phases.uniform(0, args.ttl / 3))
            for path, seconds in took.items():
                samples[path].append(seconds)
            line = "  ".join(f"{path} {seconds:7.3f} s" for path, seconds in took.items())
            print(f"trial {i + 1:>2}/{args.trials}  {line}", flush=True)

    rows = {path: summary(s) for path, s in samples.items()}
    print(
        f"\nkill-to-CPU-route after SIGKILL of the last GPU worker, {args.trials} trials per "
        f"path (heartbeat TTL {args.ttl:g} s, API fleet cache 1 s, liveness checks 0.25 s)"
    )
    print(f"{'path':<18} {'p50 s':>8} {'p99 s':>8} {'min s':>8} {'max s':>8}")
    for path, r in rows.items():
        print(f"{path:<18} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['min']:>8.3f} {r['max']:>8.3f}")
    new, old = rows["liveness channel"], rows["heartbeat TTL"]
    print(
        f"\nliveness channel vs heartbeat TTL: {old['p50'] / new['p50']:.0f}x faster (p50), "
        f"{old['p99'] / new['p99']:.0f}x (p99); goal: p99 under 1 s "
        f"({'met' if new['p99'] < 1.0 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
