"""Pure routing decisions: which queue a job goes to, and when CPU workers rescue GPU jobs.

No I/O here: callers pass a fleet snapshot and get a decision with a human-readable reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from morag.config import CPU_QUEUE, GPU_QUEUE


@dataclass(frozen=True)
class WorkerView:
    """What routing needs to know about one live worker (from its heartbeat)."""

    name: str
    queues: tuple[str, ...]
    processors: tuple[str, ...]
    device: str = "cpu"
    busy: bool = False


@dataclass(frozen=True)
class FleetSnapshot:
    workers: tuple[WorkerView, ...] = ()
    queue_lengths: dict[str, int] = field(default_factory=dict)

    def consumers_of(self, queue: str) -> list[WorkerView]:
        return [w for w in self.workers if queue in w.queues]


@dataclass(frozen=True)
class Route:
    queue: str
    gpu_requested: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"queue": self.queue, "gpu_requested": self.gpu_requested, "reason": self.reason}


def decide_route(
    *, gpu_requested: bool, content_type: str, fleet: FleetSnapshot, gpu_backlog_limit: int
) -> Route:
    """Pick the queue for a new job. GPU only when a live GPU worker can take it now."""
    if not gpu_requested:
        return Route(CPU_QUEUE, False, "gpu not requested")
    gpu_workers = fleet.consumers_of(GPU_QUEUE)
    if not gpu_workers:
        return Route(CPU_QUEUE, True, "no live GPU worker; running on CPU")
    capable = [w for w in gpu_workers if content_type in w.processors]
    if not capable:
        return Route(
            CPU_QUEUE, True, f"no live GPU worker can process {content_type}; running on CPU"
        )
    backlog = fleet.queue_lengths.get(GPU_QUEUE, 0)
    if backlog >= gpu_backlog_limit:
        return Route(
            CPU_QUEUE,
            True,
            f"GPU backlog {backlog} reached the limit {gpu_backlog_limit}; running on CPU",
        )
    names = ", ".join(sorted(w.name for w in capable))
    return Route(GPU_QUEUE, True, f"{len(capable)} live GPU worker(s): {names}")


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
