"""The ``morag`` command: run the API or a worker, submit jobs, look at jobs and workers."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from morag.api.schemas import Accepted
from morag.config import DECLARED_QUEUES, GPU_QUEUE, STORE_QUEUE
from morag.job_record import Job, JobStatus, Route

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


class CliError(Exception):
    """A failure the command reports and exits on: ``what`` (for people, the red part),
    ``detail``, the HTTP ``status`` and the API's ``code`` when an answer said so."""

    def __init__(
        self,
        what: str,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        exit_code: int = 1,
    ) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail
        self.status = status
        self.code = code
        self.exit_code = exit_code

    def as_json(self) -> dict[str, Any]:
        # An API answer's detail is the error; a local failure says what failed, too.
        error = self.detail if self.status is not None else f"{self.what}: {self.detail}"
        return {"error": error, "status": self.status, "code": self.code}


@contextlib.contextmanager
def reported(as_json: bool) -> Iterator[None]:
    """Print a CliError (or a bad option value) and exit with its code: with ``--json`` as
    one JSON object on stdout, where the command's other output goes, so a script reads
    every outcome the same way; otherwise as a red line on stderr."""
    try:
        yield
    except CliError as exc:
        if as_json:
            print(json.dumps(exc.as_json()), flush=True)
        else:
            err.print(f"[red]{escape(exc.what)}:[/red] {escape(exc.detail)}")
        raise typer.Exit(exc.exit_code) from exc
    except typer.BadParameter as exc:
        if not as_json:
            raise
        hint = exc.param_hint if isinstance(exc.param_hint, str) else None
        body = {"error": exc.format_message(), "status": None, "code": "bad_parameter"}
        print(json.dumps({**body, "param": hint}), flush=True)
        raise typer.Exit(2) from exc


def json_errors(command: Callable[..., None]) -> Callable[..., None]:
    """A command whose failures are reported as its ``--json`` (``as_json``) asks."""

    @functools.wraps(command)  # typer reads the wrapped signature
    def run(*args: Any, **kwargs: Any) -> None:
        with reported(bool(kwargs.get("as_json"))):
            command(*args, **kwargs)

    return run


def _settings() -> Any:
    from morag.config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        raise CliError(
            "invalid configuration", str(exc), code="invalid_configuration", exit_code=2
        ) from exc


def _key(explicit: str | None) -> str:
    if explicit:
        return explicit
    keys = _settings().api_key_values()
    if not keys:
        raise CliError(
            "no API key",
            "pass --api-key or set MORAG_API_KEY"
            " (on a worker host, `morag workers --redis` reads the heartbeats without one)",
            code="no_api_key",
            exit_code=2,
        )
    return keys[0]


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8000, help="port to bind"),
) -> None:
    """Run the HTTP API (uvicorn, foreground)."""
    import uvicorn

    from morag.api.app import ConfigurationError, create_app
    from morag.api.server import uvicorn_options

    with reported(False):
        settings = _settings()
    try:
        application = create_app(settings)
    except ConfigurationError as exc:
        err.print(f"[red]cannot start the API:[/red] {exc}")
        raise typer.Exit(2) from exc
    uvicorn.run(application, host=host, port=port, **uvicorn_options(settings))


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
    with reported(False):
        settings = _settings()
    from morag.worker import celery_app, require_api_identity, require_device

    # Before Celery starts (and connects): MORAG_DEVICE=cuda without usable CUDA exits 78, as
    # does a worker whose token or CA the API refuses (MORAG_JOB_WRITES=api).
    require_device(settings)
    require_api_identity(settings)
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


@app.command("worker-token")
def worker_token(host: str = typer.Argument(..., help="the worker host's name")) -> None:
    """Print the worker token of one host, derived from MORAG_WORKER_TOKEN (the fleet's).

    A host given only its own token (with MORAG_WORKER_HOST) fetches uploads and changes the
    records of its own attempts through the API (MORAG_JOB_WRITES=api), and nothing else."""
    with reported(False):
        typer.echo(_host_token(host))


