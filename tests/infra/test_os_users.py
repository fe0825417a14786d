"""The server's services run as OS users of their own (docs/security.md, "OS users").

The CPU worker on the server runs as `morag`, like every GPU worker: a job that takes it over
must not reach the API keys, the API's or the store worker's Redis credentials, the API's TLS
key, their processes' environment, or the local vector store. Each "cannot" is tried as
`morag`, next to the same read by the owner, so a check that cannot fail is caught.
"""

from __future__ import annotations

import shlex

import pytest

WORKER_USER = "morag"
API_USER = "morag-api"
STORE_USER = "morag-store"


@pytest.fixture
def split_server(server):
    identities = server.var("morag_server_identities", ["api", "store"])
    if "api" not in identities:
        pytest.skip("morag_server_identities: the API runs as the service user here")
    assert server.host.user(API_USER).exists, f"the server play made no {API_USER}"
    return server


@pytest.fixture
def store_server(split_server):
    if "store" not in split_server.worker_instances():
        pytest.skip("no store worker on this server")
    return split_server


def _as(host, user: str, cmd: str):
    with host.sudo():
        return host.run(f"runuser -u {user} -- sh -c {shlex.quote(cmd)}")


def _main_pid(host, unit: str) -> int:
    out = host.run(f"systemctl show -p MainPID --value {unit}")
    pid = int(out.stdout.strip() or 0)
    assert pid > 0, f"{unit} is not running"
    return pid


def _process_user(host, pid: int) -> str:
    return host.run(f"ps -o user= -p {pid}").stdout.strip()


def _cpu_instances(server) -> list[str]:
    return [i for i in server.worker_instances() if not i.startswith("store")]


def test_each_service_runs_as_its_own_user(split_server):
    host = split_server.host
    assert _process_user(host, _main_pid(host, "morag-api")) == API_USER
    if "store" in split_server.worker_instances():
        assert _process_user(host, _main_pid(host, "morag-worker@store")) == STORE_USER
    instances = _cpu_instances(split_server)
    assert instances, "no CPU worker on the server"
    for instance in instances:
        assert _process_user(host, _main_pid(host, f"morag-worker@{instance}")) == WORKER_USER


def test_the_users_share_the_service_group_and_have_their_own(split_server):
    names = [API_USER] + ([STORE_USER] if "store" in split_server.worker_instances() else [])
    for name in names:
        user = split_server.host.user(name)
        assert user.exists
        assert user.group == "morag"
        assert name in user.groups
        assert user.shell == "/usr/sbin/nologin"
    worker = split_server.host.user(WORKER_USER)
    assert API_USER not in worker.groups and STORE_USER not in worker.groups


@pytest.mark.parametrize(
    ("path", "owner_group"),
    [
        ("/etc/morag/api.env", API_USER),
        ("/etc/morag/redis-api.env", API_USER),
        ("/etc/morag/redis-store.env", STORE_USER),
        ("/etc/morag/worker-store.env", STORE_USER),
    ],
)
def test_secret_files_belong_to_their_service(split_server, path, owner_group):
    if owner_group == STORE_USER and "store" not in split_server.worker_instances():
        with split_server.host.sudo():
            assert not split_server.host.file(path).exists, f"{path} without a store worker"
        return
    with split_server.host.sudo():
        f = split_server.host.file(path)
        assert f.exists, path
        assert (f.user, f.group, f.mode) == ("root", owner_group, 0o640)


@pytest.mark.parametrize(
    ("path", "owner"),
    [
        ("/etc/morag/api.env", API_USER),
        ("/etc/morag/redis-api.env", API_USER),
        ("/etc/morag/redis-store.env", STORE_USER),
    ],
)
def test_the_workers_user_cannot_read_another_services_secrets(split_server, path, owner):
    if owner == STORE_USER and "store" not in split_server.worker_instances():
        pytest.skip("no store worker on this server")
    host = split_server.host
    assert _as(host, owner, f"cat {path} >/dev/null").rc == 0, f"{owner} cannot read {path}"
    out = _as(host, WORKER_USER, f"cat {path}")
    assert out.rc != 0 and "Permission denied" in out.stderr, f"{WORKER_USER} read {path}"


def test_the_workers_user_cannot_read_the_api_tls_key(split_server):
    host = split_server.host
    if (
        "MORAG_API_TLS_KEY_FILE="
        not in host.run("systemctl show -p Environment --value morag-api").stdout
    ):
        pytest.skip("the API serves plain HTTP here")
    env = host.run("systemctl show -p Environment --value morag-api").stdout.split()
    key = next(v.split("=", 1)[1] for v in env if v.startswith("MORAG_API_TLS_KEY_FILE="))
    assert _as(host, API_USER, f"cat {key} >/dev/null").rc == 0
    out = _as(host, WORKER_USER, f"cat {key}")
    assert out.rc != 0 and "Permission denied" in out.stderr


@pytest.mark.parametrize(
    ("unit", "owner"), [("morag-api", API_USER), ("morag-worker@store", STORE_USER)]
)
def test_the_workers_user_cannot_read_their_process_environment(split_server, unit, owner):
    if owner == STORE_USER and "store" not in split_server.worker_instances():
        pytest.skip("no store worker on this server")
    host = split_server.host
    pid = _main_pid(host, unit)
    own = _main_pid(host, f"morag-worker@{_cpu_instances(split_server)[0]}")
    # Control: the same read of its own process works.
    assert (
        "MORAG_REDIS_URL=" in _as(host, WORKER_USER, f"tr '\\0' '\\n' </proc/{own}/environ").stdout
    )
    out = _as(host, WORKER_USER, f"cat /proc/{pid}/environ")
    assert out.rc != 0 and "MORAG_" not in out.stdout, f"{WORKER_USER} read {unit}'s environment"


def test_the_workers_user_cannot_change_the_local_vector_store(store_server):
    split_server = store_server
    host = split_server.host
    path = split_server.var("morag_worker_qdrant_path", "/var/lib/morag/qdrant")
    with host.sudo():
        d = host.file(path)
        assert d.is_directory and d.user == STORE_USER
    probe = f"{path}/.morag-infra-probe"
    out = _as(host, WORKER_USER, f"touch {probe}")
    assert out.rc != 0 and "Permission denied" in out.stderr
    assert _as(host, STORE_USER, f"touch {probe} && rm {probe}").rc == 0


def test_the_api_and_the_workers_share_the_uploads_directory(split_server):
    shared = split_server.env().get("MORAG_SHARED_DIR", "/var/lib/morag/shared")
    with split_server.host.sudo():
        d = split_server.host.file(f"{shared}/uploads")
        assert d.is_directory
        assert (d.group, d.mode) == ("morag", 0o2770)
