"""The worker unit's IPAddressAllow= opens loopback only where a worker needs it (issue 18
item 6): for yt-dlp's policy proxy on 127.0.0.1 where yt-dlp is installed, or when a host
the worker must reach (Redis, the API) resolves to a loopback address. It used to allow
127.0.0.1 always, so any worker could reach every loopback service of its host.

roles/morag_worker/templates/morag-worker@.service.j2 is rendered by ansible-playbook with
the role's defaults and vars; the stat of yt-dlp and the getent answers (preflight.yml)
are given as the values those tasks register."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "morag_worker"
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)

CASES = {
    # A CPU worker with the audio extra only, its Redis and API on the server.
    "no_ytdlp": {"ytdlp": False, "resolved": ["10.0.0.5      STREAM redis.lan"]},
    "ytdlp": {"ytdlp": True, "resolved": ["10.0.0.5      STREAM redis.lan"]},
    # Redis on the same host, named "localhost" in the inventory.
    "local_redis": {"ytdlp": False, "resolved": ["127.0.0.1       STREAM localhost"]},
}

PLAYBOOK = f"""
- name: Render the worker unit
  hosts: localhost
  connection: local
  gather_facts: false
  vars_files:
    - {ROLE}/defaults/main.yml
    - {ROLE}/vars/main.yml
  tasks:
    - name: Render one unit per case
      ansible.builtin.template:
        src: {ROLE}/templates/morag-worker@.service.j2
        dest: "{{{{ out_dir }}}}/{{{{ item.key }}}}.service"
        mode: "0644"
      loop: "{{{{ cases | dict2items }}}}"
      vars:
        morag_worker_mode: cpu
        ansible_facts: {{dns: {{nameservers: [10.0.0.1]}}}}
        # What preflight.yml registers: the stat of yt-dlp and getent ahosts' answers.
        _morag_worker_ytdlp: {{stat: {{exists: "{{{{ item.value.ytdlp }}}}"}}}}
        _morag_worker_ip_allow_lookup:
          results: [{{stdout_lines: "{{{{ item.value.resolved }}}}"}}]
"""


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]]]:
    if ANSIBLE is None:
        pytest.skip("ansible-playbook is not installed")
    tmp = tmp_path_factory.mktemp("worker-unit")
    (tmp / "render.yml").write_text(PLAYBOOK)
    (tmp / "cases.json").write_text(json.dumps({"cases": CASES, "out_dir": str(tmp)}))
    args = [ANSIBLE, "-i", "localhost,", str(tmp / "render.yml"), "-e", f"@{tmp / 'cases.json'}"]
    args += ["-e", f"ansible_python_interpreter={sys.executable}"]
    # Run outside the repository: its ansible.cfg wants a vault password and an inventory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env["ANSIBLE_LOCALHOST_WARNING"] = "false"
    done = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rendered = {}
    for name in CASES:
        service: dict[str, list[str]] = {}
        for line in (tmp / f"{name}.service").read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                service.setdefault(key, []).append(value)
        rendered[name] = service
    return rendered


def test_a_worker_without_yt_dlp_cannot_reach_loopback(units: dict) -> None:
    unit = units["no_ytdlp"]
    assert "localhost" in unit["IPAddressDeny"][0].split()
    allowed = unit["IPAddressAllow"][0].split()
    assert allowed == ["10.0.0.5", "10.0.0.1"]
    assert not any(a.startswith("127.") or a in ("::1", "localhost") for a in allowed)


def test_a_worker_with_yt_dlp_reaches_its_policy_proxy_on_127_0_0_1(units: dict) -> None:
    assert "127.0.0.1" in units["ytdlp"]["IPAddressAllow"][0].split()


def test_a_redis_on_the_same_host_is_allowed_by_its_address(units: dict) -> None:
    assert units["local_redis"]["IPAddressAllow"][0].split() == ["127.0.0.1", "10.0.0.1"]
