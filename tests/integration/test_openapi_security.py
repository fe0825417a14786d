"""Authentication as ``/openapi.json`` states it, and as the running API enforces it.

The schema carries the credentials as OpenAPI security schemes (``components.securitySchemes``
and a ``security`` requirement per operation), never as header parameters (which OpenAPI
ignores for ``Authorization``), so Swagger UI's "Authorize" and generated clients know what
to send. ``/health`` and ``/ready`` are the only open routes and declare their answers.

A real API (uvicorn) on a real Redis, without workers: nothing here needs a job to run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RedisServer
from tests.integration.conftest import running_stack
from tests.integration.stack import API_KEY, METRICS_TOKEN, WORKER_TOKEN, Stack

OPEN_PATHS = {"/health", "/ready"}
SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "OpenAIBearer": {"type": "http", "scheme": "bearer"},
    "WorkerToken": {"type": "apiKey", "in": "header", "name": "X-Worker-Token"},
    "MetricsToken": {"type": "http", "scheme": "bearer"},
}
CREDENTIAL_HEADERS = {"authorization", "x-api-key", "x-worker-token"}


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_server, tmp_path_factory.mktemp("openapi-security"), {}) as s:
        yield s


@pytest.fixture(scope="module")
def schema(api: Stack) -> dict[str, Any]:
    with api.client() as c:
        resp = c.get("/openapi.json")
    assert resp.status_code == 200, resp.text
    return resp.json()


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            yield method, path, op


def _scheme_for(path: str) -> str:
    if path == "/metrics":
        return "MetricsToken"
    if path.startswith("/api/v1/files/"):
        return "WorkerToken"
    if path.startswith("/v1/"):
        return "OpenAIBearer"
    return "ApiKey"


def test_the_schema_declares_security_schemes(schema: dict[str, Any]) -> None:
    declared = schema["components"]["securitySchemes"]
    for name, expected in SCHEMES.items():
        assert expected.items() <= declared[name].items(), (name, declared.get(name))
        assert declared[name].get("description"), f"{name}: say what to send"


def test_each_operation_names_its_credential(schema: dict[str, Any]) -> None:
    for method, path, op in _operations(schema):
        headers = {p["name"].lower() for p in op.get("parameters", []) if p["in"] == "header"}
        assert not headers & CREDENTIAL_HEADERS, f"{method} {path}: a credential as a parameter"
        if path in OPEN_PATHS:
            assert not op.get("security"), f"{method} {path} needs no credential"
        else:
            assert op.get("security") == [{_scheme_for(path): []}], (method, path)


def test_health_routes_declare_their_answers(schema: dict[str, Any]) -> None:
    def ref(op: dict[str, Any], status: str) -> str:
        return op["responses"][status]["content"]["application/json"]["schema"]["$ref"]

    ready = schema["paths"]["/ready"]["get"]
    assert ref(ready, "200") == ref(ready, "503") == "#/components/schemas/Readiness"
    assert ref(schema["paths"]["/health"]["get"], "200") == "#/components/schemas/Health"
    model = schema["components"]["schemas"]["Readiness"]
    assert set(model["properties"]["status"]["enum"]) == {
        "ready",
        "degraded",
        "not ready",
    }


def test_only_the_health_routes_answer_without_credentials(
    api: Stack, schema: dict[str, Any]
) -> None:
    # Every operation of the schema, plus the schema and its UI (left out of the schema).
    routes = [(m, re.sub(r"\{[^}]+\}", "x", p)) for m, p, _ in _operations(schema)]
    routes += [("get", "/openapi.json"), ("get", "/docs")]
    with api.client(None) as anonymous:
        for method, path in routes:
            resp = anonymous.request(method, path)
            if path in OPEN_PATHS:
                assert resp.status_code == 200, (method, path, resp.text)
            else:
                assert resp.status_code == 401, (
                    method,
                    path,
                    resp.status_code,
                    resp.text,
                )


def test_api_key_worker_token_and_metrics_token_still_work(api: Stack, speech_wav: Path) -> None:
    with api.client() as c, api.client("wrong") as wrong, api.client(None) as anonymous:
        assert c.get("/api/v1/workers").status_code == 200
        refused = wrong.get("/api/v1/workers")
        missing = anonymous.get("/api/v1/workers")
        # The project's own bodies, not FastAPI's {"detail": "Not authenticated"}.
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
        assert missing.status_code == 401 and missing.json() == {
            "detail": "missing API key: send it in the X-API-Key header",
            "code": "unauthorized",
        }
        # A stored upload (no worker takes the job), fetched the way a worker does.
        api.ingest(speech_wav, gpu=False)
        file_id = next(p.name for p in (api.shared / "uploads").iterdir())
        by_token = anonymous.get(
            f"/api/v1/files/{file_id}", headers={"X-Worker-Token": WORKER_TOKEN}
        )
        assert by_token.status_code == 200 and by_token.content == speech_wav.read_bytes()
        assert c.get(f"/api/v1/files/{file_id}").status_code == 401  # an API key is no token
        metrics = anonymous.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert metrics.status_code == 200
        as_key = anonymous.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        assert as_key.status_code == 401
        no_bearer = anonymous.get("/metrics", headers={"Authorization": f"Basic {METRICS_TOKEN}"})
        assert no_bearer.status_code == 401 and no_bearer.headers["www-authenticate"] == "Bearer"


def test_openai_bearer_still_works(api: Stack, speech_wav: Path) -> None:
    url = f"{api.api_url}/v1"
    wrong = openai.OpenAI(api_key="wrong", base_url=url, max_retries=0)
    with open(speech_wav, "rb") as f, pytest.raises(openai.AuthenticationError) as auth:
        wrong.audio.transcriptions.create(model="whisper-1", file=f)
    assert auth.value.body["code"] == "invalid_api_key"
    # The right key passes authentication: what answers is the check of the next field.
    good = openai.OpenAI(api_key=API_KEY, base_url=url, max_retries=0)
    with open(speech_wav, "rb") as f, pytest.raises(openai.BadRequestError) as model:
        good.audio.transcriptions.create(model="gpt-9-audio", file=f)
    assert model.value.body["param"] == "model"
    # Without a body the route's own dependency decides (the guard checks bodies only).
    path = f"{api.api_url}/v1/audio/transcriptions"
    for headers, message in [
        ({}, "missing API key"),
        ({"Authorization": f"Basic {API_KEY}"}, "missing API key"),
        ({"X-API-Key": API_KEY}, "missing API key"),
        ({"Authorization": "Bearer wrong"}, "invalid API key"),
    ]:
        resp = httpx.post(path, headers=headers, timeout=30)
        assert resp.status_code == 401, (headers, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "authentication_error" and error["message"].startswith(message)
        assert resp.headers["www-authenticate"] == "Bearer"
    authorized = httpx.post(path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert authorized.status_code == 400, authorized.text  # past authentication: no file
