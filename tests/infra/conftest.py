"""testinfra checks of a deployed MoRAG fleet: any inventory, lab or production.

    pytest tests/infra --hosts='ansible://all' --ansible-inventory=inventory/lab/hosts.yml
    pytest tests/infra --hosts='ansible://gpu_workers' \
        --ansible-inventory=inventory/mysite/hosts.yml

(with `--force-ansible --sudo` where the inventory needs become; the vault password comes
from ansible.cfg's tools/vault-pass.sh). Without --hosts every test here is skipped, so a plain
`pytest tests` does not try to reach any host.
"""

from __future__ import annotations

import json
import shlex

import pytest

ENV_FILE = "/etc/morag/morag.env"
# The API's own secrets where it runs as a user of its own (morag_app_identities).
API_ENV_FILE = "/etc/morag/api.env"
VENV_PYTHON = "/opt/morag/venv/bin/python"


def pytest_collection_modifyitems(config, items):
    if config.getoption("hosts", default=None):
        return
    skip = pytest.mark.skip(reason="infra checks need --hosts (and --ansible-inventory)")
    for item in items:
        if "tests/infra" in str(item.fspath):
            item.add_marker(skip)


class Facts:
    """What the checks need to know about one host, read from the inventory and the host."""

    def __init__(self, host):
        self.host = host
        try:
            self.vars = host.ansible.get_variables()
        except Exception:  # not an ansible:// host
            self.vars = {}
        self.groups = set(self.vars.get("group_names", []))

    def var(self, name: str, default=None):
        """An inventory variable, or `default` when unset or still a template (the inventory
        is read without templating, so `{{ ... }}` values are unknown here)."""
        value = self.vars.get(name, default)
        if isinstance(value, str) and "{{" in value:
            return default
        return value

    @property
    def is_server(self) -> bool:
        return "server" in self.groups

    @property
    def is_gpu_worker(self) -> bool:
        return "gpu_workers" in self.groups

    @property
    def is_worker(self) -> bool:
        return bool(self.groups & {"gpu_workers", "cpu_workers"})

    def worker_instances(self) -> list[str]:
        with self.host.sudo():
            out = self.host.run("ls /etc/morag/ 2>/dev/null")
        return sorted(
            name[len("worker-") : -len(".env")]
            for name in out.stdout.split()
            if name.startswith("worker-") and name.endswith(".env")
        )

    def env(self, path: str = ENV_FILE) -> dict[str, str]:
        with self.host.sudo():
            content = self.host.file(path).content_string
        values = {}
        for line in content.splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
                values[key.strip()] = value
        return values

    def api_env(self) -> dict[str, str]:
        """What the API's unit reads: morag.env, then api.env where there is one."""
        values = self.env()
        with self.host.sudo():
            has_api_env = self.host.file(API_ENV_FILE).exists
        if has_api_env:
            values.update(self.env(API_ENV_FILE))
        return values

    def api_base(self) -> tuple[str, str | None]:
        """The API's URL on this host and the CA file that verifies it (None: plain HTTP).
        TLS is on when the unit hands the API a certificate (roles/morag_api)."""
        port = self.var("morag_api_port", 8000)
        unit = self.host.run("systemctl show -p Environment --value morag-api").stdout
        if "MORAG_API_TLS_CERT_FILE=" not in unit:
            return f"http://127.0.0.1:{port}", None
        ca = self.env().get("MORAG_API_CA_FILE") or self.var(
            "morag_api_tls_ca_cert_file", "/etc/morag/api-tls/ca.crt"
        )
        return f"https://127.0.0.1:{port}", ca

    def venv_python(self, code: str, sudo: bool = True):
        cmd = f"{VENV_PYTHON} -c {shlex.quote(code)}"
        if sudo:
            with self.host.sudo():
                return self.host.run(cmd)
        return self.host.run(cmd)

    def redis(self, code: str):
        """Run `code` with `r` = a Redis client built from the host's own MORAG_REDIS_URL."""
        prelude = (
            "import json, redis\n"
            "url = [l.split('=', 1)[1].strip().strip('\"') for l in open('/etc/morag/morag.env')"
            " if l.startswith('MORAG_REDIS_URL=')][0]\n"
            "r = redis.Redis.from_url(url, socket_timeout=5)\n"
        )
        return self.venv_python(prelude + code)

    def redis_json(self, code: str):
        out = self.redis(code)
        assert out.rc == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture
def facts(host) -> Facts:
    return Facts(host)


@pytest.fixture
def server(facts) -> Facts:
    if not facts.is_server:
        pytest.skip("not the server")
    return facts


@pytest.fixture
def worker(facts) -> Facts:
    if not facts.is_worker:
        pytest.skip("not a worker host")
    return facts


@pytest.fixture
def gpu_worker(facts) -> Facts:
    if not facts.is_gpu_worker:
        pytest.skip("not a GPU worker host")
    return facts
