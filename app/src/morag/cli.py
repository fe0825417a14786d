"""The ``morag`` command: run the API or a worker, submit jobs, look at jobs and workers."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from morag.config import DECLARED_QUEUES, GPU_QUEUE, STORE_QUEUE

app = typer.Typer(
    help="MoRAG processing service.", no_args_is_help=True, pretty_exceptions_enable=False
)
console = Console()
err = Console(stderr=True)

API_URL = typer.Option(
    "http://127.0.0.1:8000", "--api-url", envvar="MORAG_API_URL", help="the API to talk to"
)
API_KEY = typer.Option(
    None, "--api-key", envvar="MORAG_API_KEY", help="API key (default: the first of MORAG_API_KEYS)"
)


def _settings() -> Any:
    from morag.config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2) from exc


def _key(explicit: str | None) -> str:
    if explicit:
        return explicit
    keys = _settings().api_key_values()
    if not keys:
        err.print("[red]no API key:[/red] pass --api-key or set MORAG_API_KEY")
        raise typer.Exit(2)
    return keys[0]


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8000, help="port to bind"),
) -> None:
    """Run the HTTP API (uvicorn, foreground)."""
    import uvicorn

    from morag.api.app import ConfigurationError, create_app

    try:
        application = create_app(_settings())
    except ConfigurationError as exc:
        err.print(f"[red]cannot start the API:[/red] {exc}")
        raise typer.Exit(2) from exc
    uvicorn.run(application, host=host, port=port, log_level="info", access_log=False)


@app.command()
def worker(
    queue: list[str] = typer.Option(..., "--queue", "-Q", help="queue to consume (repeatable)"),
    concurrency: int = typer.Option(1, min=1, help="jobs at once (1 per GPU)"),
    name: str | None = typer.Option(None, help="node name, e.g. gpu0@%h"),
    loglevel: str = typer.Option("INFO", help="log level"),
) -> None:
    """Run a Celery worker (prefork pool) on the given queues, in the foreground."""
    unknown = [q for q in queue if q not in DECLARED_QUEUES]
    if unknown:
        err.print(
            f"[red]unknown queue(s):[/red] {', '.join(unknown)}; "
            f"declared queues: {', '.join(DECLARED_QUEUES)}"
        )
        raise typer.Exit(2)
    settings = _settings()
    from morag.worker import celery_app, require_device

    # Before Celery starts (and connects): MORAG_DEVICE=cuda without usable CUDA exits 78.
    require_device(settings)
    kind = "gpu" if GPU_QUEUE in queue else "store" if queue == [STORE_QUEUE] else "cpu"
    node = name or f"{kind}@%h"
    celery_app.worker_main(
        [
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "--queues",
            ",".join(queue),
            "--hostname",
            node,
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command("gpu-stack")
def gpu_stack(
    as_json: bool = typer.Option(False, "--json", help="print the row as JSON"),
    ctranslate2: str | None = typer.Option(None, help="another version than the installed one"),
) -> None:
    """The CUDA libraries, pip wheels and driver branch the installed CTranslate2 needs."""
    from morag.gpu_stack import main as gpu_stack_main

    args = (["--json"] if as_json else []) + (["--ctranslate2", ctranslate2] if ctranslate2 else [])
    raise typer.Exit(gpu_stack_main(args))


def _client(api_url: str, api_key: str | None) -> httpx.Client:
    return httpx.Client(base_url=api_url, headers={"X-API-Key": _key(api_key)}, timeout=60.0)


def _fail_on(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail")
        except ValueError:
            detail = resp.text
        err.print(f"[red]HTTP {resp.status_code}:[/red] {detail}")
        raise typer.Exit(1)


@app.command()
def submit(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    gpu: bool = typer.Option(False, "--gpu", help="ask for a GPU worker"),
    wait: bool = typer.Option(False, "--wait", help="wait for the result and print it"),
    api_url: str = API_URL,
    api_key: str | None = API_KEY,
    as_json: bool = typer.Option(False, "--json", help="print the final job as JSON"),
) -> None:
    """Upload FILE as an ingest job; with --wait, follow its progress and print the result."""
    with _client(api_url, api_key) as client, open(file, "rb") as f:
        resp = client.post(
            "/api/v1/ingest/file", files={"file": (file.name, f)}, data={"gpu": str(gpu).lower()}
        )
        _fail_on(resp)
        job = resp.json()
        if not as_json:
            console.print(f"job [bold]{job['task_id']}[/bold] -> {_route_text(job['route'])}")
        if not wait:
            if as_json:
                console.print_json(json.dumps(job))
            return
        final = _follow(client, job["task_id"], quiet=as_json)
    if as_json:
        print(json.dumps(final))
    else:
        _print_job(final)
    if final["status"] != "succeeded":
        raise typer.Exit(1)


def _follow(client: httpx.Client, task_id: str, *, quiet: bool) -> dict[str, Any]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
    ) as progress:
        bar = progress.add_task("queued", total=1.0)
        while True:
            resp = client.get(f"/api/v1/status/{task_id}", params={"wait": 1})
            _fail_on(resp)
            job = resp.json()
            progress.update(bar, completed=job["progress"], description=job["status"])
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.2)


def _route_text(route: dict[str, Any]) -> str:
    """``queue [code] (reason)``; the code is the stable, machine-readable part."""
    code = route.get("code")
    return f"{route['queue']} " + (f"\\[{code}] " if code else "") + f"({route['reason']})"


def _print_job(job: dict[str, Any]) -> None:
    console.print(f"[bold]{job['task_id']}[/bold]: {job['status']}")
    console.print(f"route: {_route_text(job['route'])}")
    for a in job.get("attempts", []):
        console.print(
            f"  attempt on {a['queue']} by {a['worker']} ({a['device']})"
            + (f": {a['error']}" if a.get("error") else "")
        )
    if job.get("error"):
        console.print(f"[red]error:[/red] {job['error']}")
    if job.get("result"):
        console.print(f"[green]{job['result'].get('content', '')}[/green]")


@app.command()
def status(
    task_id: str,
    api_url: str = API_URL,
    api_key: str | None = API_KEY,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show one job."""
    with _client(api_url, api_key) as client:
        resp = client.get(f"/api/v1/status/{task_id}")
        _fail_on(resp)
    if as_json:
        print(json.dumps(resp.json()))
    else:
        _print_job(resp.json())


@app.command()
def workers(
    as_json: bool = typer.Option(False, "--json", help="print the heartbeats as JSON"),
) -> None:
    """List live workers from their heartbeats in Redis (reads MORAG_REDIS_URL)."""
    import redis

    from morag.fleet import read_heartbeats

    client = redis.Redis.from_url(_settings().redis_url.get_secret_value())
    try:
        beats = read_heartbeats(client)
    except redis.RedisError as exc:
        err.print(f"[red]Redis unavailable:[/red] {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        print(json.dumps(beats))
        return
    table = Table("name", "queues", "device", "gpus", "busy", "processors", "updated")
    for b in beats:
        gpus = ", ".join(f"{g['index']}:{g['name']}" for g in b.get("gpus", []))
        table.add_row(
            b["name"],
            ",".join(b.get("consuming", b["queues"])),
            f"{b['device']}" + ("" if b["device"] == "cuda" else f" ({b['device_reason']})"),
            gpus or "-",
            "yes" if b["busy"] else "no",
            ",".join(b["processors"]),
            b["updated_at"],
        )
    console.print(table)
    if not beats:
        err.print("no live workers")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
