"""``/api/v1/worker/jobs/{task_id}/{op}``: a worker's change of its own attempt's record, and
``/api/v1/worker/identity``: whom the API takes a worker's credentials for.

The narrow write path of ``MORAG_JOB_WRITES=api`` (morag.job_writes): the caller is a
worker host (its own token) or the fleet token; the change is applied with the API's
credential once the attempt it names is one of that host's, and only as the JobStore allows
(the attempt must hold the job). Not part of the client API: hidden from the schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from morag import job_writes
from morag.api.deps import require_worker_token, services
from morag.api.errors import ApiError
from morag.submission import Services

router = APIRouter(prefix="/api/v1/worker", tags=["worker"], include_in_schema=False)


@router.get("/identity")
async def identity(caller: str | None = Depends(require_worker_token)) -> dict[str, Any]:
    """Who the API takes this worker for: its host, or null for the fleet's token. A worker
    asks before it starts consuming (morag.runtime.require_api_identity)."""
    return {"host": caller}


@router.post("/jobs/{task_id}/{op}")
async def change(
    task_id: str,
    op: str,
    body: dict[str, Any] = Body(...),
    caller: str | None = Depends(require_worker_token),
    svc: Services = Depends(services),
) -> dict[str, Any]:
    try:
        parsed = job_writes.parse(op, body)
    except KeyError as exc:
        raise ApiError(404, f"unknown operation {op!r}") from exc
    except ValidationError as exc:
        raise ApiError(422, f"invalid {op}: {exc.errors(include_url=False)}") from exc
    # A Redis error answers 503 (the app's handler): the worker retries, as against Redis.
    try:
        return await run_in_threadpool(job_writes.apply, svc.store, caller, task_id, parsed)
    except job_writes.WriteRefused as exc:
        raise ApiError(403, str(exc)) from exc
