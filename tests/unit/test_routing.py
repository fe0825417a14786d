"""The pure routing and rescue decisions."""

from __future__ import annotations

import pytest
from morag.routing import (
    ROUTE_CODES,
    FleetSnapshot,
    WorkerView,
    connected,
    decide_rescue,
    decide_route,
    gpu_failure_route,
    is_gpu_fallback,
    rescued_route,
)

GPU = WorkerView("gpu0@a", ("gpu-tasks",), ("audio",), device="cuda")
CPU = WorkerView("cpu0@s", ("celery",), ("audio", "document"))
RESCUER = WorkerView("cpu1@s", ("celery",), ("audio",))  # rescuing: configured queues only


def route(gpu: bool, fleet: FleetSnapshot, content_type: str = "audio", limit: int = 10):
    return decide_route(
        gpu_requested=gpu,
        content_type=content_type,
        fleet=fleet,
        gpu_backlog_limit=limit,
    )


def test_cpu_requested_always_goes_to_celery() -> None:
    r = route(False, FleetSnapshot((GPU, CPU)))
    assert (r.queue, r.gpu_requested, r.code, r.reason) == (
        "celery",
        False,
        "not_requested",
        "gpu not requested",
    )


def test_gpu_requested_with_a_live_capable_worker() -> None:
    r = route(True, FleetSnapshot((GPU, CPU)))
    assert r.queue == "gpu-tasks" and r.gpu_requested and "gpu0@a" in r.reason
    assert r.code == "gpu_worker"


def test_gpu_requested_without_gpu_workers_falls_back() -> None:
    r = route(True, FleetSnapshot((CPU, RESCUER)))
    assert r.queue == "celery" and r.gpu_requested and "no live GPU worker" in r.reason
    assert r.code == "no_gpu_worker"


def test_gpu_worker_that_cannot_process_the_type() -> None:
    r = route(True, FleetSnapshot((GPU, CPU)), content_type="document")
    assert r.queue == "celery" and "can process document" in r.reason
    assert r.code == "no_capable_gpu"


@pytest.mark.parametrize("backlog,queue", [(9, "gpu-tasks"), (10, "celery"), (50, "celery")])
def test_gpu_backlog_bound(backlog: int, queue: str) -> None:
    r = route(True, FleetSnapshot((GPU,), {"gpu-tasks": backlog}), limit=10)
    assert r.queue == queue
    if queue == "celery":
        assert "backlog" in r.reason and r.code == "backlog"
    else:
        assert r.code == "gpu_worker"


def test_route_dump_is_the_http_contract() -> None:
    assert route(False, FleetSnapshot()).model_dump() == {
        "queue": "celery",
        "gpu_requested": False,
        "code": "not_requested",
        "reason": "gpu not requested",
    }


def test_rerouting_codes_and_what_counts_as_a_gpu_fallback() -> None:
    failed = gpu_failure_route(gpu_requested=True, worker="gpu0@a", error="CUDA OOM")
    assert (failed.queue, failed.code) == ("celery", "gpu_failure")
    assert "GPU failure on gpu0@a: CUDA OOM" in failed.reason
    rescued = rescued_route(gpu_requested=True, worker="cpu0@s")
    assert (rescued.queue, rescued.code) == ("gpu-tasks", "rescued")
    assert is_gpu_fallback(failed) and is_gpu_fallback(rescued)
    assert not is_gpu_fallback(route(True, FleetSnapshot((GPU,))))
    assert not is_gpu_fallback(route(False, FleetSnapshot()))
    assert is_gpu_fallback(route(True, FleetSnapshot((CPU,))))
    codes = {failed.code, rescued.code, "worker_lost"}
    assert codes <= set(ROUTE_CODES) and len(set(ROUTE_CODES)) == len(ROUTE_CODES)


@pytest.mark.parametrize(
    "rescuing,workers,absent_since,now,expected",
    [
        (False, (GPU, CPU), None, 100.0, "none"),
        (True, (GPU, CPU), None, 100.0, "stop"),
        (False, (CPU,), 95.0, 100.0, "none"),  # within the grace period
        (False, (CPU,), 90.0, 100.0, "start"),  # grace (10 s) elapsed
        (True, (CPU,), 10.0, 100.0, "none"),  # already rescuing
        (False, (CPU,), None, 100.0, "none"),  # absence not yet observed
    ],
)
def test_rescue(rescuing, workers, absent_since, now, expected) -> None:
    assert (
        decide_rescue(
            rescuing=rescuing,
            fleet=FleetSnapshot(workers),
            gpu_absent_since=absent_since,
            now=now,
            grace=10.0,
        )
        == expected
    )


