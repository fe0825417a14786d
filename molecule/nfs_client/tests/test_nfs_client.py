"""nfs_client: package, mount point and the fstab entry (containers cannot mount NFS)."""


def test_nfs_common_installed(host):
    assert host.package("nfs-common").is_installed


def test_mount_point(host):
    d = host.file("/var/lib/morag/shared")
    assert d.is_directory
    assert (d.uid, d.gid) == (2300, 2300)
    assert d.mode == 0o750


def test_fstab_entry(host):
    lines = [
        line.split()
        for line in host.file("/etc/fstab").content_string.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    entry = [f for f in lines if f[1] == "/var/lib/morag/shared"]
    assert len(entry) == 1
    source, _, fstype, options = entry[0][:4]
    assert source == "morag-server.example.test:/morag"
    assert fstype == "nfs"
    opts = options.split(",")
    for wanted in (
        "proto=tcp",
        "hard",
        "_netdev",
        "nosuid",
        "nodev",
        "vers=4.2",
        "nofail",
        "x-systemd.mount-timeout=60",
    ):
        assert wanted in opts


def test_systemd_knows_the_mount_unit(host):
    out = host.run("systemctl cat var-lib-morag-shared.mount")
    assert out.rc == 0
    assert "morag-server.example.test:/morag" in out.stdout
