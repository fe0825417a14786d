"""Redis as the role leaves it: enabled, TLS only (not on loopback only), the admin password
and one ACL user per MoRAG role with only the commands and keys it needs."""

import pytest

PASSWORD = "molecule-redis-password"
USERS = {
    "api": ("morag-api", "molecule-api-password"),
    "worker": ("morag-worker", "molecule-worker-password"),
    "store": ("morag-store", "molecule-store-password"),
}
TLS = "--tls --cacert /etc/redis/tls/ca.crt -p 6380"


def cli(host, args: str, role: str | None = None, tls: str = TLS, addr: str = "127.0.0.1"):
    user, password = USERS[role] if role else ("default", PASSWORD)
    with host.sudo():
        return host.run(f"REDISCLI_AUTH={password} redis-cli -h {addr} {tls} --user {user} {args}")


def test_service_enabled_and_running(host):
    svc = host.service("redis-server")
    assert svc.is_enabled
    assert svc.is_running


def test_container_drop_in_disables_private_users(host):
    drop_in = host.file("/etc/systemd/system/redis-server.service.d/morag.conf")
    assert drop_in.exists
    assert "PrivateUsers=false" in drop_in.content_string


def test_config_protected_and_without_clear_passwords(host):
    conf = host.file("/etc/redis/redis.conf")
    assert conf.user == "redis"
    assert conf.mode == 0o640
    content = conf.content_string
    assert "appendonly yes" in content
    assert "maxmemory-policy noeviction" in content
    assert "requirepass" not in content
    for secret in [PASSWORD, *(p for _, p in USERS.values())]:
        assert secret not in content


def test_tls_only_not_plain(host):
    assert host.socket("tcp://127.0.0.1:6380").is_listening
    assert not host.socket("tcp://127.0.0.1:6379").is_listening
    assert not host.socket("tcp://0.0.0.0:6380").is_listening


def test_server_key_readable_by_redis_only(host):
    key = host.file("/etc/redis/tls/redis.key")
    assert key.mode == 0o640
    assert key.user == "root" and key.group == "redis"


def test_tls_needs_the_ca(host):
    unverified = cli(host, "PING", tls="--tls -p 6380")
    assert unverified.stdout.strip() != "PONG"
    assert cli(host, "PING").stdout.strip() == "PONG"


def test_tls_on_the_private_address(host):
    addr = host.ansible("setup", "gather_subset=!all,network")["ansible_facts"][
        "ansible_default_ipv4"
    ]["address"]
    assert cli(host, "PING", addr=addr).stdout.strip() == "PONG"


def test_password_required(host):
    with host.sudo():
        refused = host.run(f"redis-cli -h 127.0.0.1 {TLS} PING")
    assert "NOAUTH" in refused.stdout + refused.stderr


def test_a_users_password_opens_only_its_user(host):
    with host.sudo():
        out = host.run(
            f"REDISCLI_AUTH={USERS['worker'][1]} redis-cli -h 127.0.0.1 {TLS} --user morag-api PING"
        )
    assert out.stdout.strip() != "PONG"


@pytest.mark.parametrize("role", sorted(USERS))
@pytest.mark.parametrize(
    "command",
    [
        "FLUSHALL",
        "FLUSHDB",
        "CONFIG GET maxmemory",
        "KEYS '*'",
        "DEBUG SLEEP 0",
        "MODULE LIST",
        "ACL LIST",
        "SHUTDOWN NOSAVE",
        "SCRIPT FLUSH",
        "MONITOR",
    ],
)
def test_app_users_cannot_administer(host, role, command):
    # ACL DRYRUN (as the admin) answers what the ACL decides, also for DEBUG and MODULE,
    # which redis.conf disables for everyone besides; the others are also really refused.
    verdict = cli(host, f"ACL DRYRUN {USERS[role][0]} {command}")
    assert "no permissions" in verdict.stdout, verdict.stdout + verdict.stderr
    if not command.startswith(("DEBUG", "MODULE")):
        out = cli(host, command, role)
        assert "NOPERM" in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("role", ["worker", "store"])
