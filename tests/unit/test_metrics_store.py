"""The Redis layout of the fleet's counters and histograms, and the API's collector over it
(a dictionary stands in for Redis; tests/integration/test_metrics.py uses the real one)."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from morag import jobs, metrics, metrics_export
from morag.config import Settings
from morag.job_record import JobStatus, Route, Source
from morag.routing import FleetSnapshot
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import Scrape


class FakeRedis:
    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, float]] = defaultdict(dict)
        self.sets: dict[str, set[str]] = defaultdict(set)
        self.strings: dict[str, str] = {}

    def pipeline(self, transaction: bool = True) -> FakePipe:
        return FakePipe(self)

    def mget(self, keys: list[str]) -> list[str | None]:
        return [self.strings.get(k) for k in keys]


class FakePipe:
    def __init__(self, r: FakeRedis) -> None:
        self.r = r
        self.ops: list[Any] = []

    def hincrby(self, key: str, field: str, amount: int) -> None:
        self.ops.append(
            lambda: self.r.hashes[key].__setitem__(field, self._add(key, field, amount))
        )

    hincrbyfloat = hincrby

    def _add(self, key: str, field: str, amount: float) -> float:
        return self.r.hashes[key].get(field, 0) + amount

    def hgetall(self, key: str) -> None:
        self.ops.append(
            lambda: {f.encode(): str(v).encode() for f, v in self.r.hashes[key].items()}
        )

    def smembers(self, key: str) -> None:
        self.ops.append(lambda: {m.encode() for m in self.r.sets[key]})

    def execute(self) -> list[Any]:
        return [op() for op in self.ops]


def scrape(
    r: FakeRedis, beats: list[dict] | None = None, queues: dict | None = None, now: float = 0
) -> Scrape:
    state = SimpleNamespace(snapshot=FleetSnapshot((), queues or {}), heartbeats=beats or [])
    fleet = SimpleNamespace(get=lambda: state)
    settings = Settings(job_time_limit=600, visibility_timeout=900)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        metrics_export.FleetCollector(r, fleet, settings, ("audio", "web"), clock=lambda: now)
    )
    text = generate_latest(registry).decode()
    list(text_string_to_metric_families(text))  # valid exposition format
    return Scrape(text)


def test_route_decisions_and_what_counts_as_a_fallback() -> None:
    r = FakeRedis()
    pipe = r.pipeline()
    routes = [
        Route(queue=queue, gpu_requested=gpu, code=code, reason="test")
        for queue, gpu, code in (
            ("celery", False, "not_requested"),
            ("gpu-tasks", True, "gpu_worker"),
            ("celery", True, "no_gpu_worker"),
            ("celery", True, "gpu_failure"),
            ("gpu-tasks", True, "rescued"),
        )
    ]
    for route in routes:
        metrics.route_decided(pipe, route, "audio")
    pipe.execute()
    m = scrape(r)
    for route in routes:
        assert m.value("morag_route_decisions_total", code=route.code) == 1
    fallbacks = m.series("morag_gpu_fallbacks_total", content_type="audio")
    counted = {s.labels["code"] for s in fallbacks if s.value}
    assert counted == {"no_gpu_worker", "gpu_failure", "rescued"}
    # Known series start at 0 (every fallback code, for audio and web).
    assert len(fallbacks) == 6 and m.value("morag_gpu_fallbacks_total", content_type="web") == 0
    assert m.value("morag_webhook_failures_total", outcome="gave_up") == 0


def test_a_job_with_several_fallbacks_is_one_job_that_fell_back() -> None:
    """morag_gpu_fallbacks counts decisions (several per job); morag_gpu_jobs_finished
    counts each gpu=true job once, at its end, so the alert's ratio of jobs stays <= 1."""
    r = FakeRedis()
    pipe = r.pipeline()

    def route(queue: str, code: str, gpu: bool = True) -> Route:
        return Route(queue=queue, gpu_requested=gpu, code=code, reason="test")

    def gpu_job(task_id: str, first: Route) -> Any:
        return jobs.new_record(
            kind="process",
            content_type="audio",
            source=Source.link("https://example.org/a.mp3"),
            options={},
            route=first,
            task_id=task_id,
        )

    # Sent to a CPU (no GPU worker), its CPU worker lost, rescued by another: 3 fallbacks.
    rescued = gpu_job("a" * 32, route("celery", "no_gpu_worker"))
    metrics.job_created(pipe, rescued)
    for later in (route("celery", "worker_lost"), route("gpu-tasks", "rescued")):
        metrics.route_decided(pipe, later, "audio")
        rescued.route = later
    rescued.status = JobStatus.succeeded
    metrics.job_ended(pipe, rescued)
    # Ran on a GPU; and a gpu=false job, which is no GPU job at all.
    on_gpu = gpu_job("b" * 32, route("gpu-tasks", "gpu_worker"))
    metrics.job_created(pipe, on_gpu)
    on_gpu.status = JobStatus.succeeded
    metrics.job_ended(pipe, on_gpu)
    cpu = gpu_job("c" * 32, route("celery", "not_requested", gpu=False))
    metrics.job_created(pipe, cpu)
    cpu.status = JobStatus.failed
    metrics.job_ended(pipe, cpu)
    pipe.execute()

    m = scrape(r)
    assert m.value("morag_gpu_fallbacks_total", content_type="audio") == 3
    finished = "morag_gpu_jobs_finished_total"
    assert m.value(finished, content_type="audio", fell_back="true") == 1
    assert m.value(finished, content_type="audio", fell_back="false") == 1
    assert m.value(finished, content_type="web", fell_back="true") == 0  # starts at 0


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    r = FakeRedis()
    pipe = r.pipeline()
    labels = {"content_type": "audio", "queue": "gpu-tasks", "device": "cuda"}
    for seconds in (0.05, 0.1, 7, 9999):
        metrics.observe(pipe, "morag_job_run_seconds", seconds, **labels)
    metrics.observe(pipe, "morag_job_run_seconds", -3, **labels)  # clock skew: counts as 0
    pipe.execute()
    m = scrape(r)
    buckets = {s.labels["le"]: s.value for s in m.series("morag_job_run_seconds_bucket")}
    assert buckets["0.1"] == 3 and buckets["5.0"] == 3 and buckets["10.0"] == 4
    assert buckets["7200.0"] == 4 and buckets["+Inf"] == 5
    assert m.value("morag_job_run_seconds_count", **labels) == 5
    assert m.value("morag_job_run_seconds_sum", **labels) == pytest.approx(10006.15)


