"""The idempotence check of the lab and the firstday scenario (morag_fleet.idempotence):
ansible-runner for real on a tiny local playbook; changed hosts and their tasks come from the
runner's events and stats, never from ansible-playbook's text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from morag_fleet.idempotence import Idempotence, second_run

PLAYBOOK = """\
- name: A tiny play
  hosts: all
  gather_facts: false
  tasks:
    - name: Write the marker file
      tags: [steady]
      ansible.builtin.copy:
        dest: "{{ playbook_dir }}/{{ inventory_hostname }}.txt"
        content: "steady\\n"
        mode: "0644"
    - name: An ok task
      tags: [steady]
      ansible.builtin.debug:
        msg: nothing to change
    - name: Stamp the drifting host
      ansible.builtin.command: "true"
      changed_when: inventory_hostname == 'drifting-host'
    - name: Fail where asked
      ansible.builtin.fail:
        msg: "the disk is full on {{ inventory_hostname }}"
      when: fail_here | default(false)
"""

INVENTORY = """\
all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  hosts:
    steady-host:
    drifting-host:
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("idempotence")
    (root / "play.yml").write_text(PLAYBOOK)
    (root / "hosts.yml").write_text(INVENTORY)
    (root / "ansible.cfg").write_text("[defaults]\nretry_files_enabled = False\n")
    return root


def check(project: Path, **kwargs) -> Idempotence:
    return second_run(project / "play.yml", project / "hosts.yml", project_dir=project, **kwargs)


# Each run takes seconds: one sequence, run once, shared by the tests below.
@pytest.fixture(scope="module")
def first(project: Path) -> Idempotence:
    return check(project)


@pytest.fixture(scope="module")
def again(project: Path, first: Idempotence) -> Idempotence:
    return check(project)


def test_a_first_run_names_every_changed_host_and_task(first: Idempotence) -> None:
    assert first.result.ok
    assert first.changed == {
        "drifting-host": ["Write the marker file", "Stamp the drifting host"],
        "steady-host": ["Write the marker file"],
    }
    assert first.exit_code == 1
    report = first.report()
    assert "not idempotent: 2 host(s) changed" in report
    assert "drifting-host (changed=2)" in report and "- Stamp the drifting host" in report
    assert str(first.result.artifacts) in report


def test_a_second_run_names_only_the_drifting_host(again: Idempotence) -> None:
    assert again.result.ok
    assert again.changed == {"drifting-host": ["Stamp the drifting host"]}
    assert again.result.hosts["steady-host"].changed == 0
    assert again.exit_code == 1
    named = again.report().split("events and stdout")[0]
    assert "drifting-host (changed=1)" in named and "steady-host" not in named


def test_the_command_line_passes_an_unchanged_host(project: Path, again: Idempotence) -> None:
    """``python -m morag_fleet.idempotence`` in the project with an environment of its own,
    as firstday runs it; -l and --tags reach the runner (the stamp task is not tagged)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    cmd = [sys.executable, "-m", "morag_fleet.idempotence", "-i", "hosts.yml", "play.yml"]
    out = subprocess.run(
        [*cmd, "-l", "steady-host", "--tags", "steady"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(
        "second run of play.yml -l steady-host --tags steady changed nothing (steady-host ok=2)"
    ), out.stdout


def test_a_failed_run_is_not_a_pass(project: Path, again: Idempotence) -> None:
    (project / "host_vars").mkdir()
    (project / "host_vars" / "steady-host.yml").write_text("fail_here: true\n")
    try:
        failed = check(project)
    finally:
        (project / "host_vars" / "steady-host.yml").unlink()
    assert failed.exit_code == 2
    assert "steady-host: failed in 'Fail where asked': the disk is full on steady-host" in (
        failed.report()
    )
