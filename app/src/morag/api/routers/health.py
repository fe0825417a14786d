"""``/health`` (the process answers) and ``/ready`` (its dependencies answer); no key needed.

``/metrics`` lives in ``routers/metrics.py`` (its own bearer token)."""

from __future__ import annotations

import os
from typing import Any

import redis
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from morag.api.deps import services
from morag.api.schemas import Health, Readiness
from morag.config import STORE_QUEUE
from morag.fleet import GpuWorkers, gpu_workers
from morag.submission import Services

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> dict[str, str]:
    return {"status": "ok"}


NO_STORE_WORKER = (
    "no live morag-store worker: ingest jobs wait at progress 0.99 (stored, webhooks and "
    "search too) until one starts"
)


def gpu_workers_text(gpu: GpuWorkers) -> str:
    """``checks.gpu_workers``: a GPU worker counts only with a passed CUDA check."""
    text = f"{len(gpu.checked)} GPU worker(s) with a passed CUDA check" + (
        f": {', '.join(gpu.checked)}" if gpu.checked else ""
    )
    if gpu.unchecked:
        text += (
            f"; not counted, device cuda without a passed CUDA check (a worker older than "
            f"the check?): {', '.join(gpu.unchecked)}"
        )
    if gpu.on_cpu:
        text += f"; consuming gpu-tasks on the CPU: {', '.join(gpu.on_cpu)}"
    return text


@router.get(
    "/ready",
    response_model=Readiness,
    responses={
        200: {"description": "ready, or degraded: jobs are taken but part of the work waits"},
        # Not ErrorBody: a 503 here is the same readiness report, with the failed checks.
        503: {"model": Readiness, "description": "not ready: Redis or the shared dir is down"},
    },
)
def ready(svc: Services = Depends(services)) -> JSONResponse:
    """503 when the API cannot take jobs (Redis, shared dir); ``degraded`` (200) when it can
    but part of the work waits: no morag-store worker alive, or unsent job messages."""
    checks: dict[str, Any] = {}
    degraded: dict[str, Any] = {}
    # checks.gpu_workers: the cuda workers whose heartbeat carries a passed CUDA check.
    # Informational, never degraded: without GPU workers gpu=true jobs run on CPU by design.
    informational: dict[str, Any] = {}
    try:
        svc.redis.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"unavailable: {type(exc).__name__}"
    if checks["redis"] == "ok":
        try:
            state = svc.fleet.get()
            snapshot = state.snapshot
            informational["gpu_workers"] = gpu_workers_text(gpu_workers(state.heartbeats))
            if svc.settings.store_ingested and not snapshot.consumers_of(STORE_QUEUE):
                degraded["store_worker"] = NO_STORE_WORKER
            # Past the grace only: every submission holds an entry for a moment.
            unsent = len(svc.store.outbox_due())
            if unsent:
                degraded["outbox"] = (
                    f"{unsent} job message(s) not sent within MORAG_OUTBOX_GRACE: is any "
                    "worker alive to send them?"
                )
        except redis.RedisError as exc:
            checks["redis"] = f"unavailable: {type(exc).__name__}"
    uploads = svc.settings.uploads_dir
    try:
        uploads.mkdir(parents=True, exist_ok=True)
        checks["shared_dir"] = "ok" if os.access(uploads, os.W_OK) else "not writable"
    except OSError as exc:
        checks["shared_dir"] = f"unavailable: {exc.strerror}"
    ok = all(v == "ok" for v in checks.values())
    status = "not ready" if not ok else ("degraded" if degraded else "ready")
    checks.update(degraded)
    checks.update(informational)
    return JSONResponse({"status": status, "checks": checks}, status_code=200 if ok else 503)
