"""The ASGI guard: credentials and the body size are checked before a byte of body is read.

FastAPI parses a multipart form (and spools it to disk) before any dependency runs, so a
route's ``Depends(require_api_key)`` would come after a stranger's 300 MiB upload was read.
This middleware sits in front of the routers and, for every request that carries a body
(``Content-Length`` > 0 or ``Transfer-Encoding``):

1. checks the credential of the path (worker token for ``/api/v1/files``,
   ``Authorization: Bearer <API key>`` under ``/v1/`` (OpenAI's SDKs), none for ``/health``,
   ``/ready`` and ``/metrics``, ``X-API-Key`` everywhere else) from the headers alone and
   answers 401/403 without reading the body;
2. answers 413 at once when ``Content-Length`` announces more than the limit;
3. counts the bytes the application actually receives (chunked bodies have no length) and,
   once over the limit, stops the request and answers 413 while the client is still sending.

Early answers carry ``Connection: close``: the unread rest of the body is never read, the
server drops the connection after the answer. Requests without a body are left to the
routes' own dependencies (which use the same checks, ``api/deps.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from morag.api.deps import AuthFailure, check_api_key, check_worker_token
from morag.api.errors import OPENAI_PREFIX, code_for, openai_body
from morag.api.routers.openai_audio import bearer_key

log = logging.getLogger("morag.api.guard")

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})  # /metrics: its own bearer token
# Paths for workers (uploads, their job record changes): the worker token, not an API key.
WORKER_TOKEN_PREFIXES = ("/api/v1/files", "/api/v1/worker")
# Room for the multipart framing and the small form fields around an upload.
MULTIPART_OVERHEAD = 1024 * 1024
# JSON bodies (URLs, batches of up to 500 URLs, search queries) are small.
JSON_BODY_LIMIT = 4 * 1024 * 1024


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit. An HTTPException so that
    FastAPI's body parsing re-raises it instead of turning it into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def body_limit(content_type: str | None, max_upload_bytes: int) -> int:
    """Uploads (multipart) may carry the upload limit plus framing; anything else is JSON."""
    upload_limit = max_upload_bytes + MULTIPART_OVERHEAD
    if (content_type or "").lower().startswith("multipart/"):
        return upload_limit
    return min(JSON_BODY_LIMIT, upload_limit)


def has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if _header(scope, b"transfer-encoding") is not None:
        return True
    return bool(length and length.strip() not in ("", "0"))


def error_message(path: str, status: int, detail: str, code: str) -> tuple[Message, Message]:
    """The same bodies the routes answer (``api/errors.py``): ``{"detail", "code"}``, or
    OpenAI's error object under ``/v1/``."""
    if path.startswith(OPENAI_PREFIX):
        payload = openai_body(status, detail, code, None)
    else:
        payload = {"detail": detail, "code": code_for(status)}
    body = json.dumps(payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        # The rest of the body is not read: the connection cannot carry another request.
        (b"connection", b"close"),
    ]
    if status == 401 and path.startswith(OPENAI_PREFIX):
        headers.append((b"www-authenticate", b"Bearer"))
    start: Message = {"type": "http.response.start", "status": status, "headers": headers}
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class RequestGuard:
    """Pure ASGI middleware (no request body buffering, no BaseHTTPMiddleware)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: Callable[[], list[str]],
        worker_token: Callable[[], str | None],
        max_upload_bytes: int,
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.worker_token = worker_token
        self.max_upload_bytes = max_upload_bytes

    def authenticate(self, scope: Scope) -> None:
        path: str = scope.get("path", "")
        if path in PUBLIC_PATHS:
            return
        if any(path == p or path.startswith(p + "/") for p in WORKER_TOKEN_PREFIXES):
            check_worker_token(
                _header(scope, b"x-worker-token"),
                self.worker_token(),
                _header(scope, b"x-worker-host"),
            )
            return
        if path.startswith(OPENAI_PREFIX):  # OpenAI's SDKs send Authorization: Bearer <key>
            bearer_key(_header(scope, b"authorization"), self.api_keys())
            return
        check_api_key(_header(scope, b"x-api-key"), self.api_keys())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        try:
            self.authenticate(scope)
        except AuthFailure as exc:
            await self._refuse(send, exc.status, exc.detail, exc.code, scope["path"])
            return
        limit = body_limit(_header(scope, b"content-type"), self.max_upload_bytes)
        declared = _header(scope, b"content-length")
        if declared and declared.strip().isdigit() and int(declared) > limit:
            await self._too_large(send, limit, scope["path"])
            return
        await self._guarded(scope, receive, send, limit)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        over = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge(limit)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # whatever the app makes of the aborted body, the answer is 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except Exception:
            # BodyTooLarge itself, or whatever a layer made of it (a parse error, a group
            # from a task group): the answer is the 413 below. Anything else is not ours.
            if not over:
                raise
        if over:
            log.info("request to %s refused: body over %d bytes", scope.get("path"), limit)
            if not started:
                await self._too_large(send, limit, scope["path"])

    @classmethod
    async def _too_large(cls, send: Send, limit: int, path: str) -> None:
        detail = f"request body exceeds the limit of {limit} bytes"
        await cls._refuse(send, 413, detail, "too_large", path)

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str, code: str, path: str = "") -> None:
        start, body = error_message(path, status, detail, code)
        await send(start)
        await send(body)
