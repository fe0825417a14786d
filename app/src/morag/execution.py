"""Running one delivered job: claim, fetch the input, process, record (or keep the result
through a long Redis outage), fall back on GPU failure."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery.exceptions import Reject, SoftTimeLimitExceeded

from morag import files, fleet, live_events, split_jobs, urls
from morag.celery_app import dispatch
from morag.config import CPU_QUEUE, GPU_QUEUE, STORE_QUEUE, Settings
from morag.job_record import TERMINAL, JobRecord, Result, Route
from morag.jobs import Claim, JobStore
from morag.processors.base import ProcessContext, ProcessingError, is_gpu_failure
from morag.processors.registry import get_processor
from morag.redis_client import passing_outage, redis_reason
from morag.routing import gpu_failure_route, rescued_route
from morag.runtime import Runtime
from morag.webhooks import notify_end

log = logging.getLogger("morag.execution")

PROGRESS_EVERY = 0.5  # seconds between progress writes
DECLINE_PAUSE = 2.0  # seconds a worker waits before sending back a job it declined before

T = TypeVar("T")


def through_outage(
    rt: Runtime, what: str, call: Callable[[], T], *, until_it_answers: bool = False
) -> T:
    """``call()``, retried with backoff while Redis is unreachable or refuses writes (a
    restart, a blip, OOM/READONLY/MISCONF), for up to ``MORAG_REDIS_RETRY_SECONDS``, or for
    as long as that lasts with ``until_it_answers``. Other Redis errors are raised at once."""
    deadline = None if until_it_answers else time.monotonic() + rt.settings.redis_retry_seconds
    pause = 0.2
    while True:
        try:
            return call()
        except redis.RedisError as exc:
            why = passing_outage(exc)
            if why is None or (deadline is not None and time.monotonic() >= deadline):
                raise
            log.warning("%s: %s; retrying in %.1fs", what, why, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


@dataclass(frozen=True)
class Outcome:
    """What an attempt ended with, to write into its job."""

    result: Result | None = None
    error: str | None = None
    to_store: bool = False  # an ingest job handed to morag-store, which ends it


@dataclass(frozen=True)
class Kept:
    """An outcome that Redis was away too long to take, kept on disk by ``keep``."""

    task_id: str
    owner: str
    outcome: Outcome
    path: Path


def record_outcome(
    store: JobStore, settings: Settings, task_id: str, owner: str, o: Outcome
) -> bool:
    """Write the attempt's outcome; False when the attempt no longer owns the job (the
    watchdog requeued it, another worker ran it, the client cancelled it)."""
    if not o.to_store:
        return store.finish(task_id, owner, result=o.result, error=o.error)
    assert o.result is not None
    return store.hand_to_store(
        task_id, owner, result=o.result, store_resend_after=settings.store_resend_after
    )


def kept_dir(settings: Settings, worker: str) -> Path:
    """Where a worker keeps the outcomes it could not record (one folder per worker)."""
    return settings.work_dir / "parked" / worker


def keep(settings: Settings, worker: str, task_id: str, owner: str, outcome: Outcome) -> Path:
    """Keep an outcome on disk for the worker's supervisor (the parent process), which
    holds the job's lease and records it once Redis takes writes again. On disk, not in
    memory: the pool child that ran the job hands it over and goes on, and the worker may
    be restarted (systemd, a deploy, a crash) before Redis is back."""
    folder = kept_dir(settings, worker)
    folder.mkdir(parents=True, exist_ok=True)
    name = (
        task_id
        if re.fullmatch(r"[A-Za-z0-9_-]{1,100}", task_id)
        else (hashlib.sha256(task_id.encode()).hexdigest())
    )
    data = {
        "task_id": task_id,
        "owner": owner,
        "result": outcome.result.model_dump(mode="json") if outcome.result else None,
        "error": outcome.error,
        "to_store": outcome.to_store,
        "kept_at": time.time(),
    }
    tmp, path = folder / f".{name}.tmp", folder / f"{name}.json"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # results are private
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)  # whole or absent, should the worker die while writing
    return path


def kept_outcomes(settings: Settings, worker: str) -> list[Kept]:
    """The outcomes this worker keeps; an unreadable file is set aside (``.bad``)."""
    found = []
    for path in sorted(kept_dir(settings, worker).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            result = Result.model_validate(data["result"]) if data["result"] else None
            outcome = Outcome(result=result, error=data["error"], to_store=data["to_store"])
            found.append(Kept(data["task_id"], data["owner"], outcome, path))
        except (OSError, ValueError, KeyError, TypeError):
            log.exception("kept result %s unreadable; set aside", path)
            path.replace(path.with_suffix(".bad"))
    return found


def record_kept(settings: Settings, client: redis.Redis, store: JobStore, kept: list[Kept]) -> None:
    """The supervisor records the outcomes kept through an outage (their leases refreshed
    first). A Redis error is raised: they stay kept for the next tick."""
    for item in kept:
        task_id = item.task_id
        recorded = record_outcome(store, settings, task_id, item.owner, item.outcome)
        item.path.unlink(missing_ok=True)
        if not recorded:
            log.warning(
                "job %s: the result kept through the Redis outage is discarded: the job "
                "was requeued, cancelled or ended meanwhile",
                task_id,
            )
            continue
        log.info("job %s: the result kept through the Redis outage is recorded", task_id)
        if item.outcome.to_store:
            try:
                dispatch(store, task_id, STORE_QUEUE)
            except Exception:  # the hand-over's outbox entry has it sent later
                log.warning("job %s: store message not sent now; sent later", task_id)
        _after_end(settings, store, store.get(task_id))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_is_dead(holder: str, my_worker: str) -> bool:
    """A lease held by a dead child of this very worker can be taken over at once."""
    name, _, pid = holder.rpartition("/")
    return name == my_worker and pid.isdigit() and not _pid_alive(int(pid))


def _own_heartbeat(rt: Runtime, worker: str) -> dict[str, Any] | None:
    """This worker's heartbeat as its supervisor published it (queues, processors)."""
    raw = rt.redis.get(fleet.heartbeat_key(worker))
    return json.loads(raw) if raw else None


