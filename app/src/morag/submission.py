"""Creating jobs: validate what the client sent, decide the route, record, enqueue."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
from kombu.exceptions import OperationalError
from prometheus_client import CollectorRegistry

from morag import files, idempotency, metrics_export, urls
from morag.celery_app import celery_app, dispatch
from morag.config import Settings
from morag.fleet import CachedFleet
from morag.idempotency import Idempotency
from morag.job_events import EndListener
from morag.job_record import JobRecord, Source
from morag.jobs import CANCELLED, JobStore, NotReplicated, new_record
from morag.metrics import Refusals
from morag.processors.detect import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS
from morag.processors.registry import known_types
from morag.redis_client import redis_client
from morag.routing import decide_route
from morag.runtime import job_store
from morag.webhooks import notify_end, webhook_view

log = logging.getLogger("morag.submission")


class BadInput(ValueError):
    """Client input that cannot become a job; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code  # None: the status' usual code (morag.api.errors)


class BrokerUnavailable(BadInput):
    """The broker (or Redis) did not take the job: 503, and the job will not run: its
    record is withdrawn, so no reconciler sends it and no worker runs it."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, detail)


class SubmissionUnknown(BadInput):
    """Redis stopped answering while the job was being written and never answered again in
    time: whether the job exists is unknown. 503 with its own code; a retry with the same
    Idempotency-Key is safe (it returns the job if it was written)."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, detail, "submission_unknown")


@dataclass(frozen=True)
class Admission:
    """Jobs written and sent; ``replayed``: an earlier request's, found by its Idempotency-Key."""

    records: list[JobRecord]
    batch_id: str | None = None
    replayed: bool = False


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    fleet: CachedFleet
    metrics: CollectorRegistry  # the fleet's metrics, read from Redis at each scrape
    # Job-end announcements that wake waiting requests (started by the app's lifespan).
    job_ends: EndListener | None = None
    # Submissions answered 503, by reason (exported with the metrics).
    refusals: Refusals = field(default_factory=Refusals)


