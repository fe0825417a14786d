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
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import redis
from celery.worker import state as worker_state

from morag import __version__, execution, fleet, gpu_telemetry, liveness, runtime, warmup
from morag.config import CPU_QUEUE, GPU_QUEUE, Settings, get_settings
from morag.processors.registry import advertised_types
from morag.redis_client import redis_client
from morag.routing import decide_rescue
from morag.runtime import decide_device, worker_job_store
from morag.watchdog import Watchdog

log = logging.getLogger("morag.supervisor")


class Supervisor:
    def __init__(self, consumer: Any, settings: Settings) -> None:
        self.settings = settings
        self.consumer = consumer
        self.hostname: str = consumer.hostname
        self.queues = tuple(sorted(q.name for q in consumer.task_consumer.queues))
        self.concurrency = getattr(consumer.pool, "num_processes", None) or 1
        self.device = decide_device(settings)
        # Checked once: a worker whose Whisper model cannot load offers no audio/video/youtube.
        self.processors = list(advertised_types(settings.whisper_model))
        self.redis = redis_client(settings)
        # Held while this process lives; dies with it (morag.liveness). Its own client, with
        # keepalive and a periodic PING: a Redis host that vanished is noticed.
        self.liveness = (
            liveness.Subscription(
                redis_client(
                    settings,
                    socket_keepalive=True,
                    health_check_interval=max(1, int(settings.heartbeat_interval)),
                ),
                self.hostname,
            )
            if settings.liveness_channel
            else None
        )
        # A CPU worker that may rescue gpu-tasks checks the GPU workers' liveness channels
        # between heartbeats, so it notices a dead one within liveness_interval.
        self.rescues = CPU_QUEUE in self.queues and GPU_QUEUE not in self.queues
        self.state: fleet.FleetState | None = None
        self.store = worker_job_store(self.redis, settings)
        self.watchdog = Watchdog(self.redis, self.store, settings, self.hostname)
        self.started_at = _now()
        # The pool processes' last warm-up report (morag.warmup); "off" when it does not run.
        self.warmup: dict[str, Any] = {"state": "pending" if warmup.enabled() else "off"}
        self.rescuing = False
        self.gpu_absent_since: float | None = None
        self.draining = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="morag-supervisor", daemon=True)

    # -- the loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        next_tick = time.monotonic()
        while not self.stopped.is_set():
            try:
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.settings.heartbeat_interval
                    self.tick()
                else:
                    with contextlib.suppress(redis.RedisError):  # the tick says it, less often
                        self.check_liveness()
            except redis.RedisError as exc:
                log.warning("supervisor: Redis unavailable: %s", exc)
                self.watchdog.saw_error(exc)
            except Exception:
                log.exception("supervisor tick failed")
            pause = max(0.0, next_tick - time.monotonic())
            if self.rescues:
                pause = min(pause, self.settings.liveness_interval)
            self.stopped.wait(pause)

    def check_liveness(self) -> None:
        """Between heartbeats: drop the workers whose process died from the last fleet read
        (one PUBSUB NUMSUB), and start rescuing gpu-tasks when that left none on it."""
        if self.state is None or self.draining.is_set() or not self.rescues:
            return
        self.state = fleet.recheck(self.redis, self.state)
        self._rescue(self.state)

    def take_warmup_reports(self, timeout: float = 0.0, count: int = 0) -> None:
        for report in warmup.reports(timeout, count):
            self.warmup = report
            if report.get("fallback") and self.device.device != "cpu":
                # A pool process fell back to CPU (MORAG_DEVICE=auto): advertise it, and
                # processes forked from now on start on CPU too.
                self.device = replace(self.device, device="cpu", reason=report["fallback"])
                runtime.use_device(self.device)

    def tick(self) -> None:
        self.take_warmup_reports()
        # Results kept through a Redis outage longer than MORAG_REDIS_RETRY_SECONDS hold
        # their lease as running jobs do (no watchdog takes the job for lost), and are
        # recorded first thing once Redis takes writes again.
        kept = execution.kept_outcomes(self.settings, self.hostname)
        active = {**self._active_leases(), **{k.task_id: k.owner for k in kept}}
        self.store.refresh_leases(active)
        execution.record_kept(self.settings, self.redis, self.store, kept)
        for k in kept:
            active.pop(k.task_id, None)
        if self.draining.is_set():
            # Warm shutdown: out of routing at once, but keep the running job's lease alive.
            fleet.withdraw(self.redis, self.hostname)
            return
        fleet.publish(self.redis, self.heartbeat(active), self.settings.heartbeat_ttl)
        # The whole fleet is read only by the workers that use it: those that may rescue
        # gpu-tasks, and the one holding the watchdog lock. Every worker reading it every
        # tick made the fleet's reads grow with its square (tests/bench/fleet_scale.py).
        state: fleet.FleetState | None = None
        if self.rescues:
            state = self.state = fleet.read_fleet(self.redis)
            self._rescue(state)
        # A worker whose record changes go through the API (MORAG_JOB_WRITES=api) may not
        # write other jobs' records: the API (MORAG_API_WATCHDOG) or the store worker watch.
        if self.settings.job_writes == "redis":
            self.watchdog.tick(state)

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
            # The CUDA check at start (passed, reason, checked_at, seconds); /ready counts a
            # cuda worker only with a passed one. None: the device was never cuda.
            "cuda_check": check.heartbeat() if (check := self.device.cuda_check) else None,
            "gpu_telemetry": gpu_telemetry.sample(),  # NVML, never CUDA; [] without a GPU
            "processors": self.processors,
            # Model loaded before the first job: state warm, failed (with the error), off.
            "warmup": self.warmup,
            # Subscribed while this process lives: readers count it (morag.liveness). None
            # until Redis confirmed it, or when refused: the TTL alone then.
            "liveness": self.liveness.live_channel() if self.liveness else None,
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
            # On this worker's own consumer, in its event loop (the hub's call_soon is
            # thread-safe): a broadcast would need PUBLISH on the remote-control channel,
            # which the worker's Redis user is refused (remote control of every worker).
            self.consumer.call_soon(self.consumer.add_task_queue, GPU_QUEUE)
            self.rescuing = True
        elif action == "stop":
            log.info("a GPU worker is back: leaving %s to it", GPU_QUEUE)
            self.consumer.call_soon(self.consumer.cancel_task_queue, GPU_QUEUE)
            self.rescuing = False

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self.liveness is not None:
            self.liveness.start()  # before the first heartbeat, which advertises it
        if warmup.enabled():
            # Before the first heartbeat, in Celery's worker_ready: the event loop (and with
            # it the first BRPOP) waits too, so no job reaches a cold process.
            started = time.monotonic()
            self.take_warmup_reports(self.settings.warmup_timeout, self.concurrency)
            log.info("warm-up: %s after %.1fs", self.warmup, time.monotonic() - started)
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


def current_hostname() -> str:
    """This worker's Celery hostname (``name@host``), once the supervisor started."""
    return _supervisor.hostname if _supervisor is not None else socket.gethostname()


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
