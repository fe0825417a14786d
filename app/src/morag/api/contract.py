"""docs/api.md, rendered from the app's OpenAPI schema (``python -m morag.api.contract``).

The unit test ``tests/unit/test_api_contract.py`` fails when docs/api.md and the schema
differ, so the document in the repository is the contract the code serves.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import SecretStr

HEADER = """# The HTTP API

Generated from the app's OpenAPI schema by `python -m morag.api.contract > docs/api.md`;
`tests/unit/test_api_contract.py` fails when this file and the code differ. The live schema
is `GET /openapi.json` (Swagger UI: `GET /docs`), both behind the API key.

## Conventions

- **Authentication**: `X-API-Key: <key>` on every route except `/health` and `/ready`;
  `/api/v1/files/*` takes `X-Worker-Token`, `/metrics` `Authorization: Bearer
  <MORAG_METRICS_TOKEN>`, the OpenAI-compatible `/v1/*` `Authorization: Bearer <key>`.
  The schema declares them as security schemes (below, "Security schemes"), and each
  operation names the one it takes, so Swagger UI's "Authorize" and generated clients
  send the right header. A missing credential is a 401, a wrong one a 403 (401 under
  `/v1/` and on `/metrics`).
- **One way per parameter**: job parameters (`gpu`, `options`, `metadata`, `webhook_url`)
  travel in the request body: form fields with an upload, JSON members otherwise. The query
  string carries only read modifiers (`wait`, `limit`, `offset`, `source`). `?gpu=` on
  `/process/*` is still read for old clients and is deprecated; sending both with different
  values is a 422.
- **Paging**: list answers hold `total`, `count` (this page), `offset`, `limit` and the
  items; `limit` is 1-500 (default 100).
- **Errors**: `{"detail": str, "code": str}` (validation errors add `errors`, one entry
  per field); under `/v1/` OpenAI's `{"error": {"message", "type", "param", "code"}}`,
  every invalid request a 400 (never 415/422), and an answer whose job goes on (504, or
  503 while waiting) carries `x-should-retry: false` so OpenAI's SDKs start no second job.
- **Job states** (`JobStatus`): `queued`, `running`, then one of `succeeded`, `failed`,
  `cancelled`.
- **Options** (`options`, a JSON object): the members of `JobOptions` below are checked
  (422 when wrong), and so is a near-miss of one of them (`subtitle`: "did you mean
  subtitles?"); other members are passed to the processor unchanged.
- **Retrying a submission** (`Idempotency-Key` header, on every route that creates jobs:
  `/process/*`, `/api/v1/ingest/*`, `/v1/audio/*`): a request repeated with the same key by
  the same API key returns the first request's job or batch (same status and body shape;
  `/process/*` and `/v1/audio/*` wait for that job) instead of a new one, also when both
  arrive at once. The key is 1-255 visible ASCII characters (a UUID), kept
  `MORAG_IDEMPOTENCY_TTL` seconds (24 h); the same key with a different request (route, file,
  fields) is a 422 `idempotency_key_reused`; a 409 `idempotency_key_in_use` while the first
  request is still being submitted. A refused submission (4xx, 503) forgets its key.
- **A 503 on a submission means the job will not run**: what was written is withdrawn
  (failed, "not accepted: ...", no webhook) and its upload removed; a batch is all or
  nothing. When the withdrawal cannot be confirmed the job stands, answered 202 (the
  outbox sends it). The one exception is code `submission_unknown`: Redis stopped
  answering mid-write, the job (ids in `detail`) may exist; retry with the same key.
- **Live events** (Server-Sent Events, `text/event-stream`): the worker running a job
  publishes each transcribed segment and its progress to Redis as it goes.
  `GET /api/v1/status/{task_id}/events` streams `status` (`{"status"}`, on change), `route`
  (`{"route", "attempt", "queue", "worker", "device"}`: the route or the running attempt
  changed, e.g. a GPU->CPU fallback), `progress` (`{"progress"}`, never backwards),
  `segment` (`{"attempt", "start", "end", "text"}`, audio and video), then `end` (the job,
  as `GET /api/v1/status/{task_id}` answers it) and closes; `error` (`{"detail", "code"}`)
  when the job expired or Redis failed. Segment and progress events carry an `id`: a client
  that reconnects with `Last-Event-ID` gets what came after it; one that connects late
  (even after the end) gets every event still kept (`MORAG_LIVE_EVENTS_TTL`,
  `MORAG_LIVE_EVENTS_MAX`). `POST /v1/audio/transcriptions` with `stream=true` (json or
  text) answers OpenAI's events: `data: {"type":"transcript.text.delta","delta":...}` per
  segment, then `data: {"type":"transcript.text.done","text":...}` with the job's
  transcript (the deltas joined are that text); a failed job ends with an `error` event
  (`{"type":"error","error":{"message","type","code"}}`, which the SDKs raise). After a
  GPU->CPU fallback mid-way the CPU attempt starts over: its segments within the time
  already streamed are not sent again, so nothing repeats, and `done` carries the CPU
  attempt's transcript, which is the one to keep. A client that disconnects cancels the
  job; no news for `MORAG_OPENAI_WAIT` (no worker took it) ends the stream with a
  `timeout` error while the job goes on.
