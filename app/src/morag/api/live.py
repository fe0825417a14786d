"""Server-Sent Events of a job, for ``GET /api/v1/status/{id}/events`` and
``POST /v1/audio/transcriptions`` with ``stream=true``.

Both poll the job record (the truth: state, route, result) and the job's live events
(``morag.live_events``: the worker's segments and progress), in that order: once a read of
the record shows the end, every event the worker wrote is already in the Stream (it writes
them before the end), so the read after it finds them all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis
from starlette.concurrency import run_in_threadpool

from morag import live_events
from morag.job_record import TERMINAL, JobRecord, JobStatus
from morag.live_events import KEEPALIVE, SEGMENT, LiveEvent, sse
from morag.submission import Services
from morag.submission import cancel as cancel_job

# Seconds between polls: short at first (a job's first events come quickly), then slower.
FIRST_POLL = 0.05
MAX_POLL = 0.25

# What the native stream declares in the OpenAPI schema (``text/event-stream``).
EVENT_NAMES = ("status", "route", "progress", "segment", "end", "error")


def _poll(svc: Services, task_id: str, after: str) -> tuple[JobRecord | None, list[LiveEvent]]:
    record = svc.store.get(task_id)
    if record is None:
        return None, []
    return record, live_events.read_after(svc.redis, task_id, after)


class _Pacer:
    """Poll delays and keep-alive comments."""

    def __init__(self, keepalive: float) -> None:
        self.keepalive = keepalive
        self.delay = FIRST_POLL
        self.sent_at = time.monotonic()

    def sent(self) -> None:
        self.sent_at = time.monotonic()
        self.delay = FIRST_POLL

    def idle_comment(self) -> str | None:
        if time.monotonic() - self.sent_at >= self.keepalive:
            self.sent_at = time.monotonic()
            return KEEPALIVE
        return None

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 1.5, MAX_POLL)


def _redis_error(exc: redis.RedisError) -> dict[str, Any]:
    return {
        "detail": f"Redis unavailable ({type(exc).__name__}); the job goes on: reconnect "
        "(with Last-Event-ID) or GET /api/v1/status/{id}",
        "code": "unavailable",
    }


# -- the native stream ---------------------------------------------------------------------


@dataclass
class _Seen:
    status: JobStatus | None = None
    route: Any = None
    progress: float = -1.0
    extra: dict[str, Any] = field(default_factory=dict)


def _route_event(record: JobRecord) -> dict[str, Any]:
    attempt = record.attempts[-1] if record.attempts else None
    return {
        "route": record.route.model_dump(mode="json"),
        "attempt": len(record.attempts) or None,
        "queue": attempt.queue if attempt else record.route.queue,
        "worker": attempt.worker if attempt else None,
        "device": attempt.device if attempt else None,
    }


async def job_events(svc: Services, task_id: str, after: str = "0") -> AsyncIterator[str]:
    """``status`` (on change), ``route`` (the route or the running attempt's queue, worker,
    device changed: a fallback, a rescue), ``progress`` (never backwards), ``segment``
    (with the Stream id as the SSE id, for ``Last-Event-ID``), then ``end`` (the job as
    ``GET /api/v1/status/{id}`` answers it) and the stream closes; ``error`` when the job
    vanishes (expired) or Redis fails, then it closes too."""
    seen = _Seen()
    pace = _Pacer(svc.settings.sse_keepalive)
    while True:
        try:
            record, events = await run_in_threadpool(_poll, svc, task_id, after)
        except redis.RedisError as exc:
            yield sse(_redis_error(exc), event="error")
            return
        if record is None:
            detail = f"job {task_id} no longer exists (expired or deleted)"
            yield sse({"detail": detail, "code": "not_found"}, event="error")
            return
        out = []
        if record.status != seen.status:
            seen.status = record.status
            out.append(sse({"status": record.status.value}, event="status"))
        route = _route_event(record)
        if route != seen.route:
            seen.route = route
            out.append(sse(route, event="route"))
        for ev in events:
            after = ev.id
            if ev.type == SEGMENT:
                out.append(sse({"attempt": ev.attempt, **ev.data}, event="segment", event_id=ev.id))
            elif float(ev.data.get("progress", 0.0)) > seen.progress:
                seen.progress = float(ev.data["progress"])
                out.append(sse({"progress": seen.progress}, event="progress", event_id=ev.id))
        if record.progress > seen.progress:  # a new attempt starts at 0 in the record: kept
            seen.progress = record.progress
            out.append(sse({"progress": seen.progress}, event="progress"))
        if record.status in TERMINAL:
            out.append(sse(record.public().model_dump(mode="json"), event="end"))
            yield "".join(out)
            return
        if out:
            yield "".join(out)
            pace.sent()
        elif (comment := pace.idle_comment()) is not None:
            yield comment
        await pace.wait()


# -- OpenAI's transcription stream ---------------------------------------------------------


def openai_error(message: str, code: str) -> str:
    """An error the openai SDK raises as ``APIError`` (it reads ``error.message``)."""
    body = {"message": message, "type": "server_error", "param": None, "code": code}
    return sse({"type": "error", "error": body}, event="error")


class _Deltas:
    """Segments to ``transcript.text.delta`` texts whose concatenation is the job's
    ``content`` (segments joined by one space).

    After a GPU->CPU fallback the new attempt transcribes the file from the start: its
    segments whose middle lies within what an earlier attempt already streamed are not sent
    again, the deltas continue from there. The final ``transcript.text.done`` carries the
    finished job's transcript (the new attempt's), which is what a client keeps."""

    def __init__(self) -> None:
        self.attempt = 0
        self.streamed_until = 0.0  # end of the last segment sent, seconds
        self.resume_after: float | None = None  # set when an attempt follows another
        self.any_sent = False

    def take(self, ev: LiveEvent) -> str | None:
        if ev.type != SEGMENT or ev.attempt < self.attempt:
            return None  # progress, or a late write of an attempt that was replaced
        if ev.attempt > self.attempt:
            if self.attempt:
                self.resume_after = self.streamed_until
            self.attempt = ev.attempt
        text = str(ev.data.get("text") or "").strip()
        start, end = float(ev.data.get("start") or 0.0), float(ev.data.get("end") or 0.0)
        if not text or (self.resume_after is not None and (start + end) / 2 <= self.resume_after):
            return None
        self.streamed_until = max(self.streamed_until, end)
        delta = text if not self.any_sent else " " + text
        self.any_sent = True
        return delta


async def transcript_events(
    svc: Services, task_id: str, *, client_gone: str, forget: str | None = None
) -> AsyncIterator[str]:
    """OpenAI's stream: ``transcript.text.delta`` as the worker finishes segments, then
    ``transcript.text.done`` with the whole transcript; an ``error`` event when the job
    fails. A client that disconnects before the end cancels the job (as without stream),
    and ``forget`` (its Idempotency-Key entry) is deleted: nobody got this job's answer.
    No news (no segment, no progress, no change of state) for MORAG_OPENAI_WAIT seconds
    (no worker took the job) ends the stream with a ``timeout`` error; the job goes on."""
    deltas = _Deltas()
    pace = _Pacer(svc.settings.sse_keepalive)
    after = "0"
    ended = False
    news_at, last_status = time.monotonic(), None
    try:
        while True:
            try:
                record, events = await run_in_threadpool(_poll, svc, task_id, after)
            except redis.RedisError as exc:
                ended = True  # the job goes on; its id is in X-MoRAG-Task-Id
                yield openai_error(_redis_error(exc)["detail"], "unavailable")
                return
            if record is None:
                ended = True
                yield openai_error(f"job {task_id} no longer exists", "not_found")
                return
            out = []
            if events or record.status != last_status:
                news_at, last_status = time.monotonic(), record.status
            for ev in events:
                after = ev.id
                delta = deltas.take(ev)
                if delta is not None:
                    out.append(sse({"type": "transcript.text.delta", "delta": delta}))
            if record.status in TERMINAL:
                ended = True
                if record.status == JobStatus.succeeded and record.result is not None:
                    text = record.result.content
                    out.append(sse({"type": "transcript.text.done", "text": text}))
                else:
                    reason = record.error or record.status.value
                    out.append(
                        openai_error(
                            f"transcription failed (job {task_id}): {reason}", "processing_failed"
                        )
                    )
                yield "".join(out)
                return
            if time.monotonic() - news_at >= svc.settings.openai_wait:
                ended = True  # as the 504 without stream: the job goes on, nobody cancels it
                wait = svc.settings.openai_wait
                out.append(
                    openai_error(
                        f"no news of the job for {wait:.0f}s (MORAG_OPENAI_WAIT); it goes on: "
                        f"GET /api/v1/status/{task_id}",
                        "timeout",
                    )
                )
                yield "".join(out)
                return
            if out:
                yield "".join(out)
                pace.sent()
            elif (comment := pace.idle_comment()) is not None:
                yield comment
            await pace.wait()
    finally:
        if not ended:
            # The client went away (the server cancels this generator): nobody reads the
            # result, the fleet stops working on it. Shielded: we are being cancelled.
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(cancel_job, svc, task_id, client_gone)
                if forget is not None:
                    await run_in_threadpool(svc.redis.delete, forget)
