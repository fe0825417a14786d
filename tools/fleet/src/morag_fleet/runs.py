"""Playbook runs through ansible-runner: progress from its event stream, artifacts kept, and
a per-host summary read from the events (never parsed from ansible-playbook's text).

Each run gets ``<runs>/<timestamp>/`` (ansible-runner's private data dir and artifact dir at
once): ``stdout`` (the play's text), ``job_events/*.json`` (every event), ``rc``, ``status``,
``command``, and ``summary.json`` written here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[4]  # tools/fleet/src/morag_fleet -> the repository
RUNS_DIR = ".morag-fleet/runs"  # next to the inventory; .gitignore'd

# runner_on_* events that end one task on one host.
_RESULT_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_skipped": "skipped",
    "runner_on_unreachable": "unreachable",
    "runner_item_on_failed": None,  # the task's own runner_on_failed follows and counts
}


@dataclass
class HostSummary:
    host: str
    ok: int = 0
    changed: int = 0
    failed: int = 0
    skipped: int = 0
    unreachable: int = 0
    tasks: int = 0  # tasks finished on this host
    current: str = ""  # the task it runs now
    failed_task: str | None = None  # the first task that failed (not ignored) and its message
    failed_msg: str | None = None
    changed_tasks: list[str] = field(default_factory=list)  # in the order they ran

    @property
    def result(self) -> str:
        if self.unreachable:
            return "unreachable"
        if self.failed:
            return "failed"
        return "changed" if self.changed else "ok"


@dataclass
class RunResult:
    status: str  # ansible-runner's: successful, failed, timeout, canceled
    rc: int
    artifacts: Path
    hosts: dict[str, HostSummary] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "successful" and self.rc == 0


class EventSummary:
    """Folds runner events into per-host counts; the stats event (playbook_on_stats) has
    the last word on ok/changed/failed, as the recap does."""

    def __init__(self) -> None:
        self.hosts: dict[str, HostSummary] = {}
        self.task = ""

    def host(self, name: str) -> HostSummary:
        return self.hosts.setdefault(name, HostSummary(name))

    def feed(self, event: dict[str, Any]) -> HostSummary | None:
        """Take one event; the host it changed, if any."""
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        if kind == "playbook_on_task_start":
            self.task = data.get("task", "")
            return None
        if kind == "runner_on_start" and data.get("host"):
            h = self.host(data["host"])
            h.current = data.get("task", self.task)
            return h
        if kind == "playbook_on_stats":
            self._stats(data)
            return None
        if kind not in _RESULT_EVENTS or not data.get("host") or _RESULT_EVENTS[kind] is None:
            return None
        h = self.host(data["host"])
        h.tasks += 1
        h.current = ""
        res = data.get("res") or {}
        outcome = _RESULT_EVENTS[kind]
        if outcome == "ok":
            h.ok += 1
            if res.get("changed"):
                h.changed += 1
                h.changed_tasks.append(data.get("task") or self.task)
        elif outcome == "skipped":
            h.skipped += 1
        elif data.get("ignore_errors"):
            h.ok += 1  # ignore_errors: the recap counts it as ignored, not failed
        else:
            setattr(h, outcome, getattr(h, outcome) + 1)
            if h.failed_task is None:
                h.failed_task = data.get("task") or self.task
                h.failed_msg = failure_message(res)
        return h

    def _stats(self, data: dict[str, Any]) -> None:
        for key, attr in (
            ("ok", "ok"),
            ("changed", "changed"),
            ("failures", "failed"),
            ("skipped", "skipped"),
            ("dark", "unreachable"),
        ):
            for host, count in (data.get(key) or {}).items():
                setattr(self.host(host), attr, int(count))


def failure_message(res: dict[str, Any]) -> str:
    """What a failed task says: its msg, else stderr, else the failed loop item's msg."""
    for key in ("msg", "stderr", "reason"):
        value = res.get(key)
        if value:
            return str(value).strip()
    for item in res.get("results") or []:
        if isinstance(item, dict) and item.get("failed"):
            return failure_message(item)
    return "(no message)"


def new_run_dir(inventory: Path, now: datetime | None = None) -> Path:
    base = runs_root(inventory)
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")
    path = base / stamp
    base.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700)  # the stdout of a run may show host details: its owner's only
    return path


def runs_root(inventory: Path) -> Path:
    """``.morag-fleet/runs`` beside the inventory file (or inside an inventory directory)."""
    folder = inventory if inventory.is_dir() else inventory.parent
    return folder / RUNS_DIR


def run_playbook(
    playbook: Path,
    inventory: Path,
    run_dir: Path,
    *,
    limit: str | None = None,
    tags: str | None = None,
    extravars: dict[str, Any] | None = None,
    project_dir: Path = REPO,
    env: dict[str, str] | None = None,
    on_event: Callable[[EventSummary, HostSummary | None, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run ``playbook`` against ``inventory`` with ansible-runner; artifacts in ``run_dir``.
    ``env``: further environment variables for ansible-playbook (over this process's)."""
    import ansible_runner

    summary = EventSummary()

    def handler(event: dict[str, Any]) -> bool:
        changed = summary.feed(event)
        if on_event is not None:
            on_event(summary, changed, event)
        return True  # keep the event on disk (job_events/)

    started = datetime.now(timezone.utc)
    env = {
        # The repository's ansible.cfg (roles_path, vault password script), whatever the cwd.
        "ANSIBLE_CONFIG": str(project_dir / "ansible.cfg"),
        # ansible-playbook and its helpers from the same venv as this command.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # ansible-runner turns host key checking off unless told: keep ansible.cfg's (on).
        "ANSIBLE_HOST_KEY_CHECKING": os.environ.get("ANSIBLE_HOST_KEY_CHECKING", "True"),
        **(env or {}),
    }
    runner = ansible_runner.run(
        private_data_dir=str(run_dir),
        artifact_dir=str(run_dir.parent),
        ident=run_dir.name,  # artifacts straight in run_dir, beside nothing else
        project_dir=str(project_dir),
        playbook=str(playbook),
        inventory=str(inventory),
        limit=limit,
        tags=tags,
        extravars=extravars or None,
        envvars=env,
        event_handler=handler,
        quiet=True,
        suppress_env_files=True,  # no env/ copies of the variables on disk
    )
    seconds = (datetime.now(timezone.utc) - started).total_seconds()
    result = RunResult(
        status=str(runner.status),
        rc=int(runner.rc if runner.rc is not None else 1),
        artifacts=run_dir,
        hosts=dict(sorted(summary.hosts.items())),
        seconds=seconds,
    )
    _scrub_command(run_dir)
    write_summary(result)
    return result


def _scrub_command(run_dir: Path) -> None:
    """ansible-runner's ``command`` artifact holds the whole environment, where API keys and
    vault passwords may be: keep the command line, the cwd and the variables' names only."""
    path = run_dir / "command"
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    body["env"] = sorted(body.get("env") or {})
    path.write_text(json.dumps(body, indent=2) + "\n")


def write_summary(result: RunResult) -> None:
    body = {
        "status": result.status,
        "rc": result.rc,
        "seconds": round(result.seconds, 1),
        "hosts": {name: asdict(h) | {"result": h.result} for name, h in result.hosts.items()},
    }
    (result.artifacts / "summary.json").write_text(json.dumps(body, indent=2) + "\n")
