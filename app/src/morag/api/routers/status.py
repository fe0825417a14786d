"""``/api/v1/status/*``: jobs, batches, active jobs and queue statistics.

The fixed paths are declared before ``/{task_id}`` so they are never read as a job id.
"""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from morag.api import live
from morag.api.deps import ApiKey, services, wait_for_end
from morag.api.errors import ApiError
from morag.api.params import Paging, paging
from morag.api.schemas import BatchStatus, Job, JobPage, QueuesAnswer, QueueStats, errors
from morag.config import DECLARED_QUEUES
from morag.live_events import valid_event_id
from morag.submission import Services

router = APIRouter(
    prefix="/api/v1/status", tags=["status"], dependencies=[ApiKey], responses=errors()
)


@router.get("/", response_model=JobPage)
def active_jobs(page: Paging = Depends(paging), svc: Services = Depends(services)) -> JobPage:
    """Queued and running jobs, oldest id first (ids are random: the order is stable, not
    chronological), one page at a time."""
    ids = svc.store.active_ids()
    jobs = [r.public() for r in svc.store.get_many(page.cut(ids))]
    return JobPage(total=len(ids), count=len(jobs), offset=page.offset, limit=page.limit, jobs=jobs)


@router.get("/stats/queues", response_model=QueuesAnswer)
def queue_stats(svc: Services = Depends(services)) -> QueuesAnswer:
    state = svc.fleet.get()
    queues = {}
    for name in DECLARED_QUEUES:
        consumers = [b["name"] for b in state.heartbeats if name in b.get("consuming", [])]
        queues[name] = QueueStats(
            pending=state.snapshot.queue_lengths.get(name, 0),
            consumers=len(consumers),
            workers=sorted(consumers),
        )
    return QueuesAnswer(queues=queues)


@router.get("/batch/{batch_id}", response_model=BatchStatus, responses=errors(404))
def batch_status(batch_id: str, svc: Services = Depends(services)) -> BatchStatus:
    task_ids = svc.store.get_batch(batch_id)
    if task_ids is None:
        raise ApiError(404, f"unknown batch id {batch_id}")
    records = svc.store.get_many(task_ids)
    return BatchStatus(
        batch_id=batch_id,
        total=len(task_ids),
        counts=dict(Counter(r.status.value for r in records)),
        task_ids=task_ids,
    )


@router.get("/{task_id}", response_model=Job, responses=errors(404))
async def job_status(
    task_id: str,
    wait: float = Query(
        default=0, ge=0, le=60, description="long-poll: seconds to wait for the end"
    ),
    svc: Services = Depends(services),
) -> Job:
    record = await wait_for_end(svc, task_id, wait)
    if record is None:
        raise ApiError(404, f"unknown task id {task_id}")
    return record.public()


EVENTS_ANSWER = {
    "description": "Server-Sent Events until the job ends: "
    + ", ".join(f"`{name}`" for name in live.EVENT_NAMES)
    + ' (docs/api.md, "Live events"); the stream closes after `end` (or `error`)',
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


@router.get(
    "/{task_id}/events",
    response_class=StreamingResponse,
    responses={200: EVENTS_ANSWER, **errors(404)},
)
async def job_events(
    task_id: str,
    last_event_id: str | None = Header(
        default=None,
        alias="Last-Event-ID",
        description="resume after this event (what an SSE client sends when it reconnects)",
    ),
    svc: Services = Depends(services),
) -> StreamingResponse:
    """The job as it goes (SSE): state and route changes, progress, the transcript's
    segments as the worker finishes them (audio and video), then the end state."""
    if await run_in_threadpool(svc.store.get, task_id) is None:
        raise ApiError(404, f"unknown task id {task_id}")
    after = last_event_id if valid_event_id(last_event_id) else "0"
    return StreamingResponse(
        live.job_events(svc, task_id, after or "0"),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