# Workers that advertise a liveness channel (morag.liveness).
GPU_LIVE = WorkerView("gpu0@a", ("gpu-tasks",), ("audio",), device="cuda", liveness="ch:gpu0")
CPU_LIVE = WorkerView("cpu0@s", ("celery",), ("audio",), liveness="ch:cpu0")


def test_a_worker_whose_liveness_channel_lost_its_subscriber_is_dead() -> None:
    """SIGKILL of the only GPU worker: its heartbeat still lives (TTL), but its channel has
    no subscriber left, so gpu=true goes to the CPU queue and the rescue clock starts."""
    workers = (GPU_LIVE, CPU_LIVE)
    alive = connected(workers, {"ch:gpu0": 1, "ch:cpu0": 1})
    assert alive == workers
    assert route(True, FleetSnapshot(alive)).code == "gpu_worker"
    after_kill = FleetSnapshot(connected(workers, {"ch:gpu0": 0, "ch:cpu0": 1}))
    assert after_kill.workers == (CPU_LIVE,)
    r = route(True, after_kill)
    assert (r.queue, r.code) == ("celery", "no_gpu_worker")
    rescue = {"rescuing": False, "fleet": after_kill, "now": 100.0, "grace": 10.0}
    assert decide_rescue(**rescue, gpu_absent_since=95.0) == "none"
    assert decide_rescue(**rescue, gpu_absent_since=90.0) == "start"


def test_liveness_unknown_falls_back_to_the_heartbeat_ttl() -> None:
    # A worker without a channel (older, MORAG_LIVENESS_CHANNEL=false) is judged by its
    # heartbeat alone; so is everyone when Redis would not count subscribers (None).
    old = WorkerView("gpu1@a", ("gpu-tasks",), ("audio",))
    assert connected((old, GPU_LIVE), {"ch:gpu0": 0}) == (old,)
    assert connected((old, GPU_LIVE), None) == (old, GPU_LIVE)
    assert connected((GPU_LIVE,), {}) == ()  # a channel NUMSUB did not list: no subscriber


def test_the_reason_names_a_few_capable_workers_and_counts_the_rest() -> None:
    """At a thousand GPU workers the reason listed every name: 20 KB on every job record."""
    capable = [WorkerView(f"gpu0@h{i:04d}", ("gpu-tasks",), ("audio",)) for i in range(1000)]
    fleet = FleetSnapshot((*capable, WorkerView("gpu0@video-only", ("gpu-tasks",), ("video",))))
    r = route(True, fleet)
    assert r.code == "gpu_worker"
    assert r.reason == "1000 live GPU worker(s): gpu0@h0000, gpu0@h0001, gpu0@h0002 and 997 more"
    assert route(True, FleetSnapshot(fleet.workers[:2])).reason == (
        "2 live GPU worker(s): gpu0@h0000, gpu0@h0001"
    )


def test_a_snapshots_answers_are_computed_once_and_stay_right() -> None:
    """Routing asks the same snapshot thousands of times a second: the consumers and the
    capable workers are computed once per snapshot, and are the same answers as before."""
    b = WorkerView("gpu0@b", ("gpu-tasks",), ("audio", "video"), liveness="ch:b")
    a = WorkerView("gpu0@a", ("gpu-tasks",), ("audio",), liveness="ch:a")
    fleet = FleetSnapshot((b, CPU, a))
    assert fleet.capable("gpu-tasks", "audio") == (a, b)  # by name
    assert fleet.capable("gpu-tasks", "audio") is fleet.capable("gpu-tasks", "audio")
    assert fleet.capable("gpu-tasks", "video") == (b,)
    assert fleet.consumers_of("celery") == [CPU]
    assert fleet.liveness_channels() == ("ch:a", "ch:b")
    assert FleetSnapshot((b, CPU, a)) == fleet  # the memo takes no part in equality
