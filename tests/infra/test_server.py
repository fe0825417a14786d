"""The server: Redis, the NFS export, the API."""

import pytest


@pytest.mark.parametrize("unit", ["redis-server", "morag-api"])
def test_services_enabled_and_active(server, unit):
    svc = server.host.service(unit)
    assert svc.is_enabled
    assert svc.is_running


def _ganesha(server) -> bool:
    return server.host.file("/etc/ganesha/ganesha.conf").contains("MoRAG")


def test_nfs_server_enabled_and_active(server):
    svc = server.host.service("nfs-ganesha" if _ganesha(server) else "nfs-server")
    assert svc.is_enabled
    assert svc.is_running


def _export_paths(server) -> list[str]:
    if _ganesha(server):
        conf = server.host.file("/etc/ganesha/ganesha.conf").content_string
        return [
            line.split("=", 1)[1].strip().rstrip(";").strip().strip('"')
            for line in conf.splitlines()
            if line.strip().startswith("Path")
        ]
    exports = server.host.file("/etc/exports.d/morag.exports").content_string
    return [
        line.split()[0]
        for line in exports.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_export_directory(server):
    paths = _export_paths(server)
    assert paths, "no MoRAG export configured"
    ids = (server.var("morag_app_uid", 2300), server.var("morag_app_gid", 2300))
    for path in paths:
        d = server.host.file(path)
        assert d.is_directory
        assert (d.uid, d.gid) == ids


def test_export_restricted_and_root_squashed(server):
    if _ganesha(server):
        conf = server.host.file("/etc/ganesha/ganesha.conf").content_string
        assert "Access_Type = None;" in conf
        assert "Root_Squash" in conf
        assert "Clients = *" not in conf
    else:
        exports = server.host.file("/etc/exports.d/morag.exports").content_string
        assert "no_root_squash" not in exports
        assert "*(" not in exports


def test_redis_persistence_and_policy(server):
    with server.host.sudo():
        conf = server.host.file("/etc/redis/redis.conf").content_string
    assert "appendonly yes" in conf
    assert "maxmemory-policy noeviction" in conf


def test_api_health_and_auth(server):
    base, ca = server.api_base()
    context = f"ssl.create_default_context(cafile={ca!r})" if ca else "None"
    with server.host.sudo():  # the CA is under /etc/morag (root:morag 0750)
        out = server.host.run(
            'python3 -c "import ssl, urllib.request as u\n'
            "def get(p):\n"
            f"  try: return u.urlopen('{base}' + p, timeout=10, context={context}).status\n"
            "  except u.HTTPError as e: return e.code\n"
            "print(get('/health'), get('/api/v1/workers'))\""
        )
    assert out.rc == 0, out.stderr
    health, workers = out.stdout.split()
    assert health == "200"
    assert workers in ("401", "403"), "the API must refuse requests without a key"


def test_api_is_tls_only_and_verified_with_its_ca(server):
    """Off loopback the API serves HTTPS only (roles/morag_api): plain HTTP gets no answer,
    and a client that does not trust the role's CA is refused."""
    base, ca = server.api_base()
    if ca is None:
        pytest.skip("the API serves plain HTTP here (loopback only)")
    plain = base.replace("https://", "http://")
    out = server.host.run(
        'python3 -c "import urllib.request as u\n'
        "def get(url):\n"
        "  try: u.urlopen(url, timeout=10); return 'answered'\n"
        "  except Exception as e: return type(e).__name__ + ':' + str(e).replace(' ', '_')\n"
        f"print(get('{plain}/health'), get('{base}/health'))\""
    )
    assert out.rc == 0, out.stderr
    over_http, untrusted = out.stdout.split()
    assert over_http != "answered", "the API answered plain HTTP"
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted, untrusted
