"""Running one delivered job: claim, fetch the input, process, record, fall back on GPU failure."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery.exceptions import SoftTimeLimitExceeded

from morag import files, fleet, urls
from morag.celery_app import dispatch
from morag.config import CPU_QUEUE, GPU_QUEUE, STORE_QUEUE
from morag.job_record import TERMINAL, JobRecord, Result, Route
from morag.processors.base import ProcessContext, ProcessingError, is_gpu_failure
from morag.processors.registry import get_processor
from morag.routing import gpu_failure_route, rescued_route
from morag.runtime import Runtime
from morag.webhooks import notify_end

log = logging.getLogger("morag.execution")

PROGRESS_EVERY = 0.5  # seconds between progress writes
DECLINE_PAUSE = 2.0  # seconds a worker waits before sending back a job it declined before

T = TypeVar("T")


def through_outage(rt: Runtime, what: str, call: Callable[[], T]) -> T:
    """``call()``, retried while Redis is unreachable (a restart, a blip), for up to
    ``MORAG_REDIS_RETRY_SECONDS``: a finished job's result must not be lost to a blip."""
    deadline = time.monotonic() + rt.settings.redis_retry_seconds
    pause = 0.2
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, exc, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


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
    beat = through_outage(
        rt, f"reading the heartbeat of {worker}", lambda: _own_heartbeat(rt, worker)
    )
    if through_outage(
        rt, f"checking job {task_id}", lambda: _declined(rt, task_id, beat, queue, worker)
    ):
        return
    claim = through_outage(
        rt,
        f"claiming job {task_id}",
        lambda: rt.store.claim(
            task_id,
            owner=owner,
            attempt={"queue": queue, "worker": worker, "device": device},
            max_deliveries=rt.settings.max_deliveries,
            owner_is_dead=lambda holder: owner_is_dead(holder, worker),
            route=_rescue_route(beat, queue, worker),
        ),
    )
    if not claim.run:
        log.info("job %s not run here: %s", task_id, claim.reason)
        if claim.record is not None:  # the delivery cap ended it
            _cleanup(rt, claim.record)
            notify_end(rt.redis, claim.record, resend_after=rt.settings.store_resend_after)
        return
    record = claim.record
    assert record is not None
    if record.force_cpu and device != "cpu":
        device = "cpu"
        _set_attempt_device(rt, task_id, owner, device)
    scratch = files.scratch_dir(rt.settings, task_id)

    def finish(**outcome: Any) -> None:
        through_outage(
            rt, f"recording job {task_id}", lambda: rt.store.finish(task_id, owner, **outcome)
        )

    try:
        result = _process(rt, record, queue=queue, device=device, owner=owner, scratch=scratch)
    except SoftTimeLimitExceeded:
        finish(
            error="ran out of time: the job ran past MORAG_JOB_TIME_LIMIT "
            f"({rt.settings.job_time_limit}s)"
        )
    except ProcessingError as exc:
        finish(error=str(exc))
    except files.FileUnavailable as exc:
        finish(error=str(exc))
    except urls.UrlRefused as exc:
        finish(error=str(exc))
    except Exception as exc:
        if is_gpu_failure(exc) and not record.force_cpu:
            _fall_back_to_cpu(rt, record, owner, worker, exc)
        else:
            log.exception("job %s failed", task_id)
            finish(error=f"internal error: {type(exc).__name__}: {exc}")
    else:
        if record.store:
            # Storing runs on the server (morag-store); the job succeeds once stored.
            handed = through_outage(
                rt,
                f"handing job {task_id} to the store",
                lambda: rt.store.hand_to_store(
                    task_id,
                    owner,
                    result=result,
                    store_resend_after=rt.settings.store_resend_after,
                ),
            )
            if handed:
                dispatch(rt.store, task_id, STORE_QUEUE)
        else:
            if record.kind == "ingest":
                result.metadata["stored"] = False
            finish(result=result)
    finally:
        files.drop_scratch(scratch)
    final = through_outage(rt, f"reading job {task_id}", lambda: rt.store.get(task_id))
    if final is not None:
        _cleanup(rt, final)
        if rt.settings.fault_injection and record.options.get("fault") == "die_before_webhook":
            # Test hook: the end (and the webhook it owes) is written, the publish is not.
            os.kill(os.getpid(), signal.SIGKILL)
        notify_end(rt.redis, final, resend_after=rt.settings.store_resend_after)


def _set_attempt_device(rt: Runtime, task_id: str, owner: str, device: str) -> None:
    def change(rec: JobRecord, holder: str | None) -> JobRecord | None:
        if holder != owner or not rec.attempts:
            return None
        rec.attempts[-1].device = device
        return rec

    rt.store.update(task_id, change)


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


def _process(
    rt: Runtime, record: JobRecord, *, queue: str, device: str, owner: str, scratch: Path
) -> Result:
    task_id = record.task_id
    last = {"at": 0.0}

    def progress(fraction: float) -> None:
        now = time.monotonic()
        if now - last["at"] >= PROGRESS_EVERY:
            last["at"] = now
            try:
                rt.store.set_progress(task_id, owner, fraction)
            except redis.RedisError as exc:  # progress is a hint; the job goes on
                log.warning("job %s: progress not recorded (%s)", task_id, exc)

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
        )
        transfer = "url"
    ctx = ProcessContext(rt.settings, device, scratch, progress, source_url)
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
