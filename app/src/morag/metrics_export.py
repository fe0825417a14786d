"""The API's Prometheus export: one collector reads the whole fleet from Redis at scrape time.

:class:`FleetCollector` reads the heartbeats and queue lengths (through the API's
one-second fleet cache), one pipeline for the counter and histogram hashes that
:mod:`morag.metrics` records and the active-job ids, and one MGET of the active job
records. Nothing happens at import time.

:class:`ApiRedisCollector` adds what only this API process knows (docs/ha.md): the Redis
primary its client uses (asked of the Sentinels at each scrape), the changes of primary and
the connection errors that client met, and the submissions it refused, by reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pydantic import ValidationError

from morag import __version__
from morag.config import CPU_QUEUE, DECLARED_QUEUES, GPU_QUEUE, STORE_QUEUE, Settings
from morag.job_record import JobRecord, JobStatus
from morag.jobs import ACTIVE_SET, job_key
from morag.metrics import (
    ACTIVE_STATES,
    BUCKETS,
    COUNTERS,
    COUNTERS_KEY,
    DEVICES,
    ENDED_STATES,
    FALLBACK_CODES,
    HISTOGRAMS,
    HISTOGRAMS_KEY,
    WEBHOOK_OUTCOMES,
    Refusals,
    parse_time,
)
from morag.redis_client import ERROR_KINDS, redis_health, refresh_primary

log = logging.getLogger(__name__)


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _worker_kind(queues: Iterable[str]) -> str:
    queues = list(queues)
    if GPU_QUEUE in queues:
        return "gpu"
    return "store" if queues == [STORE_QUEUE] else "cpu"


class FleetCollector(Collector):
    """Reads the fleet's state from Redis at every scrape (no state of its own)."""

    def __init__(
        self,
        client: redis.Redis,
        fleet: Any,
        settings: Settings,
        content_types: Iterable[str] = (),
        clock: Any = time.time,
    ) -> None:
        self.client = client
        self.fleet = fleet  # morag.fleet.CachedFleet (heartbeats + queue lengths)
        self.settings = settings
        self.content_types = tuple(content_types)
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        state = self.fleet.get()
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(COUNTERS_KEY)
        pipe.hgetall(HISTOGRAMS_KEY)
        pipe.smembers(ACTIVE_SET)
        counters, histograms, active = pipe.execute()
        records = self._records(sorted(_decode(a) for a in active))
        now = self.clock()

        info = GaugeMetricFamily("morag_build_info", "The API's MoRAG version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from self._settings_gauges()
        yield from self._queue_gauges(state)
        yield from self._worker_gauges(state.heartbeats)
        yield from self._gpu_gauges(state.heartbeats)
        yield from self._job_gauges(records, now)
        yield from self._counters(counters)
        yield from self._histograms(histograms)

    # -- pieces -------------------------------------------------------------------------
    def _records(self, ids: list[str]) -> list[JobRecord]:
        records = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for raw in self.client.mget([job_key(i) for i in chunk]):
                if not raw:
                    continue
                try:
                    records.append(JobRecord.from_json(raw))
                except ValidationError:  # a scrape never fails on one unreadable record
                    log.warning("metrics: skipped an unreadable job record")
        return records

    def _settings_gauges(self) -> Iterator[Metric]:
        s = self.settings
        yield GaugeMetricFamily(
            "morag_job_time_limit_seconds",
            "MORAG_JOB_TIME_LIMIT: a running job is killed after this",
            value=s.job_time_limit,
        )
        yield GaugeMetricFamily(
            "morag_gpu_backlog_limit",
            "MORAG_GPU_BACKLOG_LIMIT: gpu=true goes to the CPU queue at this gpu-tasks depth",
            value=s.gpu_backlog_limit,
        )
        yield GaugeMetricFamily(
            "morag_store_ingested",
            "1 when ingest jobs are stored by the morag-store worker (MORAG_STORE_INGESTED)",
            value=1 if s.store_ingested else 0,
        )

    def _queue_gauges(self, state: Any) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "morag_queue_depth", "Messages waiting in each queue", labels=["queue"]
        )
        consumers = GaugeMetricFamily(
            "morag_queue_consumers",
            "Live workers consuming each queue now (rescuing CPU workers included)",
            labels=["queue"],
        )
        for queue in DECLARED_QUEUES:
            depth.add_metric([queue], state.snapshot.queue_lengths.get(queue, 0))
            count = sum(1 for hb in state.heartbeats if queue in hb.get("consuming", []))
            consumers.add_metric([queue], count)
        yield depth
        yield consumers

    def _worker_gauges(self, beats: list[dict[str, Any]]) -> Iterator[Metric]:
        workers = GaugeMetricFamily(
            "morag_workers",
            "Live workers by configured queue and the device they compute on",
            labels=["queue", "device"],
        )
        counts: Tally[tuple[str, str]] = Tally()
        for queue in DECLARED_QUEUES:
            for device in DEVICES:
                counts[(queue, device)] += 0
        for hb in beats:
            for queue in hb.get("queues", []):
                counts[(queue, hb.get("device", "cpu"))] += 1
        for (queue, device), n in sorted(counts.items()):
            workers.add_metric([queue, device], n)
        yield workers

        info = GaugeMetricFamily(
            "morag_worker_info",
            "One series per live worker: its kind (gpu, cpu, store by configured queues) "
            "and the device it computes on",
            labels=["worker", "hostname", "kind", "device"],
        )
        busy = GaugeMetricFamily(
            "morag_worker_busy", "1 while the worker runs a job", labels=["worker"]
        )
        rescuing = GaugeMetricFamily(
            "morag_workers_rescuing",
            "CPU workers consuming gpu-tasks because no GPU worker is alive",
        )
        for hb in beats:
            name = str(hb.get("name"))
            info.add_metric(
                [
                    name,
                    str(hb.get("hostname", "")),
                    _worker_kind(hb.get("queues", [])),
                    str(hb.get("device", "cpu")),
                ],
                1,
            )
            busy.add_metric([name], 1 if hb.get("busy") else 0)
        rescuing.add_metric([], sum(1 for hb in beats if hb.get("rescuing")))
        yield info
        yield busy
        yield rescuing

    def _gpu_gauges(self, beats: list[dict[str, Any]]) -> Iterator[Metric]:
        labels = ["worker", "hostname", "gpu", "uuid", "name"]
        util = GaugeMetricFamily(
            "morag_gpu_utilization_ratio",
            "GPU utilisation (0-1) over NVML's last sample period, per GPU a worker is bound to",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "morag_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=labels
        )
        total = GaugeMetricFamily(
            "morag_gpu_memory_total_bytes", "GPU memory installed (NVML)", labels=labels
        )
        for hb in beats:
            for gpu in hb.get("gpu_telemetry") or []:
                values = [
                    str(hb.get("name")),
                    str(hb.get("hostname", "")),
                    str(gpu.get("index", "")),
                    str(gpu.get("uuid", "")),
                    str(gpu.get("name", "")),
                ]
                if gpu.get("utilization") is not None:
                    util.add_metric(values, float(gpu["utilization"]))
                if gpu.get("memory_used_bytes") is not None:
                    used.add_metric(values, float(gpu["memory_used_bytes"]))
                if gpu.get("memory_total_bytes") is not None:
                    total.add_metric(values, float(gpu["memory_total_bytes"]))
        yield util
        yield used
        yield total

    def _job_gauges(self, records: list[JobRecord], now: float) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "morag_jobs",
            "Jobs not yet ended, by state and content type (ended jobs: morag_jobs_finished)",
            labels=["state", "content_type"],
        )
        oldest = GaugeMetricFamily(
            "morag_jobs_oldest_seconds",
            "Age of the oldest job in each state: since it was (re)queued, or since its "
            "current attempt started (0 when there is none)",
            labels=["state"],
        )
        counts: Tally[tuple[str, str]] = Tally()
        for state in ACTIVE_STATES:
            for ct in self.content_types:
                counts[(state, ct)] += 0
        ages = dict.fromkeys(ACTIVE_STATES, 0.0)
        for record in records:
            state = record.status.value
            if state not in ages:
                continue
            counts[(state, record.content_type)] += 1
            if record.status == JobStatus.queued:
                since = parse_time(record.queued_at or record.created_at)
            else:
                started = record.attempts[-1].started_at if record.attempts else None
                since = parse_time(started or record.updated_at)
            if since is not None:
                ages[state] = max(ages[state], now - since)
        for (state, ct), n in sorted(counts.items()):
            jobs.add_metric([state, ct], n)
        for state, age in ages.items():
            oldest.add_metric([state], max(0.0, age))
        yield jobs
        yield oldest

    def _counters(self, raw: dict[bytes, bytes]) -> Iterator[Metric]:
        families = {
            name: CounterMetricFamily(name, help_, labels=list(labels))
            for name, (help_, labels) in COUNTERS.items()
        }
        seen = set()
        for field, value in raw.items():
            try:
                name, pairs = json.loads(_decode(field))
            except ValueError:
                continue
            family = families.get(name)
            if family is None:
                continue
            labels = dict(pairs)
            key = (name, tuple(labels.get(n, "") for n in COUNTERS[name][1]))
            seen.add(key)
            family.add_metric(list(key[1]), int(value))
        # Known label values start at 0, so that rate() sees the first event and the
        # dashboard shows 0 rather than "no data".
        for name, values in self._known_series():
            if (name, values) not in seen:
                families[name].add_metric(list(values), 0)
        yield from families.values()

    def _known_series(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        for outcome in WEBHOOK_OUTCOMES:
            yield "morag_webhook_failures", (outcome,)
        yield "morag_webhooks_delivered", ()
        for queue in (CPU_QUEUE, GPU_QUEUE):
            yield "morag_orphan_requeues", (queue,)
        for ct in self.content_types:
            yield "morag_redeliveries", (ct,)
            for code in FALLBACK_CODES:
                yield "morag_gpu_fallbacks", (code, ct)
            for state in ENDED_STATES:
                yield "morag_jobs_finished", (state, ct)
            for fell_back in ("false", "true"):
                yield "morag_gpu_jobs_finished", (ct, fell_back)
            for queue, gpu in ((CPU_QUEUE, "false"), (CPU_QUEUE, "true"), (GPU_QUEUE, "true")):
                yield "morag_jobs_submitted", (ct, queue, gpu)

    def _histograms(self, raw: dict[bytes, bytes]) -> Iterator[Metric]:
        series: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}
        for field, value in raw.items():
            try:
                name, pairs, part = json.loads(_decode(field))
            except ValueError:
                continue
            if name not in HISTOGRAMS:
                continue
            labels = dict(pairs)
            key = (name, tuple(labels.get(n, "") for n in HISTOGRAMS[name][1]))
            series.setdefault(key, {})[part] = float(value)
        for name, (help_, label_names) in HISTOGRAMS.items():
            family = HistogramMetricFamily(name, help_, labels=list(label_names))
            for (series_name, values), parts in sorted(series.items()):
                if series_name != name:
                    continue
                cumulative, buckets = 0.0, []
                for index, bound in enumerate((*BUCKETS, float("inf"))):
                    cumulative += parts.get(str(index), 0.0)
                    buckets.append((_le(bound), cumulative))
                family.add_metric(list(values), buckets, parts.get("sum", 0.0))
            yield family