def _host_token(host: str) -> str:
    from morag import job_writes

    if not job_writes.HOST_NAME.match(host):
        raise CliError("invalid host name", host, code="invalid_input", exit_code=2)
    settings = _settings()
    if settings.job_writes == "api" and settings.worker_host:
        # A worker host's env: its token is that host's own, and what derives from it is
        # no token the API takes.
        raise CliError(
            "not the fleet's worker token",
            f"MORAG_WORKER_TOKEN here is host {settings.worker_host}'s own "
            "(MORAG_JOB_WRITES=api); run this on an API host, where `sudo morag worker-token "
            "HOST` reads the API's env file",
            code="no_worker_token",
            exit_code=2,
        )
    fleet = settings.worker_token
    if fleet is None or not fleet.get_secret_value():
        raise CliError(
            "no worker token",
            "set MORAG_WORKER_TOKEN (the fleet's)",
            code="no_worker_token",
            exit_code=2,
        )
    return job_writes.host_token(fleet.get_secret_value(), host)


@app.command("gpu-stack")
def gpu_stack(
    as_json: bool = typer.Option(False, "--json", help="print the row as JSON"),
    ctranslate2: str | None = typer.Option(None, help="another version than the installed one"),
) -> None:
    """The CUDA libraries, pip wheels and driver branch the installed CTranslate2 needs."""
    from morag.gpu_stack import main as gpu_stack_main

    args = (["--json"] if as_json else []) + (["--ctranslate2", ctranslate2] if ctranslate2 else [])
    raise typer.Exit(gpu_stack_main(args))


@app.command("gpu-check")
def gpu_check(
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    timeout: float | None = typer.Option(
        None, min=1, help="seconds for the CUDA check (default MORAG_CUDA_CHECK_TIMEOUT or 120)"
    ),
) -> None:
    """Check CUDA as a GPU worker does at start, in this environment (CUDA_VISIBLE_DEVICES...).

    nvidia-smi and the CUDA libraries, then a real CUDA check in a child process (device,
    memory, a CTranslate2 forward pass). Exit 0 when it passed, 78 with the cause when not."""
    from morag import cuda_check
    from morag.devices import EX_CONFIG, unavailable_message
    from morag.processors.audio import compute_type_for

    with reported(as_json):
        compute_type = compute_type_for("cuda", _settings().whisper_compute_type)
    info, result = cuda_check.check_here(compute_type=compute_type, timeout=timeout)
    passed = isinstance(result, cuda_check.CudaCheck) and result.passed
    problem = result.problem if isinstance(result, cuda_check.CudaCheck) else result
    if as_json:
        answer: dict[str, Any] = {
            "passed": passed,
            "stage": "cuda_check" if info is not None else "detect",
            "reason": problem.reason,
            "check": problem.check,
            "message": "" if passed else unavailable_message(problem),
            "gpus": info.gpus_as_dicts() if info else [],
            "libraries": dict(info.libraries) if info else {},
            "cuda_check": result.as_dict() if isinstance(result, cuda_check.CudaCheck) else None,
        }
        print(json.dumps(answer))
    elif passed:
        assert isinstance(result, cuda_check.CudaCheck)
        print(f"CUDA check passed in {result.seconds:.1f}s: {result.reason}")
    else:  # one line, as the worker's journal has it (no terminal wrapping)
        print(f"morag gpu-check: {unavailable_message(problem)}", file=sys.stderr)
    raise typer.Exit(0 if passed else EX_CONFIG)


def _client(api_url: str, api_key: str | None) -> httpx.Client:
    # An https:// API's certificate is verified against MORAG_API_CA_FILE (or the system's).
    try:
        verify = _settings().api_tls_verify()
    except OSError as exc:
        raise CliError(
            "cannot load MORAG_API_CA_FILE", str(exc), code="ca_file", exit_code=2
        ) from exc
    return httpx.Client(
        base_url=api_url, headers={"X-API-Key": _key(api_key)}, timeout=60.0, verify=verify
    )


def _request(client: httpx.Client, method: str, url: str, **kwargs: Any) -> Any:
    """One API call; an unreachable API or an error answer is a CliError (exit 1)."""
    try:
        resp = client.request(method, url, **kwargs)
    except httpx.TransportError as exc:
        raise CliError(
            f"cannot reach the API at {client.base_url}",
            str(exc) or type(exc).__name__,
            code="unreachable",
        ) from exc
    _fail_on(resp)
    return resp.json()


