"""roles/haproxy's preflight and its keepalived configuration (issue 19 item 3).

The role's preflight runs for real (ansible-playbook, local connection, one host per case):
the API hosts it sends requests to come from the inventory (the `api` group, else `server`,
by ansible_host and morag_api_port), and a setting that cannot work fails with a message that
names the variable to change. The keepalived configuration is rendered with the role's
template for two entry hosts that share a floating address, and checked with
`keepalived --config-test` where keepalived is installed. HAProxy's own configuration is
rendered, checked and run in tests/integration/test_haproxy.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "haproxy"
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)
KEEPALIVED = shutil.which("keepalived", path=f"/usr/sbin{os.pathsep}{os.environ['PATH']}")

# Each case is a host of one run: name -> its variables (the CA directory is filled in).
CASES: dict[str, dict[str, Any]] = {
    "from_api": {},
    "from_server": {"haproxy_api_groups": ["nope", "server"]},
    "listed": {"haproxy_api_backends": [{"name": "a", "address": "10.1.0.1", "port": 9000}]},
    "no_backends": {"haproxy_api_groups": ["nope"]},
    "no_ca": {"haproxy_tls_ca_dir": "{{ out_dir }}/empty"},
    "given_missing": {
        "haproxy_tls_certificates": "given",
        "haproxy_tls_cert_file": "{{ out_dir }}/absent.pem",
    },
    "given_empty": {"haproxy_tls_certificates": "given", "haproxy_tls_cert_file": ""},
    "passthrough_given": {"haproxy_tls_mode": "passthrough", "haproxy_tls_certificates": "given"},
    "bad_mode": {"haproxy_tls_mode": "offload"},
    "bad_timeout": {"haproxy_timeout_client": "30 seconds"},
    "bad_backend": {"haproxy_api_backends": [{"name": "a", "address": "10.1.0.1", "port": 0}]},
    "bad_metrics": {
        "haproxy_metrics_enabled": True,
        "haproxy_metrics_port": 443,
        "haproxy_metrics_path": "metrics",
    },
    "metrics_off_ignored": {"haproxy_metrics_port": 0},
}

PLAYBOOK = f"""
- name: The role's preflight, per case
  hosts: cases
  gather_facts: false
  tasks:
    - name: Run the preflight as an entry host does
      ansible.builtin.include_role:
        name: haproxy
        tasks_from: preflight
        public: true

    - name: Report the API hosts
      ansible.builtin.debug:
        msg: "{{{{ haproxy_api_backends | to_json }}}}"

