"""The server: Redis, the NFS export, the API."""

import pytest


@pytest.mark.parametrize("unit", ["redis-server", "morag-api"])
def test_services_enabled_and_active(server, unit):
    svc = server.host.service(unit)
    assert svc.is_enabled
    assert svc.is_running


def test_nfs_server_enabled_and_active(server):
    impl = server.vars.get("nfs_server_implementation", "kernel")
    unit = "nfs-ganesha" if impl == "ganesha" else "nfs-server"
    svc = server.host.service(unit)
    assert svc.is_enabled
    assert svc.is_running


def test_export_directory(server):
    path = server.vars.get("nfs_server_export_path", "/srv/morag/shared")
    d = server.host.file(path)
    assert d.is_directory
    assert (d.uid, d.gid) == (
        server.vars.get("morag_app_uid", 2300),
        server.vars.get("morag_app_gid", 2300),
    )


def test_redis_persistence_and_policy(server):
    with server.host.sudo():
        conf = server.host.file("/etc/redis/redis.conf").content_string
    assert "appendonly yes" in conf
    assert "maxmemory-policy noeviction" in conf


def test_api_health_and_auth(server):
    port = server.vars.get("morag_api_port", 8000)
    out = server.host.run(
        'python3 -c "import urllib.request as u\n'
        "def get(p):\n"
        f"  try: return u.urlopen('http://127.0.0.1:{port}' + p, timeout=10).status\n"
        "  except u.HTTPError as e: return e.code\n"
        "print(get('/health'), get('/api/v1/workers'))\""
    )
    assert out.rc == 0, out.stderr
    health, workers = out.stdout.split()
    assert health == "200"
    assert workers in ("401", "403"), "the API must refuse requests without a key"
