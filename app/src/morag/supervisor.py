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

from morag import __version__, execution, fleet, gpu_telemetry, liveness, runtime, warmup, webhooks
from morag.celery_app import dispatch
from morag.config import CPU_QUEUE, GPU_QUEUE, STORE_QUEUE, Settings, get_settings
from morag.job_record import JobRecord
from morag.jobs import QUEUED, RUNNING, STORE_WAIT, TERMINAL, waited_queued
from morag.processors.registry import advertised_types
from morag.redis_client import redis_client
from morag.routing import WORKER_LOST, decide_rescue, decide_route
from morag.runtime import decide_device, job_store

log = logging.getLogger("morag.supervisor")

WATCHDOG_LOCK = "morag:watchdog"
# Running jobs seen without a lease: task id -> epoch seconds when first seen so. A job is
# requeued only once it stayed so for a whole lease TTL: after a Redis outage every lease
# has lapsed, and each live worker takes its own back at its next tick.
SUSPECTS = "morag:orphans:suspects"
NO_STORE_WORKER = (
    "a morag-store worker: none is alive, the result is stored when one starts "
    "(`morag worker --queue morag-store`)"
)


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
        self.store = job_store(self.redis, settings)
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
        lock_ms = max(100, int(self.settings.heartbeat_interval * 900))
        if not self.redis.set(WATCHDOG_LOCK, self.hostname, nx=True, px=lock_ms):
            return
        if state is None:
            state = fleet.read_fleet(self.redis)
        self._send_outbox()
        self._send_webhooks(state)
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

    # -- the outbox: records written whose message was never sent ---------------------------
    def _send_outbox(self) -> None:
        for task_id in self.store.outbox_due():
            record = self.store.get(task_id)
            queue = _pending_queue(record)
            if queue is not None:
                log.warning("job %s: its message was never sent; sending it to %s", task_id, queue)
                dispatch(self.store, task_id, queue)
            else:
                self.store.sent(task_id)

    def _send_webhooks(self, state: fleet.FleetState) -> None:
        """Ended jobs whose webhook is owed and not delivered in time: publish it again (its
        ender died before publishing, the broker refused, a store worker lost it). Only while
        a store worker is alive to deliver it and has taken every message waiting for it:
        messages do not pile up meanwhile."""
        if not state.snapshot.consumers_of(STORE_QUEUE) or self._store_backlog():
            return
        due = self.store.webhooks_due()
        if due:
            webhooks.resend_due(self.store, due, resend_after=self.settings.store_resend_after)

    # -- orphans: running jobs whose worker vanished --------------------------------------
    def _watch_orphans(self, state: fleet.FleetState) -> None:
        now = time.time()
        seen = {_text(k): float(v) for k, v in self.redis.hgetall(SUSPECTS).items()}
        suspects: dict[str, float] = {}
        store_alive = bool(state.snapshot.consumers_of(STORE_QUEUE))
        backlog: int | None = None  # the store queue's length, read once a tick if needed
        lengths: dict[str, int] | None = None  # the same for the job queues
        for record in self.store.get_many(self.store.active_ids()):
            task_id = record.task_id
            if record.status == QUEUED:
                if lengths is None:
                    lengths = fleet.queue_lengths(self.redis)
                self._watch_queued(record, lengths)
                continue
            if record.status != RUNNING or self.store.lease_owner(task_id):
                continue
            if record.storing:  # handed to morag-store
                if backlog is None:
                    backlog = self._store_backlog()
                self._watch_storing(record, store_alive, backlog)
                continue
            lost = record.attempts[-1].worker if record.attempts else "unknown"
            if _reports_active(state, lost, task_id):
                continue  # its worker is alive and runs it: it takes its lease back
            first = seen.get(task_id, now)
            suspects[task_id] = first
            if now - first < self.settings.heartbeat_ttl:
                continue
            decided = decide_route(
                gpu_requested=record.route.gpu_requested,
                content_type=record.content_type,
                fleet=state.snapshot,
                gpu_backlog_limit=self.settings.gpu_backlog_limit,
            )
            route = decided.model_copy(
                update={
                    "reason": f"worker {lost} was lost; redelivered: {decided.reason}",
                    "code": WORKER_LOST,
                }
            )
            suspects.pop(task_id)
            if self.store.requeue(
                task_id,
                route=route,
                owner=None,
                error=f"worker {lost} lost (no heartbeat)",
            ):
                log.warning("job %s orphaned by %s: re-enqueued on %s", task_id, lost, route.queue)
                dispatch(self.store, task_id, route.queue)
        pipe = self.redis.pipeline()
        pipe.delete(SUSPECTS)
        if suspects:
            pipe.hset(SUSPECTS, mapping=suspects)
        pipe.execute()

    def _watch_queued(self, record: JobRecord, lengths: dict[str, int]) -> None:
        """A job queued for MORAG_LOST_MESSAGE_AFTER while its queue is empty and nobody
        claimed it has lost its message: a worker killed between taking it off the queue and
        claiming the job (kombu keeps it in ``unacked`` until the visibility timeout, hours,
        or loses it if killed before that). Its message goes out again through the outbox.
        A message in the queue is not lost (it waits its turn), so a backlog costs nothing."""
        queue = record.route.queue
        # Checked on the record in hand first: most ticks need no transaction at all.
        after = self.settings.lost_message_after
        if lengths.get(queue, 0) or not waited_queued(record, after, time.time()):
            return
        if self.store.resend_lost(record.task_id, queued_for=after):
            log.warning(
                "job %s: queued with %s empty and nobody running it: its message was lost; "
                "sending it again",
                record.task_id,
                queue,
            )

    def _store_backlog(self) -> int:
        """Messages waiting on the morag-store queue."""
        return int(self.redis.llen(STORE_QUEUE))

    def _watch_storing(self, record: JobRecord, store_alive: bool, backlog: int) -> None:
        """A handed-over job nobody stores: say why, and send its store message again once
        ``store_resend_after`` passed (a store worker killed mid-store leaves its message
        unacked until the visibility timeout; a duplicate is skipped by the store claim).
        Not while messages wait on the store queue: the job's own is most likely among
        them, and resending every waiting job of a backlog that outlasts
        ``store_resend_after`` flooded the queue with duplicates (15,000 in ten minutes in
        the chaos test on a loaded machine). A lost message is sent once the queue drains."""
        task_id = record.task_id
        next_at = time.time() + self.settings.store_resend_after
        if not store_alive or backlog:
            why = STORE_WAIT if store_alive else NO_STORE_WORKER
            self.store.store_resent(task_id, next_at=next_at, waiting_for=why, resend=False)
            return
        if self.store.store_resent(task_id, next_at=next_at, waiting_for=STORE_WAIT):
            log.warning("job %s: nobody is storing it; store message sent again", task_id)
            dispatch(self.store, task_id, STORE_QUEUE)

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


def _pending_queue(record: JobRecord | None) -> str | None:
    """Where the message of an outbox entry goes, or None when nothing is to be sent."""
    if record is None or record.status in TERMINAL:
        return None
    if record.status == QUEUED:
        return record.route.queue
    if record.status == RUNNING and record.storing:
        return STORE_QUEUE
    return None  # claimed: the message was delivered


def _reports_active(state: fleet.FleetState, worker: str, task_id: str) -> bool:
    return any(
        beat.get("name") == worker and task_id in (beat.get("active") or [])
        for beat in state.heartbeats
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
