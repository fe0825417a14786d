"""Prometheus metrics for the whole fleet: what is counted, and how it is recorded in Redis.

- Recording (any process: API, workers, the store worker). Counters and histograms that
  several processes increment live in Redis: ``morag:metrics:counters`` (one hash field per
  labelled counter) and ``morag:metrics:histograms`` (per labelled histogram: one field per
  bucket, a sum and a count). The helpers below only *queue* HINCRBY commands on a
  pipeline; the job store calls them inside the same MULTI/EXEC as the job transition they
  count, so an event is counted exactly once, however many processes race on the job.
- Exporting (the API): :mod:`morag.metrics_export` reads it back at scrape time.
- Per API process, not in Redis: what must count also while Redis refuses writes (a
  failover, too few replicas): the submissions it refused (:class:`Refusals`), and what its
  Redis client met (morag.redis_client.RedisHealth).

Wait and run times are measured from the job record's own timestamps (``queued_at``, and
each attempt's ``started_at``/``finished_at``), written by the hosts involved, so their
clocks should agree (NTP).
"""

from __future__ import annotations

import json
import threading
from bisect import bisect_left
from datetime import datetime
from typing import Any

import redis

from morag.job_record import JobRecord, Route
from morag.routing import (
    BACKLOG,
    GPU_FAILURE,
    NO_CAPABLE_GPU,
    NO_GPU_WORKER,
    RESCUED,
    WORKER_LOST,
    is_gpu_fallback,
)

COUNTERS_KEY = "morag:metrics:counters"
HISTOGRAMS_KEY = "morag:metrics:histograms"

# Seconds; jobs take from a fraction of a second (a web page) to hours (a long video).
BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
DEVICES = ("cpu", "cuda")
ACTIVE_STATES = ("queued", "running")
WEBHOOK_OUTCOMES = ("retrying", "gave_up", "refused")
ENDED_STATES = ("succeeded", "failed", "cancelled")
FALLBACK_CODES = (NO_GPU_WORKER, NO_CAPABLE_GPU, BACKLOG, GPU_FAILURE, WORKER_LOST, RESCUED)
# Why a submission was answered 503 (morag.submission.admit): replicas (WAIT: fewer replicas
# than MORAG_REDIS_MIN_REPLICAS acknowledged the job), noreplicas (the primary's
# min-replicas-to-write refused the write), redis (Redis failed while recording), broker (the
# broker did not take the message), unknown (Redis stopped answering: the job may exist).
REFUSAL_REASONS = ("replicas", "noreplicas", "redis", "broker", "unknown")

# name -> (help, label names); the exposition adds ``_total``.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "morag_jobs_submitted": (
        "Jobs submitted, by content type, the queue chosen and whether a GPU was requested",
        ("content_type", "queue", "gpu_requested"),
    ),
    "morag_route_decisions": (
        "Routing decisions by code (at submission, and when a job is re-routed or rescued)",
        ("queue", "code", "gpu_requested"),
    ),
    "morag_gpu_fallbacks": (
        "gpu=true jobs sent to or taken by a CPU, by route code (no_gpu_worker, "
        "no_capable_gpu, backlog, gpu_failure, worker_lost, rescued)",
        ("code", "content_type"),
    ),
    "morag_jobs_finished": (
        "Jobs that ended, by final state and content type",
        ("state", "content_type"),
    ),
    # Once per job (unlike morag_gpu_fallbacks, one per fallback decision: a job can have
    # several), so "fell back / all" is a ratio of jobs and never exceeds 1.
    "morag_gpu_jobs_finished": (
        "gpu=true jobs that ended, by content type and whether their last route sent them "
        "to a CPU (fell_back: no_gpu_worker, no_capable_gpu, backlog, gpu_failure, "
        "worker_lost to celery, rescued)",
        ("content_type", "fell_back"),
    ),
    "morag_redeliveries": (
        "Deliveries that took over a job whose previous attempt lost its worker",
        ("content_type",),
    ),
    "morag_orphan_requeues": (
        "Running jobs whose worker vanished, re-enqueued by the orphan watchdog",
        ("queue",),
    ),
    "morag_webhook_failures": (
        "Webhook POSTs that failed: retrying (another try is scheduled), gave_up (the "
        "last try failed), refused (the URL is not allowed)",
        ("outcome",),
    ),
    "morag_webhooks_delivered": ("Webhook POSTs answered with a 2xx status", ()),
    "morag_messages_dropped": (
        "Messages a worker found on its queue and dropped: envelope (not a kombu message), "
        "task_message (not a Celery protocol 2 task message); queue unacked: an entry of "
        "kombu's in-flight hash; morag.broker",
        ("reason", "queue"),
    ),
}

HISTOGRAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "morag_job_wait_seconds": (
        "Seconds a job waited in its queue before a worker claimed it",
        ("content_type", "queue", "device"),
    ),
    "morag_job_run_seconds": (
        "Seconds one attempt ran on a worker (attempts lost with their worker excluded)",
        ("content_type", "queue", "device"),
    ),
}


