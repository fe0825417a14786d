"""The processing task and the worker's signal handlers (device at start, supervisor,
time-limit failures, drain at shutdown). Imported by every worker through the Celery app's
``imports`` setting and by ``morag.worker``."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import signals
from celery.exceptions import TimeLimitExceeded

from morag import warmup
from morag.celery_app import PROCESS_TASK, celery_app
from morag.config import CPU_QUEUE, get_settings
from morag.execution import run_job
from morag.job_record import JobStatus
from morag.redis_client import redis_client
from morag.runtime import get_runtime, require_device, worker_job_store
from morag.supervisor import current_hostname, drain_supervisor, start_supervisor
from morag.webhooks import notify_end

log = logging.getLogger("morag.worker")


@celery_app.task(name=PROCESS_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def process_job(self: Any, task_id: str) -> None:
    delivery = self.request.delivery_info or {}
    queue = delivery.get("routing_key") or CPU_QUEUE
    run_job(get_runtime(), task_id, queue=queue, worker=self.request.hostname or "unknown")


# -- worker lifecycle -----------------------------------------------------------------------


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Decide the device in the parent with nvidia-smi (never CUDA itself) before the fork;
    # `celery -A morag.worker:celery_app worker` with MORAG_DEVICE=cuda and no CUDA exits here.
    info = require_device(get_settings())
    log.info("device %s (%s)", info.device, info.reason)
    # The pipe the pool processes report their warm-up on, opened before they fork.
    queues = [q.name for q in sender.app.amqp.queues.consume_from.values()]
    warmup.prepare(get_settings(), queues)


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    warmup.warm_child(get_settings())  # loads the model before the process takes a job


@signals.worker_ready.connect
def _on_worker_ready(sender: Any, **_: Any) -> None:
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
    if getattr(sender, "name", None) != PROCESS_TASK:
        return
    settings = get_settings()
    try:
        client = redis_client(settings, socket_timeout=5)
        try:
            store = worker_job_store(client, settings)
            record = store.fail_timed_out(task_id, current_hostname(), settings.job_time_limit)
            if record is not None and record.status == JobStatus.failed:
                notify_end(store, record, resend_after=settings.store_resend_after)
        finally:
            client.close()
    except redis.RedisError:
        log.exception("job %s ran out of time; its record could not be updated", task_id)


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    drain_supervisor()
