"""Prometheus as morag_monitoring installs it: running and answering, its configuration and
the repository's alert rules accepted by the host's own promtool (and the rules' unit tests
passing against the deployed file), the targets the role's variables list, the token file
working, the service's hardening in effect, and a wrong variable refused before any change."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "tests" / "morag-alerts.test.yml"
RULES = "/etc/prometheus/rules/morag-alerts.yml"
TEST_COPY = "/root/rule-tests/morag-alerts.test.yml"
CONFIG = "/etc/prometheus/prometheus.yml"
TOKEN_FILE = "/etc/prometheus/morag-metrics-token"
BASE = "http://127.0.0.1:9090"
# What converge.yml sets: job -> instances.
TARGETS = {
    "morag": {"127.0.0.1:8000", "127.0.0.1:8001"},
    "prometheus": {"127.0.0.1:9090"},
    "node": {"127.0.0.1:9100"},
}


def api(host, path: str) -> dict:
    """GET Prometheus' HTTP API from inside the container (it listens on its loopback)."""
    code = (
        "import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=5).read().decode())"
    )
    out = host.run(f"python3 -c '{code}' '{BASE}{path}'")
    assert out.rc == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["status"] == "success", body
    return body["data"]


def wait_until(check, timeout: float = 60.0, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_prometheus_enabled_running_and_ready(host):
    svc = host.service("prometheus")
    assert svc.is_enabled and svc.is_running
    assert host.socket("tcp://127.0.0.1:9090").is_listening
    assert not host.socket("tcp://0.0.0.0:9090").is_listening
    ready = host.run(
        f"python3 -c 'import urllib.request as u; print(u.urlopen(\"{BASE}/-/ready\").status)'"
    )
    assert ready.stdout.strip() == "200", ready.stderr
    # The command line from /etc/default/prometheus (the role's retention, not the default).
    flags = api(host, "/api/v1/status/flags")
    assert flags["storage.tsdb.retention.time"] == "2d"
    assert flags["web.listen-address"] == "127.0.0.1:9090"


def test_promtool_accepts_the_deployed_configuration_and_rules(host):
    with host.sudo():
        config = host.run(f"promtool check config {CONFIG}")
        rules = host.run(f"promtool check rules {RULES}")
    assert config.rc == 0, config.stdout + config.stderr
    assert rules.rc == 0, rules.stdout + rules.stderr
    assert "SUCCESS" in rules.stdout


def test_the_rule_unit_tests_pass_against_the_deployed_rules(host):
    """The repository's promtool rule tests, pointed at the file the role installed."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = [RULES]
    body = base64.b64encode(yaml.safe_dump(tests).encode()).decode()
    with host.sudo():
        put = host.run(f"mkdir -p /root/rule-tests && echo {body} | base64 -d > {TEST_COPY}")
        assert put.rc == 0, put.stderr
        out = host.run(f"promtool test rules {TEST_COPY}")
    assert out.rc == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_rules_are_loaded(host):
    groups = api(host, "/api/v1/rules")["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
    deployed = yaml.safe_load(host.file(RULES).content_string)["groups"]
    names = {r["alert"] for g in deployed for r in g["rules"] if "alert" in r}
    assert names and names == loaded


def test_scrape_targets_are_the_ones_the_variables_list(host):
    active = api(host, "/api/v1/targets")["activeTargets"]
    found: dict[str, set[str]] = {}
    for t in active:
        found.setdefault(t["labels"]["job"], set()).add(t["labels"]["instance"])
    assert found == TARGETS
    morag = [t for t in active if t["labels"]["job"] == "morag"]
    assert {t["scrapeUrl"] for t in morag} == {f"http://{i}/metrics" for i in TARGETS["morag"]}
    managers = api(host, "/api/v1/alertmanagers")["activeAlertmanagers"]
    assert [m["url"] for m in managers] == ["http://127.0.0.1:9093/api/v2/alerts"]


def test_the_token_file_opens_the_api(host):
    """The stand-in answers only the role's bearer token: up means Prometheus, as its own
    sandboxed user, read the root:prometheus 0640 file."""
    token = host.file(TOKEN_FILE)
    with host.sudo():
        assert (token.user, token.group, token.mode) == ("root", "prometheus", 0o640)

    def health() -> str | None:
        active = api(host, "/api/v1/targets")["activeTargets"]
        return next(
            (
                t["health"]
                for t in active
                if t["labels"]["instance"] == "127.0.0.1:8000" and t["health"] == "up"
            ),
            None,
        )

    assert wait_until(health) == "up", api(host, "/api/v1/targets")
    data = api(host, "/api/v1/query?query=morag_workers")
    assert [r["value"][1] for r in data["result"]] == ["1"]


@pytest.mark.parametrize(
    ("prop", "value"),
    [
        ("User", "prometheus"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("PrivateUsers", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectSystem", "full"),
        ("ProtectHome", "yes"),
        ("RestrictNamespaces", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
    ],
)
def test_the_unit_is_sandboxed(host, prop, value):
    """Debian's unit carries the sandboxing (the role adds no drop-in): nothing the role
    writes may undo it, in containers included."""
    assert host.run(f"systemctl show -P {prop} prometheus").stdout.strip() == value


def test_the_sandbox_is_in_effect_on_the_process(host):
    pid = host.run("systemctl show -P MainPID prometheus").stdout.strip()
    status = host.file(f"/proc/{pid}/status").content_string
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    with host.sudo():
        uid_map = host.file(f"/proc/{pid}/uid_map").content_string.split()
    # PrivateUsers: a user namespace mapping only root and the service's own user.
    assert len(uid_map) == 6 and uid_map[0] == "0", uid_map


def run_role(tmp_path: Path, variables: dict) -> subprocess.CompletedProcess:
    """The role with ``variables`` against this scenario's instance, as molecule runs it."""
    play = [{"name": "Wrong variable", "hosts": "all", "become": True,
             "roles": [{"role": "morag_monitoring", "vars": variables}]}]  # fmt: skip
    playbook = tmp_path / "wrong.yml"
    playbook.write_text(yaml.safe_dump(play))
    return subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(playbook)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        # argument_specs: before any task.
        ({"morag_monitoring_api_scheme": "ftp"}, "morag_monitoring_api_scheme must be one of"),
        # preflight: installing without the API's token.
        (
            {"morag_monitoring_prometheus_install": True, "morag_monitoring_metrics_token": ""},
            "needs morag_monitoring_metrics_token",
        ),
    ],
)
def test_a_wrong_variable_fails_before_any_change(host, tmp_path, variables, message):
    before = host.file(CONFIG).md5sum
    out = run_role(tmp_path, variables)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert message in " ".join(text.split()), text[-3000:]
    assert "changed=0" in text, text[-3000:]
    assert host.file(CONFIG).md5sum == before
