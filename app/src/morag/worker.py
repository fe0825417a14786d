"""The Celery app (``celery -A morag.worker:celery_app``), its queues, settings and the one task.

Nothing connects at import time: the configuration is read from the settings object when
Celery first needs it, and each worker process opens its own Redis client lazily.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, signals
from celery.exceptions import TimeLimitExceeded
from kombu import Exchange, Queue

from morag.config import CPU_QUEUE, DECLARED_QUEUES, STORE_QUEUE, Settings, get_settings
from morag.devices import EX_CONFIG, DeviceInfo, DeviceUnavailable, detect_device
from morag.jobs import JobStore

log = logging.getLogger("morag.worker")

celery_app = Celery("morag", set_as_current=False)


def celery_config(settings: Settings) -> dict[str, Any]:
    url = settings.redis_url.get_secret_value()
    transport = {
        # Above the longest job, or Redis hands a running job to a second worker.
        "visibility_timeout": settings.visibility_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }
    return {
        "broker_url": url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,  # results live in the job record, not a result backend
        "result_backend": None,
        "task_queues": tuple(
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in DECLARED_QUEUES
        ),
        "task_default_queue": CPU_QUEUE,
        "task_create_missing_queues": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.job_time_limit,
        "task_soft_time_limit": max(1, settings.job_time_limit - 30),
        # A Redis blip must not cost a running job: the job keeps running, its lease is
        # taken back when Redis answers again, and a redelivered copy of its message is
        # skipped by the claim (the live lease holder keeps it).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_max_tasks_per_child": settings.max_tasks_per_child,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        # Task events for Flower / celery-exporter (MORAG_CELERY_EVENTS; off by default).
        "worker_send_task_events": settings.celery_events,
        "task_send_sent_event": settings.celery_events,
        "imports": ("morag.server_tasks",),  # storing, search, webhooks (morag-store queue)
    }


@celery_app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))


# -- per-process runtime --------------------------------------------------------------------


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    device: DeviceInfo
    pid: int


_runtime: Runtime | None = None
_device: DeviceInfo | None = None  # decided in the parent, inherited by forked children


def decide_device(settings: Settings) -> DeviceInfo:
    """Decided once per worker; raises DeviceUnavailable for MORAG_DEVICE=cuda without CUDA."""
    global _device
    if _device is None:
        _device = detect_device(settings.device)
    return _device


def require_device(settings: Settings) -> DeviceInfo:
    """decide_device, or exit with EX_CONFIG (78) and the reason on stderr and in the log.

    systemd's RestartPreventExitStatus=78 then leaves the unit failed with the message in its
    journal, instead of restarting a worker that cannot do what it was told."""
    try:
        return decide_device(settings)
    except DeviceUnavailable as exc:
        if log.hasHandlers():
            log.critical("%s", exc)
        print(f"morag worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EX_CONFIG) from exc


def job_store(client: redis.Redis, settings: Settings) -> JobStore:
    return JobStore(
        client,
        ttl=settings.job_ttl,
        lease_ttl=settings.heartbeat_ttl,
        outbox_grace=settings.outbox_grace,
    )


def get_runtime() -> Runtime:
    """This process's Redis client and job store; rebuilt after a fork."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = get_settings()
        client = redis.Redis.from_url(settings.redis_url.get_secret_value())
        store = job_store(client, settings)
        _runtime = Runtime(settings, client, store, decide_device(settings), os.getpid())
    return _runtime


# -- the task -------------------------------------------------------------------------------


@celery_app.task(name="morag.process_job", bind=True, acks_late=True, reject_on_worker_lost=True)
def process_job(self: Any, task_id: str) -> None:
    from morag.execution import run_job

    delivery = self.request.delivery_info or {}
    queue = delivery.get("routing_key") or CPU_QUEUE
    run_job(get_runtime(), task_id, queue=queue, worker=self.request.hostname or "unknown")


def enqueue(task_id: str, queue: str) -> None:
    """Send the job's message; the Celery task id is the job id, so revoke(job id) cancels."""
    process_job.apply_async((task_id,), queue=queue, task_id=task_id)


def enqueue_store(task_id: str, countdown: float | None = None) -> None:
    """Ask the server's morag-store worker to chunk, embed and store an ingested job.

    The Celery task id is the job id: the store worker's supervisor then keeps the job's
    lease alive while it stores, as it does for a processing job."""
    celery_app.send_task(
        "morag.store_job", (task_id,), queue=STORE_QUEUE, task_id=task_id, countdown=countdown
    )


def dispatch(store: JobStore, task_id: str, queue: str) -> None:
    """Send the message of a job whose record (and outbox entry) is written, then clear
    the outbox entry. If the send fails the entry stays and a reconciler sends it."""
    if queue == STORE_QUEUE:
        enqueue_store(task_id)
    else:
        enqueue(task_id, queue)
    try:
        store.sent(task_id)
    except redis.RedisError:  # sent twice at worst; the claim skips the duplicate
        log.warning("job %s sent, but its outbox entry stays (Redis error)", task_id)


# -- worker lifecycle -----------------------------------------------------------------------


@signals.worker_init.connect
def _on_worker_init(**_: Any) -> None:
    # Decide the device in the parent with nvidia-smi (never CUDA itself) before the fork;
    # `celery -A morag.worker:celery_app worker` with MORAG_DEVICE=cuda and no CUDA exits here.
    info = require_device(get_settings())
    log.info("device %s (%s)", info.device, info.reason)


@signals.worker_ready.connect
def _on_worker_ready(sender: Any, **_: Any) -> None:
    from morag.supervisor import start_supervisor

    start_supervisor(sender)


@signals.task_failure.connect
def _on_task_failure(
    sender: Any = None, task_id: str = "", exception: Any = None, **_: Any
) -> None:
    """A hard time limit kills the pool child; Celery reports it here, in the parent.

    Without this the job would stay `running`, its lease would lapse and the watchdog would
    re-run it up to the delivery cap. It ends `failed` once, saying it ran out of time."""
    if not isinstance(exception, TimeLimitExceeded):
        return
    if getattr(sender, "name", None) != "morag.process_job":
        return
    from morag.supervisor import current_hostname

    settings = get_settings()
    try:
        client = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=5)
        try:
            store = job_store(client, settings)
            record = store.fail_timed_out(task_id, current_hostname(), settings.job_time_limit)
            if record is not None and record["status"] == "failed":
                from morag.webhooks import notify_end

                notify_end(client, record)
        finally:
            client.close()
    except redis.RedisError:
        log.exception("job %s ran out of time; its record could not be updated", task_id)


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    from morag.supervisor import drain_supervisor

    drain_supervisor()
