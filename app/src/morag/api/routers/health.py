"""``/health`` (the process answers) and ``/ready`` (its dependencies answer); no key needed.

``/metrics`` lives in ``routers/metrics.py`` (its own bearer token)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from morag.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


# Both async: answered on the event loop even while every pool thread waits on Redis.
@router.get("/health", response_model=Health)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=Readiness,
    responses={
        200: {"description": "ready, or degraded: jobs are taken but part of the work waits"},
        # Not ErrorBody: a 503 here is the same readiness report, with the failed checks.
        503: {"model": Readiness, "description": "not ready: Redis or the shared dir is down"},
    },
)
async def ready(request: Request) -> JSONResponse:
    """503 when the API cannot take jobs (Redis, shared dir); ``degraded`` (200) when it can
    but part of the work waits: no morag-store worker alive, unsent job messages, or Redis
    away for less than MORAG_READY_REDIS_GRACE during a Sentinel failover. Answered within
    MORAG_READY_TIMEOUT (morag.api.readiness)."""
    status, body = await request.app.state.readiness.report()
    return JSONResponse(body, status_code=status)