def _rescue_route(beat: dict[str, Any] | None, queue: str, worker: str) -> Route | None:
    """A job taken from gpu-tasks by a worker not configured for it (its heartbeat's
    ``queues``) is a rescue. Only gpu=true jobs are ever routed to gpu-tasks."""
    if queue != GPU_QUEUE or beat is None or GPU_QUEUE in beat.get("queues", []):
        return None
    return rescued_route(gpu_requested=True, worker=worker)


def _declined(
    rt: Runtime, task_id: str, beat: dict[str, Any] | None, queue: str, worker: str
) -> bool:
    """A worker that does not offer the job's content type (its Whisper model cannot load,
    an extra is not installed) hands the job back instead of failing it: True when it did."""
    if beat is None:
        return False  # no heartbeat yet: nothing says what this worker offers
    record = rt.store.get(task_id)
    if record is None or record.content_type in beat.get("processors", []):
        return False
    declined = rt.store.decline(task_id, worker, queue=queue)
    if declined is None:
        log.info(
            "job %s (%s) not run here: not offered, and not queued", task_id, record.content_type
        )
        return True
    if declined.repeat:
        # Only workers that cannot take it are idle: slow the round trip down.
        time.sleep(DECLINE_PAUSE)
    log.warning(
        "job %s: this worker does not offer %s; sent back to %s",
        task_id,
        record.content_type,
        queue,
    )
    dispatch(rt.store, task_id, queue)
    return True


def run_job(rt: Runtime, task_id: str, *, queue: str, worker: str) -> None:
    owner = f"{worker}/{os.getpid()}"
    device = rt.device.device
    claim = _claim(rt, task_id, queue=queue, worker=worker, owner=owner)
    if claim is None:
        return
    record = claim.record
    assert record is not None
    if record.force_cpu and device != "cpu":
        device = "cpu"
        rt.store.set_attempt_device(task_id, owner, device)
    scratch = files.scratch_dir(rt.settings, task_id)

    outcome: Outcome | None = None
    try:
        result = _process(rt, record, queue=queue, device=device, owner=owner, scratch=scratch)
    except SoftTimeLimitExceeded:
        outcome = Outcome(
            error="ran out of time: the job ran past MORAG_JOB_TIME_LIMIT "
            f"({rt.settings.job_time_limit}s)"
        )
    except (ProcessingError, files.FileUnavailable, urls.UrlRefused) as exc:
        outcome = Outcome(error=str(exc))
    except Exception as exc:
        if is_gpu_failure(exc) and not record.force_cpu:
            _fall_back_to_cpu(rt, record, owner, worker, exc)
        else:
            log.exception("job %s failed", task_id)
            outcome = Outcome(error=f"internal error: {type(exc).__name__}: {exc}")
    else:
        if record.store:
            # Storing runs on the server (morag-store); the job succeeds once stored.
            outcome = Outcome(result=result, to_store=True)
        else:
            if record.kind == "ingest":
                result.metadata["stored"] = False
            outcome = Outcome(result=result)
    finally:
        files.drop_scratch(scratch)
    if outcome is not None and not _record(rt, task_id, owner, worker, outcome):
        return
    final = through_outage(rt, f"reading job {task_id}", lambda: rt.store.get(task_id))
    if final is not None:
        if rt.settings.fault_injection and record.options.get("fault") == "die_before_webhook":
            _cleanup(rt, final)
            # Test hook: the end (and the webhook it owes) is written, the publish is not.
            os.kill(os.getpid(), signal.SIGKILL)
        _after_end(rt.settings, rt.store, final)


