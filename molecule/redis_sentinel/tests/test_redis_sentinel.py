"""Redis with Sentinel as the role leaves it: a primary, two replicas and three Sentinels, TLS
and ACL users on every link. Runs twice: before and after side_effect.yml's failover (the
second time /var/tmp/molecule-old-primary names the primary it stopped)."""

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import pytest
import testinfra

testinfra_hosts = ["docker://molecule-sentinel-1"]

NAMES = ["molecule-sentinel-1", "molecule-sentinel-2", "molecule-sentinel-3"]
ADMIN = ("default", "molecule-redis-password")
API = ("morag-api", "molecule-api-password")
CLIENT = ("morag-sentinel-client", "molecule-sentinel-client-password")
CLEAR_PASSWORDS = [  # what Redis and Sentinel send to log in elsewhere: in 0640 files only
    "molecule-replication-password",
    "molecule-sentinel-auth-password",
    "molecule-sentinel-peer-password",
]
HASHED_PASSWORDS = [  # never in clear anywhere
    ADMIN[1],
    API[1],
    CLIENT[1],
    "molecule-worker-password",
    "molecule-store-password",
]
TLS = "--tls --cacert /etc/redis/tls/ca.crt"
MARKER = "/var/tmp/molecule-old-primary"

T = TypeVar("T")


def node(name: str):
    return testinfra.get_host(f"docker://{name}")


def address(name: str) -> str:
    return node(name).check_output("hostname -i").split()[0]


def cli(name: str, args: str, user: tuple[str, str] = ADMIN, port: int = 6380, addr: str = ""):
    target = addr or "127.0.0.1"
    return node(name).run(
        f"REDISCLI_AUTH={user[1]} redis-cli -h {target} {TLS} -p {port} --user {user[0]} {args}"
    )


def sentinel(name: str, args: str, user: tuple[str, str] = ADMIN):
    return cli(name, args, user, port=26379)


