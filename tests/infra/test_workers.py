"""Worker hosts: instances active, pinned to their GPU, heartbeats in Redis, the share."""

import json
import time

import pytest


def test_worker_instances_exist(facts):
    if not facts.is_worker and not facts.worker_instances():
        pytest.skip("no worker on this host")
    if (
        facts.is_gpu_worker
        and not facts.var("morag_worker_cpu_fallback", False)
        and not facts.worker_instances()
    ):
        pytest.skip("GPU host without GPU and without CPU fallback")
    assert facts.worker_instances(), "no /etc/morag/worker-*.env on a worker host"


def test_instances_enabled_and_active(facts):
    instances = facts.worker_instances()
    if not instances:
        pytest.skip("no worker instance on this host")
    for index in instances:
        svc = facts.host.service(f"morag-worker@{index}")
        assert svc.is_enabled, f"morag-worker@{index} not enabled"
        assert svc.is_running, f"morag-worker@{index} not running"


def gpu_instances(host_facts) -> list[str]:
    return [
        index
        for index in host_facts.worker_instances()
        if "gpu-tasks"
        in host_facts.env(f"/etc/morag/worker-{index}.env").get("MORAG_WORKER_QUEUE_ARGS", "")
    ]


def test_gpu_instances_pinned(gpu_worker):
    """Each GPU instance is bound to one GPU: by UUID where nvidia-smi answers (indexes can
    reorder across boots), by PCI-order index only while the driver does not answer yet."""
    smi = gpu_worker.host.run("nvidia-smi --query-gpu=uuid --format=csv,noheader")
    uuids = [u.strip() for u in smi.stdout.splitlines() if u.strip()] if smi.rc == 0 else []
    bound = []
    for index in gpu_instances(gpu_worker):
        env = gpu_worker.env(f"/etc/morag/worker-{index}.env")
        visible = env.get("CUDA_VISIBLE_DEVICES", "")
        assert env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
        if uuids:
            assert visible.startswith(("GPU-", "MIG-")), f"worker-{index} bound by index: {visible}"
            if visible.startswith("GPU-"):
                assert visible in uuids
        else:
            assert visible == index.split("-")[0]
        bound.append(visible)
        pid = gpu_worker.host.check_output(
            f"systemctl show -p MainPID --value morag-worker@{index}"
        )
        with gpu_worker.host.sudo():
            environ = gpu_worker.host.check_output(
                f"tr '\\0' '\\n' < /proc/{pid}/environ"
            ).splitlines()
        assert f"CUDA_VISIBLE_DEVICES={visible}" in environ
    assert len(bound) == len(set(bound)), f"two instances share a GPU: {bound}"


def test_gpu_workers_start_after_the_gpu_is_ready(gpu_worker):
    """Where the driver role installed the device-node unit, GPU instances require it (and
    Fabric Manager where it is installed: NVSwitch boards)."""
    instances = gpu_instances(gpu_worker)
    if not instances:
        pytest.skip("no GPU instance on this host")
    if not gpu_worker.host.file("/etc/systemd/system/nvidia-devices.service").exists:
        pytest.skip("the driver role did not run here")
    wanted = ["nvidia-devices.service"]
    if gpu_worker.host.run("systemctl cat nvidia-fabricmanager.service").rc == 0:
        wanted.append("nvidia-fabricmanager.service")
    for index in instances:
        show = dict(
            line.split("=", 1)
            for line in gpu_worker.host.check_output(
                f"systemctl show -p Requires -p After morag-worker@{index}.service"
            ).splitlines()
        )
        for unit in wanted:
            assert unit in show["Requires"].split(), f"morag-worker@{index} lacks Requires={unit}"
            assert unit in show["After"].split(), f"morag-worker@{index} lacks After={unit}"


def test_worker_units_verify(facts):
    instances = facts.worker_instances()
    if not instances:
        pytest.skip("no worker instance on this host")
    with facts.host.sudo():
        out = facts.host.run(f"systemd-analyze verify morag-worker@{instances[0]}.service")
    assert out.rc == 0, out.stdout + out.stderr


def test_persistence_mode(gpu_worker):
    dropin = gpu_worker.host.file(
        "/etc/systemd/system/nvidia-persistenced.service.d/persistence-mode.conf"
    )
    if not dropin.exists:
        pytest.skip("the driver role did not run here")
    exec_start = gpu_worker.host.check_output("systemctl show -p ExecStart nvidia-persistenced")
    assert "--persistence-mode" in exec_start
    assert "--no-persistence-mode" not in exec_start


def test_cpu_instances_not_on_a_gpu(facts):
    for index in facts.worker_instances():
        env = facts.env(f"/etc/morag/worker-{index}.env")
        if "gpu-tasks" in env.get("MORAG_WORKER_QUEUE_ARGS", ""):
            continue
        assert env.get("CUDA_VISIBLE_DEVICES", "") == ""


def test_heartbeats_present(facts):
    instances = facts.worker_instances()
    if not instances:
        pytest.skip("no worker instance on this host")
    names = [facts.env(f"/etc/morag/worker-{i}.env")["MORAG_WORKER_NAME"] for i in instances]
    missing = names
    for _ in range(30):
        beats = facts.redis_json(
            f"print(json.dumps([r.get('morag:worker:' + n) is not None for n in {names!r}]))"
        )
        missing = [n for n, ok in zip(names, beats, strict=True) if not ok]
        if not missing:
            break
        time.sleep(1)
    assert not missing, f"no heartbeat in Redis for {missing}"
    for name in names:
        beat = facts.redis_json(f"print(r.get('morag:worker:{name}').decode())")
        assert beat["name"] == name
        expected_queue = "gpu-tasks" if name.startswith("gpu") else "celery"
        assert expected_queue in beat["queues"]


def test_share_configured(worker):
    # The app's shared directory is what must be the NFS mount.
    mount_point = worker.env().get("MORAG_SHARED_DIR") or worker.var("nfs_client_mount_point")
    fstab = [
        line.split()
        for line in worker.host.file("/etc/fstab").content_string.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    entries = [f for f in fstab if len(f) > 2 and f[1] == mount_point]
    assert entries, f"no fstab entry for {mount_point}"
    assert entries[0][2] in ("nfs", "nfs4")
    if worker.var("nfs_client_mount_state", "mounted") == "mounted":
        assert worker.host.mount_point(mount_point).exists, f"{mount_point} is not mounted"


def test_nvidia_smi(gpu_worker):
    out = gpu_worker.host.run(
        "nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader"
    )
    if out.rc != 0 or not out.stdout.strip():
        pytest.skip(f"no usable GPU here (nvidia-smi: {(out.stdout + out.stderr).strip()[:120]})")
    gpus = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(gpus) >= 1
    branch = gpu_worker.var("nvidia_driver_branch")
    if branch:
        assert all(g.split(",")[2].strip().startswith(str(branch)) for g in gpus)


def test_heartbeat_reports_gpu_device(gpu_worker):
    """Where nvidia-smi answers and the app is not forced to CPU, workers must say cuda."""
    out = gpu_worker.host.run("nvidia-smi -L")
    if out.rc != 0:
        pytest.skip("no usable GPU here")
    if gpu_worker.env().get("MORAG_DEVICE") == "cpu":
        pytest.skip("MORAG_DEVICE=cpu on this host")
    for index in gpu_worker.worker_instances():
        name = gpu_worker.env(f"/etc/morag/worker-{index}.env")["MORAG_WORKER_NAME"]
        beat = gpu_worker.redis_json(f"print(r.get('morag:worker:{name}').decode())")
        assert beat["device"] == "cuda", json.dumps(beat)
