"""Pure routing decisions: which queue a job goes to, and when CPU workers rescue GPU jobs.

No I/O here: callers pass a fleet snapshot and get a decision with a machine-readable
``code`` (stable: the metrics, the CLI and the tests use it) and a human-readable reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from morag.config import CPU_QUEUE, GPU_QUEUE
from morag.job_record import Route


@dataclass(frozen=True)
class WorkerView:
    """What routing needs to know about one live worker (from its heartbeat)."""

    name: str
    queues: tuple[str, ...]
    processors: tuple[str, ...]
    device: str = "cpu"
    busy: bool = False
    # The Pub/Sub channel its process stays subscribed to while it lives (morag.liveness);
    # None: a worker that advertises none (older, or MORAG_LIVENESS_CHANNEL=false).
    liveness: str | None = None


def connected(
    workers: tuple[WorkerView, ...], subscribers: Mapping[str, int] | None
) -> tuple[WorkerView, ...]:
    """The workers whose process still holds its Redis connection.

    ``subscribers``: PUBSUB NUMSUB of the workers' liveness channels, or None when Redis
    could not tell (then the heartbeats' TTL alone decides, as before liveness channels).
    A channel with no subscriber means the process died: the kernel closed its socket and
    Redis dropped the subscription, long before the heartbeat expires. A worker without a
    channel is judged by its heartbeat alone."""
    if subscribers is None:
        return workers
    return tuple(w for w in workers if w.liveness is None or subscribers.get(w.liveness, 0) > 0)


@dataclass(frozen=True)
class FleetSnapshot:
    """The fleet at one read. Immutable: the answers below are computed once per snapshot
    and per argument, not at every routing decision (a thousand workers each time)."""

    workers: tuple[WorkerView, ...] = ()
    queue_lengths: dict[str, int] = field(default_factory=dict)
    _memo: dict[tuple[str, ...], tuple[Any, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def consumers_of(self, queue: str) -> list[WorkerView]:
        return list(self.consumers(queue))

    def capable(self, queue: str, content_type: str) -> tuple[WorkerView, ...]:
        """The consumers of ``queue`` that can process ``content_type``, by name."""
        key = ("capable", queue, content_type)
        found = self._memo.get(key)
        if found is None:
            found = tuple(
                sorted(
                    (w for w in self.consumers(queue) if content_type in w.processors),
                    key=lambda w: w.name,
                )
            )
            self._memo[key] = found  # racing threads store equal values: harmless
        return found

    def liveness_channels(self) -> tuple[str, ...]:
        """The workers' liveness channels, sorted, each once."""
        key = ("channels",)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = tuple(
                sorted({w.liveness for w in self.workers if w.liveness})
            )
        return found

    def consumers(self, queue: str) -> tuple[WorkerView, ...]:
        """``consumers_of``, without a copy."""
        key = ("consumers", queue)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = tuple(w for w in self.workers if queue in w.queues)
        return found


# Route codes. Decisions at submission: the first five; later re-routing: the last three.
NOT_REQUESTED = "not_requested"  # gpu=false
GPU_WORKER = "gpu_worker"  # gpu=true and a live GPU worker can take it
NO_GPU_WORKER = "no_gpu_worker"  # gpu=true, no live worker consumes gpu-tasks
NO_CAPABLE_GPU = "no_capable_gpu"  # gpu=true, no live GPU worker has the processor
BACKLOG = "backlog"  # gpu=true, gpu-tasks holds MORAG_GPU_BACKLOG_LIMIT jobs
GPU_FAILURE = "gpu_failure"  # the GPU failed mid-job (CUDA OOM, CUDA unusable): re-run on CPU
WORKER_LOST = "worker_lost"  # the worker running it vanished: re-enqueued by the watchdog
RESCUED = "rescued"  # waiting on gpu-tasks with no GPU worker: a CPU worker took it
ROUTE_CODES = (
    NOT_REQUESTED,
    GPU_WORKER,
    NO_GPU_WORKER,
    NO_CAPABLE_GPU,
    BACKLOG,
    GPU_FAILURE,
    WORKER_LOST,
    RESCUED,
)


def _route(queue: str, gpu_requested: bool, code: str, reason: str) -> Route:
    return Route(queue=queue, gpu_requested=gpu_requested, code=code, reason=reason)


def is_gpu_fallback(route: Route) -> bool:
    """Did a job that asked for a GPU get sent to (or taken by) a CPU instead?"""
    if not route.gpu_requested:
        return False
    return route.queue != GPU_QUEUE or route.code == RESCUED


def decide_route(
    *, gpu_requested: bool, content_type: str, fleet: FleetSnapshot, gpu_backlog_limit: int
) -> Route:
    """Pick the queue for a new job. GPU only when a live GPU worker can take it now."""
    if not gpu_requested:
        return _route(CPU_QUEUE, False, NOT_REQUESTED, "gpu not requested")
    if not fleet.consumers(GPU_QUEUE):
        return _route(CPU_QUEUE, True, NO_GPU_WORKER, "no live GPU worker; running on CPU")
    capable = fleet.capable(GPU_QUEUE, content_type)
    if not capable:
        return _route(
            CPU_QUEUE,
            True,
            NO_CAPABLE_GPU,
            f"no live GPU worker can process {content_type}; running on CPU",
        )
    backlog = fleet.queue_lengths.get(GPU_QUEUE, 0)
    if backlog >= gpu_backlog_limit:
        return _route(
            CPU_QUEUE,
            True,
            BACKLOG,
            f"GPU backlog {backlog} reached the limit {gpu_backlog_limit}; running on CPU",
        )
    return _route(
        GPU_QUEUE, True, GPU_WORKER, f"{len(capable)} live GPU worker(s): {_some(capable)}"
    )


# A reason names this many workers at most: at a thousand workers, all of their names made
# every job record 20 KB longer.
REASON_NAMES = 3


def _some(workers: tuple[WorkerView, ...]) -> str:
    """The first REASON_NAMES names, and how many more."""
    names = ", ".join(w.name for w in workers[:REASON_NAMES])
    more = len(workers) - REASON_NAMES
    return f"{names} and {more} more" if more > 0 else names


def gpu_failure_route(*, gpu_requested: bool, worker: str, error: str) -> Route:
    """The GPU failed mid-job: the same job goes to the CPU queue."""
    return _route(
        CPU_QUEUE,
        gpu_requested,
        GPU_FAILURE,
        f"GPU failure on {worker}: {error}; re-running on CPU",
    )


def rescued_route(*, gpu_requested: bool, worker: str) -> Route:
    """A CPU worker took a job waiting on gpu-tasks because no GPU worker was alive."""
    return _route(
        GPU_QUEUE,
        gpu_requested,
        RESCUED,
        f"no live GPU worker: rescued from {GPU_QUEUE} by the CPU worker {worker}",
    )


RescueAction = Literal["start", "stop", "none"]


def decide_rescue(
    *,
    rescuing: bool,
    fleet: FleetSnapshot,
    gpu_absent_since: float | None,
    now: float,
    grace: float,
) -> RescueAction:
    """Should this CPU worker start/stop consuming the GPU queue?

    ``fleet`` must list workers by their *configured* queues, so a CPU worker that is
    rescuing does not count as a GPU worker.
    """
    gpu_alive = bool(fleet.consumers_of(GPU_QUEUE))
    if gpu_alive:
        return "stop" if rescuing else "none"
    if rescuing or gpu_absent_since is None:
        return "none"
    return "start" if now - gpu_absent_since >= grace else "none"
