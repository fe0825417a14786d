"""roles/morag_monitoring's Prometheus configuration, rendered with the role's template by
`ansible-playbook` (local connection) and checked by the real `promtool check config`: the
HAProxy scrape job (docs/ha.md) is there only when morag_monitoring_haproxy_targets lists
entry hosts, under the job name the dashboard and the MoragHaproxy* alerts read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.test_alert_rules import promtool

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "morag_monitoring"
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)

PLAYBOOK = f"""
- name: Render the role's prometheus.yml
  hosts: localhost
  gather_facts: false
  vars_files:
    - {ROLE}/defaults/main.yml
    - {ROLE}/vars/main.yml
  tasks:
    - name: Write it with and without HAProxy targets
      ansible.builtin.template:
        src: {ROLE}/templates/prometheus.yml.j2
        dest: "{{{{ out_dir }}}}/{{{{ item.name }}}}.yml"
        mode: "0644"
      vars:
        morag_monitoring_prometheus_install: true
        morag_monitoring_prometheus_config_dir: "{{{{ out_dir }}}}"
        morag_monitoring_haproxy_targets: "{{{{ item.targets }}}}"
      loop:
        - {{name: plain, targets: []}}
        - {{name: ha, targets: ["10.0.0.41:8405", "10.0.0.42:8405"]}}
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if ANSIBLE is None:
        pytest.skip("ansible-playbook is not installed")
    tmp = tmp_path_factory.mktemp("monitoring-config")
    (tmp / "pb.yml").write_text(PLAYBOOK)
    (tmp / "morag-metrics-token").write_text("token\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env |= {"ANSIBLE_LOCALHOST_WARNING": "false", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false"}
    done = subprocess.run(
        [
            ANSIBLE,
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"out_dir={tmp} ansible_python_interpreter={sys.executable}",
            str(tmp / "pb.yml"),
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp


def _jobs(path: Path) -> dict[str, dict]:
    return {job["job_name"]: job for job in yaml.safe_load(path.read_text())["scrape_configs"]}


def test_haproxy_targets_get_a_scrape_job_of_their_own(rendered: Path) -> None:
    assert "morag_haproxy" not in _jobs(rendered / "plain.yml")
    job = _jobs(rendered / "ha.yml")["morag_haproxy"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["10.0.0.41:8405", "10.0.0.42:8405"]}]
    assert "authorization" not in job  # HAProxy's exporter has no token (roles/haproxy)


@pytest.mark.parametrize("name", ["plain", "ha"])
def test_promtool_accepts_the_configuration(rendered: Path, name: str) -> None:
    out = subprocess.run(
        [promtool(), "check", "config", "--syntax-only", str(rendered / f"{name}.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
