"""The ``morag-fleet`` command: status, add (gpu|cpu) and upgrade, on the controller.

ansible-playbook stays the base: each command runs the repository's playbooks through
ansible-runner, shows progress from its events, keeps the artifacts under
``.morag-fleet/runs/`` beside the inventory and ends with a summary per host.
"""

from __future__ import annotations

import enum
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from morag_fleet.inventory import InventoryError, InventoryHost, add_host, read_hosts
from morag_fleet.runs import REPO, EventSummary, HostSummary, RunResult, new_run_dir, run_playbook
from morag_fleet.status import GPU_QUEUE, FleetReport, fleet_report, workers_of

app = typer.Typer(
    help="The MoRAG fleet from the Ansible controller (ansible-playbook through ansible-runner).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

INVENTORY = typer.Option(
    REPO / "inventory/mysite/hosts.yml",
    "--inventory",
    "-i",
    envvar="MORAG_FLEET_INVENTORY",
    help="the inventory's hosts.yml (ansible.cfg's default)",
)
API_URL = typer.Option(
    "http://127.0.0.1:8000", "--api-url", envvar="MORAG_API_URL", help="the API to ask"
)
API_KEY = typer.Option(None, "--api-key", envvar="MORAG_API_KEY", help="API key")
FROM_REDIS = typer.Option(
    False, "--redis", help="read the heartbeats from Redis (MORAG_REDIS_URL), not the API"
)


class Kind(str, enum.Enum):
    gpu = "gpu"
    cpu = "cpu"


def _fail(what: str, detail: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]{escape(what)}:[/red] {escape(detail)}")
    return typer.Exit(code)


def _heartbeat_reader(from_redis: bool, api_url: str, api_key: str | None) -> Callable[[], Any]:
    """A function that reads the live workers' heartbeats as `morag workers` does (the same
    client, key, URL and MORAG_API_CA_FILE; or Redis with --redis). CliError on failure."""
    from morag import cli as morag_cli

    if from_redis:
        return morag_cli._heartbeats_from_redis

    def through_api() -> list[dict[str, Any]]:
        with morag_cli._client(api_url, api_key) as client:
            return morag_cli._all_workers(client)

    return through_api


def _expected_version() -> str | None:
    # The app version this checkout deploys (morag_app builds its wheel from app/).
    try:
        from morag import __version__
    except ImportError:
        return None
    return __version__


# -- status -------------------------------------------------------------------------------
@app.command()
def status(
    inventory: Path = INVENTORY,
    from_redis: bool = FROM_REDIS,
    api_url: str = API_URL,
    api_key: str | None = API_KEY,
    expect_version: str | None = typer.Option(
        None, help="the app version every worker should run (default: this checkout's)"
    ),
    as_json: bool = typer.Option(False, "--json", help="the report as JSON"),
) -> None:
    """The inventory against the live workers; exit 1 when something needs a look."""
    from morag.cli import reported

    try:
        hosts = read_hosts(inventory)
    except InventoryError as exc:
        raise _fail("inventory", str(exc), 2) from exc
    with reported(as_json):
        beats = _heartbeat_reader(from_redis, api_url, api_key)()
    report = fleet_report(hosts, beats, expect_version or _expected_version())
    if as_json:
        print(json.dumps(report.as_json()))
    else:
        _print_report(report)
    if report.problems:
        raise typer.Exit(1)


def _print_report(report: FleetReport) -> None:
    table = Table("host", "kind", "workers", "device", "gpus", "version", "state", box=box.SIMPLE)
    for h in report.hosts:
        devices = sorted({str(w.get("device", "?")) for w in h.workers})
        gpus = sorted({str(g.get("name", "?")) for w in h.workers for g in w.get("gpus") or []})
        versions = sorted({str(w.get("version", "?")) for w in h.workers})
        table.add_row(
            h.host,
            h.kind,
            ", ".join(str(w.get("name")) for w in h.workers) or "-",
            ",".join(devices) or "-",
            ", ".join(gpus) or "-",
            ",".join(versions) or "-",
            "[green]ok[/green]" if h.ok else f"[red]{len(h.problems)} problem(s)[/red]",
        )
    console.print(table)
    if report.expected_version:
        console.print(f"expected app version: {report.expected_version}", style="dim")
    for line in report.problems:
        console.print(f"[red]-[/red] {escape(line)}")
    if not report.problems:
        console.print("[green]every worker host has live workers as expected[/green]")


# -- runs: progress and summary ----------------------------------------------------------
class RunProgress:
    """One line per host, fed by runner events: tasks done, changed, failed, the task now."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.rows: dict[str, TaskID] = {}
        self.play = ""

    def __call__(self, summary: EventSummary, host: HostSummary | None, event: dict) -> None:
        if event.get("event") == "playbook_on_play_start":
            self.play = (event.get("event_data") or {}).get("play", "")
            self.progress.console.print(f"[bold]play:[/bold] {escape(self.play)}")
        if host is None:
            return
        if host.host not in self.rows:
            self.rows[host.host] = self.progress.add_task("", total=None, host=host.host)
        state = (
            "[red]failed[/red]"
            if host.failed or host.unreachable
            else f"{host.tasks} tasks, [yellow]{host.changed} changed[/yellow]"
        )
        self.progress.update(self.rows[host.host], description=f"{state}  {escape(host.current)}")


def _run_with_progress(title: str, **kwargs: Any) -> RunResult:
    console.print(f"[bold]{escape(title)}[/bold]  artifacts: {kwargs['run_dir']}")
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.fields[host]}", style="cyan"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        result = run_playbook(on_event=RunProgress(progress), **kwargs)
        for row in progress.task_ids:
            progress.stop_task(row)
    print_summary(result)
    return result


def print_summary(result: RunResult, out: Console | None = None) -> None:
    """One screen: a row per host (ok, changed, failed task and its message, cut short;
    the artifacts have all of it)."""
    out = out or console
    table = Table("host", "result", "ok", "changed", "failed task", "message", box=box.SIMPLE)
    for h in result.hosts.values():
        message = (h.failed_msg or "").strip().splitlines()
        shown = "\n".join(message[:3]) + (" …" if len(message) > 3 else "")
        colour = {"ok": "green", "changed": "yellow"}.get(h.result, "red")
        table.add_row(
            h.host,
            f"[{colour}]{h.result}[/{colour}]",
            str(h.ok),
            str(h.changed),
            escape(h.failed_task or "-"),
            escape(shown[:600] or "-"),
        )
    out.print(table)
    verdict = "[green]succeeded[/green]" if result.ok else f"[red]{result.status}[/red]"
    out.print(
        f"run {verdict} in {result.seconds:.0f}s (rc {result.rc}); "
        f"events and stdout: {result.artifacts}"
    )


# -- add ---------------------------------------------------------------------------------
@app.command()
def add(
    kind: Kind = typer.Argument(..., help="gpu or cpu"),
    host: str = typer.Argument(..., help="the inventory name of the new host"),
    address: str = typer.Option(..., "--address", help="its IP address (or DNS name)"),
    inventory: Path = INVENTORY,
    wait: float = typer.Option(
        600, min=1, help="seconds to wait for its workers' heartbeats after the playbook"
    ),
    from_redis: bool = FROM_REDIS,
    api_url: str = API_URL,
    api_key: str | None = API_KEY,
) -> None:
    """Add HOST to the inventory's gpu_workers/cpu_workers, provision it with
    `site.yml -l HOST`, and wait until its workers heartbeat."""
    from morag.cli import workers_table

    started = time.monotonic()
    hosts_file = inventory / "hosts.yml" if inventory.is_dir() else inventory
    try:
        group = add_host(hosts_file, kind.value, host, address)
    except InventoryError as exc:
        raise _fail("not added", str(exc), 2) from exc
    console.print(f"added [cyan]{escape(host)}[/cyan] ({address}) to {group} in {hosts_file}")
    result = _run_with_progress(
        f"site.yml -l {host}",
        playbook=REPO / "site.yml",
        inventory=hosts_file,
        run_dir=new_run_dir(hosts_file),
        limit=host,
    )
    provisioned = time.monotonic()
    if not result.ok:
        raise _fail(
            "provisioning failed",
            f"{host} stays in {hosts_file}; fix the cause shown above and run "
            f"`ansible-playbook -i {hosts_file} site.yml -l {host}`",
        )
    read = _heartbeat_reader(from_redis, api_url, api_key)
    target = next(h for h in read_hosts(hosts_file) if h.name == host)
    with console.status(f"waiting for {host}'s workers to heartbeat (up to {wait:.0f}s)"):
        try:
            mine = wait_for_workers(target, read, timeout=wait)
        except TimeoutError as exc:
            raise _fail("no heartbeat", str(exc)) from exc
    table, reasons = workers_table(mine)
    console.print(table)
    for line in reasons:
        console.print(line, markup=False, style="yellow")
    now = time.monotonic()
    console.print(
        f"[green]{escape(host)} is live[/green]: provisioned in {provisioned - started:.0f}s, "
        f"first heartbeat {now - provisioned:.0f}s later, {now - started:.0f}s in all"
    )


def wait_for_workers(
    host: InventoryHost,
    read: Callable[[], list[dict[str, Any]]],
    *,
    timeout: float,
    interval: float = 2.0,
) -> list[dict[str, Any]]:
    """The live workers of ``host`` once it has one (a GPU host: one on gpu-tasks); a
    TimeoutError that says where to look after ``timeout`` seconds."""
    from morag.cli import CliError

    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            mine = workers_of(host, read())
            last_error = ""
        except CliError as exc:  # the API restarting, say: ask again until the deadline
            mine, last_error = [], f"{exc.what}: {exc.detail}"
        if mine and (host.kind != "gpu" or any(GPU_QUEUE in (w.get("queues") or ()) for w in mine)):
            return mine
        if time.monotonic() >= deadline:
            hint = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(
                f"{host.name} was provisioned but none of its workers heartbeats after "
                f"{timeout:.0f}s{hint}. On the host: `systemctl status 'morag-worker@*'` and "
                f"`journalctl -u 'morag-worker@*' -n 50`; docs/troubleshooting.md."
            )
        time.sleep(interval)  # workers beat every few seconds: no point asking more often


# -- upgrade -----------------------------------------------------------------------------
@app.command()
def upgrade(
    inventory: Path = INVENTORY,
    group: Kind = typer.Option(Kind.gpu, help="gpu_workers or cpu_workers"),
    serial: str | None = typer.Option(None, help="hosts per batch (morag_update_serial, 25%)"),
    reboot: bool = typer.Option(False, help="allow a reboot for a new driver"),
    limit: str | None = typer.Option(None, "--limit", "-l", help="only these hosts (a pattern)"),
) -> None:
    """The rolling update (playbooks/rolling_update.yml), with per-host progress."""
    hosts_file = inventory / "hosts.yml" if inventory.is_dir() else inventory
    extravars: dict[str, Any] = {
        "morag_update_group": f"{group.value}_workers",
        "morag_update_reboot": reboot,
    }
    if serial:
        extravars["morag_update_serial"] = serial
    result = _run_with_progress(
        "playbooks/rolling_update.yml",
        playbook=REPO / "playbooks/rolling_update.yml",
        inventory=hosts_file,
        run_dir=new_run_dir(hosts_file),
        limit=limit,
        extravars=extravars,
    )
    if not result.ok:
        raise typer.Exit(1)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
