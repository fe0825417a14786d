"""Redis as the role leaves it: enabled, listening on loopback only, password required."""

PASSWORD = "molecule-redis-password"


def test_service_enabled_and_running(host):
    svc = host.service("redis-server")
    assert svc.is_enabled
    assert svc.is_running


def test_container_drop_in_disables_private_users(host):
    drop_in = host.file("/etc/systemd/system/redis-server.service.d/morag.conf")
    assert drop_in.exists
    assert "PrivateUsers=false" in drop_in.content_string


def test_config_protected(host):
    conf = host.file("/etc/redis/redis.conf")
    assert conf.user == "redis"
    assert conf.mode == 0o640
    content = conf.content_string
    assert "appendonly yes" in content
    assert "maxmemory-policy noeviction" in content


def test_listens_on_loopback_only(host):
    assert host.socket("tcp://127.0.0.1:6379").is_listening
    assert not host.socket("tcp://0.0.0.0:6379").is_listening


def test_password_required(host):
    with host.sudo():
        refused = host.run("redis-cli -h 127.0.0.1 PING")
        assert "NOAUTH" in refused.stdout + refused.stderr
        ok = host.run(f"REDISCLI_AUTH={PASSWORD} redis-cli -h 127.0.0.1 PING")
        assert ok.stdout.strip() == "PONG"


def test_password_not_in_process_list(host):
    assert PASSWORD not in host.check_output("ps -eo args")
