"""A run that must change nothing (the second run of a playbook), checked through
ansible-runner: ``changed`` per host from the runner's stats event, and the tasks that
changed from its ``runner_on_ok`` events, never parsed from ansible-playbook's text.

    python -m morag_fleet.idempotence [-i INVENTORY] [-l LIMIT] [--tags TAGS] PLAYBOOK

Runs PLAYBOOK with the ansible.cfg of the current directory (as ansible-playbook does) and
exits 0 when no host changed, 1 naming each changed host and its changed tasks, 2 when the
run itself failed (the failed task and its message). The lab (tests/lab/lab.py) and the
``firstday`` scenario (tests/docs/firstday.py) use it after their first ``site.yml``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from morag_fleet.runs import RunResult, new_run_dir, run_playbook


@dataclass
class Idempotence:
    playbook: str
    result: RunResult

    @property
    def changed(self) -> dict[str, list[str]]:
        """Host -> the tasks that reported a change, for each host whose stats say changed."""
        return {
            name: h.changed_tasks or ["(a change the events did not name)"]
            for name, h in self.result.hosts.items()
            if h.changed
        }

    @property
    def exit_code(self) -> int:
        if not self.result.ok:
            return 2
        return 1 if self.changed else 0

    def report(self) -> str:
        run = f"second run of {self.playbook}"
        where = f"events and stdout: {self.result.artifacts}"
        if not self.result.ok:
            lines = [f"{run} failed ({self.result.status}, rc {self.result.rc}):"]
            for h in self.result.hosts.values():
                if h.failed or h.unreachable:
                    lines.append(f"  {h.host}: {h.result} in {h.failed_task!r}: {h.failed_msg}")
            return "\n".join([*lines, where])
        if self.changed:
            lines = [f"{run} is not idempotent: {len(self.changed)} host(s) changed"]
            for host, tasks in self.changed.items():
                lines.append(f"  {host} (changed={self.result.hosts[host].changed}):")
                lines += [f"    - {task}" for task in tasks]
            return "\n".join([*lines, where])
        hosts = ", ".join(f"{h.host} ok={h.ok}" for h in self.result.hosts.values())
        return f"{run} changed nothing ({hosts}) in {self.result.seconds:.0f}s"


def second_run(
    playbook: Path,
    inventory: Path,
    *,
    project_dir: Path,
    limit: str | None = None,
    tags: str | None = None,
    env: dict[str, str] | None = None,
) -> Idempotence:
    """Run ``playbook`` again through ansible-runner (artifacts under the inventory's
    ``.morag-fleet/runs/``) and say which hosts and tasks changed."""
    result = run_playbook(
        playbook,
        inventory,
        new_run_dir(inventory),
        limit=limit,
        tags=tags,
        project_dir=project_dir,
        env=env,
    )
    try:
        name = str(playbook.relative_to(project_dir))
    except ValueError:
        name = str(playbook)
    label = " ".join([name, *(["-l", limit] if limit else []), *(["--tags", tags] if tags else [])])
    return Idempotence(label, result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m morag_fleet.idempotence",
        description="Run a playbook through ansible-runner; fail when any host changed.",
    )
    parser.add_argument("playbook", type=Path)
    parser.add_argument("-i", "--inventory", type=Path, default=Path("inventory/mysite/hosts.yml"))
    parser.add_argument("-l", "--limit")
    parser.add_argument("--tags")
    args = parser.parse_args(argv)
    project = Path.cwd()
    check = second_run(
        (project / args.playbook).resolve(),
        (project / args.inventory).resolve(),
        project_dir=project,
        limit=args.limit,
        tags=args.tags,
    )
    print(check.report(), flush=True)
    return check.exit_code


if __name__ == "__main__":
    sys.exit(main())