class ApiRedisCollector(Collector):
    """This API process's own view of Redis, read from memory (one Sentinel query)."""

    def __init__(self, client: redis.Redis, refusals: Refusals) -> None:
        self.client = client
        self.refusals = refusals

    def collect(self) -> Iterator[Metric]:
        refresh_primary(self.client)  # with Sentinel: the primary they name now
        health = redis_health(self.client)
        primary = GaugeMetricFamily(
            "morag_redis_primary_info",
            "1 for the Redis primary this API process's client reached last (host:port; "
            "with Sentinel, as the Sentinels name it at the scrape)",
            labels=["address"],
        )
        changes = CounterMetricFamily(
            "morag_redis_primary_changes",
            "Times this API process's Redis client found another primary than before (a "
            "Sentinel failover)",
        )
        errors = CounterMetricFamily(
            "morag_redis_connection_errors",
            "Connects, sends and reads of this API process's Redis client that failed, by "
            "kind: connection (refused, reset, READONLY of a demoted primary, no primary "
            "known to the Sentinels), timeout; commands retried on another connection included",
            labels=["kind"],
        )
        if health is not None:
            if health.primary is not None:
                primary.add_metric([health.primary], 1)
            changes.add_metric([], health.primary_changes)
            for kind in ERROR_KINDS:
                errors.add_metric([kind], health.errors[kind])
        refused = CounterMetricFamily(
            "morag_submissions_refused",
            "Submissions this API process answered 503, by reason: replicas (fewer Redis "
            "replicas than MORAG_REDIS_MIN_REPLICAS acknowledged the job), noreplicas (the "
            "primary refused writes: min-replicas-to-write), redis, broker, unknown",
            labels=["reason"],
        )
        for reason, n in self.refusals.counts.items():
            refused.add_metric([reason], n)
        yield primary
        yield changes
        yield errors
        yield refused


def _le(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return str(float(bound))


def build_registry(
    client: redis.Redis,
    fleet: Any,
    settings: Settings,
    content_types: Iterable[str] = (),
    refusals: Refusals | None = None,
) -> CollectorRegistry:
    """A registry of the fleet collector and this API process's Redis collector (no process
    or platform metrics: morag.api.http_metrics has them)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(client, fleet, settings, content_types))
    registry.register(ApiRedisCollector(client, refusals or Refusals()))
    return registry
