"""Soak: thousands of jobs through one stack, with and without faults, in one run.

Each mode gets a fresh stack on a Redis of its own (AOF, the role's ACL users): the API,
two CPU workers on `celery`, one worker on `gpu-tasks` (on the CPU here), and the server's
store worker, which delivers every job's webhook to a receiver in this process. Submitter
threads send ``--jobs`` mixed jobs (web pages, and every ``--audio-every``-th a short
recording; gpu=true for half) as fast as the API takes them. In the `faults` mode a thread
kills (SIGKILL) in turn, every ``--fault-every`` seconds, a CPU worker, the GPU-queue
worker, the API, the store worker and Redis itself (restarted from its AOF), each restarted
at once, until every job has ended and each of them was killed at least once.

Prints per mode: accepted and refused submissions, how they ended, jobs that ran to a result
more than once, webhooks (exactly one per job expected), throughput (ended jobs per second
of wall time) and the latency of a job (created -> ended, from its record: p50, p99), then
the ratios faults / no faults.

    make bench      # or: .venv/bin/python tests/bench/soak.py --jobs 2000
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import SENTENCE, free_port, speak  # noqa: E402
from tests.integration import media  # noqa: E402
from tests.integration.receiver import Receiver  # noqa: E402
from tests.integration.stack import OwnRedis, Stack, own_redis  # noqa: E402

SECRET = "soak-webhook-secret"
WORKERS = {
    "cpu0@soak": "celery",
    "cpu1@soak": "celery",
    "gpu0@soak": "gpu-tasks",
    "store@soak": "morag-store",
}
TERMINAL = ("succeeded", "failed", "cancelled")


class Submitter:
    """``threads`` threads sharing one job counter; what the API answered for each job."""

    def __init__(self, stack: Stack, args: argparse.Namespace, speech: Path, page: str, hook: str):
        self.stack, self.args, self.speech, self.page, self.hook = stack, args, speech, page, hook
        self.numbers = itertools.count()
        self.lock = threading.Lock()
        self.accepted: list[str] = []
        self.refused: Counter[str] = Counter()
        self.threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(args.threads)
        ]

    def _one(self, i: int, client: httpx.Client) -> httpx.Response:
        gpu = str(i % 2 == 0).lower()
        if i % self.args.audio_every == 0:
            with open(self.speech, "rb") as f:
                return client.post(
                    "/api/v1/ingest/file",
                    files={"file": ("speech.wav", f)},
                    data={"gpu": gpu, "webhook_url": self.hook},
                )
        return client.post(
            "/api/v1/ingest/url",
            json={"url": self.page, "gpu": gpu == "true", "webhook_url": self.hook},
        )

    def _run(self) -> None:
        with self.stack.client() as client:
            while (i := next(self.numbers)) < self.args.jobs:
                try:
                    resp = self._one(i, client)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                else:
                    outcome = str(resp.status_code)
                    if resp.status_code == 202:
                        with self.lock:
                            self.accepted.append(resp.json()["task_id"])
                        continue
                with self.lock:
                    self.refused[outcome] += 1
                if outcome != "429":
                    time.sleep(0.2)  # the API or Redis is down for a moment

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)


def faults(
    stack: Stack, server: OwnRedis, every: float, stop: threading.Event, done: list[str]
) -> None:
    """Kill something every ``every`` seconds until ``stop``; ``done``: what, in order."""
    cycle = itertools.cycle(["cpu0@soak", "gpu0@soak", "api", "store@soak", "redis"])
    while not stop.wait(every):
        what = next(cycle)
        if what == "api":
            stack.kill("api")
            stack.start_api()
        elif what == "redis":
            server.kill()
            server.start()
        else:
            stack.kill(what)
            stack.start_worker(what, WORKERS[what], wait=False)
        done.append(what)


def _seconds(record: dict[str, Any]) -> float:
    start = datetime.fromisoformat(record["created_at"])
    end = datetime.fromisoformat(record["updated_at"])
    return (end - start).total_seconds()


def _records(stack: Stack) -> dict[str, dict[str, Any]]:
    try:
        return {r["task_id"]: r for r in stack.jobs_in_redis()}
    except redis.RedisError:
        return {}


def run_mode(name: str, args: argparse.Namespace, speech: Path, page: str) -> dict[str, Any]:
    receiver = Receiver(SECRET)
    settings = {
        "webhook_secret": SECRET,
        "webhook_backoff": 0.2,
        "store_ingested": "false",  # the store worker delivers webhooks; no embeddings
        "outbox_grace": 2,
        "redis_retry_seconds": 120,
    }
    with (
        tempfile.TemporaryDirectory(prefix=f"soak-{name}-") as tmp,
        own_redis(Path(tmp) / "redis") as server,
    ):
        stack = Stack(server.url(0), Path(tmp), free_port(), users=server.users(), **settings)
        try:
            stack.start(WORKERS)
            submitter = Submitter(stack, args, speech, page, receiver.url)
            stop = threading.Event()
            killed: list[str] = []
            killer = None
            if name == "faults":
                killer = threading.Thread(
                    target=faults, args=(stack, server, args.fault_every, stop, killed), daemon=True
                )
            started = time.monotonic()
            submitter.start()
            if killer is not None:
                killer.start()
            submitter.join()
            # Faults go on while jobs run, until each part was killed at least once.
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                records = _records(stack)
                try:
                    owed = stack.redis.zcard("morag:outbox:webhooks")
                except redis.RedisError:
                    owed = 1
                settled = all(r["status"] in TERMINAL for r in records.values())
                if records and not owed and settled and (killer is None or len(killed) >= 5):
                    break
                time.sleep(0.5)
            stop.set()
            if killer is not None:
                killer.join()
            wall = time.monotonic() - started
            records = _records(stack)
        finally:
            stack.close()
            receiver.close()
    accepted = submitter.accepted
    ended = Counter(records[t]["status"] if t in records else "missing" for t in accepted)
    twice = sum(
        1
        for t in accepted
        if t in records and sum(a["error"] is None for a in records[t]["attempts"]) > 1
    )
    posts = receiver.deliveries()
    hooks = Counter(posts.get(f"msg_{t}", 0) for t in accepted)
    latencies = sorted(_seconds(records[t]) for t in accepted if t in records)
    return {
        "mode": name,
        "accepted": len(accepted),
        "refused": dict(submitter.refused),
        "ended": dict(ended),
        "twice": twice,
        "hooks": dict(hooks),
        "wall": wall,
        "throughput": sum(ended[s] for s in TERMINAL) / wall,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "killed": Counter(killed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per mode")
    parser.add_argument("--threads", type=int, default=4, help="submitting threads")
    parser.add_argument("--audio-every", type=int, default=10, help="every Nth job a recording")
    parser.add_argument("--fault-every", type=float, default=8.0, help="seconds between kills")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for jobs to end")
    parser.add_argument("--modes", default="no faults,faults")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak-media-") as tmp:
        speech = speak(SENTENCE, Path(tmp) / "speech.wav")
        page = media.html_page(Path(tmp) / "page.html")
        with media.http_server(page.parent) as url:
            results = [
                run_mode(m.strip(), args, speech, f"{url}/page.html") for m in args.modes.split(",")
            ]

    print(
        f"\nsoak: {args.jobs} jobs per mode, {args.threads} submitters, 1 in "
        f"{args.audio_every} a recording; workers {', '.join(WORKERS)}"
    )
    head = f"{'mode':10} {'accepted':>8} {'wall s':>7} {'jobs/s':>7} {'p50 s':>7} {'p99 s':>7}"
    print(head + "  ended / ran twice / webhook POSTs per job / refused")
    for r in results:
        print(
            f"{r['mode']:10} {r['accepted']:8d} {r['wall']:7.1f} {r['throughput']:7.2f} "
            f"{r['p50']:7.2f} {r['p99']:7.2f}  {json.dumps(r['ended'])} / {r['twice']} / "
            f"{json.dumps(r['hooks'])} / {json.dumps(r['refused'])}"
        )
        if r["killed"]:
            print(f"{'':10} killed: {dict(r['killed'])}")
    by = {r["mode"]: r for r in results}
    if {"no faults", "faults"} <= by.keys():
        base, hit = by["no faults"], by["faults"]
        print(
            f"ratio faults / no faults: throughput {hit['throughput'] / base['throughput']:.2f}x, "
            f"p99 {hit['p99'] / base['p99']:.2f}x"
        )
    bad = [
        r["mode"]
        for r in results
        if set(r["ended"]) != {"succeeded"} or r["twice"] or set(r["hooks"]) != {1}
    ]
    if bad:
        print(f"FAILED: not every accepted job succeeded once with one webhook in {bad}")
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
