"""`morag-fleet status` against a live fleet: real Celery workers heartbeating into a real
Redis (through the API, and straight from Redis), and an inventory that does not match."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from morag import __version__, fleet

from tests.conftest import RedisServer
from tests.integration.conftest import running_stack
from tests.integration.stack import API_KEY, Stack

INVENTORY = """\
---
morag:
  children:
    server:
      hosts:
        fleet-server:
    gpu_workers:
      hosts:
        fleet-gpu-a:   # its worker consumes gpu-tasks but computes on the CPU
        fleet-gpu-b:   # never provisioned: no worker
        fleet-gpu-c:   # its worker failed the CUDA check
    cpu_workers:
      hosts:
        fleet-cpu-a:
        fleet-cpu-b:   # an older app version
"""


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("fleetstatus")
    workers = {"gpu0@fleet-gpu-a": "gpu-tasks", "cpu0@fleet-cpu-a": "celery"}
    with running_stack(redis_server, root, workers) as s:
        # No GPU and no old release here: two more heartbeats, each a live worker's own
        # heartbeat as supervisor.py wrote it, renamed, published with the app's writer.
        gpu = s.heartbeat("gpu0@fleet-gpu-a")
        cpu = s.heartbeat("cpu0@fleet-cpu-a")
        assert gpu and cpu
        failed_check = {"passed": False, "reason": "cuInit: no CUDA-capable device is detected"}
        fleet.publish(
            s.redis,
            {**gpu, "name": "gpu0@fleet-gpu-c", "device": "cuda", "cuda_check": failed_check},
            ttl=600,
        )
        fleet.publish(s.redis, {**cpu, "name": "cpu0@fleet-cpu-b", "version": "0.0.9"}, ttl=600)
        yield s


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    path = tmp_path / "hosts.yml"
    path.write_text(INVENTORY)
    return path


def morag_fleet(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "MORAG_API_URL": stack.api_url, "MORAG_API_KEY": API_KEY, "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "morag_fleet.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("source", [[], ["--redis"]], ids=["api", "redis"])
def test_status_finds_what_does_not_match_the_inventory(
    stack: Stack, inventory: Path, source: list[str]
) -> None:
    done = morag_fleet(stack, "status", "-i", str(inventory), "--json", *source)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["expected_version"] == __version__
    hosts = {h["host"]: h for h in report["hosts"]}
    assert set(hosts) == {"fleet-gpu-a", "fleet-gpu-b", "fleet-gpu-c", "fleet-cpu-a", "fleet-cpu-b"}
    assert hosts["fleet-cpu-a"]["problems"] == []
    assert hosts["fleet-cpu-a"]["workers"] == ["cpu0@fleet-cpu-a"]
    assert hosts["fleet-gpu-b"]["problems"] == ["no live worker"]
    [on_cpu] = hosts["fleet-gpu-a"]["problems"]
    assert on_cpu.startswith("gpu0@fleet-gpu-a computes on cpu: ")
    assert hosts["fleet-gpu-c"]["problems"] == [
        "gpu0@fleet-gpu-c failed its CUDA check: cuInit: no CUDA-capable device is detected"
    ]
    assert hosts["fleet-cpu-b"]["problems"] == [
        f"cpu0@fleet-cpu-b runs 0.0.9, expected {__version__}"
    ]
    assert report["unknown_workers"] == []


def test_status_for_people_and_a_worker_the_inventory_lacks(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    path.write_text(INVENTORY.replace("        fleet-cpu-a:\n", ""))
    done = morag_fleet(stack, "status", "-i", str(path))
    assert done.returncode == 1, done.stderr
    assert "fleet-gpu-b: no live worker" in done.stdout
    assert "cpu0@fleet-cpu-a: live, but its host fleet-cpu-a is not in the inventory" in (
        done.stdout
    )
    assert "fleet-gpu-a: gpu0@fleet-gpu-a computes on cpu" in done.stdout


def test_status_refuses_a_missing_inventory_and_a_wrong_key(stack: Stack, tmp_path: Path) -> None:
    missing = morag_fleet(stack, "status", "-i", str(tmp_path / "nope.yml"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    path = tmp_path / "hosts.yml"
    path.write_text(INVENTORY)
    wrong = morag_fleet(stack, "status", "-i", str(path), "--api-key", "wrong", "--json")
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)["status"] in (401, 403)  # the API refused the key


def test_add_waits_for_the_new_hosts_workers_and_times_out_clearly(stack: Stack) -> None:
    # `morag-fleet add`'s wait after the playbook, on the live heartbeats of this stack.
    from morag_fleet.cli import wait_for_workers
    from morag_fleet.inventory import InventoryHost

    def read() -> list[dict]:
        return fleet.read_heartbeats(stack.redis)

    gpu_a = InventoryHost("fleet-gpu-a", ("gpu_workers",))
    assert [w["name"] for w in wait_for_workers(gpu_a, read, timeout=30)] == ["gpu0@fleet-gpu-a"]
    # A CPU host whose worker starts while we wait: found once it heartbeats.
    late = InventoryHost("fleet-cpu-late.example.com", ("cpu_workers",))
    stack.start_worker("cpu0@fleet-cpu-late", "celery", wait=False)
    found = wait_for_workers(late, read, timeout=60, interval=0.2)
    assert [w["name"] for w in found] == ["cpu0@fleet-cpu-late"]
    assert found[0]["version"] == __version__
    stack.stop("cpu0@fleet-cpu-late")
    gpu_b = InventoryHost("fleet-gpu-b", ("gpu_workers",))
    with pytest.raises(TimeoutError) as timed_out:
        wait_for_workers(gpu_b, read, timeout=0.5, interval=0.1)
    assert "fleet-gpu-b was provisioned but none of its workers heartbeats" in str(timed_out.value)
    assert "journalctl -u 'morag-worker@*'" in str(timed_out.value)
