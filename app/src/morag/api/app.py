"""The FastAPI app factory (``uvicorn --factory morag.api.app:create_app``)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from morag import __version__, job_events
from morag.api import errors, http_metrics
from morag.api.guard import RequestGuard
from morag.api.readiness import ReadinessProbe
from morag.api.routers import (
    docs,
    files,
    health,
    ingest,
    metrics,
    openai_audio,
    process,
    search,
    status,
    worker_writes,
    workers,
)
from morag.config import Settings, get_settings
from morag.job_events import EndListener
from morag.redis_client import redis_client
from morag.submission import build_services
from morag.watchdog import Watchdog, WatchdogThread
from morag.webhooks import UNSIGNED_NOTE, secret_of

log = logging.getLogger("morag.api")


class ConfigurationError(RuntimeError):
    pass


def check_api_settings(settings: Settings) -> None:
    if not settings.api_key_values():
        raise ConfigurationError("MORAG_API_KEYS is empty: set at least one API key")
    if settings.worker_token is None or not settings.worker_token.get_secret_value():
        raise ConfigurationError("MORAG_WORKER_TOKEN is not set")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    check_api_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = services = build_services(settings)
        # Wakes the requests waiting for a job at its end (morag.job_events).
        services.job_ends = EndListener(redis_client(settings, **job_events.CLIENT_OPTIONS))
        services.job_ends.start()
        app.state.readiness = readiness = ReadinessProbe(services)
        if secret_of(settings) is None:
            log.warning(UNSIGNED_NOTE)
        watching = None
        if settings.api_watchdog:
            # Workers that write through the API (MORAG_JOB_WRITES=api) do not watch.
            name = f"api@{socket.gethostname()}/{os.getpid()}"
            watching = WatchdogThread(
                Watchdog(services.redis, services.store, settings, name),
                settings.heartbeat_interval,
            )
            watching.start()
        yield
        if watching is not None:
            watching.stop()
        services.job_ends.stop()
        readiness.close()
        services.redis.close()

    app = FastAPI(
        title="MoRAG",
        version=__version__,
        description="Media and document processing on CPU and remote GPU workers.",
        lifespan=lifespan,
        # Served by the docs router, behind the API key.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        detail = f"Redis unavailable: {type(exc).__name__}"
        return errors.error_response(request, 503, detail, "unavailable")

    errors.install(app)  # every error body gets its `code` (OpenAI's shape under /v1/)
    routers = (
        health,
        metrics,
        process,
        ingest,
        status,
        workers,
        files,
        search,
        docs,
        worker_writes,
    )
    for module in (*routers, openai_audio):
        app.include_router(module.router)
    # Before any router: credentials and body size are checked before a body byte is read.
    worker_token = settings.worker_token
    app.add_middleware(
        RequestGuard,
        api_keys=settings.api_key_values,
        worker_token=lambda: worker_token.get_secret_value() if worker_token else None,
        max_upload_bytes=settings.max_upload_bytes,
    )
    # Last, so outermost: the HTTP metrics see every answer, the guard's refusals included.
    app.state.http_metrics = http_metrics.instrument(app)
    return app
