"""`morag-fleet`'s runs: ansible-runner for real on a tiny local playbook, the per-host
summary built from its events, and the artifacts kept (without the environment's values)."""

from __future__ import annotations

import json
import os

import pytest
from morag_fleet.cli import print_summary
from morag_fleet.runs import RunResult, new_run_dir, run_playbook
from rich.console import Console

PLAYBOOK = """\
- name: A tiny play
  hosts: all
  gather_facts: false
  tasks:
    - name: An ok task
      ansible.builtin.debug:
        msg: hello
    - name: A changed task
      ansible.builtin.command: "true"
      changed_when: true
    - name: A failing task
      ansible.builtin.fail:
        msg: "the disk is full on {{ inventory_hostname }}"
      when: inventory_hostname == 'bad-host'
    - name: A task after the failure
      ansible.builtin.debug:
        msg: only the good host gets here
"""

INVENTORY = """\
all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  hosts:
    good-host:
    bad-host:
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    root = tmp_path_factory.mktemp("fleetrun")
    (root / "play.yml").write_text(PLAYBOOK)
    inventory = root / "inventory" / "hosts.yml"
    inventory.parent.mkdir()
    inventory.write_text(INVENTORY)
    # A secret in the controller's environment must not land in the artifacts.
    os.environ["MORAG_API_KEY"] = "fleet-secret-api-key"
    try:
        return run_playbook(root / "play.yml", inventory, new_run_dir(inventory))
    finally:
        del os.environ["MORAG_API_KEY"]


def test_the_summary_per_host_comes_from_the_events(run: RunResult) -> None:
    assert run.status == "failed" and run.rc == 2 and not run.ok
    good, bad = run.hosts["good-host"], run.hosts["bad-host"]
    assert (good.ok, good.changed, good.failed, good.skipped) == (3, 1, 0, 1)
    assert good.result == "changed" and good.failed_task is None
    assert (bad.ok, bad.changed, bad.failed) == (2, 1, 1)
    assert bad.result == "failed"
    assert bad.failed_task == "A failing task"
    assert bad.failed_msg == "the disk is full on bad-host"


def test_the_artifacts_are_kept_beside_the_inventory(run: RunResult) -> None:
    assert run.artifacts.parent == run.artifacts.parents[2] / ".morag-fleet" / "runs"
    assert run.artifacts.parents[2].name == "inventory"
    assert run.artifacts.stat().st_mode & 0o777 == 0o700
    assert "the disk is full on bad-host" in (run.artifacts / "stdout").read_text()
    events = [json.loads(p.read_text()) for p in (run.artifacts / "job_events").glob("*.json")]
    failed = [e for e in events if e["event"] == "runner_on_failed"]
    assert [e["event_data"]["host"] for e in failed] == ["bad-host"]
    assert (run.artifacts / "rc").read_text().strip() == "2"
    summary = json.loads((run.artifacts / "summary.json").read_text())
    assert summary["hosts"]["bad-host"]["failed_msg"] == "the disk is full on bad-host"
    assert summary["hosts"]["good-host"]["result"] == "changed"


def test_the_command_artifact_keeps_no_environment_values(run: RunResult) -> None:
    text = (run.artifacts / "command").read_text()
    assert "fleet-secret-api-key" not in text
    assert "MORAG_API_KEY" in json.loads(text)["env"]  # the name only
    assert "fleet-secret-api-key" not in "".join(
        p.read_text() for p in run.artifacts.rglob("*") if p.is_file()
    )


def test_the_one_screen_summary(run: RunResult) -> None:
    console = Console(width=100, record=True)
    print_summary(run, console)
    text = console.export_text()
    assert len(text.splitlines()) < 20
    bad_line = next(line for line in text.splitlines() if "bad-host" in line)
    assert "failed" in bad_line and "A failing task" in bad_line
    assert "the disk is full on bad-host" in text
    assert str(run.artifacts) in text.replace("\n", "")


def test_progress_lines_per_host_come_from_the_events(tmp_path) -> None:
    from morag_fleet import cli

    (tmp_path / "play.yml").write_text(PLAYBOOK)
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(INVENTORY)
    recorded = Console(width=120, record=True, force_terminal=False)
    cli.console, saved = recorded, cli.console
    try:
        result = cli._run_with_progress(
            "tiny",
            playbook=tmp_path / "play.yml",
            inventory=inventory,
            run_dir=new_run_dir(inventory),
        )
    finally:
        cli.console = saved
    text = recorded.export_text()
    assert "play: A tiny play" in text
    assert any("good-host" in line and "4 tasks" in line for line in text.splitlines())
    assert any("bad-host" in line and "failed" in line for line in text.splitlines())
    assert result.hosts["bad-host"].failed_msg == "the disk is full on bad-host"
