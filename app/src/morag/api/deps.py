"""Request-scoped access to the services, authentication and shared request helpers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Header, HTTPException, Request, Security, UploadFile
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from morag import files, idempotency, job_writes
from morag.api.errors import ApiError
from morag.idempotency import Idempotency
from morag.job_record import TERMINAL, JobRecord, Source
from morag.jobs import new_id
from morag.processors.detect import detect_content_type
from morag.processors.registry import known_types
from morag.submission import BadInput, Services, requested_type


def services(request: Request) -> Services:
    return request.app.state.services


def _matches(given: str, expected: list[str]) -> bool:
    # Compare against every key so timing does not reveal which one nearly matched.
    hits = [hmac.compare_digest(given.encode(), key.encode()) for key in expected]
    return any(hits)


class AuthFailure(Exception):
    """A refused credential: the HTTP status, a readable detail and a stable code."""

    def __init__(self, status: int, detail: str, code: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code


def check_api_key(given: str | None, keys: list[str]) -> None:
    """Raise AuthFailure unless ``given`` is one of ``keys``. Shared by the route dependency
    and the ASGI guard (``api/guard.py``), which runs it before any body is read."""
    if not given:
        raise AuthFailure(401, "missing API key: send it in the X-API-Key header", "no_api_key")
    if not _matches(given, keys):
        raise AuthFailure(403, "invalid API key", "bad_api_key")


def check_worker_token(given: str | None, token: str | None, host: str | None = None) -> str | None:
    """Who the caller is: None for the fleet's worker token (MORAG_WORKER_TOKEN, any host),
    else the worker host whose own token (``job_writes.host_token``, sent with its name in
    X-Worker-Host) it holds. Raise AuthFailure for anything else."""
    if not given:
        raise AuthFailure(
            401, "missing worker token: send it in the X-Worker-Token header", "no_worker_token"
        )
    if not token:
        raise AuthFailure(403, "invalid worker token", "bad_worker_token")
    if _matches(given, [token]):
        return None
    if (
        host
        and job_writes.HOST_NAME.match(host)
        and _matches(given, [job_writes.host_token(token, host)])
    ):
        return host
    raise AuthFailure(403, "invalid worker token", "bad_worker_token")


# The credentials as OpenAPI security schemes (components.securitySchemes, and a `security`
# requirement on each operation that uses one), so /docs' "Authorize" and generated clients
# know how to authenticate. auto_error=False: a missing credential is answered below, with
# the API's own body and code, not FastAPI's.
API_KEY_SCHEME = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKey",
    description="one of MORAG_API_KEYS: the native API (not /health, /ready, /metrics, /v1/)",
    auto_error=False,
)
WORKER_TOKEN_SCHEME = APIKeyHeader(
    name="X-Worker-Token",
    scheme_name="WorkerToken",
    description="MORAG_WORKER_TOKEN: workers fetching an upload from /api/v1/files",
    auto_error=False,
)
OPENAI_BEARER_SCHEME = HTTPBearer(
    scheme_name="OpenAIBearer",
    description="one of MORAG_API_KEYS, as OpenAI's SDKs send it: the /v1/ routes",
    auto_error=False,
)
METRICS_BEARER_SCHEME = HTTPBearer(
    scheme_name="MetricsToken",
    description="MORAG_METRICS_TOKEN, as Prometheus sends it: /metrics",
    auto_error=False,
)


def bearer_header(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The ``Authorization`` value back from HTTPBearer's parse (None: missing, or not
    Bearer), for the checks that take the header as the ASGI guard sees it."""
    return f"Bearer {credentials.credentials}" if credentials else None


def require_api_key(request: Request, x_api_key: str | None = Security(API_KEY_SCHEME)) -> None:
    try:
        check_api_key(x_api_key, services(request).settings.api_key_values())
    except AuthFailure as exc:
        raise HTTPException(exc.status, exc.detail) from exc


def require_worker_token(
    request: Request,
    x_worker_token: str | None = Security(WORKER_TOKEN_SCHEME),
    x_worker_host: str | None = Header(None, include_in_schema=False),
) -> str | None:
    """The calling worker host (None: the fleet token, any host)."""
    token = services(request).settings.worker_token
    try:
        return check_worker_token(
            x_worker_token, token.get_secret_value() if token else None, x_worker_host
        )
    except AuthFailure as exc:
        raise HTTPException(exc.status, exc.detail) from exc