class Refusals:
    """Submissions (requests: a batch counts once) this API process answered 503, by reason
    (REFUSAL_REASONS). In the process, not in Redis: a primary short of replicas refuses
    every write, a counter's too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(REFUSAL_REASONS, 0)

    def count(self, reason: str) -> None:
        if reason not in self.counts:
            raise KeyError(f"unknown refusal reason {reason}")
        with self._lock:
            self.counts[reason] += 1


# -- recording: queue increments on the caller's pipeline ------------------------------------


def _field(name: str, labels: dict[str, Any], part: str | None = None) -> str:
    key: list[Any] = [name, sorted((k, str(v)) for k, v in labels.items())]
    if part is not None:
        key.append(part)
    return json.dumps(key, separators=(",", ":"))


def inc(pipe: redis.client.Pipeline, name: str, amount: int = 1, **labels: Any) -> None:
    if name not in COUNTERS:
        raise KeyError(f"unknown counter {name}")
    pipe.hincrby(COUNTERS_KEY, _field(name, labels), amount)


def observe(pipe: redis.client.Pipeline, name: str, value: float, **labels: Any) -> None:
    if name not in HISTOGRAMS:
        raise KeyError(f"unknown histogram {name}")
    value = max(0.0, float(value))
    bucket = bisect_left(BUCKETS, value)  # first bound >= value; len(BUCKETS) is +Inf
    pipe.hincrby(HISTOGRAMS_KEY, _field(name, labels, str(bucket)), 1)
    pipe.hincrby(HISTOGRAMS_KEY, _field(name, labels, "count"), 1)
    pipe.hincrbyfloat(HISTOGRAMS_KEY, _field(name, labels, "sum"), value)


def _flag(value: Any) -> str:
    return "true" if value else "false"


def route_decided(pipe: redis.client.Pipeline, route: Route, content_type: str) -> None:
    code = route.code or "unknown"
    gpu = _flag(route.gpu_requested)
    inc(pipe, "morag_route_decisions", queue=route.queue, code=code, gpu_requested=gpu)
    if is_gpu_fallback(route):
        inc(pipe, "morag_gpu_fallbacks", code=code, content_type=content_type)


def job_created(pipe: redis.client.Pipeline, record: JobRecord) -> None:
    route = record.route
    inc(
        pipe,
        "morag_jobs_submitted",
        content_type=record.content_type,
        queue=route.queue,
        gpu_requested=_flag(route.gpu_requested),
    )
    route_decided(pipe, route, record.content_type)


def _observe_attempt(
    pipe: redis.client.Pipeline,
    name: str,
    record: JobRecord,
    start: str | None,
    end: str | None,
) -> None:
    """Observe end - start for the job's last attempt, labelled with its queue and device."""
    attempt = record.attempts[-1] if record.attempts else None
    begun, ended = parse_time(start), parse_time(end)
    if attempt is not None and begun is not None and ended is not None:
        observe(
            pipe,
            name,
            ended - begun,
            content_type=record.content_type,
            queue=attempt.queue,
            device=attempt.device,
        )


def job_claimed(pipe: redis.client.Pipeline, record: JobRecord, queued_at: str | None) -> None:
    """A worker started an attempt; the wait counts from when the job was (re)queued."""
    started = record.attempts[-1].started_at if record.attempts else None
    _observe_attempt(pipe, "morag_job_wait_seconds", record, queued_at, started)


def attempt_ended(pipe: redis.client.Pipeline, record: JobRecord) -> None:
    """The worker holding the job recorded the end of its attempt (success or error)."""
    if record.attempts:
        attempt = record.attempts[-1]
        _observe_attempt(
            pipe, "morag_job_run_seconds", record, attempt.started_at, attempt.finished_at
        )


def job_ended(pipe: redis.client.Pipeline, record: JobRecord) -> None:
    inc(pipe, "morag_jobs_finished", state=record.status.value, content_type=record.content_type)
    if record.route.gpu_requested:
        inc(
            pipe,
            "morag_gpu_jobs_finished",
            content_type=record.content_type,
            fell_back=_flag(is_gpu_fallback(record.route)),
        )


def redelivered(pipe: redis.client.Pipeline, record: JobRecord) -> None:
    inc(pipe, "morag_redeliveries", content_type=record.content_type)


def orphan_requeued(pipe: redis.client.Pipeline, route: Route) -> None:
    inc(pipe, "morag_orphan_requeues", queue=route.queue)


def webhook_outcome(client: redis.Redis, outcome: str) -> None:
    """Count one webhook POST outcome (``delivered`` or one of WEBHOOK_OUTCOMES)."""
    pipe = client.pipeline(transaction=False)
    if outcome == "delivered":
        inc(pipe, "morag_webhooks_delivered")
    else:
        inc(pipe, "morag_webhook_failures", outcome=outcome)
    pipe.execute()


def message_dropped(client: redis.Redis, reason: str, queue: str) -> None:
    """Count one malformed message a worker dropped from ``queue`` (morag.broker)."""
    pipe = client.pipeline(transaction=False)
    inc(pipe, "morag_messages_dropped", reason=reason, queue=queue)
    pipe.execute()


def parse_time(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return None
