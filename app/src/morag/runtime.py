"""A worker process's runtime: its settings, device, Redis client and job store.

The device is decided once in the worker's parent (with nvidia-smi, never CUDA there; the
CUDA check runs in a child process) and inherited by the forked pool children; the Redis
client and the job store are rebuilt in each process after the fork.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import redis

from morag import cuda_check
from morag.config import Settings, get_settings
from morag.devices import EX_CONFIG, DeviceInfo, DeviceUnavailable
from morag.jobs import JobStore
from morag.processors.audio import compute_type_for
from morag.redis_client import redis_client

log = logging.getLogger("morag.worker")


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    store: JobStore
    device: DeviceInfo
    pid: int


_runtime: Runtime | None = None
_device: DeviceInfo | None = None  # decided in the parent, inherited by forked children


def decide_device(settings: Settings) -> DeviceInfo:
    """Decided once per worker; raises DeviceUnavailable for MORAG_DEVICE=cuda without CUDA.

    ``cuda`` only after the CUDA check passed in a child process, in the compute type the
    worker's Whisper model will use (morag.cuda_check)."""
    global _device
    if _device is None:
        compute_type = compute_type_for("cuda", settings.whisper_compute_type)
        _device = cuda_check.decide(settings.device, compute_type=compute_type)
    return _device


def use_device(info: DeviceInfo) -> None:
    """Replace this process's device (a warm-up that fell back to CPU, morag.warmup): its
    runtime is rebuilt, and processes forked later inherit it."""
    global _device, _runtime
    _device, _runtime = info, None


def require_device(settings: Settings) -> DeviceInfo:
    """decide_device, or exit with EX_CONFIG (78) and the reason on stderr and in the log.

    systemd's RestartPreventExitStatus=78 then leaves the unit failed with the message in its
    journal, instead of restarting a worker that cannot do what it was told."""
    try:
        return decide_device(settings)
    except DeviceUnavailable as exc:
        _refuse_start(str(exc))


def require_api_identity(settings: Settings) -> None:
    """With MORAG_JOB_WRITES=api, before Celery starts: exit with EX_CONFIG (78) and the
    reason when the API refuses this worker's token or its certificate is not trusted (every
    job it took could then be neither recorded nor failed, and would wait for another worker);
    an API that does not answer now is an outage, waited out per job as a Redis one is."""
    if settings.job_writes != "api":
        return
    from morag.api_job_store import check_identity  # httpx: only in workers that use it

    check = check_identity(settings)
    if check.refused:
        _refuse_start(check.refused)
    if check.unreachable:
        print(f"morag worker: {check.unreachable}; starting anyway", file=sys.stderr, flush=True)


def _refuse_start(reason: str) -> NoReturn:
    if log.hasHandlers():
        log.critical("%s", reason)
    print(f"morag worker: {reason}", file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)


def _store_options(settings: Settings) -> dict[str, Any]:
    return {
        "ttl": settings.job_ttl,
        "lease_ttl": settings.heartbeat_ttl,
        "outbox_grace": settings.outbox_grace,
    }


def job_store(client: redis.Redis, settings: Settings) -> JobStore:
    """The job store on this process's own Redis credential (the API, the store worker)."""
    return JobStore(client, **_store_options(settings))


def worker_job_store(client: redis.Redis, settings: Settings) -> JobStore:
    """A GPU/CPU worker's job store: its attempts' changes go through the API with
    MORAG_JOB_WRITES=api (morag.api_job_store), else straight to Redis."""
    if settings.job_writes != "api":
        return job_store(client, settings)
    from morag.api_job_store import ApiJobStore  # httpx: only in workers that use it

    return ApiJobStore(client, settings, **_store_options(settings))


def get_runtime() -> Runtime:
    """This process's Redis client and job store; rebuilt after a fork."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = get_settings()
        client = redis_client(settings)
        store = worker_job_store(client, settings)
        _runtime = Runtime(settings, client, store, decide_device(settings), os.getpid())
    return _runtime
