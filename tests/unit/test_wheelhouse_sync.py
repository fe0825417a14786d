"""The morag_app role's wheelhouse sync: only missing or changed wheels are copied.

The copy looped over every wheel of the wheelhouse with a per-item condition that templated
the host's whole list again for each item: with 111 wheels, 25 s per host on every run,
copying nothing (the lab's second site.yml, read from ansible-runner's events). The role now
lists what to copy once. These tests run the role's own tasks (taken from
roles/morag_app/tasks/install.yml by name) in a real ansible-playbook on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)
TASKS = [
    "Find the wheels of the wheelhouse on the controller",
    "Find the wheels already on the host",
    "List the wheels that are missing on the host or differ",
    "Copy the wheels that are missing on the host or differ",
]

pytestmark = pytest.mark.skipif(ANSIBLE is None, reason="ansible-playbook is not installed")


def role_tasks() -> list[dict]:
    tasks = yaml.safe_load((ROOT / "roles/morag_app/tasks/install.yml").read_text())
    by_name = {t.get("name"): t for t in tasks}
    missing = [n for n in TASKS if n not in by_name]
    assert not missing, f"tasks no longer in install.yml: {missing}"
    picked = [dict(by_name[n]) for n in TASKS]
    for task in picked:
        # Local connection, as the test's own user: no root ownership, no delegation.
        task.pop("delegate_to", None)
        task.pop("become", None)
        if "ansible.builtin.copy" in task:
            copy = task["ansible.builtin.copy"]
            task["ansible.builtin.copy"] = {
                k: v for k, v in copy.items() if k not in ("owner", "group")
            }
    return picked


def sync(tmp_path: Path, source: Path, host_dir: Path) -> dict:
    """One run; returns the copy task's result (JSON callback)."""
    playbook = [
        {
            "name": "Sync the wheelhouse",
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {
                "morag_app_source": "wheelhouse",
                "morag_app_wheelhouse_dir": str(source),
                "_morag_app_wheelhouse_remote_dir": str(host_dir),
            },
            "tasks": role_tasks(),
        }
    ]
    path = tmp_path / "sync.yml"
    path.write_text(yaml.safe_dump(playbook, sort_keys=False))
    env = dict(
        os.environ,
        ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
    )
    out = subprocess.run(
        [
            ANSIBLE,
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(path),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads(out.stdout)
    tasks = report["plays"][0]["tasks"]
    copy = next(t for t in tasks if t["task"]["name"] == TASKS[-1])
    return copy["hosts"]["localhost"]


def copied(result: dict) -> list[str]:
    return sorted(Path(r["dest"]).name for r in result.get("results", []) if r.get("changed"))


def test_only_missing_or_changed_wheels_are_copied(tmp_path: Path) -> None:
    source, host = tmp_path / "controller", tmp_path / "host"
    source.mkdir()
    host.mkdir()
    names = [f"pkg{i}-1.0-py3-none-any.whl" for i in range(12)]
    for name in names:
        (source / name).write_bytes(name.encode() * 50)
    (source / "README").write_text("not a wheel")

    first = sync(tmp_path, source, host)
    assert copied(first) == sorted(names)
    assert sorted(p.name for p in host.iterdir()) == sorted(names)

    second = sync(tmp_path, source, host)
    assert second.get("results", []) == [], "a second run went through wheels it had"
    assert not second.get("changed")

    # One wheel changed on the controller, one removed from the host, one new: those three.
    (source / names[3]).write_bytes(b"rebuilt")
    (host / names[7]).unlink()
    (source / "new-2.0-py3-none-any.whl").write_bytes(b"new")
    third = sync(tmp_path, source, host)
    assert copied(third) == sorted([names[3], names[7], "new-2.0-py3-none-any.whl"])
    assert (host / names[3]).read_bytes() == b"rebuilt"
