"""The Prometheus alert rules and the Grafana dashboard in monitoring/.

The rules are checked by the real ``promtool`` (Debian's ``prometheus`` package, installed
by ``make test``): ``promtool check rules`` and ``promtool test rules`` with, for every
alert, a case that fires and one that does not. Whether the dashboard's queries use only
metrics a running API exports is checked against a live stack in
tests/integration/test_metrics.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "prometheus" / "morag-alerts.yml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "tests" / "morag-alerts.test.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "morag-fleet.json"
MONITORING_DOC = ROOT / "docs" / "monitoring.md"


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        # `make unit` / `make test` install Debian's prometheus: never skip there (or in CI).
        if os.environ.get("MORAG_REQUIRE_PROMETHEUS") or os.environ.get("CI"):
            pytest.fail("promtool is missing: run `make deps` (Debian package prometheus)")
        pytest.skip("promtool is not installed (Debian package prometheus; make deps)")
    return exe


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


def test_promtool_test_rules() -> None:
    out = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fires == set(), "alerts without a test case that fires"
    assert names - quiet == set(), "alerts without a test case that stays quiet"
    expected = {
        "MoragMetricsDown",
        "MoragNoGpuWorker",
        "MoragNoCpuWorker",
        "MoragGpuWorkerOnCpu",
        "MoragGpuIdleWhileBusy",
        "MoragQueueBacklog",
        "MoragJobsStuck",
        "MoragNoStoreWorker",
        "MoragGpuFallbackRateHigh",
        "MoragApiErrorRateHigh",
        "MoragMessagesDropped",
        "MoragRedisFailover",
        "MoragSubmissionsRefusedForReplicas",
        "MoragHaproxyBackendDown",
        "MoragHaproxyFewBackends",
    }
    assert names == expected


def test_every_alert_is_explained_in_the_docs() -> None:
    doc = MONITORING_DOC.read_text()
    for rule in alerts():
        name = rule["alert"]
        # runbook_url: the name Alertmanager templates and Grafana's alerting link from.
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        assert "runbook" not in rule["annotations"], f"{name}: `runbook` is now `runbook_url`"
        assert rule["annotations"]["runbook_url"] == f"docs/monitoring.md#{name.lower()}"
        assert re.search(rf"^### {name}$", doc, re.MULTILINE), f"docs/monitoring.md: {name}"
        assert rule["labels"]["severity"] in ("warning", "critical")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


def test_dashboard_structure() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "morag-fleet" and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            expr = target["expr"]
            assert "morag_" in expr or "haproxy_" in expr, f"{panel['title']}: {expr}"
    assert len(dashboard_queries()) >= 20


# A metric name and the label matchers that follow it, if any (not a function like rate).
SELECTOR = re.compile(r"\b((?:morag|process|python)_[a-z0-9_]+)\b(\{[^}]*\})?(?!\s*\()")
# HAProxy's own metrics (roles/haproxy): their scrape job is another one, $haproxy_job.
HAPROXY_SELECTOR = re.compile(r"\b(haproxy_[a-z0-9_]+)\b(\{[^}]*\})?(?!\s*\()")


def test_dashboard_keeps_fleets_apart_with_job_and_instance_variables() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    for name in ("job", "instance"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"]["uid"] == "${datasource}"
        assert not var.get("multi") and not var.get("includeAll"), (
            f"{name}: one at a time, or two fleets' numbers add up"
        )
    assert "$job" in variables["instance"]["query"]["query"]
    haproxy_job = variables["haproxy_job"]
    assert not haproxy_job.get("multi") and not haproxy_job.get("includeAll")
    for title, expr in dashboard_queries():
        if "haproxy_" in expr:
            for metric, matchers in HAPROXY_SELECTOR.findall(expr):
                assert 'job="$haproxy_job"' in matchers and 'proxy="morag_api"' in matchers, (
                    f"{title}: {metric} is not filtered by $haproxy_job and the API backend"
                )
            continue
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{title}: no metric in {expr}"
        for metric, matchers in selectors:
            assert 'job="$job"' in matchers and 'instance="$instance"' in matchers, (
                f"{title}: {metric} is not filtered by $job and $instance: {expr}"
            )


def test_dashboard_has_an_api_row() -> None:
    board = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in board["panels"]]
    assert "API" in titles
    row = titles.index("API")
    api = board["panels"][row + 1 : row + 6]
    queries = " ".join(t["expr"] for p in api for t in p.get("targets", []))
    for needed in (
        "morag_http_requests_total",  # request rate, 5xx rate
        "morag_http_request_duration_seconds_bucket",  # p95 latency
        "morag_http_requests_inprogress",  # in flight
        'status=~"5.."',
    ):
        assert needed in queries, needed
    assert "histogram_quantile(0.95" in queries


def test_dashboard_has_a_high_availability_row() -> None:
    """docs/ha.md: the panels that show a failover and its cost, beside the alerts."""
    board = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in board["panels"]]
    assert "High availability" in titles
    row = titles.index("High availability")
    ha = board["panels"][row + 1 :]
    queries = " ".join(t["expr"] for p in ha for t in p["targets"])
    for needed in (
        "morag_redis_primary_info",
        "morag_redis_primary_changes_total",
        "morag_redis_connection_errors_total",
        "morag_submissions_refused_total",
        "haproxy_backend_active_servers",
        "haproxy_server_status",
    ):
        assert needed in queries, needed
    ha_doc = (ROOT / "docs" / "ha.md").read_text()
    for panel in ha:
        assert f"**{panel['title']}**" in ha_doc, f"docs/ha.md does not explain {panel['title']}"