"""


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return f"`{schema['$ref'].rsplit('/', 1)[-1]}`"
    if "anyOf" in schema:
        return " \\| ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type")
    if kind == "array":
        return f"list[{_type(schema.get('items', {}))}]"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"dict[str, {_type(extra)}]" if isinstance(extra, dict) and extra else "object"
    if kind == "string" and schema.get("format") == "binary":
        return "file"
    return str(kind or "any")


def _cell(text: Any) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")


def _limits(schema: dict[str, Any]) -> str:
    names = ("minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength", "pattern")
    found = [f"{n}={schema[n]}" for n in names if n in schema]
    for option in schema.get("anyOf", []):
        found += [f"{n}={option[n]}" for n in names if n in option]
    return ", ".join(found)


def _fields(schema: dict[str, Any]) -> list[str]:
    props = schema.get("properties", {})
    if not props:
        return ["(no fields)", ""]
    required = set(schema.get("required", []))
    rows = ["| field | type | required | default | notes |", "|---|---|---|---|---|"]
    for name, prop in props.items():
        default = f"`{prop['default']}`" if "default" in prop else ""
        notes = "; ".join(x for x in (prop.get("description"), _limits(prop)) if x)
        if prop.get("deprecated"):
            notes = f"deprecated. {notes}"
        rows.append(
            f"| `{name}` | {_type(prop)} | {'yes' if name in required else ''} "
            f"| {_cell(default)} | {_cell(notes)} |"
        )
    rows.append("")
    return rows


def _operation(method: str, path: str, op: dict[str, Any]) -> list[str]:
    lines = [f"### {method.upper()} {path}", ""]
    if op.get("description"):
        lines += [op["description"].strip(), ""]
    for requirement in op.get("security", []):
        lines += ["Authentication: " + ", ".join(f"`{name}`" for name in requirement), ""]
    params = [p for p in op.get("parameters", []) if p["in"] != "header"]
    if params:
        lines += ["| parameter | in | type | required | notes |", "|---|---|---|---|---|"]
        for p in params:
            notes = "; ".join(x for x in (p.get("description"), _limits(p.get("schema", {}))) if x)
            if p.get("deprecated"):
                notes = f"deprecated. {notes}"
            lines.append(
                f"| `{p['name']}` | {p['in']} | {_type(p.get('schema', {}))} | "
                f"{'yes' if p.get('required') else ''} | {_cell(notes)} |"
            )
        lines.append("")
    body = op.get("requestBody", {}).get("content", {})
    for media, content in body.items():
        lines.append(f"Request body ({media}): {_type(content.get('schema', {}))}")
        lines.append("")
    lines += ["| status | answer | meaning |", "|---|---|---|"]
    for status, answer in sorted(op.get("responses", {}).items()):
        kinds = [
            f"{_type(c.get('schema', {}))} ({media})" if c.get("schema") else media
            for media, c in answer.get("content", {}).items()
        ]
        lines.append(f"| {status} | {_cell(', '.join(kinds))} | {_cell(answer['description'])} |")
    lines.append("")
    return lines


def render(schema: dict[str, Any], extra_models: dict[str, dict[str, Any]]) -> str:
    lines = [HEADER, "## Operations", ""]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            lines += _operation(method, path, op)
    schemes = schema.get("components", {}).get("securitySchemes", {})
    if schemes:
        lines += ["## Security schemes", "", "| name | sends | meaning |", "|---|---|---|"]
        for name, scheme in schemes.items():
            if scheme["type"] == "apiKey":
                sends = f"`{scheme['name']}: <value>` ({scheme['in']})"
            else:
                sends = f"`Authorization: {scheme.get('scheme', '').title()} <value>`"
            lines.append(f"| `{name}` | {sends} | {_cell(scheme.get('description'))} |")
        lines.append("")
    lines += ["## Models", ""]
    models = {**schema.get("components", {}).get("schemas", {}), **extra_models}
    for name in sorted(models):
        model = models[name]
        lines += [f"### {name}", ""]
        if model.get("description"):
            lines += [" ".join(model["description"].split()), ""]
        if "enum" in model:
            lines += ["One of: " + ", ".join(f"`{v}`" for v in model["enum"]), ""]
        else:
            lines += _fields(model)
    return "\n".join(lines).rstrip() + "\n"


def build() -> str:
    """docs/api.md as the current code would serve it."""
    from morag.api.app import create_app
    from morag.api.schemas import JobOptions
    from morag.config import Settings

    # Placeholder credentials: the schema does not depend on them, create_app needs some.
    settings = Settings(api_keys=[SecretStr("doc")], worker_token=SecretStr("doc"))
    schema = create_app(settings).openapi()
    options = JobOptions.model_json_schema(ref_template="#/components/schemas/{model}")
    return render(schema, {"JobOptions": options})


def main() -> None:
    sys.stdout.write(build())


if __name__ == "__main__":
    main()
