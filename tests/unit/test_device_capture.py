"""What a real GPU machine said, replayed through the code that decides without one.

tests/data/gpu/device-h100-sxm-* were captured on 2026-11-27 by tests/device/gpu_check.py on a
lent VM with one H100 80GB HBM3 (SXM5, passed through), driver 580.159.04, Ubuntu 24.04
(each file's header says which command). There the role's parsers bound one worker to the
GPU by UUID, `morag worker` with MORAG_DEVICE=cuda exited 78 with the messages of
device-h100-sxm-worker-cuda.txt, and the app's AudioProcessor transcribed on the GPU
(device-h100-sxm-report.json). These tests feed the same captures to the same code here and
require the same answers, so a change that would have decided differently on that machine
fails without one. With the cuBLAS 12.8 the role installs, that machine is the passing case
of the CUDA check (morag.cuda_check): its CTranslate2 answers come from the report, through
the stand-in of tests/unit/cuda_standin; the failing cases are the stand-in's CUDA errors.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from morag import cuda_check, devices, gpu_stack

from tests.unit.test_cuda_check import FAILURES, h100_compute_types, standin_env
from tests.unit.test_devices import MORAG_WORKER, captured, fake_smi, run, worker_env
from tests.unit.test_gpu_stack import build_stub, needs_cc

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "gpu"
UUID = "GPU-fa494572-2b6a-69e8-15be-d6ee3a5e0f70"
QUERY = "device-h100-sxm-smi-query.csv"
LISTING = "device-h100-sxm-smi-l.txt"


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plan = _load("nvidia_driver_plan", "roles/nvidia_driver/filter_plugins/nvidia_driver_plan.py")
mw = _load("morag_worker_gpus", "roles/morag_worker/filter_plugins/morag_worker_gpus.py")
gpu_check = _load("gpu_check", "tests/device/gpu_check.py")  # the script that made the captures


def smi_q(field: str) -> str:
    """One ``Field : value`` of the captured ``nvidia-smi -q``."""
    for line in captured("device-h100-sxm-smi-q.txt").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    raise KeyError(field)


def worker_said() -> list[str]:
    return [
        line
        for line in captured("device-h100-sxm-worker-cuda.txt").splitlines()
        if line.startswith("morag worker: ")
    ]


def test_every_capture_names_its_source() -> None:
    files = sorted(DATA.glob("device-h100-sxm-*"))
    assert len(files) >= 8
    for path in files:
        if path.suffix == ".json":
            assert "captured 2026-11-27" in json.loads(path.read_text())["_source"]
        else:
            assert path.read_text().startswith("# captured 2026-11-27 by tests/device/gpu_check.py")


def test_lspci_decisions_match_what_the_driver_says() -> None:
    parsed = plan.parse_lspci(captured("device-h100-sxm-lspci-sysfs.txt"))
    assert [(g["pci_slot"], g["device_id"]) for g in parsed["gpus"]] == [("0000:00:06.0", "2330")]
    # The PCI id table gives the architecture nvidia-smi -q reports from the GPU itself.
    assert plan.gpu_architecture("2330") == smi_q("Product Architecture").lower() == "hopper"
    # One SXM GPU passed through without its NVSwitches: no Fabric Manager in this guest.
    assert parsed["nvswitches"] == [] and not plan.fabricmanager_required(parsed)
    # The installed driver satisfies the role's default branch.
    assert plan.version_matches(smi_q("Driver Version"), plan.DEFAULT_BRANCH)
    assert "Open Kernel Module" in captured("device-h100-sxm-proc-driver-nvidia.txt")


def test_the_plan_for_this_gpu_on_ubuntu_2404() -> None:
    parsed = plan.parse_lspci(captured("device-h100-sxm-lspci-sysfs.txt"))
    facts = gpu_check.plan_facts(plan, parsed)
    decided = plan.plan(facts)
    assert decided["errors"] == []
    assert not decided["fabricmanager"]
    assert any(p.startswith("linux-modules-nvidia-580-server-open-") for p in decided["packages"])


def test_one_instance_bound_by_uuid() -> None:
    gpus = mw.parse_smi(captured("device-h100-sxm-smi-query-role.csv"), captured(LISTING))
    assert [(g["uuid"], g["pci_bus_id"], g["mig_mode"]) for g in gpus] == [
        (UUID, "00000000:00:06.0", "Disabled")
    ]
    (instance,) = mw.gpu_instances(gpus, "vm", ["gpu-tasks"], 1, "cuda")
    assert instance["cuda_visible_devices"] == UUID
    assert instance["cuda_device_order"] == "PCI_BUS_ID"
    assert instance["bound_by"] == "uuid"
    assert mw.gpu_problems(gpus) == []


@pytest.mark.parametrize(
    ("visible", "found"),
    [(UUID, True), (UUID[:12], True), ("0", True), ("GPU-00000000-dead-beef", False)],
)
def test_visible_devices_resolve_as_on_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, visible: str, found: bool
) -> None:
    bin_dir = fake_smi(tmp_path / "bin", query=QUERY, listing=LISTING)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    chosen, _note, problem = devices.visible_gpus({"CUDA_VISIBLE_DEVICES": visible})
    assert [g.uuid for g in chosen] == ([UUID] if found else [])
    assert (problem is None) == found
    if found:
        assert chosen[0].memory_mb == 81559 and chosen[0].name == "NVIDIA H100 80GB HBM3"


def test_the_real_cublas_version_was_refused() -> None:
    # cublasGetProperty on the machine's cuBLAS 13.1 said 13.1.0: the check refused it.
    said = worker_said()
    assert len(said) == 2
    problem = gpu_stack.check_library(gpu_stack.CUBLAS_12, lambda _soname: (13, 1, 0)).problem
    assert problem is not None and problem in said[1]


@needs_cc
@pytest.mark.parametrize("case", ["no-cublas", "cublas-13"])
def test_the_worker_says_here_what_it_said_there(tmp_path: Path, case: str) -> None:
    libs = tmp_path / "lib"
    libs.mkdir()
    if case == "cublas-13":
        build_stub(libs, "libcublas.so.12", cublas="13.1.0")
    env = worker_env(
        fake_smi(tmp_path / "bin", query=QUERY, listing=LISTING),
        LD_LIBRARY_PATH=str(libs),
        CUDA_VISIBLE_DEVICES=UUID,
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
    )
    out, _ = run(MORAG_WORKER, env)
    assert out.returncode == devices.EX_CONFIG, out.stderr[-2000:]
    expected = worker_said()[0 if case == "no-cublas" else 1]
    assert expected in out.stderr.splitlines()


def test_the_gpu_transcribed_with_the_app_processor() -> None:
    report = json.loads((DATA / "device-h100-sxm-report.json").read_text())
    cold, warm, cpu = (
        report["transcribe"][k] for k in ("cuda_cold_cache", "cuda_warm_cache", "cpu")
    )
    for run_ in (cold, warm):
        assert run_["rc"] == 0 and run_["metadata"]["device"] == "cuda"
        assert run_["this_pid_on_gpu"], "NVML did not list the transcribing process on the GPU"
        assert run_["metadata"]["compute_type"] == "float16"
    assert cpu["metadata"]["device"] == "cpu"
    # Same words on both devices, give or take a few (float16 vs int8).
    words = [set(re.findall(r"[a-z]+", r["content"].lower())) for r in (warm, cpu)]
    assert len(words[0] & words[1]) / len(words[0] | words[1]) > 0.8
    # The PTX JIT of CTranslate2's kernels for Hopper is paid once per CUDA_CACHE_PATH.
    assert cold["seconds"][0] > 5 * warm["seconds"][0]


def h100_worker_env(tmp_path: Path, plan: str) -> dict[str, str]:
    """The H100's nvidia-smi, the cuBLAS 12.8 the role installs, the stand-in CTranslate2."""
    libs = tmp_path / "lib"
    build_stub(libs, "libcublas.so.12", cublas="12.8.4")
    base = standin_env(plan)
    return worker_env(
        fake_smi(tmp_path / "bin", query=QUERY, listing=LISTING),
        LD_LIBRARY_PATH=str(libs),
        CUDA_VISIBLE_DEVICES=UUID,
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
        PYTHONPATH=base["PYTHONPATH"],
        STANDIN_CUDA=plan,
        STANDIN_CUDA_TYPES=base["STANDIN_CUDA_TYPES"],
    )


