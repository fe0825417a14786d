"""GET /metrics takes only the metrics bearer token (never an API key), and is off without one.

These requests are refused before anything reads Redis; the exported values are tested
against a real stack in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from morag.api.app import create_app
from morag.config import Settings

API_KEY = "unit-api-key"
TOKEN = "unit-metrics-token"


def client(metrics_token: str | None) -> TestClient:
    settings = Settings(
        api_keys=API_KEY,
        worker_token="unit-worker-token",
        metrics_token=metrics_token,
        redis_url="redis://127.0.0.1:1/0",  # never reached by these requests
    )
    return TestClient(create_app(settings))


def test_without_a_token_configured_metrics_are_off() -> None:
    with client(None) as c:
        resp = c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 404
    assert "MORAG_METRICS_TOKEN" in resp.json()["detail"]


@pytest.mark.parametrize(
    "headers,detail",
    [
        ({}, "missing metrics token"),
        ({"Authorization": "Bearer"}, "missing metrics token"),
        ({"Authorization": f"Basic {TOKEN}"}, "missing metrics token"),
        ({"Authorization": "Bearer wrong-token"}, "invalid metrics token"),
        ({"X-API-Key": API_KEY}, "missing metrics token"),
        ({"Authorization": f"Bearer {API_KEY}"}, "invalid metrics token"),
        ({"X-Worker-Token": "unit-worker-token"}, "missing metrics token"),
    ],
)
def test_anything_but_the_metrics_token_is_refused(headers, detail) -> None:
    with client(TOKEN) as c:
        resp = c.get("/metrics", headers=headers)
    assert resp.status_code == 401
    assert resp.json()["detail"].startswith(detail)
    assert resp.headers["www-authenticate"].startswith("Bearer")


def test_the_metrics_token_opens_no_other_route() -> None:
    with client(TOKEN) as c:
        resp = c.get("/api/v1/workers", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 401