def require_metrics_token(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(METRICS_BEARER_SCHEME),
) -> None:
    """``Authorization: Bearer <MORAG_METRICS_TOKEN>``, as Prometheus sends it. API keys and
    the worker token are not accepted; without a configured token the endpoint is off."""
    token = services(request).settings.metrics_token
    if token is None or not token.get_secret_value():
        raise HTTPException(404, "metrics are disabled: set MORAG_METRICS_TOKEN to enable them")
    given = credentials.credentials.strip() if credentials else ""
    if not given:
        raise HTTPException(
            401,
            "missing metrics token: send Authorization: Bearer <MORAG_METRICS_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not _matches(given, [token.get_secret_value()]):
        raise HTTPException(
            401,
            "invalid metrics token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


def limit_body(request: Request) -> None:
    """Refuse an oversized upload from its Content-Length, before reading it."""
    limit = services(request).settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + 1024 * 1024:
        raise HTTPException(413, f"upload exceeds the limit of {limit} bytes")


ApiKey = Depends(require_api_key)


def bad_input(exc: BadInput) -> HTTPException:
    return ApiError(exc.status, exc.detail, exc.code)


@dataclass(frozen=True)
class IdempotencyHeader:
    """A request's ``Idempotency-Key``, kept per client (the API key that sent it)."""

    client_key: str
    key: str
    ttl: int

    def bind(self, route: str, request: Any) -> Idempotency:
        """The key for this request: ``request`` is what its job is made of (JSON-able)."""
        return Idempotency.of(self.client_key, self.key, route, request, self.ttl)


def idempotency_header(
    request: Request,
    idempotency_key: str | None = Header(
        default=None,
        alias=idempotency.HEADER,
        description="a retry with the same key (same client, same request) returns the "
        "first request's job instead of a new one; remembered MORAG_IDEMPOTENCY_TTL seconds",
    ),
) -> IdempotencyHeader | None:
    if idempotency_key is None:
        return None
    try:
        key = idempotency.check_key(idempotency_key)
    except idempotency.KeyRefused as exc:
        raise ApiError(exc.status, exc.detail, exc.code) from exc
    # The route's own authentication checked this key already (X-API-Key, or OpenAI's Bearer).
    client = request.headers.get("x-api-key") or (
        request.headers.get("authorization", "").partition(" ")[2].strip()
    )
    return IdempotencyHeader(client, key, services(request).settings.idempotency_ttl)


IdempotencyKey = Depends(idempotency_header)


@dataclass(frozen=True)
class AcceptedUpload:
    """An upload stored in the shared directory: what the job reads, and what it is."""

    content_type: str
    source: Source


def accept_upload(svc: Services, upload: UploadFile, options: dict[str, Any]) -> AcceptedUpload:
    """Store an upload in the shared dir under a new id; answer its job source and type."""
    file_id = new_id()
    try:
        stored = files.store_upload(
            upload.file, svc.settings.uploads_dir, file_id, svc.settings.max_upload_bytes
        )
    except files.UploadTooLarge as exc:
        raise HTTPException(413, str(exc)) from exc
    try:
        if stored.size == 0:
            raise BadInput(422, "the uploaded file is empty")
        content_type = requested_type(options) or detect_content_type(
            stored.head, upload.filename or ""
        )
        if content_type is None:
            raise BadInput(
                415,
                f"unsupported content type: {upload.filename or 'the file'} is not a "
                f"recognised format (supported: {', '.join(known_types())})",
            )
    except BadInput:
        files.remove_upload(svc.settings.uploads_dir, file_id)
        raise
    source = Source.upload(
        file_id=stored.file_id,
        sha256=stored.sha256,
        size=stored.size,
        filename=(upload.filename or "")[-200:],
    )
    return AcceptedUpload(content_type, source)


async def wait_for_end(
    svc: Services,
    task_id: str,
    seconds: float,
    *,
    stop: Callable[[], Awaitable[bool]] | None = None,
) -> JobRecord | None:
    """Wait until the job ends, ``seconds`` pass or ``stop()`` says to give up (the client
    went away); the record as last read (long-poll helper).

    Woken by the end's announcement (morag.job_events) and then reads the record; without
    one it reads the record again every MORAG_JOB_WAIT_POLL seconds at the latest (at first
    sooner, with a back-off, while the announcements are not subscribed)."""
    deadline = time.monotonic() + seconds
    poll = svc.settings.job_wait_poll
    delay = min(0.05, poll)
    ends = svc.job_ends
    with ends.watch(task_id) if ends is not None else contextlib.nullcontext() as waiter:
        while True:
            record = await run_in_threadpool(svc.store.get, task_id)
            if record is None or record.status in TERMINAL or time.monotonic() >= deadline:
                return record
            if stop is not None and await stop():
                return record
            live = ends is not None and ends.live
            pause = min(poll if live else delay, max(0.0, deadline - time.monotonic()))
            if waiter is None:
                await asyncio.sleep(pause)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.event.wait(), pause)
                waiter.event.clear()
            delay = min(delay * 1.5, poll)
