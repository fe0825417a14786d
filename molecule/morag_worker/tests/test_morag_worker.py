"""morag_worker in gpu mode: one instance per GPU, pinned, consuming gpu-tasks, beating."""

import json
import shlex
import time

import pytest

INSTANCES = [0, 1]


@pytest.mark.parametrize("index", INSTANCES)
def test_instance_enabled_and_running(host, index):
    svc = host.service(f"morag-worker@{index}")
    assert svc.is_enabled
    assert svc.is_running


@pytest.mark.parametrize("index", INSTANCES)
def test_instance_pinned_to_its_gpu(host, index):
    with host.sudo():
        env = host.file(f"/etc/morag/worker-{index}.env").content_string
    # No nvidia-smi in the container: bound by PCI-order index until the driver answers.
    assert f"CUDA_VISIBLE_DEVICES={index}" in env.replace('"', "")
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in env.replace('"', "")
    assert "--queue gpu-tasks" in env
    pid = host.check_output(f"systemctl show -p MainPID --value morag-worker@{index}")
    with host.sudo():
        environ = host.check_output(f"tr '\\0' '\\n' < /proc/{pid}/environ")
    assert f"CUDA_VISIBLE_DEVICES={index}" in environ.splitlines()


def test_no_extra_instances(host):
    assert not host.file("/etc/morag/worker-2.env").exists


def test_graceful_stop_settings(host):
    unit = host.check_output("systemctl cat morag-worker@0")
    assert "KillMode=mixed" in unit
    assert "TimeoutStopSec=420" in unit


@pytest.mark.parametrize("index", INSTANCES)
def test_heartbeat_in_redis(host, index):
    hostname = host.check_output("uname -n")
    name = f"gpu{index}@{hostname}"
    for _ in range(40):
        out = host.run(
            "REDISCLI_AUTH=molecule-redis-password redis-cli --no-auth-warning "
            f"GET 'morag:worker:{name}'"
        )
        if out.stdout.strip():
            beat = json.loads(out.stdout)
            assert "gpu-tasks" in beat["queues"]
            assert beat["device"] == "cpu"
            return
        time.sleep(1)
    pytest.fail(f"no heartbeat morag:worker:{name}")


def wait_for_state(host, unit, wanted, timeout=60):
    state = ""
    for _ in range(timeout):
        state = host.check_output(f"systemctl show -p ActiveState --value {unit}")
        if state in wanted:
            return state
        time.sleep(1)
    return state


def test_cuda_worker_without_gpu_fails_its_unit_with_the_reason(host):
    """MORAG_DEVICE=cuda on a host where CUDA cannot run: exit 78, unit failed, no restart loop."""
    unit = "morag-worker@cudatest"
    with host.sudo():
        env = host.file("/etc/morag/worker-0.env").content_string
        env = env.replace("gpu0@", "cudatest@").replace('MORAG_DEVICE="auto"', "")
        env += "\nMORAG_DEVICE=cuda\n"
        host.run(f"printf '%s' {shlex.quote(env)} > /etc/morag/worker-cudatest.env")
        try:
            host.run(f"systemctl reset-failed {unit}; systemctl start {unit}")
            assert wait_for_state(host, unit, {"failed"}) == "failed"
            show = host.check_output(f"systemctl show -p ExecMainStatus -p NRestarts {unit}")
            assert "ExecMainStatus=78" in show
            assert "NRestarts=0" in show, show  # RestartPreventExitStatus=78: no loop
            journal = host.check_output(f"journalctl -u {unit} --no-pager -o cat")
            assert "MORAG_DEVICE=cuda" in journal
            assert "GPU" in journal or "nvidia-smi" in journal
        finally:
            host.run(f"systemctl stop {unit}; systemctl reset-failed {unit}")
            host.run("rm -f /etc/morag/worker-cudatest.env")


def test_worker_units_require_the_share(host):
    unit = host.check_output("systemctl cat morag-worker@0")
    assert "RequiresMountsFor=/srv/moragshare" in unit
    assert "RestartPreventExitStatus=78" in unit
    # The fstab entry is noauto: only the workers' RequiresMountsFor= mounted it.
    assert host.mount_point("/srv/moragshare").exists


def test_units_pass_systemd_analyze_verify(host):
    with host.sudo():
        out = host.run("systemd-analyze verify morag-worker@0.service")
    assert out.rc == 0, out.stdout + out.stderr


def test_installed_app_names_its_cuda_libraries(host):
    """cuda_runtime installs what this prints (the app's table for its pinned CTranslate2)."""
    out = host.check_output("/opt/morag/venv/bin/python -m morag.gpu_stack --json")
    stack = json.loads(out)
    assert stack["cuda_major"] == 12
    assert any(w.startswith("nvidia-cublas-cu12==") for w in stack["wheels"])
    assert "libcublas.so.12" in stack["libraries"]


def test_gpu_instances_keep_a_cuda_cache(host):
    with host.sudo():
        env = host.file("/etc/morag/worker-0.env").content_string
    assert 'CUDA_CACHE_PATH="/var/lib/morag/cuda-cache"' in env


def test_units_cap_memory_tasks_and_addresses(host):
    unit = host.check_output("systemctl cat morag-worker@0")
    assert "MemoryMax=80%" in unit
    assert "TasksMax=1024" in unit
    deny = next(line for line in unit.splitlines() if line.startswith("IPAddressDeny="))
    allow = next(line for line in unit.splitlines() if line.startswith("IPAddressAllow="))
    for net in ("localhost", "link-local", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"):
        assert net in deny.split("=", 1)[1].split()
    # Redis of this scenario (127.0.0.1), by its resolved address: the extras here are
    # [audio], without yt-dlp, whose policy proxy would need 127.0.0.1 otherwise.
    assert "127.0.0.1" in allow.split("=", 1)[1].split()
    props = host.check_output("systemctl show morag-worker@0 -p TasksMax -p MemoryMax")
    assert "TasksMax=1024" in props
