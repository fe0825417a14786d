"""The watchdog: one process of the fleet at a time (a Redis lock) sends what was never sent
and requeues what was lost.

It sends the messages of records whose send failed (the outbox), publishes webhooks owed
and not delivered in time, requeues running jobs whose worker vanished, sends again the
message of a queued job that was lost, and of a job handed to the store worker nobody
stores. It changes any job's record, so it runs only where the credential may: a worker
writing records on Redis (MORAG_JOB_WRITES=redis, the store worker) or the API
(MORAG_API_WATCHDOG); never a GPU/CPU worker that writes through the API.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from morag import fleet, webhooks
from morag.celery_app import dispatch
from morag.config import STORE_QUEUE, Settings
from morag.job_record import JobRecord
from morag.jobs import QUEUED, RUNNING, STORE_WAIT, TERMINAL, JobStore, waited_queued
from morag.redis_client import passing_outage
from morag.routing import WORKER_LOST, decide_route

log = logging.getLogger("morag.watchdog")

WATCHDOG_LOCK = "morag:watchdog"
# Running jobs seen without a lease: task id -> epoch seconds when first seen so. A job is
# requeued only once it stayed so for a whole lease TTL: after a Redis outage every lease
# has lapsed, and each live worker takes its own back at its next tick.
SUSPECTS = "morag:orphans:suspects"
NO_STORE_WORKER = (
    "a morag-store worker: none is alive, the result is stored when one starts "
    "(`morag worker --queue morag-store`)"
)


class Watchdog:
    def __init__(self, client: redis.Redis, store: JobStore, settings: Settings, name: str) -> None:
        self.redis = client
        self.store = store
        self.settings = settings
        self.name = name  # who holds the lock (a worker's name, or the API's)
        # Redis was away (unreachable, or refusing writes) at this process's last tick.
        self.away = False
        # Until then (epoch seconds) no running job is requeued as lost (outage_grace).
        self.hold_until = 0.0

    def tick(self, state: fleet.FleetState | None = None) -> bool:
        """Watch once if this process holds (or takes) the lock; True when it did."""
        try:
            return self._tick(state)
        except redis.RedisError as exc:
            self.saw_error(exc)
            raise

    def saw_error(self, exc: redis.RedisError) -> None:
        """A Redis error of this process (its watchdog's, or its supervisor's before it)."""
        if passing_outage(exc) is not None:
            self.away = True

    def _tick(self, state: fleet.FleetState | None) -> bool:
        lock_ms = max(100, int(self.settings.heartbeat_interval * 900))
        took = self.redis.set(WATCHDOG_LOCK, self.name, nx=True, px=lock_ms)
        if self.away:
            # Back after an outage, which lapsed every lease: the workers that ran jobs
            # through it (or were restarted meanwhile, with a result kept on disk:
            # morag.execution.keep) get outage_grace to take their leases back.
            self.away = False
            self.hold_until = time.time() + self.settings.outage_grace
            log.warning(
                "watchdog: Redis is back; no job is requeued as lost for %.0fs",
                self.settings.outage_grace,
            )
        if not took:
            return False
        if state is None:
            state = fleet.read_fleet(self.redis)
        self._send_outbox()
        self._send_webhooks(state)
        self._watch_orphans(state)
        return True

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
            if now - first < self.settings.heartbeat_ttl or now < self.hold_until:
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


class WatchdogThread:
    """The API's watchdog (MORAG_API_WATCHDOG): ticks every heartbeat interval."""

    def __init__(self, watchdog: Watchdog, interval: float) -> None:
        self.watchdog = watchdog
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="morag-watchdog", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                self.watchdog.tick()
            except redis.RedisError as exc:
                log.warning("watchdog: Redis unavailable: %s", exc)
            except Exception:
                log.exception("watchdog tick failed")
            self.stopped.wait(self.interval)
