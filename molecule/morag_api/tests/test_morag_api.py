"""morag_api: the hardened unit runs, /health answers, every other route needs the key."""

import json

import pytest


def curl(host, path, key=None):
    out = host.run(
        f'python3 -c "import sys,urllib.request as u\n'
        f"r=u.Request('http://127.0.0.1:8000{path}')\n"
        + (f"r.add_header('X-API-Key','{key}')\n" if key else "")
        + "try:\n  x=u.urlopen(r,timeout=10); print(x.status); print(x.read().decode())\n"
        'except u.HTTPError as e: print(e.code); print(e.read().decode())"'
    )
    assert out.rc == 0, out.stderr
    status, _, body = out.stdout.partition("\n")
    return int(status), body


def test_service_enabled_and_running(host):
    svc = host.service("morag-api")
    assert svc.is_enabled
    assert svc.is_running


def test_runs_as_service_user(host):
    pid = host.check_output("systemctl show -p MainPID --value morag-api")
    assert host.check_output(f"ps -o user= -p {pid}").strip() == "morag"


def test_unit_hardened(host):
    unit = host.check_output("systemctl cat morag-api")
    for option in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "EnvironmentFile=/etc/morag/morag.env",
    ):
        assert option in unit


def test_listens(host):
    assert host.socket("tcp://0.0.0.0:8000").is_listening


def test_health_without_key(host):
    status, _ = curl(host, "/health")
    assert status == 200


@pytest.mark.parametrize(
    "key,expected", [(None, {401, 403}), ("wrong", {401, 403}), ("molecule-api-key", {200})]
)
def test_workers_route_needs_key(host, key, expected):
    status, body = curl(host, "/api/v1/workers", key)
    assert status in expected
    if status == 200:
        json.loads(body)


def test_ready_sees_redis(host):
    status, body = curl(host, "/ready")
    assert status == 200, body


def test_secrets_not_in_process_list(host):
    args = host.check_output("ps -eo args")
    assert "molecule-api-key" not in args
    assert "molecule-redis-password" not in args
