"""``/metrics``: the whole fleet in Prometheus' text format, behind MORAG_METRICS_TOKEN.

What is exported and how it is read from Redis: ``morag.metrics``; the scrape
configuration and the alerts: docs/monitoring.md.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from morag.api.deps import require_metrics_token, services
from morag.api.schemas import ErrorBody
from morag.submission import Services

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    dependencies=[Depends(require_metrics_token)],
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        401: {"model": ErrorBody, "description": "missing or invalid metrics token"},
        404: {"model": ErrorBody, "description": "metrics disabled (MORAG_METRICS_TOKEN unset)"},
        422: {"model": ErrorBody, "description": "invalid input"},
    },
)
def metrics(svc: Services = Depends(services)) -> Response:
    return Response(generate_latest(svc.metrics), media_type=CONTENT_TYPE_LATEST)
