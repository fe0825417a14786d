"""The NFS export goes to the address a worker mounts from (its ansible_host), not to its
inventory name: runs the nfs_server role's client resolution with ansible-playbook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = """
- hosts: localhost
  gather_facts: false
  tasks:
    - ansible.builtin.import_role:
        name: nfs_server
        tasks_from: clients.yml
    - ansible.builtin.copy:
        content: "{{ nfs_server_clients_effective | to_json }}"
        dest: "{{ out }}"
        mode: "0600"
"""
INVENTORY = """
all:
  hosts:
    localhost:
      ansible_connection: local
  children:
    gpu_workers:
      hosts:
        gpu-01.example.com:
          ansible_host: 10.0.0.21
        gpu-02.example.com:
    cpu_workers:
      hosts:
        cpu-01.example.com:
          ansible_host: 10.0.0.31
"""


def resolve(tmp_path: Path, extra: dict) -> list[str]:
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    (tmp_path / "hosts.yml").write_text(INVENTORY)
    out = tmp_path / "clients.json"
    extra = {"out": str(out), **extra}
    env = dict(
        os.environ,
        ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_NOCOLOR="1",
    )
    ansible = Path(sys.executable).parent / "ansible-playbook"
    run = subprocess.run(
        [str(ansible), "-i", "hosts.yml", "play.yml", "-e", json.dumps(extra)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(out.read_text())


def test_hosts_are_exported_by_ansible_host(tmp_path):
    clients = resolve(
        tmp_path,
        {
            "nfs_server_client_hosts": [
                "gpu-01.example.com",
                "gpu-02.example.com",
                "cpu-01.example.com",
            ]
        },
    )
    # gpu-02 has no ansible_host: Ansible reaches it by name, so its name is what mounts.
    assert clients == ["10.0.0.21", "gpu-02.example.com", "10.0.0.31"]


def test_explicit_clients_come_first_and_are_not_repeated(tmp_path):
    clients = resolve(
        tmp_path,
        {
            "nfs_server_clients": ["10.0.1.0/24", "10.0.0.21"],
            "nfs_server_client_hosts": ["gpu-01.example.com"],
        },
    )
    assert clients == ["10.0.1.0/24", "10.0.0.21"]
