"""The nfs_server role's message when the kernel NFS server does not start: it names the
cause found on the host (container, nfsd module, port 2049 holder) instead of systemd's
"A dependency job failed". The filter runs inside ansible-playbook on the real role too
(molecule scenario firstday); here its decisions are checked one by one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "nfs_server_filters", ROOT / "roles" / "nfs_server" / "filter_plugins" / "nfs_server.py"
)
assert _spec and _spec.loader
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)
hint = filters.kernel_start_hint


def test_container_points_to_ganesha() -> None:
    msg = hint({"container": "docker", "nfsd": "missing", "nfsd_mounted": "", "port_2049": ""})
    assert "container (docker)" in msg
    assert "nfs_server_implementation: ganesha" in msg
    assert "nfsd kernel module is not available" in msg


def test_bare_metal_without_module_names_the_module() -> None:
    msg = hint({"container": "none", "nfsd": "missing"})
    assert "container" not in msg
    assert "modprobe nfsd" in msg


def test_module_present_but_not_mounted() -> None:
    msg = hint({"container": "none", "nfsd": "available", "nfsd_mounted": ""})
    assert "/proc/fs/nfsd is not mounted" in msg
    assert "proc-fs-nfsd.mount" in msg


def test_ganesha_still_running_is_named() -> None:
    msg = hint({"container": "none", "nfsd": "loaded", "nfsd_mounted": "1", "ganesha_active": "1"})
    assert "nfs-ganesha is running" in msg
    assert "port 2049" in msg


def test_other_port_holder_is_named() -> None:
    msg = hint(
        {"container": "none", "nfsd": "loaded", "nfsd_mounted": "1", "port_2049": '"rpc.nfsd"'}
    )
    assert 'taken by "rpc.nfsd"' in msg


def test_no_known_cause_points_to_the_journal() -> None:
    msg = hint({"container": "none", "nfsd": "loaded", "nfsd_mounted": "1"})
    assert "no known cause" in msg
    assert "journalctl -u nfs-server" in msg