def test_workers_can_do_what_kombu_does(host, role):
    """The Redis transport's calls: LPUSH/BRPOP a queue, the binding set, the unacked hash and
    index, redis-py's Lock on unacked_mutex (SET NX PX, then a Lua release), PUBLISH."""
    steps = [
        ("LPUSH celery msg", "1"),
        ("BRPOP celery 1", "celery\nmsg"),
        # One member per role: the worker may not DEL the set after itself.
        (f"SADD _kombu.binding.celery 'celery\x06\x16\x06\x16{role}'", "1"),
        ("HSET unacked tag payload", "1"),
        ("ZADD unacked_index 1 tag", "1"),
        ("SET unacked_mutex token NX PX 5000", "OK"),
        (
            "EVAL \"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1])"
            ' else return 0 end" 1 unacked_mutex token',
            "1",
        ),
        ("HDEL unacked tag", "1"),
        ("ZREM unacked_index tag", "1"),
    ]
    if role == "store":  # workers may none (test_workers_cannot_destroy_or_command and
        # test_workers_read_job_records_and_write_none)
        steps += [
            ("SET morag:job:j1 '{}'", "OK"),
            ("SET morag:lease:j1 owner", "OK"),
            ("DEL morag:lease:j1", "1"),
            ("PUBLISH /0.celery.pidbox hello", "0"),
            ("DEL morag:job:j1 _kombu.binding.celery", "2"),
        ]
    for command, expected in steps:
        out = cli(host, command, role)
        assert out.stdout.strip() == expected, (command, out.stdout, out.stderr)


@pytest.mark.parametrize(
    "command",
    [
        "DEL celery",
        "DEL morag-store",
        "SET celery x",
        "EXPIRE gpu-tasks 0",
        "DEL _kombu.binding.celery",
        "DEL unacked",
        "DEL morag:job:j1",
        "BRPOP morag-store 1",
        "LRANGE morag-store 0 -1",
        "PUBLISH /0.celery.pidbox hello",
    ],
)
def test_workers_cannot_destroy_or_command(host, command):
    """redis_acl_worker_selectors: no DEL/SET/EXPIRE of queues or job records, no consuming
    the store's queue, no PUBLISH on the remote-control channel."""
    verdict = cli(host, f"ACL DRYRUN {USERS['worker'][0]} {command}")
    assert "no permissions" in verdict.stdout, command + verdict.stdout + verdict.stderr


def test_workers_read_job_records_and_write_none(host):
    """redis_worker_job_writes: api (the default): the worker user reads records and leases
    (%R~) and its jobs' changes go through the API; it may not write, expire or delete them,
    nor the outboxes and the watchdog's keys."""
    assert cli(host, "SET morag:job:j2 '{}'", "store").stdout.strip() == "OK"
    assert cli(host, "GET morag:job:j2", "worker").stdout.strip() == "{}"
    assert cli(host, "GET morag:lease:j2", "worker").stdout.strip() == ""
    for command in [
        "SET morag:job:j2 x",
        "EXPIRE morag:job:j2 1",
        "DEL morag:job:j2",
        "SET morag:lease:j2 owner",
        "DEL morag:lease:j2",
        "ZADD morag:jobs:active 1 j2",
        "ZADD morag:outbox 1 j2",
        "ZADD morag:outbox:webhooks 1 j2",
        "SET morag:watchdog me",
    ]:
        out = cli(host, command, "worker")
        assert "NOPERM" in out.stdout + out.stderr, (command, out.stdout, out.stderr)
    cli(host, "DEL morag:job:j2", "store")


@pytest.mark.parametrize(
    ("role", "key", "allowed"),
    [
        ("worker", "morag:batch:b1", False),
        ("worker", "morag:webhook:j1", False),
        ("worker", "morag:reply:r1", False),
        ("worker", "morag:vector-request:r1", False),  # the API's orders to the store
        ("store", "morag:vector-request:r1", True),
        ("worker", "somewhere:else", False),
        ("store", "morag:webhook:j1", True),
        ("store", "morag:batch:b1", False),
        ("api", "morag:batch:b1", True),
        ("api", "somewhere:else", False),
    ],
)
def test_key_patterns(host, role, key, allowed):
    out = cli(host, f"SET {key} x", role)
    if allowed:
        assert out.stdout.strip() == "OK", out.stdout + out.stderr
        cli(host, f"DEL {key}", role)
    else:
        assert "NOPERM" in out.stdout + out.stderr, out.stdout + out.stderr


def test_password_not_in_process_list(host):
    args = host.check_output("ps -eo args")
    for secret in [PASSWORD, *(p for _, p in USERS.values())]:
        assert secret not in args