@needs_cc
def test_the_h100_is_cuda_with_a_passed_check(tmp_path: Path) -> None:
    # The worker's own decision (runtime.decide_device), as `morag worker` makes it.
    code = (
        "import json; from morag.config import Settings; from morag.runtime import "
        "decide_device; i = decide_device(Settings()); "
        "print(json.dumps([i.device, [g['uuid'] for g in i.gpus_as_dicts()], "
        "i.cuda_check.as_dict()]))"
    )
    out, _ = run([sys.executable, "-c", code], h100_worker_env(tmp_path, "ok"))
    assert out.returncode == 0, out.stderr[-2000:]
    device, uuids, check = json.loads(out.stdout.splitlines()[-1])
    assert (device, uuids) == ("cuda", [UUID])
    assert check["passed"] is True and check["check"] == ""
    assert check["report"]["compute_types"] == sorted(h100_compute_types())
    assert check["report"]["compute_type"] == "float16"  # the worker's Whisper on a GPU


@needs_cc
@pytest.mark.parametrize("case", ["fabric-manager-802", "cublas-broken", "out-of-memory"])
def test_the_h100_worker_exits_78_when_cuda_fails_at_first_use(tmp_path: Path, case: str) -> None:
    plan, reason, check = FAILURES[case]
    out, _ = run(MORAG_WORKER, h100_worker_env(tmp_path, plan))
    assert out.returncode == devices.EX_CONFIG, out.stderr[-2000:]
    [said] = [ln for ln in out.stderr.splitlines() if ln.startswith("morag worker: ")]
    assert said.startswith(
        f"morag worker: MORAG_DEVICE=cuda but this worker cannot use CUDA: {reason}. Check "
    )
    assert check in said and said.endswith("MORAG_DEVICE=auto would run on CPU instead.")


