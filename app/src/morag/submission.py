"""Creating jobs: validate what the client sent, decide the route, record, enqueue."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from kombu.exceptions import OperationalError
from prometheus_client import CollectorRegistry

from morag import files, metrics_export, urls
from morag.celery_app import celery_app, dispatch
from morag.config import Settings
from morag.fleet import CachedFleet
from morag.job_record import JobRecord, Source
from morag.jobs import CANCELLED, JobStore, new_record
from morag.processors.detect import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS
from morag.processors.registry import known_types
from morag.routing import decide_route
from morag.runtime import job_store
from morag.webhooks import notify_end, webhook_view

log = logging.getLogger("morag.submission")


class BadInput(ValueError):
    """Client input that cannot become a job; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BrokerUnavailable(BadInput):
    """The broker did not take the job's message: 503, and the job is not accepted."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, detail)


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    fleet: CachedFleet
    metrics: CollectorRegistry  # the fleet's metrics, read from Redis at each scrape


def build_services(settings: Settings) -> Services:
    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_timeout=5, health_check_interval=30
    )
    fleet = CachedFleet(client, settings.fleet_cache_seconds)
    return Services(
        settings=settings,
        redis=client,
        store=job_store(client, settings),
        fleet=fleet,
        metrics=metrics_export.build_registry(client, fleet, settings, known_types()),
    )


def parse_json_object(raw: str | None, field: str) -> dict[str, Any]:
    if raw is None or raw.strip() == "":
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadInput(422, f"{field} is not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise BadInput(422, f"{field} must be a JSON object")
    return value


def requested_type(options: dict[str, Any]) -> str | None:
    wanted = options.get("content_type")
    if wanted is None:
        return None
    if wanted not in known_types():
        raise BadInput(
            415, f"unsupported content_type {wanted!r}; supported: {', '.join(known_types())}"
        )
    return str(wanted)


def url_content_type(url: str, options: dict[str, Any]) -> str:
    """Guess a URL's content type from its host and path (``options.content_type`` wins)."""
    explicit = requested_type(options)
    if explicit:
        return explicit
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in {"youtube.com", "www.youtube.com", "m.youtube.com", "youtu.be"}:
        guess = "youtube"
    elif any(parts.path.lower().endswith(ext) for ext in AUDIO_EXTENSIONS):
        guess = "audio"
    elif any(parts.path.lower().endswith(ext) for ext in VIDEO_EXTENSIONS):
        guess = "youtube"  # yt-dlp fetches the media and keeps its audio
    else:
        guess = "web"
    if guess not in known_types():
        raise BadInput(
            415, f"no processor for {guess} URLs yet; supported: {', '.join(known_types())}"
        )
    return guess


def submit(
    services: Services,
    *,
    kind: str,
    content_type: str,
    source: Source,
    options: dict[str, Any],
    gpu: bool,
    metadata: dict[str, Any] | None = None,
    webhook_url: str | None = None,
    batch_id: str | None = None,
    task_id: str | None = None,
) -> JobRecord:
    if webhook_url:
        try:
            urls.check_url(webhook_url, services.settings.url_allowlist)
        except urls.UrlRefused as exc:
            raise BadInput(422, f"webhook_url refused: {exc}") from exc
    route = decide_route(
        gpu_requested=gpu,
        content_type=content_type,
        fleet=services.fleet.get().snapshot,
        gpu_backlog_limit=services.settings.gpu_backlog_limit,
    )
    record = new_record(
        kind=kind,
        content_type=content_type,
        source=source,
        options=options,
        route=route,
        metadata=metadata,
        webhook_url=webhook_url,
        batch_id=batch_id,
        task_id=task_id,
    )
    record.store = kind == "ingest" and services.settings.store_ingested
    if webhook_url:
        record.webhook = webhook_view(webhook_url, services.settings)
    # The record and its outbox entry first (one transaction), then the message: if this
    # process dies in between, a worker's reconciler sends the message after the grace.
    services.store.create(record)
    if services.settings.fault_injection and options.get("fault") == "api_dies_before_send":
        os._exit(70)  # test hook: the API dies between the record and its message
    try:
        dispatch(services.store, record.task_id, route.queue)
    except (OperationalError, redis.RedisError) as exc:
        reason = f"the broker did not take the job's message: {type(exc).__name__}: {exc}"
        log.warning("job %s refused: %s", record.task_id, reason)
        try:
            services.store.fail_unsent(record.task_id, f"not accepted: {reason}")
        except redis.RedisError:
            log.warning("job %s stays in the outbox; a worker will send it", record.task_id)
        raise BrokerUnavailable(
            f"the job queue is unavailable ({type(exc).__name__}); try again later"
        ) from exc
    return record


def cancel(
    services: Services, task_id: str, reason: str = "cancelled by the client"
) -> JobRecord | None:
    """End a queued or running job: the record first, then its worker is told to stop (a
    queued message is skipped when delivered), its upload removed and its webhook sent.
    None when the job had ended already (or is unknown)."""
    record = services.store.cancel(task_id, reason)
    if record is None or record.status != CANCELLED:
        return None
    celery_app.control.revoke(task_id, terminate=True, signal="SIGTERM")
    if record.upload_id:
        files.remove_upload(services.settings.uploads_dir, record.upload_id)
    notify_end(services.redis, record, resend_after=services.settings.store_resend_after)
    return record