def _fail_on(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        code = None
        try:
            body = resp.json()
            detail = str(body.get("detail"))
            code = body.get("code")
        except (ValueError, AttributeError):
            detail = resp.text
        raise CliError(f"HTTP {resp.status_code}", detail, status=resp.status_code, code=code)


def _json_option(value: str | None, name: str) -> dict[str, Any] | None:
    """Parse a ``--options``/``--metadata`` value: a JSON object, or ``@file.json``."""
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {value[1:]}: {exc}", param_hint=name) from exc
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=name) from exc
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object", param_hint=name)
    return parsed


def _is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


@app.command()
@json_errors
def submit(
    targets: list[str] = typer.Argument(..., help="files to upload and/or http(s) URLs"),
    gpu: bool = typer.Option(False, "--gpu", help="ask for a GPU worker"),
    options: str | None = typer.Option(
        None, "--options", help='processing options, JSON or @file (e.g. \'{"language": "en"}\')'
    ),
    metadata: str | None = typer.Option(
        None, "--metadata", help="metadata stored with the result, JSON or @file"
    ),
    webhook: str | None = typer.Option(None, "--webhook", help="URL called when the job ends"),
    wait: bool = typer.Option(False, "--wait", help="wait for the results and print them"),
    api_url: str = API_URL,
    api_key: str | None = API_KEY,
    as_json: bool = typer.Option(False, "--json", help="print the jobs as JSON lines"),
) -> None:
    """Submit files and URLs as ingest jobs (one job each); with --wait, follow them to the end."""
    opts = _json_option(options, "--options")
    meta = _json_option(metadata, "--metadata")
    files = [t for t in targets if not _is_url(t)]
    for name in files:
        if not Path(name).is_file():
            raise CliError("not a file or an http(s) URL", name, code="not_a_file", exit_code=2)
    jobs: list[Accepted] = []
    with _client(api_url, api_key) as client:
        for target in targets:
            if _is_url(target):
                body: dict[str, Any] = {"url": target, "gpu": gpu}
                if opts is not None:
                    body["options"] = opts
                if meta is not None:
                    body["metadata"] = meta
                if webhook:
                    body["webhook_url"] = webhook
                job = _request(client, "POST", "/api/v1/ingest/url", json=body)
            else:
                form = {"gpu": str(gpu).lower()}
                if opts is not None:
                    form["options"] = json.dumps(opts)
                if meta is not None:
                    form["metadata"] = json.dumps(meta)
                if webhook:
                    form["webhook_url"] = webhook
                with open(target, "rb") as f:
                    job = _request(
                        client,
                        "POST",
                        "/api/v1/ingest/file",
                        files={"file": (Path(target).name, f)},
                        data=form,
                    )
            accepted = Accepted.model_validate(job)
            jobs.append(accepted)
            if not as_json:
                console.print(
                    f"{target}: job [bold]{accepted.task_id}[/bold] -> "
                    f"{_route_text(accepted.route)}"
                )
            elif not wait:
                print(json.dumps({**job, "source": target}))
        if not wait:
            return
        finals = [_follow(client, job.task_id, quiet=as_json) for job in jobs]
    for final in finals:
        if as_json:
            print(final.model_dump_json())
        else:
            _print_job(final)
    if any(final.status != JobStatus.succeeded for final in finals):
        raise typer.Exit(1)


