"""The narrow write path as deployed (morag_app_job_writes / redis_worker_job_writes: api,
docs/security.md): on each worker host, with the host's own morag.env, the workers' Redis user
reads job records and writes none, the workers' names carry the host the env file names,
and its worker token is that host's own (the API accepts it as that host, not as another)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def narrow(facts):
    env = facts.env()
    if env.get("MORAG_JOB_WRITES") != "api":
        pytest.skip("the workers of this host write job records on Redis")
    return facts, env


def test_the_worker_user_cannot_write_a_job(narrow):
    facts, _ = narrow
    out = facts.redis_json(
        "res = {}\n"
        "for name, cmd in [('set', ('SET', 'morag:job:infra-probe', '{}')),\n"
        "                  ('lease', ('SET', 'morag:lease:infra-probe', 'x')),\n"
        "                  ('outbox', ('ZADD', 'morag:outbox', '0', 'infra-probe')),\n"
        "                  ('read', ('GET', 'morag:job:infra-probe'))]:\n"
        "    try:\n"
        "        r.execute_command(*cmd); res[name] = 'ok'\n"
        "    except redis.exceptions.NoPermissionError:\n"
        "        res[name] = 'refused'\n"
        "print(json.dumps(res))"
    )
    assert out == {"set": "refused", "lease": "refused", "outbox": "refused", "read": "ok"}


def test_the_workers_act_as_the_host_their_token_is_for(narrow):
    facts, env = narrow
    host = env["MORAG_WORKER_HOST"]
    for instance in facts.worker_instances():
        name = facts.env(f"/etc/morag/worker-{instance}.env")["MORAG_WORKER_NAME"]
        assert name.endswith(f"@{host}"), f"{name}: not a worker of {host}"
    # The API takes this host's token as this host: a change naming another host's attempt
    # is refused for what it names (403), not for the token (which would also be 403: the
    # body says which).
    url = env["MORAG_API_URL"].rstrip("/") + "/api/v1/worker/jobs/" + "0" * 32
    code = (
        "import httpx, json\n"
        "env = {}\n"
        "for line in open('/etc/morag/morag.env'):\n"
        "    if '=' in line and not line.startswith('#'):\n"
        "        k, _, v = line.strip().partition('=')\n"
        "        env[k] = v.strip('\"')\n"
        "host = env['MORAG_WORKER_HOST']\n"
        "h = {'X-Worker-Token': env['MORAG_WORKER_TOKEN'], 'X-Worker-Host': host}\n"
        "verify = env.get('MORAG_API_CA_FILE') or True\n"
        "out = {}\n"
        "for who in (host, 'another-host'):\n"
        f"    r = httpx.post('{url}/progress', headers=h, verify=verify, timeout=30,\n"
        "                   json={'owner': 'cpu0@' + who + '/1', 'progress': 0.5})\n"
        "    out[who] = [r.status_code, r.text]\n"
        "print(json.dumps(out))"
    )
    result = facts.venv_python(code)
    assert result.rc == 0, result.stderr
    answers = json.loads(result.stdout)
    assert answers[host][0] == 200, answers  # its own worker: accepted (no such job: no change)
    assert answers["another-host"][0] == 403, answers
    assert "is not a worker of host" in answers["another-host"][1], answers


def test_the_api_hosts_cli_derives_the_token_the_role_wrote(narrow):
    """`sudo morag worker-token HOST` on a host that runs the API (the fleet's token is only
    in its api.env) prints the token the role wrote into that host's morag.env."""
    facts, env = narrow
    with facts.host.sudo():
        if not facts.host.file("/etc/morag/api.env").exists:
            pytest.skip("this host runs no API")
        out = facts.host.run(f"/usr/local/sbin/morag worker-token {env['MORAG_WORKER_HOST']}")
    assert out.rc == 0, out.stdout + out.stderr
    assert out.stdout.strip() == env["MORAG_WORKER_TOKEN"]
