"""Why the kernel NFS server did not start, from the facts the role collects on failure.

systemd only says "A dependency job failed" (proc-fs-nfsd.mount could not mount because
the nfsd module is missing, or port 2049 is taken): this names the cause and what to do.
"""

from __future__ import annotations

from typing import Any


def kernel_start_hint(diag: dict[str, Any]) -> str:
    """diag: container (systemd-detect-virt --container, '' or 'none' on bare metal/VM),
    nfsd (one of loaded, available, missing), nfsd_mounted (/proc/fs/nfsd mounted),
    port_2049 (what listens on TCP 2049, '' when nothing), ganesha_active (bool)."""
    container = str(diag.get("container") or "").strip()
    nfsd = str(diag.get("nfsd") or "").strip()
    port = str(diag.get("port_2049") or "").strip()
    hints: list[str] = []
    if container and container != "none":
        hints.append(
            f"this host is a container ({container}): the kernel NFS server needs the host "
            "kernel's nfsd and cannot run here; set nfs_server_implementation: ganesha "
            "(userspace, with the export on a volume and CAP_DAC_READ_SEARCH)"
        )
    if nfsd == "missing":
        hints.append(
            "the nfsd kernel module is not available (modprobe nfsd fails): install the "
            "kernel's extra modules (e.g. linux-modules-extra-$(uname -r) on Ubuntu) or boot a "
            "kernel with NFS server support, or set nfs_server_implementation: ganesha"
        )
    elif nfsd == "available" and not diag.get("nfsd_mounted"):
        hints.append(
            "the nfsd module exists but /proc/fs/nfsd is not mounted: see "
            "`systemctl status proc-fs-nfsd.mount` and `modprobe nfsd`"
        )
    if diag.get("ganesha_active"):
        hints.append(
            "nfs-ganesha is running and holds port 2049: stop and remove it (the role does so "
            "when nfs_server_implementation is kernel) or keep nfs_server_implementation: ganesha"
        )
    elif port:
        hints.append(f"TCP port 2049 is already taken by {port}: stop that service")
    if not hints:
        hints.append(
            "no known cause found: read `journalctl -u nfs-server -u proc-fs-nfsd.mount "
            "-u nfs-mountd -b`"
        )
    return (
        "The kernel NFS server (nfs-server) did not start. "
        + " ".join(f"({i + 1}) {h}." for i, h in enumerate(hints))
        + " Details: journalctl -u nfs-server -u proc-fs-nfsd.mount -b."
    )


class FilterModule:
    """nfs_server_kernel_start_hint: the message for a kernel NFS server that did not start."""

    def filters(self) -> dict[str, Any]:
        return {"nfs_server_kernel_start_hint": kernel_start_hint}
