"""The HTTP contract in the repository is the one the code serves.

docs/api.md is generated from the app's OpenAPI schema; every route declares its answer
model and error bodies; docs/architecture.md links only to files in the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from morag.api import contract
from morag.api.app import create_app
from morag.config import Settings
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def app():
    return create_app(Settings(api_keys=[SecretStr("k")], worker_token=SecretStr("t")))


def test_docs_api_md_is_generated_from_the_schema() -> None:
    current = (ROOT / "docs" / "api.md").read_text()
    expected = contract.build()
    assert current == expected, (
        "docs/api.md differs from the API's schema: regenerate it with "
        "`.venv/bin/python -m morag.api.contract > docs/api.md`"
    )


def test_every_route_declares_its_answer(app) -> None:
    # Read from the schema: app.routes holds included routers, not their APIRoutes, in
    # this FastAPI, so a walk over it checked nothing.
    schema = app.openapi()
    assert len(schema["paths"]) >= 15
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            ok = [s for s in op["responses"] if s.startswith("2")]
            assert ok, f"{method} {path}: no success answer"
            for status in ok:
                content = op["responses"][status].get("content", {})
                # JSON answers need a model; /metrics' text format has none to give.
                json_ok = all(c.get("schema") for m, c in content.items() if "json" in m)
                assert content and json_ok, f"{method} {path} {status}: no answer model"


def test_no_error_body_is_fastapis_default(app) -> None:
    """Every declared 4xx/5xx answer is ErrorBody (OpenAIError under /v1/), which is what the
    error handlers send; FastAPI's HTTPValidationError is never what the API answers.
    /ready's 503 is no error body: it is the readiness report with the failed checks."""
    schema = app.openapi()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if status.startswith("2"):
                    continue
                refs = {c["schema"]["$ref"] for c in answer["content"].values()}
                wanted = "OpenAIError" if path.startswith("/v1/") else "ErrorBody"
                if (path, status) == ("/ready", "503"):
                    wanted = "Readiness"
                assert refs == {f"#/components/schemas/{wanted}"}, (method, path, status)


def test_paged_lists(app) -> None:
    schema = app.openapi()
    for path in ("/api/v1/status/", "/api/v1/workers"):
        names = {p["name"] for p in schema["paths"][path]["get"]["parameters"]}
        assert {"limit", "offset"} <= names, path


def test_gpu_is_a_body_field_everywhere(app) -> None:
    schema = app.openapi()
    components = schema["components"]["schemas"]
    for path, ops in schema["paths"].items():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "gpu":
                    assert param.get("deprecated"), f"{path}: ?gpu= must be deprecated"
            body = op.get("requestBody", {}).get("content", {})
            for content in body.values():
                model = components[content["schema"]["$ref"].rsplit("/", 1)[-1]]
                if path.startswith(("/process/", "/api/v1/ingest/", "/v1/audio/")):
                    assert "gpu" in model["properties"] or "items" in model["properties"], path


LINK = re.compile(r"\]\(([^)#\s]+)")


@pytest.mark.parametrize("doc", ["architecture.md", "api.md"])
def test_docs_point_only_inside_the_repository(doc: str) -> None:
    text = (ROOT / "docs" / doc).read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        resolved = (ROOT / "docs" / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc} links outside the repo: {target}"
        assert resolved.exists(), f"{doc} links to a missing file: {target}"
    # Paths written as code (`../x.md`) count too: nothing above the repository root.
    for target in re.findall(r"`(\.\./[^`]+)`", text):
        resolved = (ROOT / "docs" / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc} points outside the repo: {target}"
        assert resolved.exists(), f"{doc} points to a missing file: {target}"