def _claim(rt: Runtime, task_id: str, *, queue: str, worker: str, owner: str) -> Claim | None:
    """Decline or claim a delivered job; the claim when this worker runs it, else None.

    Waits as long as Redis is unreachable or refuses writes (OOM, READONLY, MISCONF): the
    message cannot be handed back meanwhile (that is a write too), and a task that fails
    is acknowledged, leaving a queued job without a message. The claim goes through as soon
    as Redis takes it. Any other Redis error hands the message back to its queue."""
    try:
        beat_now = through_outage(
            rt,
            f"reading the heartbeat of {worker}",
            lambda: _own_heartbeat(rt, worker),
            until_it_answers=True,
        )
        if through_outage(
            rt,
            f"checking job {task_id}",
            lambda: _declined(rt, task_id, beat_now, queue, worker),
            until_it_answers=True,
        ):
            return None
        _hold_before_claim(rt, task_id)
        claim = through_outage(
            rt,
            f"claiming job {task_id}",
            lambda: rt.store.claim(
                task_id,
                owner=owner,
                attempt={"queue": queue, "worker": worker, "device": rt.device.device},
                max_deliveries=rt.settings.max_deliveries,
                owner_is_dead=lambda holder: owner_is_dead(holder, worker),
                route=_rescue_route(beat_now, queue, worker),
            ),
            until_it_answers=True,
        )
    except redis.RedisError as exc:
        log.error(
            "job %s: Redis refused the claim (%s); its message goes back to %s",
            task_id,
            redis_reason(exc),
            queue,
        )
        time.sleep(DECLINE_PAUSE)  # the same answer again at once would only spin
        raise Reject(redis_reason(exc), requeue=True) from exc
    except SoftTimeLimitExceeded as exc:  # waited the job's whole time for Redis
        raise Reject("no claim within the time limit", requeue=True) from exc
    if not claim.run:
        log.info("job %s not run here: %s", task_id, claim.reason)
        if claim.record is not None:  # the delivery cap ended it
            _after_end(rt.settings, rt.store, claim.record)
        return None
    return claim


def _record(rt: Runtime, task_id: str, owner: str, worker: str, outcome: Outcome) -> bool:
    """Write the outcome through an outage of up to MORAG_REDIS_RETRY_SECONDS; past that, keep
    it for the supervisor (False), so a finished job is neither lost nor run again."""
    try:
        recorded = through_outage(
            rt,
            f"recording job {task_id}",
            lambda: record_outcome(rt.store, rt.settings, task_id, owner, outcome),
        )
    except (redis.RedisError, SoftTimeLimitExceeded) as exc:
        if isinstance(exc, redis.RedisError) and passing_outage(exc) is None:
            raise
        path = keep(rt.settings, worker, task_id, owner, outcome)
        log.warning(
            "job %s: Redis did not take its result in %ss: %s; kept in %s until it does",
            task_id,
            rt.settings.redis_retry_seconds,
            passing_outage(exc) or "time limit",
            path,
        )
        return False
    if not recorded:
        # Another attempt holds the job (requeued after this worker was lost, cancelled,
        # ended elsewhere): its outcome stands, this one is dropped.
        log.warning(
            "job %s: this attempt's result is discarded: the job was requeued, cancelled or "
            "ended meanwhile",
            task_id,
        )
    elif outcome.to_store:
        dispatch(rt.store, task_id, STORE_QUEUE)
    return True


def _fall_back_to_cpu(
    rt: Runtime, record: JobRecord, owner: str, worker: str, exc: BaseException
) -> None:
    task_id = record.task_id
    route = gpu_failure_route(
        gpu_requested=record.route.gpu_requested, worker=worker, error=str(exc)
    )
    log.warning("job %s: %s", task_id, route.reason)
    if rt.store.requeue(task_id, route=route, error=str(exc), owner=owner, force_cpu=True):
        dispatch(rt.store, task_id, CPU_QUEUE)


