"""A thread in every worker's parent process: heartbeat, job leases, rescue and orphan watch.

It runs beside Celery's event loop, so it keeps beating while the pool children work on
long jobs. It only talks to Redis, and to its own worker through Celery's remote control
(to start or stop consuming the GPU queue), never to the children directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

import redis
from celery.worker import state as worker_state

from morag import __version__, fleet, gpu_telemetry
from morag.config import CPU_QUEUE, GPU_QUEUE, Settings, get_settings
from morag.jobs import RUNNING, JobStore
from morag.processors.registry import installed_types
from morag.routing import WORKER_LOST, decide_rescue, decide_route
from morag.worker import celery_app, decide_device, enqueue

log = logging.getLogger("morag.supervisor")

WATCHDOG_LOCK = "morag:watchdog"


class Supervisor:
    def __init__(self, consumer: Any, settings: Settings) -> None:
        self.settings = settings
        self.hostname: str = consumer.hostname
        self.queues = tuple(sorted(q.name for q in consumer.task_consumer.queues))
        self.concurrency = getattr(consumer.pool, "num_processes", None) or 1
        self.device = decide_device(settings)
        self.redis = redis.Redis.from_url(settings.redis_url.get_secret_value())
        self.store = JobStore(self.redis, ttl=settings.job_ttl, lease_ttl=settings.heartbeat_ttl)
        self.started_at = _now()
        self.rescuing = False
        self.gpu_absent_since: float | None = None
        self.draining = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="morag-supervisor", daemon=True)

    # -- the loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                self.tick()
            except redis.RedisError as exc:
                log.warning("supervisor: Redis unavailable: %s", exc)
            except Exception:
                log.exception("supervisor tick failed")
            self.stopped.wait(self.settings.heartbeat_interval)

    def tick(self) -> None:
        active = self._active_leases()
        self.store.refresh_leases(active)
        if self.draining.is_set():
            # Warm shutdown: out of routing at once, but keep the running job's lease alive.
            fleet.withdraw(self.redis, self.hostname)
            return
        fleet.publish(self.redis, self.heartbeat(active), self.settings.heartbeat_ttl)
        state = fleet.read_fleet(self.redis)
        if CPU_QUEUE in self.queues and GPU_QUEUE not in self.queues:
            self._rescue(state)
        self._watch_orphans(state)

    def heartbeat(self, active: dict[str, str]) -> dict[str, Any]:
        consuming = sorted({*self.queues, *([GPU_QUEUE] if self.rescuing else [])})
        return {
            "name": self.hostname,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "queues": list(self.queues),
            "consuming": consuming,
            "rescuing": self.rescuing,
            "device": self.device.device,
            "device_reason": self.device.reason,
            "gpus": self.device.gpus_as_dicts(),
            "cuda_libraries": dict(self.device.libraries),  # soname -> version loaded at start
            "gpu_telemetry": gpu_telemetry.sample(),  # NVML, never CUDA; [] without a GPU
            "processors": list(installed_types()),
            "busy": bool(active),
            "active": sorted(active),
            "concurrency": self.concurrency,
            "started_at": self.started_at,
            "updated_at": _now(),
        }

    def _active_leases(self) -> dict[str, str]:
        """Jobs running in this worker's children, with the lease owner each one wrote."""
        owners = {}
        for request in list(worker_state.active_requests):
            pid = getattr(request, "worker_pid", None)
            if pid:
                owners[request.id] = f"{self.hostname}/{pid}"
        return owners

    # -- rescue: CPU workers take over a GPU queue nobody consumes ------------------------
    def _rescue(self, state: fleet.FleetState) -> None:
        gpu_alive = bool(state.snapshot.consumers_of(GPU_QUEUE))
        now = time.monotonic()
        if gpu_alive:
            self.gpu_absent_since = None
        elif self.gpu_absent_since is None:
            self.gpu_absent_since = now
        action = decide_rescue(
            rescuing=self.rescuing,
            fleet=state.snapshot,
            gpu_absent_since=self.gpu_absent_since,
            now=now,
            grace=self.settings.rescue_grace,
        )
        if action == "start":
            log.warning(
                "no GPU worker for %.0fs: consuming %s", self.settings.rescue_grace, GPU_QUEUE
            )
            celery_app.control.add_consumer(GPU_QUEUE, destination=[self.hostname], reply=False)
            self.rescuing = True
        elif action == "stop":
            log.info("a GPU worker is back: leaving %s to it", GPU_QUEUE)
            celery_app.control.cancel_consumer(GPU_QUEUE, destination=[self.hostname], reply=False)
            self.rescuing = False

    # -- orphans: running jobs whose worker vanished --------------------------------------
    def _watch_orphans(self, state: fleet.FleetState) -> None:
        lock_ms = max(100, int(self.settings.heartbeat_interval * 900))
        if not self.redis.set(WATCHDOG_LOCK, self.hostname, nx=True, px=lock_ms):
            return
        for record in self.store.get_many(self.store.active_ids()):
            if record["status"] != RUNNING or self.store.lease_owner(record["task_id"]):
                continue
            if record.get("storing"):  # handed to morag-store; Celery redelivers that task
                continue
            lost = record["attempts"][-1]["worker"] if record["attempts"] else "unknown"
            route = decide_route(
                gpu_requested=record["route"]["gpu_requested"],
                content_type=record["content_type"],
                fleet=state.snapshot,
                gpu_backlog_limit=self.settings.gpu_backlog_limit,
            ).as_dict()
            route["reason"] = f"worker {lost} was lost; redelivered: {route['reason']}"
            route["code"] = WORKER_LOST
            if self.store.requeue(
                record["task_id"],
                route=route,
                owner=None,
                error=f"worker {lost} lost (no heartbeat)",
            ):
                log.warning(
                    "job %s orphaned by %s: re-enqueued on %s",
                    record["task_id"],
                    lost,
                    route["queue"],
                )
                enqueue(record["task_id"], route["queue"])

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.tick_safely()
        self.thread.start()

    def tick_safely(self) -> None:
        try:
            self.tick()
        except redis.RedisError as exc:
            log.warning("supervisor: Redis unavailable: %s", exc)

    def drain(self) -> None:
        self.draining.set()
        with contextlib.suppress(redis.RedisError):
            fleet.withdraw(self.redis, self.hostname)


_supervisor: Supervisor | None = None


def start_supervisor(consumer: Any) -> None:
    global _supervisor
    _supervisor = Supervisor(consumer, get_settings())
    _supervisor.start()
    log.info(
        "worker %s on %s, device %s",
        _supervisor.hostname,
        ",".join(_supervisor.queues),
        _supervisor.device.device,
    )


def drain_supervisor() -> None:
    if _supervisor is not None:
        _supervisor.drain()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