def _follow(client: httpx.Client, task_id: str, *, quiet: bool) -> Job:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
    ) as progress:
        bar = progress.add_task(task_id, total=1.0)

        def show(**fields: Any) -> None:
            progress.update(bar, **fields)

        ended = _follow_events(client, task_id, show)
        if ended is not None:
            return ended
        # An API without the events route (404: older, or an unknown id, which the poll
        # then reports), or a stream that broke off: poll.
        while True:
            job = Job.model_validate(
                _request(client, "GET", f"/api/v1/status/{task_id}", params={"wait": 1})
            )
            progress.update(bar, completed=job.progress, description=f"{task_id} {job.status}")
            if job.status.final:
                return job
            time.sleep(0.2)


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) of each Server-Sent Event in ``lines`` (comments and ids skipped)."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _follow_events(client: httpx.Client, task_id: str, show: Callable[..., None]) -> Job | None:
    """Follow the job on ``GET /api/v1/status/{id}/events`` (SSE) to its end; None when
    that route is not there (404) or the stream ends without the job's end."""
    status = "queued"
    try:
        # Reads wait long: the server sends a comment every MORAG_SSE_KEEPALIVE when idle.
        timeout = httpx.Timeout(60.0, read=300.0)
        with client.stream("GET", f"/api/v1/status/{task_id}/events", timeout=timeout) as resp:
            if resp.status_code == 404:
                return None
            if resp.status_code >= 400:
                resp.read()
                _fail_on(resp)
            for event, data in sse_events(resp.iter_lines()):
                body = json.loads(data)
                if event == "status":
                    status = body["status"]
                    show(description=f"{task_id} {status}")
                elif event == "route" and body.get("device"):
                    show(description=f"{task_id} {status} on {body['queue']} ({body['device']})")
                elif event == "progress":
                    show(completed=body["progress"])
                elif event == "end":
                    job = Job.model_validate(body)
                    show(completed=job.progress, description=f"{task_id} {job.status}")
                    return job
                elif event == "error":
                    return None
    except (httpx.TransportError, ValueError, KeyError):
        return None  # the poll after it says what is wrong, or finds the end
    return None


def _route_text(route: Route) -> str:
    """``queue [code] (reason)``; the code is the stable, machine-readable part."""
    code = route.code
    return f"{route.queue} " + (f"\\[{code}] " if code else "") + f"({route.reason})"


def _print_job(job: Job) -> None:
    console.print(f"[bold]{job.task_id}[/bold]: {job.status}")
    console.print(f"route: {_route_text(job.route)}")
    for a in job.attempts:
        console.print(
            f"  attempt on {a.queue} by {a.worker} ({a.device})"
            + (f": {a.error}" if a.error else "")
        )
    if job.error:
        console.print(f"[red]error:[/red] {job.error}")
    if job.result:
        console.print(job.result.content, style="green", markup=False)


@app.command()
@json_errors
def status(
    task_id: str,
    wait: bool = typer.Option(False, "--wait", help="follow the job until it ends"),
    api_url: str = API_URL,
    api_key: str | None = API_KEY,
    as_json: bool = typer.Option(False, "--json", help="print the job as JSON"),
) -> None:
    """Show one job."""
    with _client(api_url, api_key) as client:
        if wait:
            job = _follow(client, task_id, quiet=as_json)
        else:
            job = Job.model_validate(_request(client, "GET", f"/api/v1/status/{task_id}"))
    if as_json:
        print(job.model_dump_json())
    else:
        _print_job(job)


@app.command()
@json_errors
def cancel(
    task_id: str,
    api_url: str = API_URL,
    api_key: str | None = API_KEY,
    as_json: bool = typer.Option(False, "--json", help="print the answer as JSON"),
) -> None:
    """Cancel a queued or running job."""
    with _client(api_url, api_key) as client:
        answer = _request(client, "DELETE", f"/api/v1/ingest/{task_id}")
    if as_json:
        print(json.dumps(answer))
    else:
        console.print(f"{task_id}: {answer.get('status', 'cancelled')}")


@app.command()
@json_errors
def search(
    query: str,
    limit: int = typer.Option(5, min=1, max=100, help="how many chunks"),
    api_url: str = API_URL,
    api_key: str | None = API_KEY,
    as_json: bool = typer.Option(False, "--json", help="print the answer as JSON"),
) -> None:
    """Search the stored chunks (needs a morag-store worker on the server)."""
    with _client(api_url, api_key) as client:
        answer = _request(client, "POST", "/api/v1/search", json={"query": query, "limit": limit})
    if as_json:
        print(json.dumps(answer))
        return
    table = Table("score", "source", "text")
    for hit in answer.get("results", []):
        meta = hit.get("metadata") or {}
        table.add_row(
            f"{hit.get('score', 0):.3f}",
            str(meta.get("source") or hit.get("source") or "-"),
            (hit.get("text") or "")[:200],
        )
    console.print(table)
    if not answer.get("results"):
        err.print("no results")