def _fault(rt: Runtime, options: dict[str, Any], queue: str, device: str, progress: Any) -> None:
    """Test-only failures, honoured only when MORAG_FAULT_INJECTION is on for this worker."""
    fault = str(options.get("fault", ""))
    if not fault or not rt.settings.fault_injection:
        return
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "cuda_oom" and (queue == GPU_QUEUE or device == "cuda"):
        # The exact error CTranslate2 raises when VRAM runs out.
        raise RuntimeError("CUDA failed with error out of memory")
    if fault.startswith("stuck:"):
        # A call that ignores the soft time limit (a hung C library): only the hard one ends it.
        end = time.monotonic() + float(fault.split(":", 1)[1])
        while time.monotonic() < end:
            try:
                time.sleep(0.1)
            except SoftTimeLimitExceeded:
                continue
    if fault.startswith("slow:"):
        seconds = float(fault.split(":", 1)[1])
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            progress(0.5 * (1 - left / seconds))
            time.sleep(min(0.1, left))


def _hold_before_claim(rt: Runtime, task_id: str) -> None:
    """Test-only: ``hold_claim:PATH`` waits, between delivery and claim, while PATH exists
    (a test then makes Redis refuse the claim's writes). Only with MORAG_FAULT_INJECTION."""
    if not rt.settings.fault_injection:
        return
    record = rt.store.get(task_id)
    fault = str(record.options.get("fault", "")) if record is not None else ""
    if fault.startswith("hold_claim:"):
        hold = Path(fault.split(":", 1)[1])
        while hold.exists():
            time.sleep(0.05)


def _process(
    rt: Runtime, record: JobRecord, *, queue: str, device: str, owner: str, scratch: Path
) -> Result:
    task_id = record.task_id
    last = {"at": 0.0}
    # This attempt's segments and progress, live (SSE readers); numbered as in `attempts`.
    live = live_events.Publisher(
        rt.redis,
        task_id,
        len(record.attempts),
        ttl=rt.settings.live_events_ttl,
        max_len=rt.settings.live_events_max,
    )

    def progress(fraction: float) -> None:
        now = time.monotonic()
        if now - last["at"] >= PROGRESS_EVERY:
            last["at"] = now
            try:
                rt.store.set_progress(task_id, owner, fraction)
            except redis.RedisError as exc:  # progress is a hint; the job goes on
                log.warning("job %s: progress not recorded (%s)", task_id, exc)
            live.progress(fraction)

    source = record.source
    content_type = record.content_type
    _fault(rt, record.options, queue, device, progress)
    try:
        processor = get_processor(content_type)
    except KeyError as exc:
        raise ProcessingError(str(exc)) from exc
    source_url = source.url if source.type == "url" else None
    if source.type == "file":
        path, transfer = files.fetch_for_worker(rt.settings, source, scratch)
    elif getattr(processor, "fetches_url", False):
        path, transfer = scratch, "url"
    else:
        path = scratch / "download"
        urls.download(
            str(source.url),
            path,
            allowlist=rt.settings.url_allowlist,
            max_bytes=rt.settings.max_upload_bytes,
            timeout=rt.settings.url_timeout,
            deadline=rt.settings.tool_timeout,  # as for yt-dlp's downloads
        )
        transfer = "url"
    ctx = ProcessContext(
        rt.settings, device, scratch, progress, source_url, report_segment=live.segment
    )
    # A long recording may be transcribed in pieces by idle workers (morag.split_jobs).
    ctx.split = split_jobs.JobSplitter(rt, record, queue=queue, owner=owner)
    # A processor's output that is not a Result fails here, as the job's internal error.
    result = Result.model_validate(processor.process(path, record.options, ctx))
    result.metadata.setdefault("device", device)
    result.metadata["file_transfer"] = transfer
    result.metadata["content_type"] = content_type
    return result


def _cleanup(rt: Runtime, record: JobRecord) -> None:
    """Once a job has ended, its upload is no longer needed in the shared directory."""
    if record.status in TERMINAL and record.upload_id:
        files.remove_upload(rt.settings.uploads_dir, record.upload_id)


def _after_end(settings: Settings, store: JobStore, record: JobRecord | None) -> None:
    """Once the end is written: drop the upload, publish the webhook it owes."""
    if record is None:
        return
    if record.status in TERMINAL and record.upload_id:
        files.remove_upload(settings.uploads_dir, record.upload_id)
    notify_end(store, record, resend_after=settings.store_resend_after)