def build_services(settings: Settings) -> Services:
    client = redis_client(settings, socket_timeout=5, health_check_interval=30)
    fleet = CachedFleet(client, settings.fleet_cache_seconds, settings.liveness_interval)
    refusals = Refusals()
    return Services(
        settings=settings,
        redis=client,
        store=job_store(client, settings),
        fleet=fleet,
        metrics=metrics_export.build_registry(client, fleet, settings, known_types(), refusals),
        refusals=refusals,
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


def prepare(
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
    """Check what only the submission can check (the webhook URL), pick the route and build
    the job's record. Nothing is written."""
    if webhook_url:
        try:
            urls.check_url(webhook_url, services.settings.url_allowlist)
        except urls.UrlRefused as exc:
            raise BadInput(422, f"webhook_url refused: {exc}") from exc
    route = decide_route(
        gpu_requested=gpu,
        content_type=content_type,
        fleet=services.fleet.routing(),
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
    return record


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
    idem: Idempotency | None = None,
) -> JobRecord:
    """One job: its record written and its message sent (or the earlier job of ``idem``'s
    key). A refused submission removes the upload it stored, and so does a replay (the
    earlier job reads its own)."""
    try:
        record = prepare(
            services,
            kind=kind,
            content_type=content_type,
            source=source,
            options=options,
            gpu=gpu,
            metadata=metadata,
            webhook_url=webhook_url,
            batch_id=batch_id,
            task_id=task_id,
        )
        admission = admit(services, [record], idem=idem)
    except SubmissionUnknown:
        raise  # the job may exist and read its upload
    except BadInput:
        _remove_upload(services, source)
        raise
    if admission.replayed:
        _remove_upload(services, source)
    return admission.records[0]


def _remove_upload(services: Services, source: Source) -> None:
    if source.file_id:
        files.remove_upload(services.settings.uploads_dir, source.file_id)


def admit(
    services: Services,
    records: list[JobRecord],
    *,
    batch_id: str | None = None,
    idem: Idempotency | None = None,
) -> Admission:
    """Write ``records`` (and the batch record, and ``idem``'s key) in one MULTI/EXEC, then
    send their messages. All or nothing: when Redis or the broker refuses, every record is
    withdrawn (BrokerUnavailable, 503: none of them runs, ever); when that cannot be
    confirmed the records stand and the outbox sends them (answered as accepted). With
    MORAG_REDIS_MIN_REPLICAS the write counts only once that many replicas acknowledged it
    (WAIT on the connection that wrote it): fewer, and the records are withdrawn likewise."""
    settings = services.settings
    ids = [r.task_id for r in records]
    # A concurrent request with the same key may still be sending: wait for its answer.
    patience = time.monotonic() + min(services.settings.outbox_grace, 10.0)
    reserve = None
    if idem is not None:
        entry = idem.entry(ids, batch_id)
        reserve = (idem.redis_key, entry, min(idem.ttl, services.settings.job_ttl))
    # Right after a Sentinel failover the new primary has no replica for a moment (the others
    # are being re-pointed at it): a refusal for want of replicas is tried again meanwhile.
    replicas_until = time.monotonic() + (
        settings.redis_failover_seconds if settings.redis_sentinels else 0.0
    )
    pause = 0.25

    def waited_for_a_replica() -> bool:
        """Slept before the next try (0.25 s doubling to 1 s), or False when that time is over."""
        nonlocal pause
        if time.monotonic() + pause >= replicas_until:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 1.0)
        return True

    # The records and their outbox entries first, then the messages: if this process dies
    # in between, a worker's reconciler sends them after the grace.
    while True:
        try:
            existing = services.store.create_all(
                records,
                batch_id=batch_id,
                reserve=reserve,
                replicas=settings.redis_min_replicas,
                wait_ms=settings.redis_wait_timeout_ms,
            )
        except NotReplicated as exc:
            # On the primary only: a failover now would lose the jobs after a 202. Withdrawn
            # before anything is sent, so none of them runs (unless a worker already took
            # one, which only a reconciler past the outbox grace could have sent).
            reason = f"Redis did not copy the job to enough replicas: {exc}"
            outcome = _take_back(services, ids, reason, batch_id, reserve)
            if outcome and waited_for_a_replica():
                # Withdrawn: written again as new (same ids) once a replica may follow.
                log.info("jobs %s: no replica yet (a failover?); trying again", ",".join(ids))
                continue
            log.warning("jobs %s refused: %s", ",".join(ids), reason)
            if outcome is None:
                services.refusals.count("unknown")
                raise SubmissionUnknown(
                    f"Redis stopped answering while the job was withdrawn ({exc}): it may "
                    f"or may not exist (job ids {', '.join(ids)}); retry with the same "
                    "Idempotency-Key"
                ) from exc
            if outcome:
                services.refusals.count("replicas")
                raise BrokerUnavailable(
                    f"the job store could not copy the job to {exc.wanted} Redis "
                    f"replica(s) ({exc.acked} acknowledged within {exc.wait_ms} ms"
                    f"{'; ' + exc.error if exc.error else ''}): it was not accepted and "
                    "will not run; try again later"
                ) from exc
            return Admission(records, batch_id)
        except redis.RedisError as exc:
            if _too_few_replicas(exc):
                # min-replicas-to-write: the primary discarded the whole transaction.
                if waited_for_a_replica():
                    continue
                log.warning("jobs %s refused: %s", ",".join(ids), exc)
                services.refusals.count("noreplicas")
                raise BrokerUnavailable(
                    "the job store has fewer Redis replicas than it requires to take writes "
                    "(NOREPLICAS): the job was not accepted and will not run; try again later"
                ) from exc
            # The EXEC may have been applied before the connection failed: take it back.
            reason = f"Redis did not take the job: {type(exc).__name__}: {exc}"
            log.warning("jobs %s refused: %s", ",".join(ids), reason)
            outcome = _take_back(services, ids, reason, batch_id, reserve)
            if outcome is None:
                services.refusals.count("unknown")
                raise SubmissionUnknown(
                    f"Redis stopped answering while the job was recorded "
                    f"({type(exc).__name__}): it may or may not exist (job ids "
                    f"{', '.join(ids)}); retry with the same Idempotency-Key"
                ) from exc
            if outcome:
                services.refusals.count("redis")
                raise BrokerUnavailable(
                    f"the job store is unavailable ({type(exc).__name__}); try again later"
                ) from exc
            return Admission(records, batch_id)  # written, and a worker took one already
        if existing is None or idem is None:
            break
        replay = _replay(services, idem, existing, patience)
        if replay is not None:
            return replay
    if services.settings.fault_injection and any(
        r.options.get("fault") == "api_dies_before_send" for r in records
    ):
        os._exit(70)  # test hook: the API dies between the record and its message
    for record in records:
        try:
            dispatch(services.store, record.task_id, record.route.queue)
        except (OperationalError, redis.RedisError) as exc:
            reason = f"the broker did not take the job's message: {type(exc).__name__}: {exc}"
            log.warning("job %s refused: %s", record.task_id, reason)
            if _take_back(services, ids, reason, batch_id, reserve):
                services.refusals.count("broker")
                raise BrokerUnavailable(
                    f"the job queue is unavailable ({type(exc).__name__}); try again later"
                ) from exc
            # A worker took one of them, or Redis never confirmed the withdrawal: the
            # records and their outbox entries stand, and a reconciler sends the rest.
            log.warning("jobs %s stay accepted; the outbox sends them", ",".join(ids))
            break
    if idem is not None:
        try:  # replays answer at once from now on; if lost, they wait for the outbox grace
            accepted = idem.entry(ids, batch_id, idempotency.ACCEPTED)
            services.redis.set(idem.redis_key, accepted, xx=True, keepttl=True)
        except redis.RedisError:
            log.warning("jobs %s: their Idempotency-Key stays 'sending'", ",".join(ids))
    return Admission(records, batch_id)


def _too_few_replicas(exc: redis.RedisError) -> bool:
    """A primary with fewer good replicas than its min-replicas-to-write refused the write
    (nothing of the transaction was applied)."""
    return isinstance(exc, redis.ResponseError) and "NOREPLICAS" in str(exc)


def _take_back(
    services: Services,
    ids: list[str],
    reason: str,
    batch_id: str | None,
    reserve: tuple[str, str, int] | None,
) -> bool | None:
    """Withdraw refused jobs (JobStore.withdraw): True when they will never run, False when
    a worker took one already, None when Redis did not answer in time. Retried within half
    the outbox grace, before any reconciler would send them (its answer is what counts)."""
    deadline = time.monotonic() + min(services.settings.outbox_grace / 2, 10.0)
    delay = 0.05
    while True:
        try:
            return services.store.withdraw(
                ids,
                f"not accepted: {reason}",
                batch_id=batch_id,
                forget=(reserve[0], reserve[1]) if reserve else None,
            )
        except redis.RedisError as exc:
            if time.monotonic() + delay >= deadline:
                log.warning("jobs %s: withdrawal not confirmed: %s", ",".join(ids), exc)
                return None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _replay(services: Services, idem: Idempotency, raw: bytes, patience: float) -> Admission | None:
    """The earlier request of ``idem``'s key: its jobs once it answered; None when its key
    is gone meanwhile (that request was refused): this one then submits anew."""
    delay = 0.05
    while True:
        try:
            earlier = idempotency.earlier(raw, idem)
        except idempotency.KeyRefused as exc:
            raise BadInput(exc.status, exc.detail, exc.code) from exc
        # "sending" past the outbox grace: its sender died and a reconciler sends the jobs.
        settled = time.time() - earlier.at > services.settings.outbox_grace
        if earlier.state != idempotency.SENDING or settled:
            break
        if time.monotonic() >= patience:
            raise BadInput(
                409,
                f"a request with this {idempotency.HEADER} is still being submitted; "
                "retry in a moment",
                "idempotency_key_in_use",
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
        found = services.redis.get(idem.redis_key)
        if found is None:
            return None
        raw = found
    records = services.store.get_many(earlier.task_ids)
    if len(records) != len(earlier.task_ids):
        raise BadInput(
            409,
            f"the jobs of this {idempotency.HEADER} no longer exist; use a new key",
            "idempotency_key_stale",
        )
    return Admission(records, earlier.batch_id, replayed=True)


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
    for piece_id in record.pieces:  # a long recording's pieces (morag.split_jobs) end with it
        piece = services.store.cancel(piece_id, "its job was cancelled")
        if piece is not None and piece.status == CANCELLED:
            celery_app.control.revoke(piece_id, terminate=True, signal="SIGTERM")
            if piece.upload_id:
                files.remove_upload(services.settings.uploads_dir, piece.upload_id)
    if record.upload_id:
        files.remove_upload(services.settings.uploads_dir, record.upload_id)
    notify_end(services.store, record, resend_after=services.settings.store_resend_after)
    return record