def test_unknown_metric_names_are_refused() -> None:
    with pytest.raises(KeyError):
        metrics.inc(FakeRedis().pipeline(), "morag_typo")
    with pytest.raises(KeyError):
        metrics.observe(FakeRedis().pipeline(), "morag_typo_seconds", 1.0)


def _record(task_id: str, status: str, **extra: Any) -> str:
    route = Route(queue="celery", gpu_requested=False, code="not_requested", reason="test")
    record = jobs.new_record(
        kind="process",
        content_type="audio",
        source=Source.link("https://example.org/a.mp3"),
        options={},
        route=route,
        task_id=task_id,
    )
    return json.dumps({**record.model_dump(mode="json"), "status": status, **extra})


def test_job_gauges_from_the_active_records() -> None:
    r = FakeRedis()
    iso, later = "2027-01-15T08:00:00.000+00:00", "2027-01-15T08:01:00.000+00:00"
    now = metrics.parse_time(iso) + 300
    r.sets[jobs.ACTIVE_SET] = {"a", "b", "c", "gone"}
    r.strings["morag:job:a"] = _record("a", "queued", queued_at=iso)
    r.strings["morag:job:b"] = _record(
        "b",
        "running",
        attempts=[{"queue": "celery", "worker": "cpu0@h", "device": "cpu", "started_at": iso}],
    )
    r.strings["morag:job:c"] = _record("c", "queued", queued_at=None, created_at=later)
    m = scrape(
        r,
        beats=[
            {
                "name": "gpu0@h",
                "hostname": "h",
                "queues": ["gpu-tasks"],
                "consuming": ["gpu-tasks"],
                "device": "cuda",
                "busy": True,
            },
            {
                "name": "cpu0@s",
                "hostname": "s",
                "queues": ["celery"],
                "consuming": ["celery", "gpu-tasks"],
                "device": "cpu",
                "busy": False,
                "rescuing": True,
            },
        ],
        queues={"celery": 4, "gpu-tasks": 2},
        now=now,
    )
    assert m.value("morag_jobs", state="queued", content_type="audio") == 2
    assert m.value("morag_jobs", state="running", content_type="audio") == 1
    assert m.value("morag_jobs", state="queued", content_type="web") == 0
    assert m.value("morag_jobs_oldest_seconds", state="queued") == pytest.approx(300)
    assert m.value("morag_jobs_oldest_seconds", state="running") == pytest.approx(300)
    assert m.value("morag_queue_depth", queue="celery") == 4
    assert m.value("morag_queue_depth", queue="morag-store") == 0
    assert m.value("morag_queue_consumers", queue="gpu-tasks") == 2  # the rescuer too
    assert m.value("morag_workers", queue="gpu-tasks", device="cuda") == 1
    assert m.value("morag_workers", queue="gpu-tasks", device="cpu") == 0
    assert m.value("morag_workers", queue="celery", device="cpu") == 1
    assert m.value("morag_workers_rescuing") == 1
    assert m.value("morag_worker_busy", worker="gpu0@h") == 1
    assert m.value("morag_worker_info", worker="cpu0@s", kind="cpu") == 1
    assert m.value("morag_job_time_limit_seconds") == 600


def test_celery_task_events_follow_the_setting() -> None:
    from morag.celery_app import celery_config

    off = celery_config(Settings())
    on = celery_config(Settings(celery_events=True))
    assert off["worker_send_task_events"] is False and off["task_send_sent_event"] is False
    assert on["worker_send_task_events"] is True and on["task_send_sent_event"] is True


def test_the_collector_reads_the_job_store_keys() -> None:
    assert jobs.job_key("abc") == "morag:job:abc"  # what the fake store above holds
