"""The CUDA check (morag.cuda_check): a worker decided `cuda` really computes before it says so.

No GPU here. The check's child process runs with the stand-in of tests/unit/cuda_standin first
on its PYTHONPATH: the real CTranslate2 with only its CUDA calls replaced, either computing
on the CPU (the check's real model and forward pass) or raising, at the step where CTranslate2
raises it, the text CTranslate2 raises. Those texts are CUDA's own error strings behind
CTranslate2's ``CUDA failed with error `` (src/cuda/utils.h, CUDA_CHECK), its cuBLAS loader's
``Library libcublas.so.12 is not found or cannot be loaded`` and ``Cannot load symbol ...
from library ...`` (src/cuda/cublas_stub.cc) and ``cuBLAS failed with status CUBLAS_STATUS_...``
(CUBLAS_CHECK); e.g. "RuntimeError: CUDA failed with error no CUDA-capable device is
detected" in github.com/CheshireCC/faster-whisper-GUI/issues/23, error 802 "system not yet
initialized" without Fabric Manager in github.com/pytorch/pytorch/issues/35710.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from morag import cuda_check, fleet
from morag.api.app import create_app
from morag.config import Settings
from morag.cuda_check import CudaCheck, confirm, run_check
from morag.devices import DeviceInfo, DeviceUnavailable, Gpu, Problem, unavailable_message

from tests.conftest import RedisServer

ROOT = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parent / "cuda_standin"
H100_REPORT = ROOT / "tests" / "data" / "gpu" / "device-h100-sxm-report.json"
GPU = Gpu(0, "GPU-fa494572-2b6a-69e8-15be-d6ee3a5e0f70", "00000000:00:06.0", "NVIDIA H100", 81559)


def h100_compute_types() -> list[str]:
    """What get_supported_compute_types("cuda") said on the H100 (tests/device/gpu_check.py)."""
    report = json.loads(H100_REPORT.read_text())
    return report["transcribe"]["cuda_warm_cache"]["cuda_compute_types"]


def standin_env(plan: str = "ok", **extra: str) -> dict[str, str]:
    """This process's environment with the stand-in CTranslate2 first on the path."""
    path = os.pathsep.join(p for p in (str(STANDIN), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "STANDIN_CUDA": plan,
        "STANDIN_CUDA_TYPES": ",".join(h100_compute_types()),
        **extra,
    }


def fake_mig_smi(bin_dir: Path, mode: str) -> Path:
    """An ``nvidia-smi`` answering the MIG mode query for GPU (its format: ``uuid, mode``)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "{GPU.uuid}, {mode}"\n')
    script.chmod(0o755)
    return bin_dir


# -- the child, passing -------------------------------------------------------------------------


def test_a_gpu_that_works_passes() -> None:
    result = run_check(standin_env(), compute_type="float16", memory_mb=1)
    assert result.passed, result.reason
    assert (
        result.reason == "ctranslate2 4.8.5 computed a float16 forward pass on CUDA device 0 of 1"
    )
    assert result.check == ""
    assert set(result.report["steps"]) == {"import", "init", "memory", "compute"}
    assert result.report["compute_types"] == sorted(h100_compute_types())
    assert datetime.fromisoformat(result.checked_at).tzinfo is not None
    assert result.seconds > 0
    assert result.heartbeat() == {
        "passed": True,
        "reason": result.reason,
        "checked_at": result.checked_at,
        "seconds": result.seconds,
    }


def test_the_worker_compute_type_is_the_one_tried() -> None:
    result = run_check(standin_env(), compute_type="int8_float16", memory_mb=1)
    assert result.passed and result.report["compute_type"] == "int8_float16"


# -- the child, failing ---------------------------------------------------------------------------

FAILURES = {
    "fabric-manager-802": (
        "init:CUDA failed with error system not yet initialized",
        "CUDA error 802, Fabric Manager not ready: CUDA failed with error system not yet "
        "initialized",
        "systemctl status nvidia-fabricmanager",
    ),
    "cublas-missing": (
        "compute:Library libcublas.so.12 is not found or cannot be loaded",
        "cuBLAS fails when used: Library libcublas.so.12 is not found or cannot be loaded",
        "cuda_runtime role",
    ),
    "cublas-mismatched": (
        "compute:Cannot load symbol cublasGemmStridedBatchedEx from library libcublas.so.12",
        "cuBLAS fails when used: Cannot load symbol cublasGemmStridedBatchedEx from library "
        "libcublas.so.12",
        "/etc/morag/cuda.env",
    ),
    "cublas-broken": (
        "compute:cuBLAS failed with status CUBLAS_STATUS_NOT_INITIALIZED",
        "cuBLAS fails when used: cuBLAS failed with status CUBLAS_STATUS_NOT_INITIALIZED",
        "cuda_runtime role",
    ),
    "out-of-memory": (
        "memory:CUDA failed with error out of memory",
        "no GPU memory to allocate (another process holds it?): CUDA failed with error out of "
        "memory",
        "nvidia-smi --query-compute-apps",
    ),
    "old-driver": (
        "init:CUDA failed with error CUDA driver version is insufficient for CUDA runtime version",
        "the driver cannot run this CTranslate2 build: CUDA failed with error CUDA driver "
        "version is insufficient for CUDA runtime version",
        "needs driver branch 570 or newer",
    ),
    "exclusive-process": (
        "init:CUDA failed with error CUDA-capable device(s) is/are busy or unavailable",
        "the GPU is busy or unavailable: CUDA failed with error CUDA-capable device(s) is/are "
        "busy or unavailable",
        "nvidia-smi -q -d COMPUTE",
    ),
    "no-ctranslate2": (
        "import:No module named 'ctranslate2'",
        "ctranslate2 cannot be imported: No module named 'ctranslate2'",
        "audio extra",
    ),
    "anything-else": (
        "compute:CUDA failed with error an illegal memory access was encountered",
        "the CUDA check failed at step compute: CUDA failed with error an illegal memory access "
        "was encountered",
        "dmesg",
    ),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_each_known_failure_names_its_cause(case: str) -> None:
    plan, reason, check = FAILURES[case]
    result = run_check(standin_env(plan), memory_mb=1, gpus=[GPU])
    assert not result.passed
    assert result.reason == reason
    assert check in result.check
    assert result.report["step"] == plan.split(":")[0]


@pytest.mark.parametrize("exists", [False, True])
def test_unknown_error_points_at_the_uvm_node(tmp_path: Path, exists: bool) -> None:
    node = tmp_path / "nvidia-uvm"
    if exists:
        node.touch()
    result = run_check(
        standin_env("init:CUDA failed with error unknown error"), memory_mb=1, uvm_node=node
    )
    state = "exists" if exists else "is missing"
    assert result.reason == (
        f"CUDA cannot reach the GPU ({node} {state}): CUDA failed with error unknown error"
    )
    assert "systemctl status nvidia-devices" in result.check and "nvidia_uvm" in result.check


@pytest.mark.parametrize("mode", ["Enabled", "Disabled"])
def test_no_device_on_a_gpu_in_mig_mode_says_mig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # The MIG mode comes from nvidia-smi in the parent (never CUDA), as the role reads it.
    bin_dir = fake_mig_smi(tmp_path / "bin", mode)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    said = "CUDA failed with error no CUDA-capable device is detected"
    result = run_check(standin_env(f"init:{said}"), memory_mb=1, gpus=[GPU])
    if mode == "Enabled":
        assert result.reason == (
            f"MIG mode is enabled on {GPU.uuid}, which this worker is bound to as a whole GPU: "
            f"CUDA sees no device ({said})"
        )
        assert "morag_worker_mig: true" in result.check
    else:
        assert result.reason == f"CUDA sees no device although nvidia-smi lists {GPU.uuid}: {said}"
        assert "CUDA_VISIBLE_DEVICES" in result.check


def test_a_mig_device_binding_is_not_blamed_on_mig() -> None:
    mig = Gpu(0, "MIG-a45882f0-9215-5733-a0c1-49286ab31cb5", "", "A100 MIG 1g.20gb", 0, True)
    problem = cuda_check.classify(
        "init", "CUDA failed with error no CUDA-capable device is detected", gpus=[mig]
    )
    assert problem.reason.startswith("CUDA sees no device although nvidia-smi lists MIG-a458")


def test_a_hang_is_cut_by_the_timeout() -> None:
    result = run_check(standin_env("hang:compute"), memory_mb=1, timeout=10)
    assert not result.passed
    assert result.reason == "the CUDA check did not finish within 10s (hung at step compute)"
    assert "MORAG_CUDA_CHECK_TIMEOUT" in result.check


def test_a_crash_by_signal_is_reported() -> None:
    result = run_check(standin_env("signal:compute"), memory_mb=1)
    assert not result.passed
    assert result.reason == "the CUDA check process was killed by signal SIGSEGV at step compute"
    assert "/proc/driver/nvidia/version" in result.check


def test_a_child_that_dies_without_an_answer(tmp_path: Path) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'Fatal Python error: init' >&2\nexit 3\n")
    broken.chmod(0o755)
    result = run_check(standin_env(), python=str(broken))
    assert result.reason == (
        "the CUDA check failed at step start: the CUDA check process exited 3 at step start "
        "without an answer: Fatal Python error: init"
    )


@pytest.mark.parametrize(
    ("value", "seconds"), [("", 120.0), ("30", 30.0), ("0", 120.0), ("soon", 120.0)]
)
def test_the_timeout_from_the_environment(value: str, seconds: float) -> None:
    assert cuda_check.timeout_from({cuda_check.TIMEOUT_ENV: value}) == seconds


# -- the decision -------------------------------------------------------------------------------

CUDA_INFO = DeviceInfo("cuda", "1 GPU(s) visible", (GPU,), {"libcublas.so.12": "12.8.4"})
FAILED = CudaCheck(False, "CUDA error 802, Fabric Manager not ready: x", "t", 0.5, "Fabric")
PASSED = CudaCheck(True, "ran", "t", 0.5)


def runner(result: CudaCheck, calls: list[dict[str, Any]]) -> Any:
    def run(environ: Any, **kwargs: Any) -> CudaCheck:
        calls.append(kwargs)
        return result

    return run


def test_cuda_with_a_passed_check_stays_cuda_and_carries_it() -> None:
    calls: list[dict[str, Any]] = []
    info = confirm(CUDA_INFO, "cuda", compute_type="int8_float16", run=runner(PASSED, calls))
    assert info.device == "cuda" and info.cuda_check == PASSED
    assert info.gpus == CUDA_INFO.gpus and info.libraries == CUDA_INFO.libraries
    assert calls == [{"compute_type": "int8_float16", "timeout": None, "gpus": (GPU,)}]


def test_cuda_with_a_failed_check_refuses_with_the_cause() -> None:
    with pytest.raises(DeviceUnavailable) as caught:
        confirm(CUDA_INFO, "cuda", run=runner(FAILED, []))
    assert str(caught.value) == unavailable_message(Problem(FAILED.reason, "Fabric"))
    assert caught.value.problem == FAILED.problem


def test_auto_with_a_failed_check_runs_on_cpu_and_says_why() -> None:
    info = confirm(CUDA_INFO, "auto", run=runner(FAILED, []))
    assert info.device == "cpu"
    assert info.reason == f"no usable GPU: {FAILED.reason}"
    assert info.cuda_check == FAILED and info.gpus == CUDA_INFO.gpus


def test_cpu_is_never_checked() -> None:
    calls: list[dict[str, Any]] = []
    cpu = DeviceInfo("cpu", "no usable GPU: nvidia-smi not found")
    assert confirm(cpu, "auto", run=runner(PASSED, calls)) is cpu
    assert calls == []


# -- heartbeats and /ready ------------------------------------------------------------------------


def beat(name: str, device: str, check: dict[str, Any] | None, queues: list[str]) -> dict:
    hb: dict[str, Any] = {"name": name, "queues": queues, "device": device, "processors": []}
    if check is not None:
        hb["cuda_check"] = check
    return hb


BEATS = [
    beat("gpu0@a", "cuda", PASSED.heartbeat(), ["gpu-tasks"]),
    beat("gpu0@old", "cuda", None, ["gpu-tasks"]),  # a worker from before the check
    beat("gpu1@b", "cuda", FAILED.heartbeat(), ["gpu-tasks"]),
    beat("gpu0@c", "cpu", FAILED.heartbeat(), ["gpu-tasks"]),  # MORAG_DEVICE=auto fell back
    beat("cpu@d", "cpu", None, ["celery"]),
]


def test_only_a_passed_check_counts() -> None:
    counted = fleet.gpu_workers(BEATS)
    assert counted.checked == ("gpu0@a",)
    assert counted.unchecked == ("gpu0@old", "gpu1@b")
    assert counted.on_cpu == ("gpu0@c",)
    assert fleet.to_view(BEATS[1]).device == "cuda"  # an old heartbeat still reads


def test_ready_counts_gpu_workers_with_a_passed_check(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    db = redis_server.fresh_db()
    client = redis.Redis.from_url(redis_server.url(db))
    settings = Settings(
        api_keys="unit-api-key",
        worker_token="unit-worker-token",
        redis_url=redis_server.url(db),
        shared_dir=tmp_path,
        store_ingested=False,
    )
    with TestClient(create_app(settings)) as c:
        for hb in BEATS:
            fleet.publish(client, hb, ttl=60)
        answer = c.get("/ready")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ready"  # informational: it never makes /ready degraded
    assert body["checks"]["gpu_workers"] == (
        "1 GPU worker(s) with a passed CUDA check: gpu0@a; not counted, device cuda without a "
        "passed CUDA check (a worker older than the check?): gpu0@old, gpu1@b; consuming "
        "gpu-tasks on the CPU: gpu0@c"
    )
    client.close()


def test_the_child_is_its_own_process() -> None:
    # The parent never imports CTranslate2 for the check: CUDA stays out of the Celery parent.
    code = (
        "import sys; from morag import cuda_check; "
        "r = cuda_check.run_check(memory_mb=1); "
        "print(r.passed, 'ctranslate2' in sys.modules)"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], env=standin_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "False"]