- name: The floating address of two entry hosts
  hosts: haproxy
  gather_facts: false
  vars:
    haproxy_keepalived_vip: 10.0.0.100/24
  tasks:
    - name: Run the preflight as an entry host does
      ansible.builtin.include_role:
        name: haproxy
        tasks_from: preflight
        public: true

    - name: Write keepalived.conf with the role's template
      ansible.builtin.template:
        src: {ROLE}/templates/keepalived.conf.j2
        dest: "{{{{ out_dir }}}}/{{{{ inventory_hostname }}}}-keepalived.conf"
        mode: "0644"
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    """One ansible-playbook run over every case: each host's task results, by task name."""
    if ANSIBLE is None:
        pytest.skip("ansible-playbook is not installed")
    tmp = tmp_path_factory.mktemp("haproxy-role")
    ca = tmp / "ca"
    ca.mkdir()
    (tmp / "empty").mkdir()
    for name in ("ca.crt", "ca.key"):  # the preflight only checks that they exist
        (ca / name).write_text("")
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {
        "all": {
            "vars": {**local, "out_dir": str(tmp), "haproxy_tls_ca_dir": str(ca)},
            "children": {
                "api": {
                    "hosts": {
                        "api-1": {"ansible_host": "10.0.0.11"},
                        "api-2": {"ansible_host": "10.0.0.12", "morag_api_port": 8443},
                    }
                },
                "server": {"hosts": {"srv": {"ansible_host": "10.0.0.5"}}},
                "cases": {"hosts": CASES},
                "haproxy": {
                    "hosts": {
                        "lb-1": {"ansible_host": "10.0.0.21"},
                        "lb-2": {"ansible_host": "10.0.0.22"},
                    }
                },
            },
        }
    }
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp / "pb.yml").write_text(PLAYBOOK)
    # Outside the repository: its ansible.cfg wants a vault password and an inventory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env |= {
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
        "ANSIBLE_FORKS": "12",
    }
    done = subprocess.run(
        [ANSIBLE, "-i", str(tmp / "hosts.yml"), str(tmp / "pb.yml")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(done.stdout)
    results: dict[str, dict[str, Any]] = {}
    for play in report["plays"]:
        for task in play["tasks"]:
            for host, result in task["hosts"].items():
                results.setdefault(host, {})[task["task"]["name"]] = result
    return tmp, results


def failure(run: tuple[Path, dict[str, dict[str, Any]]], case: str) -> str:
    """The message of the task that failed for this case."""
    failed = [r for r in run[1][case].values() if r.get("failed")]
    assert failed, f"{case} did not fail: {run[1][case]}"
    # A loop's failure is in its failed item.
    result = next((i for i in failed[0].get("results", []) if i.get("failed")), failed[0])
    return " ".join(str(result.get("msg", result)).split())


def backends(run: tuple[Path, dict[str, dict[str, Any]]], case: str) -> list[dict[str, Any]]:
    result = run[1][case]["Report the API hosts"]
    assert not result.get("failed"), result
    return json.loads(result["msg"])


def test_the_api_hosts_come_from_the_api_group_by_address_and_port(run) -> None:
    assert backends(run, "from_api") == [
        {"name": "api-1", "address": "10.0.0.11", "port": 8000},
        {"name": "api-2", "address": "10.0.0.12", "port": 8443},
    ]


def test_without_an_api_group_the_server_group_is_used(run) -> None:
    assert backends(run, "from_server") == [{"name": "srv", "address": "10.0.0.5", "port": 8000}]


def test_listed_api_hosts_replace_the_inventory(run) -> None:
    assert backends(run, "listed") == [{"name": "a", "address": "10.1.0.1", "port": 9000}]


def test_no_api_host_fails_naming_the_variable_and_the_groups(run) -> None:
    message = failure(run, "no_backends")
    assert "haproxy_api_backends is empty" in message
    assert "haproxy_api_groups" in message and "nope" in message


def test_terminate_without_the_ca_fails_saying_where_it_comes_from(run) -> None:
    message = failure(run, "no_ca")
    assert "empty/ca.crt and" in message and "empty/ca.key" in message
    assert "roles/morag_api" in message
    assert "haproxy_tls_certificates: given" in message


@pytest.mark.parametrize("case", ["given_missing", "given_empty"])
def test_terminate_with_a_given_certificate_that_is_not_there_fails(run, case: str) -> None:
    message = failure(run, case)
    assert "haproxy_tls_cert_file" in message
    assert "haproxy_tls_certificates: role" in message


def test_passthrough_needs_no_frontend_certificate(run) -> None:
    assert backends(run, "passthrough_given")


def test_bad_settings_fail_naming_them(run) -> None:
    assert "haproxy_tls_mode must be `terminate` or `passthrough`" in failure(run, "bad_mode")
    assert "haproxy_timeout_client" in failure(run, "bad_timeout")
    assert "port (1-65535)" in failure(run, "bad_backend")
    message = failure(run, "bad_metrics")
    assert "haproxy_metrics_port must be 1-65535 and differ from haproxy_port" in message
    assert "(got 443 and 443)" in message and "(got metrics)" in message
    # Only checked where the metrics frontend is on.
    assert backends(run, "metrics_off_ignored")


def keepalived_conf(run: tuple[Path, dict[str, dict[str, Any]]], host: str) -> str:
    path = run[0] / f"{host}-keepalived.conf"
    assert path.exists(), run[1][host]
    return path.read_text()


def default_route_interface() -> str | None:
    done = subprocess.run(
        ["ip", "-o", "route", "show", "default"], capture_output=True, text=True, check=False
    )
    fields = done.stdout.split()
    return fields[fields.index("dev") + 1] if "dev" in fields else None


def test_two_entry_hosts_share_the_floating_address_by_unicast_vrrp(run) -> None:
    # No haproxy_keepalived_interface: the default route's, from the host's facts.
    device = default_route_interface()
    if device is None:
        pytest.skip("this machine has no default route")
    first, second = keepalived_conf(run, "lb-1"), keepalived_conf(run, "lb-2")
    for conf, me, peer in ((first, "10.0.0.21", "10.0.0.22"), (second, "10.0.0.22", "10.0.0.21")):
        assert f"10.0.0.100/24 dev {device}" in conf
        assert f"interface {device}" in conf
        assert f"unicast_src_ip {me}" in conf
        assert f"unicast_peer {{\n        {peer}\n    }}" in conf
        assert "virtual_router_id 51" in conf
        # HAProxy's check: the address leaves a host whose HAProxy is not running.
        assert "systemctl is-active --quiet haproxy.service" in conf
        assert "track_script {\n        chk_haproxy" in conf
    # The first host of the group holds the address while it can.
    assert "priority 150" in first and "priority 140" in second


def test_the_keepalived_configuration_passes_keepalived_config_test(run) -> None:
    if KEEPALIVED is None:
        pytest.skip("keepalived is not installed (the role installs it where it is used)")
    for host in ("lb-1", "lb-2"):
        conf = run[0] / f"{host}-keepalived.conf"
        done = subprocess.run(
            [KEEPALIVED, "--config-test", "-f", str(conf)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
