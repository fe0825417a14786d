"""OpenAPI schema and Swagger UI, behind the API key like every route but health.

The schema names every route and parameter; it is not secret, but the rule is simple:
nothing unauthenticated except ``/health`` and ``/ready``. Fetch it with
``curl -H "X-API-Key: $KEY" .../openapi.json``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from morag.api.deps import ApiKey

router = APIRouter(dependencies=[ApiKey], include_in_schema=False)


@router.get("/openapi.json")
def openapi(request: Request) -> dict[str, Any]:
    return request.app.openapi()


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="MoRAG API")
