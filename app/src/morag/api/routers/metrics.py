"""``/metrics``: the whole fleet and this API process, behind MORAG_METRICS_TOKEN.

What is exported: ``morag.metrics`` (the fleet, read from Redis at scrape time) and
``morag.api.http_metrics`` (this process's HTTP traffic and resources); the scrape
configuration and the alerts: docs/monitoring.md. The exposition is prometheus_client's:
the text format, or OpenMetrics when the scraper asks for it, gzipped when it accepts it.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from morag.api.deps import require_metrics_token, services
from morag.api.schemas import ErrorBody
from morag.submission import Services

router = APIRouter(tags=["metrics"])


class Scraped(Collector):
    """The registries one scrape serves, in order (the fleet's, then this process's)."""

    def __init__(self, *registries: Collector) -> None:
        self.registries = registries

    def collect(self) -> Iterator:
        for registry in self.registries:
            yield from registry.collect()


def _expose(scraped: Scraped, accept: str, accept_encoding: str) -> tuple[bytes, str, bool]:
    encoder, content_type = choose_encoder(accept)
    body = encoder(scraped)
    if gzip_accepted(accept_encoding):
        return gzip.compress(body), content_type, True
    return body, content_type, False


@router.get(
    "/metrics",
    dependencies=[Depends(require_metrics_token)],
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {}, OPENMETRICS: {}},
            "description": "Prometheus text format, or OpenMetrics when the Accept header "
            "asks for application/openmetrics-text; gzip when Accept-Encoding allows it",
        },
        401: {"model": ErrorBody, "description": "missing or invalid metrics token"},
        404: {"model": ErrorBody, "description": "metrics disabled (MORAG_METRICS_TOKEN unset)"},
        422: {"model": ErrorBody, "description": "invalid input"},
        503: {"model": ErrorBody, "description": "Redis unavailable"},
    },
)
async def metrics(request: Request, svc: Services = Depends(services)) -> Response:
    scraped = Scraped(svc.metrics, request.app.state.http_metrics)
    # In the thread pool: the fleet collector reads Redis with the blocking client.
    body, content_type, gzipped = await run_in_threadpool(
        _expose,
        scraped,
        request.headers.get("accept", ""),
        request.headers.get("accept-encoding", ""),
    )
    headers = {"Vary": "Accept, Accept-Encoding"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=content_type, headers=headers)
