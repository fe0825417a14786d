"""The Ganesha export, checked on the server and over real NFS (libnfs) from two clients."""

import pytest

testinfra_hosts = ["ansible://molecule-nfs-server"]

URL = "nfs://molecule-nfs-server/morag"


def test_ganesha_enabled_and_running(host):
    svc = host.service("nfs-ganesha")
    assert svc.is_enabled
    assert svc.is_running


def test_export_directory(host):
    d = host.file("/srv/morag/shared")
    assert d.is_directory
    assert (d.uid, d.gid) == (2300, 2300)
    assert d.mode == 0o2770


def test_config_restricts_clients(host):
    conf = host.file("/etc/ganesha/ganesha.conf").content_string
    assert "Access_Type = None;" in conf
    assert "Clients = molecule-nfs-client;" in conf
    assert "Squash = Root_Squash;" in conf
    assert "molecule-nfs-stranger" not in conf


@pytest.fixture(scope="module")
def written(host):
    """A file written over NFS by the service uid (2300) from the allowed client."""
    # The export lives on a docker volume that may outlive a run: start from a clean state.
    host.run_test("rm -f /srv/morag/shared/from-*.txt")
    client = host.get_host(
        "ansible://molecule-nfs-client", ansible_inventory=host.backend.ansible_inventory
    )
    client.run_test("rm -f /tmp/from-worker.txt; echo written-over-nfs > /tmp/from-worker.txt")
    out = client.run(
        f"nfs-cp /tmp/from-worker.txt '{URL}/from-worker.txt?version=4&uid=2300&gid=2300'"
    )
    assert out.rc == 0, out.stderr
    return client


def test_worker_write_lands_owned_by_service_user(host, written):
    f = host.file("/srv/morag/shared/from-worker.txt")
    assert f.exists
    assert (f.uid, f.gid) == (2300, 2300)
    assert f.content_string.strip() == "written-over-nfs"


def test_allowed_client_lists_the_export(written):
    out = written.run(f"nfs-ls '{URL}?version=4&uid=2300&gid=2300'")
    assert out.rc == 0, out.stderr
    assert "from-worker.txt" in out.stdout


def test_root_is_squashed(written):
    # root (uid 0) is mapped to the anonymous user: it cannot write into the 2770 directory.
    out = written.run(f"nfs-cp /tmp/from-worker.txt '{URL}/from-root.txt?version=4&uid=0&gid=0'")
    assert out.rc != 0


def test_host_not_in_export_list_is_refused(host):
    stranger = host.get_host(
        "ansible://molecule-nfs-stranger", ansible_inventory=host.backend.ansible_inventory
    )
    out = stranger.run(f"nfs-ls '{URL}?version=4&uid=2300&gid=2300'")
    assert out.rc != 0
    out = stranger.run(
        f"echo x > /tmp/x; nfs-cp /tmp/x '{URL}/from-stranger.txt?version=4&uid=2300&gid=2300'"
    )
    assert out.rc != 0
    assert not host.file("/srv/morag/shared/from-stranger.txt").exists
