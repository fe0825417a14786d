"""The Celery app: its queues and delivery settings, and sending jobs to it.

Imports nothing of the worker side (runtime, tasks, supervisor), so the API, the job
store's reconcilers and the tasks all import it without a circle. Nothing connects at
import time: the configuration is read from the settings object when Celery first needs
it. Tasks are sent by name; `morag.tasks` and `morag.server_tasks` define them.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery
from kombu import Exchange, Queue

from morag.config import CPU_QUEUE, DECLARED_QUEUES, STORE_QUEUE, Settings, get_settings
from morag.jobs import JobStore
from morag.redis_client import broker_settings

log = logging.getLogger("morag.worker")

PROCESS_TASK = "morag.process_job"
STORE_TASK = "morag.store_job"

celery_app = Celery("morag", set_as_current=False)


def celery_config(settings: Settings) -> dict[str, Any]:
    # The URL, TLS and (with MORAG_REDIS_SENTINELS) kombu's Sentinel options.
    broker = broker_settings(settings)
    transport = {
        # Above the longest job, or Redis hands a running job to a second worker.
        "visibility_timeout": settings.visibility_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
        **broker["broker_transport_options"],
    }
    return {
        **broker,
        # kombu's Redis transport (its Sentinel transport with MORAG_REDIS_SENTINELS) and
        # Celery's consumer, except that a malformed message pushed onto a queue is dropped
        # with a log line instead of stopping the worker.
        "broker_transport": (
            "morag.broker:SentinelTransport"
            if settings.redis_sentinels
            else "morag.broker:Transport"
        ),
        "worker_consumer": "morag.broker:Consumer",
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
        # A pool process warms up (loads its model, morag.warmup) before it reports to the
        # parent; Celery kills one that has not reported after this (4 s by default).
        "worker_proc_alive_timeout": settings.warmup_timeout + 30 if settings.warmup else 4.0,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        # Task events for Flower / celery-exporter (MORAG_CELERY_EVENTS; off by default).
        "worker_send_task_events": settings.celery_events,
        "task_send_sent_event": settings.celery_events,
        # The tasks and signal handlers (morag.tasks), and storing, search and webhooks for the
        # morag-store queue (morag.server_tasks): imported by every worker at start.
        "imports": ("morag.tasks", "morag.server_tasks"),
    }


@celery_app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))


def enqueue(task_id: str, queue: str) -> None:
    """Send the job's message; the Celery task id is the job id, so revoke(job id) cancels."""
    celery_app.send_task(PROCESS_TASK, (task_id,), queue=queue, task_id=task_id)


def enqueue_store(task_id: str, countdown: float | None = None) -> None:
    """Ask the server's morag-store worker to chunk, embed and store an ingested job.

    The Celery task id is the job id: the store worker's supervisor then keeps the job's
    lease alive while it stores, as it does for a processing job."""
    celery_app.send_task(
        STORE_TASK, (task_id,), queue=STORE_QUEUE, task_id=task_id, countdown=countdown
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
