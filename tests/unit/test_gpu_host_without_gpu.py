"""A gpu_workers host where no GPU is found (issue 22 item 1).

It used to get one CPU worker on celery with a warning that scrolled by, and verify.yml
passed: on a real fleet that is a GPU host whose driver broke, and the fleet shrank without
a word. Now the morag_worker role fails that host naming the cause and the variable (the
CPU worker only when morag_worker_cpu_fallback asks for it), and verify.yml fails for a
gpu_workers host that runs no worker on gpu-tasks.

Both run for real on this machine (local connection; it has no GPU).
"""

from __future__ import annotations

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

PREFLIGHT = """
- name: The morag_worker preflight on a host without a GPU
  hosts: cases
  gather_facts: true
  tasks:
    - name: The role's preflight, as a GPU worker host runs it
      ansible.builtin.include_role:
        name: morag_worker
        tasks_from: preflight
      vars:
        morag_worker_mode: gpu
        morag_worker_config_dir: "{{ out_dir }}/{{ inventory_hostname }}"
"""


def playbook(tmp: Path, hosts: dict[str, dict], *args: str) -> str:
    if ANSIBLE is None:
        pytest.skip("ansible-playbook is not installed")
    for host in hosts.values():
        host |= {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"all": {"children": {"cases": {"hosts": hosts}, "gpu_workers": {"hosts": hosts}}}}
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    # Outside the repository: its ansible.cfg wants a vault password and an inventory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env |= {"ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_LOCALHOST_WARNING": "false"}
    done = subprocess.run(
        [ANSIBLE, "-i", str(tmp / "hosts.yml"), *args, "-e", f"out_dir={tmp}"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.stdout + done.stderr


def test_the_role_fails_a_gpu_host_without_a_gpu_unless_a_cpu_worker_is_asked_for(
    tmp_path: Path,
) -> None:
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU")
    (tmp_path / "pb.yml").write_text(PREFLIGHT)
    output = playbook(
        tmp_path,
        {"strict": {}, "fallback": {"morag_worker_cpu_fallback": True}},
        str(tmp_path / "pb.yml"),
    )
    assert "fatal: [strict]: FAILED!" in output, output
    assert "strict is a GPU worker host (morag_worker_mode gpu) but no usable NVIDIA GPU" in output
    assert "set morag_worker_cpu_fallback: true in its host_vars" in output
    # The opt-in host goes past that check, with the warning instead.
    assert "fallback is a GPU worker host" not in output
    assert "running one CPU worker on the celery queue instead" in output


def test_verify_fails_a_gpu_host_that_runs_no_gpu_worker(tmp_path: Path) -> None:
    config = tmp_path / "etc"
    config.mkdir()
    # What the role writes for a CPU fallback worker: one instance, on celery only.
    (config / "worker-0.env").write_text(
        "MORAG_WORKER_NAME=cpu0@fallback\nMORAG_WORKER_QUEUE_ARGS=--queue celery\n"
    )
    output = playbook(
        tmp_path,
        {"fallback": {"morag_app_config_dir": str(config), "morag_worker_cpu_fallback": True}},
        str(ROOT / "playbooks" / "verify.yml"),
    )
    assert "fatal: [fallback]" in output, output
    assert "fallback is in gpu_workers but runs no GPU worker" in output, output
    assert "morag_worker_cpu_fallback made it a CPU worker" in output


def test_the_example_inventory_does_not_opt_in() -> None:
    example = yaml.safe_load((ROOT / "inventory/example/group_vars/gpu_workers.yml").read_text())
    assert example.get("morag_worker_cpu_fallback", False) is False