@app.command()
@json_errors
def workers(
    from_redis: bool = typer.Option(
        False,
        "--redis",
        help="read the heartbeats straight from Redis with this host's settings "
        "(MORAG_REDIS_URL): for worker hosts, which hold no API key, and the Ansible plays",
    ),
    api_url: str = API_URL,
    api_key: str | None = API_KEY,
    as_json: bool = typer.Option(False, "--json", help="print the heartbeats as JSON"),
) -> None:
    """List live workers from their heartbeats (through the API, or with --redis directly)."""
    if from_redis:
        beats = _heartbeats_from_redis()
    else:
        with _client(api_url, api_key) as client:
            beats = _all_workers(client)
    if as_json:
        print(json.dumps(beats))
        return
    table, reasons = workers_table(beats)
    console.print(table)
    for line in reasons:  # why a worker is not on a GPU, whole (too long for a column)
        console.print(line, markup=False, style="dim")
    if not beats:
        err.print("no live workers")


def workers_table(beats: list[dict[str, Any]]) -> tuple[Table, list[str]]:
    """The table of `morag workers` and, below it, why workers are not on their GPU.

    Names and queues are never cut (an 80-column terminal used to show `gpu-ta…`): they get
    their full width; a worker that offers every processor says `all`, and GPU names drop
    the vendor, so the rest fits beside them (--json has everything)."""
    from morag.processors.registry import SPECS

    rows: list[tuple[str, ...]] = []
    reasons: list[str] = []
    for b in beats:
        gpus = ", ".join(
            f"{g['index']}:{str(g['name']).removeprefix('NVIDIA ')}" for g in b.get("gpus", [])
        )
        device = b.get("device", "?")
        if device != "cuda" and b.get("device_reason"):
            reasons.append(f"{b['name']}: {device} because {b['device_reason']}")
        elif device == "cuda" and not (b.get("cuda_check") or {}).get("passed"):
            reasons.append(f"{b['name']}: cuda without a passed CUDA check (an older worker?)")
        processors = b.get("processors", [])
        rows.append(
            (
                b["name"],
                ",".join(b.get("consuming", b.get("queues", []))),
                device,
                gpus or "-",
                "yes" if b.get("busy") else "no",
                "all" if set(processors) >= set(SPECS) else ", ".join(processors) or "-",
                str(b.get("updated_at", ""))[11:19],  # HH:MM:SS (UTC); --json has the full stamp
            )
        )
    # No vertical rules: more of an 80-column terminal for the data.
    table = Table(
        "name",
        "queues",
        "device",
        "gpus",
        "busy",
        "processors",
        "updated",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )
    for index, column in enumerate(table.columns):
        if index in (3, 5):  # GPUs and processors fold onto more lines when space is short
            column.overflow = "fold"
            column.ratio = 1
        else:  # the others whole, at their longest
            column.no_wrap = True
            column.min_width = max([len(r[index]) for r in rows] + [len(str(column.header))])
    table.columns[5].min_width = 3  # `all`
    for row in rows:
        table.add_row(*row)
    return table, reasons


def _all_workers(client: httpx.Client) -> list[dict[str, Any]]:
    """Every page of ``GET /api/v1/workers``."""
    beats: list[dict[str, Any]] = []
    while True:
        page = _request(
            client, "GET", "/api/v1/workers", params={"offset": len(beats), "limit": 500}
        )
        beats.extend(page["workers"])
        if not page["workers"] or len(beats) >= page.get("total", len(beats)):
            return beats


def _heartbeats_from_redis() -> list[dict[str, Any]]:
    import redis

    from morag.fleet import read_heartbeats
    from morag.redis_client import redis_client

    client = redis_client(_settings())
    try:
        return read_heartbeats(client)
    except redis.RedisError as exc:
        raise CliError("Redis unavailable", str(exc), code="unavailable") from exc


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
