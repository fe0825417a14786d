"""morag.env as roles/morag_app writes it: Redis with Sentinel, the WAIT before a 202, and
the API's secrets out of it where the API has a user of its own (docs/security.md, "OS
users"). The role's own template and variables, rendered by a real ansible-playbook."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "morag_app"
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)

PLAYBOOK = f"""
- name: Render the role's env files
  hosts: localhost
  connection: local
  gather_facts: false
  vars_files:
    - {ROLE}/defaults/main.yml
    - {ROLE}/vars/main.yml
  vars:
    role_path: {ROLE}
  tasks:
    - name: Render {{{{ item }}}}
      ansible.builtin.template:
        src: "{ROLE}/templates/{{{{ item }}}}.j2"
        dest: "{{{{ out_dir }}}}/{{{{ item }}}}"
        mode: "0600"
      loop: [morag.env, api.env]
"""

BASE = {
    "morag_app_worker_token": "worker-token",
    "morag_app_api_keys": ["api-key-1"],
    "morag_app_metrics_token": "metrics-token",
    "morag_app_redis_username": "morag-worker",
    "morag_app_redis_password": "worker-password",
    "morag_app_redis_tls": True,
    # The default (nodename) needs facts, which this play does not gather.
    "morag_app_worker_host": "gpu-7.example",
}


def render(tmp_path: Path, **overrides) -> tuple[dict[str, str], dict[str, str]]:
    assert ANSIBLE, "ansible-playbook is not installed"
    play = tmp_path / "play.yml"
    play.write_text(PLAYBOOK)
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({**BASE, **overrides, "out_dir": str(tmp_path)}))
    out = subprocess.run(
        [ANSIBLE, str(play), "-e", f"@{extra}"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_FILTER_PLUGINS": str(ROLE / "filter_plugins"),
        },
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]

    def parse(name: str) -> dict[str, str]:
        values = {}
        for line in (tmp_path / name).read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                values[key] = value.strip('"')
        return values

    return parse("morag.env"), parse("api.env")


def test_one_redis_has_no_sentinel_and_no_wait(tmp_path: Path) -> None:
    env, _ = render(tmp_path)
    assert env["MORAG_REDIS_URL"].startswith("rediss://morag-worker:worker-password@")
    for key in (
        "MORAG_REDIS_SENTINELS",
        "MORAG_REDIS_MIN_REPLICAS",
        "MORAG_REDIS_SENTINEL_PASSWORD",
    ):
        assert key not in env


def test_sentinels_and_the_wait_before_a_202(tmp_path: Path) -> None:
    env, _ = render(
        tmp_path,
        morag_app_redis_sentinels=["10.0.0.11:26379", "10.0.0.12:26379", "10.0.0.13:26379"],
        morag_app_redis_sentinel_username="morag-sentinel-client",
        morag_app_redis_sentinel_password="sentinel-password",
        morag_app_redis_min_replicas=1,
    )
    assert env["MORAG_REDIS_SENTINELS"] == "10.0.0.11:26379,10.0.0.12:26379,10.0.0.13:26379"
    assert env["MORAG_REDIS_SENTINEL_MASTER"] == "morag"
    assert env["MORAG_REDIS_SENTINEL_USERNAME"] == "morag-sentinel-client"
    assert env["MORAG_REDIS_SENTINEL_PASSWORD"] == "sentinel-password"
    assert env["MORAG_REDIS_MIN_REPLICAS"] == "1"
    assert env["MORAG_REDIS_WAIT_TIMEOUT_MS"] == "500"
    # What the app reads is what the role wrote (one settings object, its own validation).
    from morag.config import Settings

    settings = Settings(**{k[len("MORAG_") :].lower(): v for k, v in env.items()})
    assert len(settings.redis_sentinels) == 3
    assert settings.redis_min_replicas == 1


@pytest.mark.parametrize("identities", [[], ["api", "store"]])
def test_the_api_secrets_leave_morag_env_where_the_api_has_its_user(
    tmp_path: Path, identities: list[str]
) -> None:
    env, api_env = render(tmp_path, morag_app_identities=identities)
    where = api_env if identities else env
    assert where["MORAG_API_KEYS"] == "api-key-1"
    assert where["MORAG_METRICS_TOKEN"] == "metrics-token"
    if identities:
        assert "MORAG_API_KEYS" not in env and "MORAG_METRICS_TOKEN" not in env


@pytest.mark.parametrize("identities", [[], ["api", "store"]])
def test_with_writes_through_the_api_a_host_holds_only_its_own_token(
    tmp_path: Path, identities: list[str]
) -> None:
    from morag.config import Settings
    from morag.job_writes import host_token

    # The role's default (morag_app_job_writes: api).
    env, api_env = render(tmp_path, morag_app_identities=identities)
    assert env["MORAG_JOB_WRITES"] == "api"
    assert env["MORAG_WORKER_HOST"] == "gpu-7.example"
    # The role's filter derives the token the app's API recognises for that host.
    assert env["MORAG_WORKER_TOKEN"] == host_token("worker-token", "gpu-7.example")
    assert "worker-token" not in (tmp_path / "morag.env").read_text()
    settings = Settings(**{k[len("MORAG_") :].lower(): v for k, v in env.items()})
    assert settings.job_writes == "api" and settings.worker_host == "gpu-7.example"
    if identities:  # the API host: the fleet's token and the watchdog, for the API alone
        assert api_env["MORAG_WORKER_TOKEN"] == "worker-token"
        assert api_env["MORAG_JOB_WRITES"] == "redis"
        assert api_env["MORAG_API_WATCHDOG"] == "true"


def test_with_writes_on_redis_workers_hold_the_fleet_token(tmp_path: Path) -> None:
    env, api_env = render(tmp_path, morag_app_identities=["api"], morag_app_job_writes="redis")
    assert env["MORAG_WORKER_TOKEN"] == "worker-token"
    assert "MORAG_JOB_WRITES" not in env and "MORAG_WORKER_HOST" not in env
    assert "MORAG_API_WATCHDOG" not in api_env and "MORAG_WORKER_TOKEN" not in api_env
