"""The server's monitoring: /metrics behind its bearer token, and the Prometheus installed by
the morag_monitoring role scraping it (skipped where that role installed no Prometheus)."""

from __future__ import annotations

import hashlib
import json
import shlex
import time

import pytest

ENV_FILE = "/etc/morag/morag.env"  # as in conftest.py
API_ENV_FILE = "/etc/morag/api.env"
TOKEN_FILE = "/etc/prometheus/morag-metrics-token"


def _http(host, url: str, auth: str | None = None, ca: str | None = None):
    """GET ``url`` from the host itself: (status, body text). ``auth``: None, or which secret
    of the host's env file to send (read there, so it never shows in a process list):
    ``metrics`` (Bearer MORAG_METRICS_TOKEN), ``api_key`` (X-API-Key), ``api_key_bearer``.
    ``ca``: the CA file an https:// URL is verified with (read as root)."""
    code = (
        "import json, ssl, urllib.request as u\n"
        f"ca = {ca!r}\n"
        "context = ssl.create_default_context(cafile=ca) if ca else None\n"
        f"auth, env = {auth!r}, {{}}\n"
        "if auth:\n"
        f"    for name in ({ENV_FILE!r}, {API_ENV_FILE!r}):\n"
        "        try:\n"
        "            lines = open(name).read().splitlines()\n"
        "        except FileNotFoundError:\n"
        "            lines = []\n"
        "        for line in lines:\n"
        "            k, _, v = line.strip().partition('=')\n"
        "            env[k] = v.strip('\"')\n"
        "key = env.get('MORAG_API_KEYS', '').split(',')[0]\n"
        "headers = {\n"
        "    None: {},\n"
        "    'metrics': {'Authorization': 'Bearer ' + env.get('MORAG_METRICS_TOKEN', '')},\n"
        "    'api_key': {'X-API-Key': key},\n"
        "    'api_key_bearer': {'Authorization': 'Bearer ' + key},\n"
        "}[auth]\n"
        f"req = u.Request({url!r}, headers=headers)\n"
        "try:\n"
        "    r = u.urlopen(req, timeout=10, context=context); status, body = r.status, r.read()\n"
        "except u.HTTPError as e:\n"
        "    status, body = e.code, e.read()\n"
        "print(json.dumps([status, body.decode(errors='replace')]))\n"
    )
    cmd = f"python3 -c {shlex.quote(code)}"
    if auth or ca:
        with host.sudo():
            out = host.run(cmd)
    else:
        out = host.run(cmd)
    assert out.rc == 0, out.stderr
    status, body = json.loads(out.stdout)
    return status, body


@pytest.fixture
def prometheus(server):
    if not server.var("morag_monitoring_prometheus_install", False):
        pytest.skip("no Prometheus installed by morag_monitoring on this server")
    address = server.var("morag_monitoring_prometheus_listen_address", "127.0.0.1:9090")
    return server, f"http://{address}"


def _query(server, base: str, expr: str) -> list:
    status, body = _http(server.host, f"{base}/api/v1/query?query={_quote(expr)}")
    assert status == 200, body
    return json.loads(body)["data"]["result"]


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _api_metrics_url(server) -> tuple[str, str | None]:
    """/metrics on the server and the CA that verifies it (None: plain HTTP)."""
    base, ca = server.api_base()
    return f"{base}/metrics", ca


def test_metrics_refuse_anything_but_the_bearer_token(server):
    env = server.api_env()
    url, ca = _api_metrics_url(server)
    status, _ = _http(server.host, url, ca=ca)
    if not env.get("MORAG_METRICS_TOKEN"):
        assert status == 404, "without MORAG_METRICS_TOKEN /metrics must be off"
        return
    assert status == 401
    if env.get("MORAG_API_KEYS"):
        for auth in ("api_key", "api_key_bearer"):
            status, _ = _http(server.host, url, auth, ca)
            assert status == 401, "an API key must not open /metrics"
    status, body = _http(server.host, url, "metrics", ca)
    assert status == 200 and "morag_workers" in body


def test_prometheus_running_on_its_address(prometheus):
    server, base = prometheus
    svc = server.host.service("prometheus")
    assert svc.is_enabled and svc.is_running
    status, _ = _http(server.host, f"{base}/-/ready")
    assert status == 200


def test_token_file_is_private_and_matches_the_api(prometheus):
    server, _ = prometheus
    with server.host.sudo():
        f = server.host.file(TOKEN_FILE)
        assert (f.user, f.group, f.mode) == ("root", "prometheus", 0o640)
        token = f.content_string.strip()
    expected = server.api_env().get("MORAG_METRICS_TOKEN", "")
    same = hashlib.sha256(token.encode()).digest() == hashlib.sha256(expected.encode()).digest()
    assert same and token, "Prometheus' token file differs from the API's MORAG_METRICS_TOKEN"


def test_alert_rules_loaded(prometheus):
    server, base = prometheus
    status, body = _http(server.host, f"{base}/api/v1/rules")
    assert status == 200, body
    rules = {r["name"]: r for g in json.loads(body)["data"]["groups"] for r in g["rules"]}
    expected = {"MoragMetricsDown", "MoragNoGpuWorker", "MoragGpuWorkerOnCpu", "MoragJobsStuck"}
    assert expected <= set(rules)
    assert all(r["health"] == "ok" for r in rules.values()), rules


def test_morag_series_arrive_in_prometheus(prometheus):
    server, base = prometheus
    deadline = time.monotonic() + 90
    while True:
        up = _query(server, base, 'up{job="morag"} == 1')
        workers = _query(server, base, 'morag_workers{queue="gpu-tasks"}')
        if (up and workers) or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert up, "Prometheus does not scrape the API (up{job='morag'} != 1)"
    assert {w["metric"]["device"] for w in workers} >= {"cpu", "cuda"}
    gpu_workers = sum(float(w["value"][1]) for w in workers)
    if server.vars.get("groups", {}).get("gpu_workers"):
        # The GPU workers' devices show in the gauge (cpu in the lab: no GPU there).
        assert gpu_workers >= 1, "no GPU worker in morag_workers"
    info = _query(server, base, 'morag_worker_info{kind="gpu"}')
    assert len(info) == int(gpu_workers)
    assert {i["metric"]["device"] for i in info} <= {"cpu", "cuda"}
    assert {d["metric"]["queue"] for d in _query(server, base, "morag_queue_depth")} == {
        "celery",
        "gpu-tasks",
        "morag-store",
    }
    assert _query(server, base, "morag_job_time_limit_seconds")
