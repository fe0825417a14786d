"""The API's own HTTP metrics, per process: what ``/metrics`` serves next to the fleet.

- Requests, latency and sizes by route *template* (``/api/v1/status/{task_id}``, never the
  raw path; a path no route matches is ``none``), method and exact status code (so the
  ``/v1`` 504s stay visible): prometheus-fastapi-instrumentator, under ``morag_http_*``.
- Requests in flight by route template: :class:`InFlight` (the instrumentator's own gauge
  always lands in prometheus_client's global registry, which two apps in one process, as
  in the tests, cannot share).
- The process: CPU, memory, file descriptors, start time (``process_*``), the Python
  runtime (``python_info``, ``python_gc_*``).

Everything lives in one registry per app, so nothing is registered at import time and
several apps in one process do not collide. The numbers are this process's only: each
API process (host) exports its own, unlike the fleet numbers every API reads from Redis.
"""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator.routing import get_route_name
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

NAMESPACE = "morag"
UNMATCHED = "none"  # the instrumentator's handler label for a path no route matches
# Seconds, for the per-route histogram: most answers take milliseconds, /process and the
# /v1 audio routes wait up to MORAG_PROCESS_WAIT / MORAG_OPENAI_WAIT for their job.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class InFlight:
    """Pure ASGI middleware: requests being served now, by route template. A streamed
    answer (Server-Sent Events) counts until its last byte."""

    def __init__(self, app: ASGIApp, gauge: Gauge) -> None:
        self.app = app
        self.gauge = gauge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = get_route_name(HTTPConnection(scope), should_include_root_path=False)
        series = self.gauge.labels(handler or UNMATCHED)
        series.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            series.dec()


def instrument(app: FastAPI) -> CollectorRegistry:
    """Add the HTTP middleware to ``app`` (call it last: the outermost middleware sees
    every answer, the guard's early 401/413 included); the registry of its metrics."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    in_flight = Gauge(
        "http_requests_inprogress",
        "HTTP requests being served by this API process, by route template",
        ["handler"],
        namespace=NAMESPACE,
        registry=registry,
    )
    Instrumentator(
        should_group_status_codes=False,  # 503 (Redis down) and 504 (/v1 wait) differ
        should_group_untemplated=True,  # unknown paths: one `none` series, not one per path
        # Streams (SSE) are timed to their first byte: a long stream is not a slow answer.
        should_exclude_streaming_duration=True,
        registry=registry,
    ).instrument(app, metric_namespace=NAMESPACE, latency_lowr_buckets=LATENCY_BUCKETS)
    app.add_middleware(InFlight, gauge=in_flight)
    return registry
