"""``/api/v1/status/*``: jobs, batches, active jobs and queue statistics.

The fixed paths are declared before ``/{task_id}`` so they are never read as a job id.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query

from morag.api.deps import ApiKey, services, wait_for_end
from morag.config import DECLARED_QUEUES
from morag.jobs import public_view
from morag.submission import Services

router = APIRouter(prefix="/api/v1/status", tags=["status"], dependencies=[ApiKey])


@router.get("/")
def active_jobs(svc: Services = Depends(services)) -> dict[str, Any]:
    jobs = [public_view(r) for r in svc.store.get_many(svc.store.active_ids())]
    return {"count": len(jobs), "jobs": jobs}


@router.get("/stats/queues")
def queue_stats(svc: Services = Depends(services)) -> dict[str, Any]:
    state = svc.fleet.get()
    queues = {}
    for name in DECLARED_QUEUES:
        consumers = [b["name"] for b in state.heartbeats if name in b.get("consuming", [])]
        queues[name] = {
            "pending": state.snapshot.queue_lengths.get(name, 0),
            "consumers": len(consumers),
            "workers": sorted(consumers),
        }
    return {"queues": queues}


@router.get("/batch/{batch_id}")
def batch_status(batch_id: str, svc: Services = Depends(services)) -> dict[str, Any]:
    task_ids = svc.store.get_batch(batch_id)
    if task_ids is None:
        raise HTTPException(404, f"unknown batch id {batch_id}")
    records = svc.store.get_many(task_ids)
    return {
        "batch_id": batch_id,
        "total": len(task_ids),
        "counts": dict(Counter(r["status"] for r in records)),
        "task_ids": task_ids,
    }


@router.get("/{task_id}")
async def job_status(
    task_id: str,
    wait: float = Query(
        default=0, ge=0, le=60, description="long-poll: seconds to wait for the end"
    ),
    svc: Services = Depends(services),
) -> dict[str, Any]:
    record = await wait_for_end(svc, task_id, wait)
    if record is None:
        raise HTTPException(404, f"unknown task id {task_id}")
    return public_view(record)
