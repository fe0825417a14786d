"""morag_worker in gpu mode: one instance per GPU, pinned, consuming gpu-tasks, beating."""

import json
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
    assert f"CUDA_VISIBLE_DEVICES={index}" in env.replace('"', "")
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
