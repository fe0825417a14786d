"""The server's allowlist, probed with real TCP connections from a fleet host and a client."""

import pytest
import testinfra

testinfra_hosts = ["docker://fw-server"]


def reaches(source: str, port: int) -> bool:
    src = testinfra.get_host(f"docker://{source}")
    return src.run(f"timeout 3 bash -c '</dev/tcp/fw-server/{port}'").rc == 0


def test_table_loaded_with_drop_policy(host):
    with host.sudo():
        table = host.check_output("nft list table inet morag")
    assert "policy drop" in table
    assert "fleet4" in table


def test_loaded_at_boot(host):
    assert 'include "/etc/nftables.d/morag.nft"' in host.file("/etc/nftables.conf").content_string
    assert host.service("nftables").is_enabled


@pytest.mark.parametrize(
    ("source", "port", "open_"),
    [
        ("fw-worker", 6379, True),
        ("fw-worker", 6380, True),
        ("fw-worker", 2049, True),
        ("fw-worker", 8000, True),
        ("fw-worker", 22, True),
        ("fw-worker", 9999, False),
        ("fw-client", 8000, True),
        ("fw-client", 22, False),  # SSH only from firewall_ssh_sources
        ("fw-client", 6379, False),
        ("fw-client", 6380, False),
        ("fw-client", 2049, False),
        ("fw-client", 9999, False),
    ],
)
def test_allowlist(source, port, open_):
    assert reaches(source, port) is open_


def test_loopback_untouched(host):
    assert host.run("timeout 3 bash -c '</dev/tcp/127.0.0.1/9999'").rc == 0
