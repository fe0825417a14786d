"""``/health`` (the process answers) and ``/ready`` (its dependencies answer); no key needed.

``/metrics`` lives in ``routers/metrics.py`` (its own bearer token)."""

from __future__ import annotations

import os
from typing import Any

import redis
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from morag.api.deps import services
from morag.submission import Services

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
def ready(svc: Services = Depends(services)) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        svc.redis.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"unavailable: {type(exc).__name__}"
    uploads = svc.settings.uploads_dir
    try:
        uploads.mkdir(parents=True, exist_ok=True)
        checks["shared_dir"] = "ok" if os.access(uploads, os.W_OK) else "not writable"
    except OSError as exc:
        checks["shared_dir"] = f"unavailable: {exc.strerror}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503
    )
