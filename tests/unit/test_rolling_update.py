"""playbooks/rolling_update.yml: an 8-GPU host drains in one go, and reboots before any start.

Issue 8, item 12. The site scenario runs the play over the lab's GPU hosts (one instance
each, no reboot in containers); these tests run the real ansible-playbook for what that
cannot show: the drain against a host with eight instances (a stand-in `systemctl` records
its calls), and the order Ansible itself gives the tasks, imported roles included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAY = ROOT / "playbooks" / "rolling_update.yml"
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)

pytestmark = pytest.mark.skipif(ANSIBLE is None, reason="ansible-playbook not installed")


def playbook(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [
            str(ANSIBLE),
            "-i",
            "localhost,",
            "-c",
            "local",
            str(PLAY),
            "-e",
            "morag_update_group=all",
            *args,
        ],
        cwd=ROOT,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_all_instances_of_a_host_are_stopped_by_one_systemctl_call(tmp_path: Path) -> None:
    config = tmp_path / "etc"
    config.mkdir()
    ids = [str(i) for i in range(8)] + ["0-mig1"]
    for instance in ids:
        (config / f"worker-{instance}.env").write_text("MORAG_DEVICE=cuda\n")
    (config / "morag.env").write_text("")  # not a worker instance
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    playbook(
        "--tags",
        "drain",
        "--skip-tags",
        "always",
        "-e",
        f"morag_worker_config_dir={config}",
        "-e",
        "ansible_become=false",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        env=env,
    )
    lines = calls.read_text().splitlines()
    assert len(lines) == 1, lines
    words = lines[0].split()
    assert words[:2] == ["stop", "--"]
    assert sorted(words[2:]) == sorted(f"morag-worker@{i}.service" for i in ids)


def test_the_reboot_comes_after_the_updates_and_before_any_worker_starts() -> None:
    listed = playbook("--list-tasks").stdout.splitlines()
    tasks = [line.strip() for line in listed if line.startswith("      ") and line.strip()]

    def index(predicate) -> list[int]:
        return [i for i, task in enumerate(tasks) if predicate(task)]

    drain = index(lambda t: t.startswith("Drain, stop every worker instance"))
    reboot = index(lambda t: t.startswith("Reboot before the workers start again"))
    updates = index(lambda t: t.split(" : ")[0] in ("nvidia_driver", "morag_app", "cuda_runtime"))
    workers = index(lambda t: t.split(" : ")[0] == "morag_worker")
    started = index(lambda t: t.startswith("Make sure the worker instances run again"))
    assert len(drain) == len(reboot) == len(started) == 1 and updates and workers, tasks
    assert drain[0] < min(updates)
    assert max(updates) < reboot[0] < min(workers) <= max(workers) < started[0]
