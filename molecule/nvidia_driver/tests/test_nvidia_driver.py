"""nvidia_driver in container mode: packages, hold, nouveau blacklist, persistenced; and
the skip path on a host without a GPU."""

import json

import pytest

GPU_HOSTS = ["ansible://molecule-nvidia-d12", "ansible://molecule-nvidia-d13"]
PACKAGES = ["nvidia-smi", "libcuda1", "nvidia-persistenced"]


def facts(host):
    with host.sudo():
        return json.loads(host.file("/root/nvidia_driver_facts.json").content_string)


def on_gpu_host(host):
    return host.backend.get_hostname() != "molecule-nvidia-nogpu"


@pytest.fixture
def gpu_host(host):
    if not on_gpu_host(host):
        pytest.skip("host without GPU")
    return host


@pytest.fixture
def no_gpu_host(host):
    if on_gpu_host(host):
        pytest.skip("GPU host")
    return host


@pytest.mark.parametrize("name", PACKAGES)
def test_userspace_packages_installed(gpu_host, name):
    assert gpu_host.package(name).is_installed


def test_driver_branch_matches_release(gpu_host):
    branch = "535" if gpu_host.system_info.codename == "bookworm" else "550"
    assert gpu_host.package("nvidia-smi").version.startswith(branch + ".")


# The libraries that must match the kernel module stay held; nvidia-persistenced is not
# tied to the module's version.
@pytest.mark.parametrize("name", ["nvidia-smi", "libcuda1"])
def test_packages_held(gpu_host, name):
    selections = gpu_host.check_output(f"dpkg --get-selections {name}")
    assert selections.split()[-1] == "hold"


def test_no_kernel_side_in_container_mode(gpu_host):
    assert not gpu_host.package("nvidia-driver").is_installed
    assert not gpu_host.package("dkms").is_installed


def test_non_free_enabled(gpu_host):
    sources = gpu_host.file("/etc/apt/sources.list.d/debian.sources").content_string
    assert "non-free" in sources and "contrib" in sources


def test_nouveau_blacklisted(gpu_host):
    conf = gpu_host.file("/etc/modprobe.d/blacklist-nouveau.conf")
    assert conf.exists
    assert "blacklist nouveau" in conf.content_string
    assert "options nouveau modeset=0" in conf.content_string


def test_persistenced_enabled_not_started(gpu_host):
    svc = gpu_host.service("nvidia-persistenced")
    assert svc.is_enabled
    assert not svc.is_running  # no GPU here: enabled for boot, not started


def test_nvidia_smi_answers_no_gpu(gpu_host):
    out = gpu_host.run("nvidia-smi")
    assert out.rc != 0
    assert "NVML" in out.stdout + out.stderr


def test_facts_on_gpu_host(gpu_host):
    f = facts(gpu_host)
    assert f["gpu_count"] == 1
    assert f["usable"] is False  # nvidia-smi fails without a GPU: "no usable GPU", no crash
    assert f["reboot_required"] is False
    assert f["worker_units"] == ["nvidia-devices.service"]  # no NVSwitch: no Fabric Manager


def test_persistenced_runs_in_persistence_mode(gpu_host):
    """The packaged unit passes --no-persistence-mode; the role's drop-in replaces it."""
    exec_start = gpu_host.check_output("systemctl show -p ExecStart nvidia-persistenced")
    assert "--persistence-mode" in exec_start
    assert "--no-persistence-mode" not in exec_start
    assert "--user nvidia-persistenced" in exec_start


def test_device_node_unit(gpu_host):
    unit = gpu_host.service("nvidia-devices")
    assert unit.is_enabled
    text = gpu_host.check_output("systemctl cat nvidia-devices.service")
    assert "ConditionVirtualization=!container" in text  # skipped here: no kernel module
    script = gpu_host.file("/usr/local/sbin/nvidia-device-nodes")
    assert script.mode == 0o755
    assert "modprobe nvidia_uvm" in script.content_string
    with gpu_host.sudo():
        verify = gpu_host.run("systemd-analyze verify nvidia-devices.service")
    assert verify.rc == 0, verify.stdout + verify.stderr
    # Container mode: no module to load at boot.
    assert not gpu_host.file("/etc/modules-load.d/nvidia-uvm.conf").exists


def test_host_without_gpu_is_skipped(no_gpu_host):
    f = facts(no_gpu_host)
    assert f["gpu_count"] == 0
    assert f["gpus"] == []
    assert f["usable"] is False
    for name in PACKAGES:
        assert not no_gpu_host.package(name).is_installed
    assert not no_gpu_host.file("/etc/modprobe.d/blacklist-nouveau.conf").exists
    assert f["worker_units"] == []
