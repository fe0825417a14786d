"""morag_api: the hardened unit runs, /health answers, every other route needs the key."""

import json

import pytest

# converge.yml binds 0.0.0.0: the role serves HTTPS with its own CA (issue 18 item 5).
CA = "/etc/morag/api-tls/ca.crt"


def curl(host, path, key=None):
    out = host.run(
        f'python3 -c "import ssl,sys,urllib.request as u\n'
        f"r=u.Request('https://127.0.0.1:8000{path}')\n"
        + (f"r.add_header('X-API-Key','{key}')\n" if key else "")
        + f"c=ssl.create_default_context(cafile='{CA}')\n"
        + "try:\n  x=u.urlopen(r,timeout=10,context=c); print(x.status); print(x.read().decode())\n"
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
    assert host.check_output(f"ps -o user= -p {pid}").strip() == "morag-api"


def test_unit_hardened(host):
    unit = host.check_output("systemctl cat morag-api")
    for option in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "EnvironmentFile=/etc/morag/morag.env",
    ):
        assert option in unit


def test_tls_files_and_limits(host):
    key = host.file("/etc/morag/api-tls/api.key")
    # Its own user (morag_app_identities: [api]) reads it; the workers' group does not.
    assert (key.user, key.group, key.mode) == ("root", "morag-api", 0o640)
    unit = host.check_output("systemctl cat morag-api")
    assert "MORAG_API_TLS_CERT_FILE=/etc/morag/api-tls/api.crt" in unit
    assert "LimitNOFILE=65536" in unit
    # systemd sets LimitNOFILE as close as it may: a container without CAP_SYS_RESOURCE
    # caps it at its own hard limit (PID 1's); a real host gets 65536.
    pid = host.check_output("systemctl show -p MainPID --value morag-api")
    ceiling = _open_files(host, "1")
    assert _open_files(host, pid) == min(65536, ceiling)


def _open_files(host, pid: str) -> int:
    """The hard "Max open files" limit of a process."""
    for line in host.check_output(f"cat /proc/{pid}/limits").splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[4])
    raise AssertionError(f"no open files limit for {pid}")


def test_plain_http_gets_no_answer(host):
    out = host.run(
        'python3 -c "import urllib.request as u\n'
        "try: u.urlopen('http://127.0.0.1:8000/health', timeout=10); print('answered')\n"
        'except Exception as e: print(type(e).__name__)"'
    )
    assert out.rc == 0 and out.stdout.strip() != "answered", out.stdout


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


def test_only_the_apis_env_file_holds_the_fleet_worker_token(host):
    """morag_app_job_writes: api (the default): the fleet's worker token and the watchdog go
    to the API's own file; morag.env (the workers') holds this host's derived token only."""
    api_env = host.file("/etc/morag/api.env")
    assert (api_env.user, api_env.group, api_env.mode) == ("root", "morag-api", 0o640)
    with host.sudo():
        api = api_env.content_string
        workers = host.file("/etc/morag/morag.env").content_string
    assert 'MORAG_WORKER_TOKEN="molecule-worker-token"' in api
    assert "MORAG_API_WATCHDOG=true" in api
    assert "molecule-worker-token" not in workers
    assert "MORAG_JOB_WRITES=api" in workers


def test_the_cli_derives_host_tokens_from_the_apis_env_file(host):
    """`sudo morag worker-token HOST` on the API host: the fleet's token is only in api.env,
    so the wrapper runs that command as the API's user with it."""
    from morag.job_writes import host_token

    with host.sudo():
        out = host.run("/usr/local/sbin/morag worker-token gpu-03.example.com")
    assert out.rc == 0, out.stdout + out.stderr
    assert out.stdout.strip() == host_token("molecule-worker-token", "gpu-03.example.com")