@needs_cc
def test_the_h100_with_auto_falls_back_to_cpu_saying_why(tmp_path: Path) -> None:
    plan, reason, _check = FAILURES["fabric-manager-802"]
    env = h100_worker_env(tmp_path, plan) | {"MORAG_DEVICE": "auto"}
    code = (
        "import json; from morag import cuda_check; i = cuda_check.decide('auto'); "
        "print(json.dumps([i.device, i.reason, i.cuda_check.heartbeat()]))"
    )
    out, _ = run([sys.executable, "-c", code], env)
    assert out.returncode == 0, out.stderr[-2000:]
    device, why, beat = json.loads(out.stdout.splitlines()[-1])
    assert (device, why) == ("cpu", f"no usable GPU: {reason}")
    assert beat["passed"] is False and beat["reason"] == reason


@needs_cc
def test_gpu_check_cli_on_the_h100(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "morag.cli", "gpu-check", "--json"]
    ok, _ = run(command, h100_worker_env(tmp_path / "ok", "ok"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    answer = json.loads(ok.stdout)
    assert answer["passed"] and answer["stage"] == "cuda_check"
    assert [g["uuid"] for g in answer["gpus"]] == [UUID]
    assert answer["libraries"] == {"libcublas.so.12": "12.8.4"}
    plan, reason, _check = FAILURES["cublas-missing"]
    bad, _ = run(command, h100_worker_env(tmp_path / "bad", plan))
    assert bad.returncode == 78
    failed = json.loads(bad.stdout)
    assert not failed["passed"] and failed["reason"] == reason
    assert failed["message"] == devices.unavailable_message(
        cuda_check.CudaCheck(False, reason, "", 0, failed["check"]).problem
    )
