"""``/ready`` answered within ``MORAG_READY_TIMEOUT``, whatever Redis does.

A load balancer takes an API out when its check times out (HAProxy: ``timeout check``, 2 s by
default in roles/haproxy). The checks therefore run off the request thread pool, one at a
time in a thread of their own (requests arriving meanwhile share the running check), and an
answer that is not there in time says so: Redis gave no answer within the timeout. Redis is
pinged on a client of its own with that timeout and no retries, so a primary that vanished
costs one timeout, and the next check asks the Sentinels afresh.

With Sentinel, Redis unavailable for less than ``MORAG_READY_REDIS_GRACE`` seconds is
``degraded`` (200), not ``not ready`` (503): a failover stops every API host at once, so
taking them all out of the load balancer only turns the submissions that would wait for the
new primary (``MORAG_REDIS_FAILOVER_SECONDS``) into immediate 503s from the balancer. Past
the grace, or without Sentinel, the API is not ready.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from morag.config import STORE_QUEUE
from morag.fleet import CachedFleet, GpuWorkers, gpu_workers
from morag.redis_client import redis_client, redis_health, refresh_primary
from morag.runtime import job_store
from morag.submission import Services

NO_STORE_WORKER = (
    "no live morag-store worker: ingest jobs wait at progress 0.99 (stored, webhooks and "
    "search too) until one starts"
)


def gpu_workers_text(gpu: GpuWorkers) -> str:
    """``checks.gpu_workers``: a GPU worker counts only with a passed CUDA check."""
    text = f"{len(gpu.checked)} GPU worker(s) with a passed CUDA check" + (
        f": {', '.join(gpu.checked)}" if gpu.checked else ""
    )
    if gpu.unchecked:
        text += (
            f"; not counted, device cuda without a passed CUDA check (a worker older than "
            f"the check?): {', '.join(gpu.unchecked)}"
        )
    if gpu.on_cpu:
        text += f"; consuming gpu-tasks on the CPU: {', '.join(gpu.on_cpu)}"
    return text


@dataclass
class Checks:
    """One run of the checks: ``redis`` None when Redis answered, else why not."""

    redis: str | None = None
    shared_dir: str = "ok"
    stage: str = "redis"  # the check running (a check that timed out is named after it)
    degraded: dict[str, Any] = field(default_factory=dict)
    informational: dict[str, Any] = field(default_factory=dict)


class ReadinessProbe:
    """The API's readiness, checked in one thread of its own; see the module's text."""

    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings
        self.timeout = settings.ready_timeout
        self.grace = settings.ready_redis_grace_seconds()
        # Its own client: a short timeout, no retry, so one check costs at most one timeout.
        self._ping = redis_client(
            settings,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
        )
        # The fleet and the outbox read on it too: the API's own client sends a command
        # again for MORAG_REDIS_FAILOVER_SECONDS, which would hold the one check thread.
        self._fleet = CachedFleet(
            self._ping, settings.fleet_cache_seconds, settings.liveness_interval
        )
        self._store = job_store(self._ping, settings)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="morag-ready")
        self._lock = threading.Lock()
        self._running: Future[None] | None = None
        self._checks = Checks()
        self._shared_dir = "ok"  # what the last check that got that far found
        self._redis_down_since: float | None = None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._ping.close()

    async def report(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of ``GET /ready``."""
        running, checks = self._check_started()
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(running)), self.timeout)
        except TimeoutError:
            # The check that has not answered (Redis, or a hung mount of the shared dir) is
            # named; what answered counts; a shared dir not reached yet, as last found.
            silent = f"no answer within MORAG_READY_TIMEOUT ({self.timeout:g} s)"
            checks = Checks(
                redis=silent if checks.stage == "redis" else checks.redis,
                shared_dir={
                    "redis": self._shared_dir,
                    "shared_dir": f"unavailable: {silent}",
                }.get(checks.stage, checks.shared_dir),
                degraded=dict(checks.degraded),
                informational=dict(checks.informational),
            )
        return self._verdict(checks, time.monotonic())

    def _check_started(self) -> tuple[Future[None], Checks]:
        with self._lock:
            if self._running is None or self._running.done():
                self._checks = Checks()
                self._running = self._executor.submit(self._check, self._checks)
            return self._running, self._checks

    def _verdict(self, checks: Checks, now: float) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {}
        degraded = dict(checks.degraded)
        if checks.redis is None:
            self._redis_down_since = None
            body["redis"] = "ok"
        else:
            since = self._redis_down_since = self._redis_down_since or now
            down_for = now - since
            if down_for < self.grace:
                body["redis"] = "ok"
                degraded["redis_failover"] = (
                    f"Redis unavailable for {down_for:.1f} s ({checks.redis}): waiting for a "
                    f"Sentinel failover; not ready after MORAG_READY_REDIS_GRACE "
                    f"({self.grace:g} s)"
                )
            else:
                body["redis"] = f"unavailable: {checks.redis}"
        body["shared_dir"] = checks.shared_dir
        ok = all(v == "ok" for v in body.values())
        status = "not ready" if not ok else ("degraded" if degraded else "ready")
        body.update(degraded)
        body.update(checks.informational)
        return (200 if ok else 503), {"status": status, "checks": body}

    def _check(self, checks: Checks) -> None:
        """Fills ``checks`` as it goes (a request that stops waiting reads what is there)."""
        try:
            self._ping.ping()
        except redis.RedisError as exc:
            checks.redis = type(exc).__name__
        else:
            self._follow_primary()
            try:
                self._fleet_checks(checks)
            except redis.RedisError as exc:
                checks.redis = type(exc).__name__
        checks.stage = "shared_dir"
        uploads = self.services.settings.uploads_dir
        try:
            uploads.mkdir(parents=True, exist_ok=True)
            checks.shared_dir = "ok" if os.access(uploads, os.W_OK) else "not writable"
        except OSError as exc:
            checks.shared_dir = f"unavailable: {exc.strerror}"
        self._shared_dir = checks.shared_dir
        checks.stage = "done"

    def _follow_primary(self) -> None:
        """The ping found another primary than the API's own client last reached (after a
        failover): let that client ask the Sentinels now, which drops its idle connections
        to the old primary, instead of each costing a submission its socket timeout."""
        mine, theirs = redis_health(self._ping), redis_health(self.services.redis)
        if mine and theirs and theirs.primary and mine.primary != theirs.primary:
            refresh_primary(self.services.redis)

    def _fleet_checks(self, checks: Checks) -> None:
        state = self._fleet.get()
        # checks.gpu_workers: the cuda workers whose heartbeat carries a passed CUDA check.
        # Informational, never degraded: without GPU workers gpu=true jobs run on CPU by design.
        checks.informational["gpu_workers"] = gpu_workers_text(gpu_workers(state.heartbeats))
        if self.services.settings.store_ingested and not state.snapshot.consumers_of(STORE_QUEUE):
            checks.degraded["store_worker"] = NO_STORE_WORKER
        # Past the grace only: every submission holds an entry for a moment.
        unsent = len(self._store.outbox_due())
        if unsent:
            checks.degraded["outbox"] = (
                f"{unsent} job message(s) not sent within MORAG_OUTBOX_GRACE: is any "
                "worker alive to send them?"
            )
