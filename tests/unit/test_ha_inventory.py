"""High availability is an inventory choice made by the host lists alone (docs/ha.md): a copy of
the example inventory with the commented `redis`, `api` and `haproxy` groups of its hosts.yml
switched on derives the Sentinels, the WAIT before a 202, the entry URL and the NFS clients;
without them everything stays as for one server. playbooks/preflight.yml refuses half an HA
inventory. Runs the real group_vars and playbook through ansible (no hosts are contacted)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "inventory" / "example"
BIN = Path(sys.executable).parent
SECRETS = {
    "vault_redis_password": "a",
    "vault_morag_worker_token": "b",
    "vault_morag_api_keys": ["c"],
    "vault_redis_api_password": "d",
    "vault_redis_worker_password": "e",
    "vault_redis_store_password": "f",
    "vault_redis_replication_password": "g",
    "vault_redis_sentinel_auth_password": "h",
    "vault_redis_sentinel_peer_password": "i",
    "vault_redis_sentinel_client_password": "j",
}


def site(tmp_path: Path, *, ha: bool, redis_hosts: int = 3) -> Path:
    """A site inventory as README.md says to make one: the example copied, its hosts renamed,
    and (ha) the HA groups of hosts.yml uncommented, nothing else edited."""
    inv = tmp_path / "mysite"
    shutil.copytree(EXAMPLE, inv)
    (inv / "host_vars" / "gpu-02.example.com.yml").unlink()
    hosts = (inv / "hosts.yml").read_text().replace(".example.com", ".site.test")
    if ha:
        block = hosts.split("# High availability")[1].split("\n", 2)[2]
        block = block.split("    gpu_workers:")[0]
        uncommented = re.sub(r"(?m)^    # ?", "    ", block)
        uncommented = re.sub(r"(?m)\s+# (?!.*:$).*$", "", uncommented)
        hosts = hosts.replace(block, uncommented)
        if redis_hosts < 3:
            for n in range(redis_hosts + 1, 4):
                host = rf"(?m)^\s+redis-0{n}\.site\.test:\n\s+ansible_host: \S+\n"
                hosts = re.sub(host, "", hosts)
    (inv / "hosts.yml").write_text(hosts)
    (inv / "group_vars" / "all" / "vault.yml").write_text(json.dumps(SECRETS))
    return inv


def env() -> dict[str, str]:
    return dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="json",
        PATH=f"{BIN}:{os.environ['PATH']}",
    )


def value(inv: Path, host: str, var: str) -> object:
    ansible = str(BIN / "ansible")
    run = subprocess.run(
        [ansible, "-i", str(inv / "hosts.yml"), host, "-m", "debug", "-a", f"var={var}"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)["plays"][0]["tasks"][0]["hosts"][host]
    return result[var]


def test_without_ha_groups_one_server_serves_redis_and_the_api(tmp_path: Path) -> None:
    inv = site(tmp_path, ha=False)
    assert value(inv, "gpu-01.site.test", "morag_app_redis_sentinels") == []
    assert value(inv, "gpu-01.site.test", "morag_app_redis_min_replicas") == 0
    assert value(inv, "gpu-01.site.test", "morag_app_api_url") == "https://10.0.0.5:8000"
    assert value(inv, "morag.site.test", "nfs_server_client_hosts") == [
        "gpu-01.site.test",
        "gpu-02.site.test",
        "cpu-01.site.test",
    ]


def test_the_host_lists_alone_make_the_fleet_ha(tmp_path: Path) -> None:
    inv = site(tmp_path, ha=True)
    worker = "gpu-01.site.test"
    assert value(inv, worker, "morag_app_redis_sentinels") == [
        "10.0.0.11:26379",
        "10.0.0.12:26379",
        "10.0.0.13:26379",
    ]
    assert value(inv, worker, "morag_app_redis_min_replicas") == 1
    assert value(inv, worker, "morag_app_redis_sentinel_password") == "j"
    # Workers and clients go through the entry, not to the server's API.
    assert value(inv, worker, "morag_app_api_url") == "https://10.0.0.4:443"
    # The second API host mounts the uploads; the server (an API host too) exports them.
    assert value(inv, "morag.site.test", "nfs_server_client_hosts") == [
        "gpu-01.site.test",
        "gpu-02.site.test",
        "cpu-01.site.test",
        "api-02.site.test",
    ]
    # Each Redis host listens on its own address; each API host's certificate names it only.
    assert value(inv, "redis-02.site.test", "redis_bind_addresses") == ["127.0.0.1", "10.0.0.12"]
    assert value(inv, "api-02.site.test", "morag_api_tls_cert_sans") == []
    assert value(inv, "api-02.site.test", "morag_app_api_keys") == ["c"]


def test_a_floating_address_is_the_entry(tmp_path: Path) -> None:
    inv = site(tmp_path, ha=True)
    (inv / "group_vars" / "haproxy.yml").write_text("haproxy_keepalived_vip: 10.0.0.100/24\n")
    assert value(inv, "gpu-01.site.test", "morag_app_api_url") == "https://10.0.0.100:443"


def preflight(inv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inv / "hosts.yml"), "playbooks/preflight.yml"],
        cwd=ROOT,
        env={**env(), "ANSIBLE_STDOUT_CALLBACK": "default"},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("ha", [False, True])
def test_preflight_accepts_the_inventory_with_or_without_ha(tmp_path: Path, ha: bool) -> None:
    run = preflight(site(tmp_path, ha=ha))
    assert run.returncode == 0, run.stdout[-3000:]


def test_preflight_refuses_two_redis_hosts(tmp_path: Path) -> None:
    run = preflight(site(tmp_path, ha=True, redis_hosts=2))
    assert run.returncode != 0
    assert "Redis with Sentinel needs three or more" in run.stdout


def test_preflight_refuses_sentinel_without_its_secrets(tmp_path: Path) -> None:
    inv = site(tmp_path, ha=True)
    secrets = {k: v for k, v in SECRETS.items() if "sentinel" not in k and "replication" not in k}
    (inv / "group_vars" / "all" / "vault.yml").write_text(json.dumps(secrets))
    run = preflight(inv)
    assert run.returncode != 0
    assert "vault_redis_replication_password" in run.stdout