def wait_for(check: Callable[[], T], what: str, timeout: float = 90) -> T:
    """Poll until check() returns something true; fail with `what` when it never does."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.5)


def primary_named_by(name: str) -> str:
    out = sentinel(name, "SENTINEL GET-MASTER-ADDR-BY-NAME morag", CLIENT)
    assert out.rc == 0, out.stdout + out.stderr
    return out.stdout.split()[0]


def agreed_primary() -> str:
    """The address every Sentinel names, once they all name the same one."""

    def agreed() -> str:
        seen = {primary_named_by(n) for n in NAMES}
        return seen.pop() if len(seen) == 1 else ""

    return wait_for(agreed, "the three Sentinels name the same primary")


def replicating(name: str, primary: str) -> str:
    """INFO replication of `name` once it replicates `primary` with its link up, else ""."""
    info = cli(name, "INFO replication").stdout
    return info if f"master_host:{primary}" in info and "master_link_status:up" in info else ""


@pytest.fixture(scope="module")
def by_address() -> dict[str, str]:
    return {address(n): n for n in NAMES}


@pytest.fixture(scope="module")
def old_primary() -> str:
    """The primary side_effect.yml stopped, or "" before the failover."""
    marker = node(NAMES[0]).file(MARKER)
    return marker.content_string.strip() if marker.exists else ""


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("service", ["redis-server", "redis-sentinel"])
def test_services_enabled_and_running(name, service):
    svc = node(name).service(service)
    assert svc.is_enabled
    assert svc.is_running


@pytest.mark.parametrize("name", NAMES)
def test_sentinel_speaks_tls_only(name):
    host = node(name)
    assert host.socket("tcp://127.0.0.1:26379").is_listening
    plain = host.run(f"REDISCLI_AUTH={ADMIN[1]} redis-cli -h 127.0.0.1 -p 26379 PING")
    assert plain.stdout.strip() != "PONG"
    assert sentinel(name, "PING").stdout.strip() == "PONG"
    assert sentinel(name, "PING", CLIENT).stdout.strip() == "PONG"


def test_sentinels_agree_and_could_fail_over(by_address, old_primary):
    primary = agreed_primary()
    assert primary in by_address
    if old_primary:
        assert primary != old_primary, "the Sentinels still name the primary that was stopped"
    else:
        assert by_address[primary] == NAMES[0]  # redis_sentinel_primary: the first host
    for name in NAMES:
        out = sentinel(name, "SENTINEL CKQUORUM morag")
        assert out.stdout.startswith("OK 3 usable Sentinels"), out.stdout + out.stderr


def test_every_other_host_replicates_the_primary_over_tls(by_address, old_primary):
    primary = agreed_primary()
    replicas = [n for a, n in by_address.items() if a != primary]
    assert len(replicas) == 2
    for name in replicas:
        # After the failover the old primary comes back as a master, until Sentinel converts it.
        info = wait_for(
            lambda n=name: replicating(n, primary), f"{name} replicates {primary}, link up"
        )
        assert "role:slave" in info
        assert "master_port:6380" in info
        # Replication has no other way than TLS: the plain port is closed.
        assert cli(name, "CONFIG GET tls-replication").stdout.split() == ["tls-replication", "yes"]
        assert cli(name, "CONFIG GET port").stdout.split() == ["port", "0"]
    info = cli(by_address[primary], "INFO replication").stdout
    assert "role:master" in info
    assert "connected_slaves:2" in info


def test_a_write_on_the_primary_reaches_the_replicas(by_address):
    primary = agreed_primary()
    key, value = f"morag:ha:{uuid.uuid4().hex}", uuid.uuid4().hex
    out = cli(by_address[primary], f"SET {key} {value}", API, addr=primary)
    assert out.stdout.strip() == "OK", out.stdout + out.stderr
    for name in [n for a, n in by_address.items() if a != primary]:
        wait_for(
            lambda n=name: cli(n, f"GET {key}", API).stdout.strip() == value,
            f"{key} replicated to {name}",
        )
        refused = cli(name, f"SET {key} other", API)
        assert "READONLY" in refused.stdout + refused.stderr


def test_the_primary_needs_a_replica_to_accept_writes(by_address):
    for name in NAMES:
        assert cli(name, "CONFIG GET min-replicas-to-write").stdout.split()[1] == "1"
        assert cli(name, "CONFIG GET min-replicas-max-lag").stdout.split()[1] == "10"


def test_the_client_user_finds_the_primary(by_address):
    primary = agreed_primary()
    assert primary_named_by(NAMES[1]) == primary
    for args in ["SENTINEL SENTINELS morag", "SENTINEL REPLICAS morag", "SENTINEL MASTERS"]:
        out = sentinel(NAMES[1], args, CLIENT)
        assert out.rc == 0 and "NOPERM" not in out.stdout, args + out.stdout + out.stderr
        assert out.stdout.strip()
    assert sentinel(NAMES[1], f"ACL DRYRUN {CLIENT[0]} SUBSCRIBE +switch-master").stdout == "OK\n"


@pytest.mark.parametrize(
    "command",
    [
        "SENTINEL FAILOVER morag",
        "SENTINEL SET morag quorum 1",
        "SENTINEL RESET morag",
        "SENTINEL REMOVE morag",
        "SENTINEL MONITOR other 127.0.0.1 6380 2",
        "SENTINEL CONFIG SET resolve-hostnames yes",
        "SENTINEL IS-MASTER-DOWN-BY-ADDR 127.0.0.1 6380 0 '*'",
        "SENTINEL DEBUG",
        "ACL LIST",
        "INFO",
        "SHUTDOWN",
    ],
)
def test_the_client_user_cannot_change_sentinel(command):
    out = sentinel(NAMES[1], command, CLIENT)
    assert "NOPERM" in out.stdout + out.stderr, command + out.stdout + out.stderr


def test_the_client_user_cannot_config_nor_listen_elsewhere():
    # CONFIG does not exist in Sentinel mode; the ACL refuses it besides.
    out = sentinel(NAMES[1], "CONFIG GET '*'", CLIENT)
    assert "unknown command" in out.stdout + out.stderr or "NOPERM" in out.stdout + out.stderr
    verdict = sentinel(NAMES[1], f"ACL DRYRUN {CLIENT[0]} SUBSCRIBE +odown")
    assert "no permissions" in verdict.stdout


@pytest.mark.parametrize(
    ("user", "command"),
    [
        ("morag-replication", "GET morag:job:j1"),
        ("morag-replication", "SET morag:job:j1 x"),
        ("morag-replication", "CONFIG SET maxmemory 1"),
        ("morag-replication", "FLUSHALL"),
        ("morag-replication", "KEYS '*'"),
        ("morag-replication", "REPLICAOF NO ONE"),
        ("morag-sentinel", "GET morag:job:j1"),
        ("morag-sentinel", "SET morag:job:j1 x"),
        ("morag-sentinel", "FLUSHALL"),
        ("morag-sentinel", "KEYS '*'"),
        ("morag-sentinel", "CONFIG GET '*'"),
        ("morag-sentinel", "CONFIG SET maxmemory 1"),
        ("morag-sentinel", "ACL LIST"),
        ("morag-sentinel", "PUBLISH morag:ended:0 j1"),
        ("morag-api", "REPLICAOF NO ONE"),
        ("morag-api", "SLAVEOF NO ONE"),
        ("morag-api", "FAILOVER"),
        ("morag-api", "PSYNC '?' -1"),
        ("morag-api", "CONFIG REWRITE"),
        ("morag-worker", "SLAVEOF NO ONE"),
        ("morag-store", "SLAVEOF NO ONE"),
        ("morag-worker", "WAIT 1 100"),
    ],
)
def test_redis_users_stay_in_their_lane(user, command):
    verdict = cli(NAMES[0], f"ACL DRYRUN {user} {command}")
    assert "no permissions" in verdict.stdout, user + command + verdict.stdout + verdict.stderr


@pytest.mark.parametrize(
    ("user", "command"),
    [
        ("morag-replication", "PSYNC '?' -1"),
        ("morag-replication", "REPLCONF listening-port 6380"),
        ("morag-sentinel", "SLAVEOF NO ONE"),
        ("morag-sentinel", "CONFIG REWRITE"),
        ("morag-sentinel", "PUBLISH __sentinel__:hello x"),
        ("morag-api", "WAIT 1 100"),  # MORAG_REDIS_MIN_REPLICAS
    ],
)
def test_replication_and_sentinel_users_have_what_they_need(user, command):
    assert cli(NAMES[0], f"ACL DRYRUN {user} {command}").stdout == "OK\n"


@pytest.mark.parametrize(
    "command",
    [
        "SENTINEL FAILOVER morag",
        "SENTINEL SET morag quorum 1",
        "SENTINEL RESET morag",
        "SENTINEL GET-MASTER-ADDR-BY-NAME morag",
        "PUBLISH +switch-master x",
    ],
)
def test_the_sentinel_peer_user_only_talks_to_sentinels(command):
    verdict = sentinel(NAMES[0], f"ACL DRYRUN morag-sentinel-peer {command}")
    assert "no permissions" in verdict.stdout, command + verdict.stdout + verdict.stderr


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("path", ["/etc/redis/redis.conf", "/etc/redis/sentinel.conf"])
def test_configs_readable_by_redis_only_and_without_clear_app_passwords(name, path):
    conf = node(name).file(path)
    assert conf.user == "redis"
    assert conf.mode == 0o640
    content = conf.content_string
    for secret in HASHED_PASSWORDS:
        assert secret not in content
    args = node(name).check_output("ps -eo args")
    for secret in HASHED_PASSWORDS + CLEAR_PASSWORDS:
        assert secret not in args


@pytest.mark.parametrize("name", NAMES)
def test_no_config_points_at_the_old_primary(name, by_address, old_primary):
    """The converge after the failover left Sentinel's choice alone: the old primary is a
    replica of the new one, and no redis.conf or sentinel.conf names the old primary."""
    if not old_primary:
        pytest.skip("before the failover")
    primary = agreed_primary()
    expected = "" if address(name) == primary else f"replicaof {primary} 6380"
    conf = node(name).file("/etc/redis/redis.conf")
    wait_for(
        lambda: (
            [line for line in conf.content_string.splitlines() if line.startswith("replicaof")]
            == ([expected] if expected else [])
        ),
        f"{name}'s redis.conf names {primary} (Sentinel's CONFIG REWRITE)",
    )
    monitor = [
        line
        for line in node(name).file("/etc/redis/sentinel.conf").content_string.splitlines()
        if line.startswith("sentinel monitor morag")
    ]
    assert monitor == [f"sentinel monitor morag {primary} 6380 2"]
    # The write side_effect.yml made on the new primary reached every host, the old one too.
    wait_for(
        lambda: cli(name, "GET morag:failover:written", API).stdout.strip() == "yes",
        f"the failover's write on {name}",
    )
