"""Run on a real GPU host: capture what the roles and the worker read, and what they decide.

Issue 8 asks that the decisions made without a GPU (``nvidia_driver_plan``,
``morag_worker_gpus``, ``morag.devices``, ``morag.gpu_stack``) be fed once with a real
machine's ``nvidia-smi``, ``lspci`` and ``/proc/driver/nvidia`` output. This script does that
and, with ``--model`` and ``--audio``, transcribes with the app's own ``AudioProcessor`` on the
GPU and on the CPU. It also runs the worker's CUDA check (``morag gpu-check --json`` and the
``morag.cuda_check`` probe child alone), whose answers are the passing and failing cases to
keep as test data. The tests import only ``plan_facts`` from here; its captures become test
data (tests/data/gpu/device-*) with their source. Without a GPU every step fails soft, so
running it on a CPU machine checks the script itself.

    PYTHONPATH=app/src python tests/device/gpu_check.py --out /tmp/gpu-check \
        [--model DIR --audio WAV] [--cublas-dir DIR]

Writes ``report.json`` (every step: what ran, what it said, how long it took) and
``captures.tar.gz`` (the raw command outputs). Every step fails soft: a missing tool or
library is recorded, never fatal.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PLAN = ROOT / "roles/nvidia_driver/filter_plugins/nvidia_driver_plan.py"
WORKER_GPUS = ROOT / "roles/morag_worker/filter_plugins/morag_worker_gpus.py"
FACTS = ROOT / "tests/data/gpu/facts-ubuntu2404.json"

ROLE_QUERY = "--query-gpu=index,uuid,pci.bus_id,name,memory.total,mig.mode.current"
DRIVER_QUERY = "--query-gpu=index,uuid,pci.bus_id,name,driver_version,memory.total"
EXTRA_QUERY = (
    "--query-gpu=name,pci.device_id,compute_cap,driver_version,persistence_mode,"
    "mig.mode.current,memory.total,memory.used"
)

report: dict[str, Any] = {"steps": {}}
captures: dict[str, str] = {}


def load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(name: str):
    """Record a step's result, error and duration in the report; never raise."""

    def wrap(fn):
        started = time.monotonic()
        try:
            value = fn()
            report["steps"][name] = {"ok": True, "result": value}
        except BaseException as exc:  # a device check records everything, fails nothing
            report["steps"][name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
            }
        report["steps"][name]["seconds"] = round(time.monotonic() - started, 3)
        print(
            f"[{name}] {json.dumps(report['steps'][name], default=str)[:1500]}",
            flush=True,
        )
        return fn

    return wrap


def run(name: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120):
    """Run a command, keep its output as a capture, return (rc, stdout, stderr)."""
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        captures[name] = f"# {' '.join(argv)}: not found\n"
        return None, "", "not found"
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        captures[name] = f"# {' '.join(argv)}: timed out after {timeout}s\n{exc.stdout or ''}"
        return None, exc.stdout or "", "timeout"
    captures[name] = out.stdout + (f"\n# stderr:\n{out.stderr}" if out.stderr else "")
    return out.returncode, out.stdout, out.stderr


def read(name: str, path: str) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        text = f"# {path}: {exc}\n"
    captures[name] = text
    return text


def sysfs_lspci() -> str:
    """``lspci -Dnn``-shaped lines from /sys/bus/pci (class and ids only, no names): for
    machines without pciutils. The role's parser needs only the slot, class and ids."""
    lines = []
    names = {
        "0300": "VGA compatible controller",
        "0302": "3D controller",
        "0680": "Bridge",
    }
    for dev in sorted(Path("/sys/bus/pci/devices").glob("*")):
        try:
            vendor = (dev / "vendor").read_text().strip()[2:]
            device = (dev / "device").read_text().strip()[2:]
            klass = (dev / "class").read_text().strip()[2:6]
        except OSError:
            continue
        label = names.get(klass, "Device")
        lines.append(f"{dev.name} {label} [{klass}]: Vendor [{vendor}:{device}]")
    return "\n".join(lines) + "\n"


def facts_capture() -> None:
    from morag import devices  # the worker's own query, so the capture is what it reads

    @step("host")
    def _():
        return {
            "hostname": socket.gethostname(),
            "kernel": platform.release(),
            "machine": platform.machine(),
            "python": sys.version.split()[0],
            "os_release": read("os-release", "/etc/os-release"),
            "nvidia_version": read("proc-driver-nvidia-version", "/proc/driver/nvidia/version"),
            "tools": {
                t: shutil.which(t)
                for t in (
                    "nvidia-smi",
                    "nvidia-modprobe",
                    "lspci",
                    "nvidia-persistenced",
                    "systemctl",
                    "nvcc",
                )
            },
            "dev_nodes": sorted(str(p) for p in Path("/dev").glob("nvidia*")),
            "modules": [
                ln
                for ln in read("proc-modules", "/proc/modules").splitlines()
                if ln.startswith("nvidia")
            ],
            "gpu_information": {
                str(p): read(f"proc-gpu-{i}", str(p / "information"))
                for i, p in enumerate(sorted(Path("/proc/driver/nvidia/gpus").glob("*")))
            },
        }

    @step("nvidia-smi")
    def _():
        said = {}
        for name, argv in (
            ("smi-q", ["nvidia-smi", "-q"]),
            ("smi-l", ["nvidia-smi", "-L"]),
            (
                "smi-query-devices",
                ["nvidia-smi", devices.SMI_QUERY, "--format=csv,noheader,nounits"],
            ),
            (
                "smi-query-role",
                ["nvidia-smi", ROLE_QUERY, "--format=csv,noheader,nounits"],
            ),
            ("smi-query-driver", ["nvidia-smi", DRIVER_QUERY, "--format=csv,noheader"]),
            ("smi-query-extra", ["nvidia-smi", EXTRA_QUERY, "--format=csv"]),
        ):
            rc, out, err = run(name, argv)
            said[name] = {"rc": rc, "stdout": out[-4000:], "stderr": err[-1000:]}
        return said

    @step("lspci")
    def _():
        rc, out, _err = run("lspci-dnn", ["lspci", "-Dnn"])
        captures["lspci-sysfs"] = sysfs_lspci()
        return {"rc": rc, "lspci": out, "sysfs": captures["lspci-sysfs"]}


def plan_facts(plan: Any, parsed: dict[str, Any]) -> dict[str, Any]:
    """The nvidia_driver role's facts for an Ubuntu 24.04 host (a captured fact file) with
    the GPUs and NVSwitches ``parsed`` from lspci: the role's defaults, open modules."""
    facts = json.loads(FACTS.read_text())["facts"]
    facts.update(
        source="distribution",
        branch=plan.DEFAULT_BRANCH,
        kernel_modules="open",
        container_mode=False,
        ubuntu_signed_modules=True,
        version="",
        gpus=parsed["gpus"],
        nvswitch_count=len(parsed["nvswitches"]),
        kernel_meta_packages=plan.kernel_meta_packages(facts["packages"], facts["distribution"]),
    )
    facts.setdefault("installed_kernels", [facts["kernel"]])
    return facts


def decisions() -> None:
    plan = load(PLAN, "nvidia_driver_plan")
    gpus_mod = load(WORKER_GPUS, "morag_worker_gpus")
    lspci = captures.get("lspci-dnn", "")
    if not lspci.strip() or lspci.startswith("#"):
        lspci = captures["lspci-sysfs"]

    @step("nvidia_driver_plan")
    def _():
        parsed = plan.parse_lspci(lspci)
        facts = plan_facts(plan, parsed)
        decided = plan.plan(facts)
        return {
            "parsed": parsed,
            "fabricmanager_required": plan.fabricmanager_required(parsed),
            "architectures": [plan.gpu_architecture(g["device_id"]) for g in parsed["gpus"]],
            "plan_ubuntu2404": {
                k: decided[k]
                for k in (
                    "packages",
                    "fabricmanager",
                    "fabricmanager_packages",
                    "errors",
                    "warnings",
                    "notes",
                )
            },
        }

    @step("morag_worker_gpus")
    def _():
        csv = captures.get("smi-query-role", "").split("\n# stderr:")[0]
        listing = captures.get("smi-l", "").split("\n# stderr:")[0]
        gpus = gpus_mod.parse_smi(csv, listing)
        instances = gpus_mod.gpu_instances(gpus, socket.gethostname(), ["gpu-tasks"], 1, "cuda")
        return {
            "gpus": gpus,
            "instances": instances,
            "problems": gpus_mod.gpu_problems(gpus),
        }


def detection(instance_env: dict[str, str], cublas_dir: str | None) -> None:
    from morag import devices, gpu_stack

    gpus = devices.parse_query_gpu(captures.get("smi-query-devices", ""))
    uuid = gpus[0].uuid if gpus else "GPU-none"

    @step("visible_gpus")
    def _():
        said = {}
        for label, env in (
            ("unset", {}),
            ("instance", instance_env),
            ("uuid-prefix", {"CUDA_VISIBLE_DEVICES": uuid[:12]}),
            ("index-0", {"CUDA_VISIBLE_DEVICES": "0"}),
            ("unknown-uuid", {"CUDA_VISIBLE_DEVICES": "GPU-00000000-dead-beef"}),
            ("empty", {"CUDA_VISIBLE_DEVICES": ""}),
        ):
            chosen, note, problem = devices.visible_gpus(env)
            said[label] = {
                "env": env,
                "gpus": [g.as_dict() for g in chosen],
                "note": note,
                "problem": problem and problem.reason,
            }
        return said

    @step("gpu_stack")
    def _():
        version, stack = gpu_stack.resolve()
        checks = gpu_stack.check_libraries(stack)
        return {
            "ctranslate2": version,
            "row": stack.as_dict(version),
            "checks_default_env": [c.__dict__ for c in checks],
        }

    def worker_exit(label: str, extra: dict[str, str]) -> dict[str, Any]:
        env = {
            **os.environ,
            **instance_env,
            **extra,
            "MORAG_DEVICE": "cuda",
            "MORAG_REDIS_URL": "redis://127.0.0.1:1/0",
        }
        code = (
            "import sys; from morag.cli import main; "
            "sys.argv = ['morag', 'worker', '-Q', 'gpu-tasks']; main()"
        )
        rc, out, err = run(f"worker-{label}", [sys.executable, "-c", code], env=env, timeout=120)
        return {"rc": rc, "stdout": out[-2000:], "stderr": err[-3000:]}

    @step("morag worker, MORAG_DEVICE=cuda, no cuBLAS 12 on the path")
    def _():
        return worker_exit("no-cublas", {})

    if cublas_dir:

        @step("morag worker, MORAG_DEVICE=cuda, LD_LIBRARY_PATH with the cuBLAS dir")
        def _():
            path = cublas_dir + ":" + os.environ.get("LD_LIBRARY_PATH", "")
            return worker_exit("cublas-dir", {"LD_LIBRARY_PATH": path})

    def cuda_check(label: str, extra: dict[str, str], argv: list[str]) -> dict[str, Any]:
        """The worker's CUDA check (morag.cuda_check) with the instance's environment; its
        answer is kept as a capture (captures/cuda-check-<label>.txt) for the unit tests."""
        env = {**os.environ, **instance_env, **extra}
        rc, out, err = run(f"cuda-check-{label}", [sys.executable, *argv], env=env, timeout=300)
        answer: Any = out[-4000:]
        for line in reversed(out.splitlines()):
            text = line.removeprefix("MORAG_CUDA_CHECK ")
            if text.startswith("{"):
                answer = json.loads(text)
                break
        return {"rc": rc, "answer": answer, "stderr": err[-2000:]}

    gpu_check_cli = ["-m", "morag.cli", "gpu-check", "--json"]
    probe = ["-m", "morag.cuda_check", "--probe", "--compute-type", "float16"]
    cache = Path(tempfile.mkdtemp(prefix="morag-cuda-cache-"))
    with_cublas: dict[str, str] = {"CUDA_CACHE_PATH": str(cache)}
    if cublas_dir:
        with_cublas["LD_LIBRARY_PATH"] = cublas_dir + ":" + os.environ.get("LD_LIBRARY_PATH", "")

    @step("CUDA check: morag gpu-check --json, default library path")
    def _():
        return cuda_check("cli-default", {"CUDA_CACHE_PATH": str(cache)}, gpu_check_cli)

    @step("CUDA check: morag gpu-check --json, the cuBLAS dir, empty CUDA_CACHE_PATH (PTX JIT)")
    def _():
        return cuda_check("cli-cold", with_cublas, gpu_check_cli)

    @step("CUDA check: morag gpu-check --json, the cuBLAS dir, warm CUDA_CACHE_PATH")
    def _():
        return cuda_check("cli-warm", with_cublas, gpu_check_cli)

    # The probe alone (no nvidia-smi or library version check first): what CTranslate2 does
    # on this GPU even where detection refuses the machine's cuBLAS (the H100 had only 13.x).
    @step("CUDA check: the probe child alone, the cuBLAS dir")
    def _():
        return cuda_check("probe", with_cublas, probe)

    @step("CUDA check: the probe child with no GPU visible (CUDA_VISIBLE_DEVICES empty)")
    def _():
        return cuda_check("probe-no-gpu", {**with_cublas, "CUDA_VISIBLE_DEVICES": ""}, probe)

    @step("gpu_telemetry (NVML)")
    def _():
        from morag import gpu_telemetry

        return gpu_telemetry.GpuTelemetry(instance_env.get("CUDA_VISIBLE_DEVICES")).sample()


# The child that transcribes: the app's AudioProcessor, decoding the WAV itself when PyAV is
# not installed (PyAV is faster-whisper's decoder; it does not fit the device's carry limit).
CHILD = r"""
import json, os, sys, time, types, wave
from pathlib import Path
import numpy as np
try:
    import av  # noqa: F401
    decoder = "pyav"
except ImportError:
    sys.modules["av"] = types.ModuleType("av")
    decoder = "wave+numpy (PyAV not installed)"
import faster_whisper.transcribe as fwt

def wav_decode(path, sampling_rate=16000, split_stereo=False):
    with wave.open(str(path)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32)
    data = data.reshape(-1, channels).mean(axis=1) / 32768.0
    if rate != sampling_rate:
        n = int(len(data) * sampling_rate / rate)
        data = np.interp(np.linspace(0, len(data) - 1, n), np.arange(len(data)), data)
    return data.astype(np.float32)

if decoder != "pyav":
    fwt.decode_audio = wav_decode
import ctranslate2
from morag.config import Settings
from morag.processors.audio import AudioProcessor
from morag.processors.base import ProcessContext

device, model, audio = sys.argv[1], sys.argv[2], Path(sys.argv[3])
out = {"decoder": decoder, "ctranslate2": ctranslate2.__version__,
       "cuda_devices": ctranslate2.get_cuda_device_count()}
if device == "cuda" and out["cuda_devices"]:
    out["cuda_compute_types"] = sorted(ctranslate2.get_supported_compute_types("cuda"))
settings = Settings(whisper_model=model, device=device)
proc = AudioProcessor()
runs, monotonic = [], True
for i in range(3):
    progress = []
    ctx = ProcessContext(settings=settings, device=device, work_dir=Path("/tmp"),
                         report_progress=progress.append)
    t = time.monotonic()
    result = proc.process(audio, {"word_timestamps": i == 2}, ctx)
    runs.append(round(time.monotonic() - t, 3))
    monotonic = monotonic and progress == sorted(progress)
out.update(seconds=runs, content=result["content"], metadata=result["metadata"],
           segments=len(result["segments"]), progress_monotonic=monotonic)
if device == "cuda":
    import pynvml
    pynvml.nvmlInit()
    uuid = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if uuid.startswith("GPU-"):
        h = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    else:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
    out["nvml_compute_processes"] = [
        {"pid": p.pid, "used_mib": (p.usedGpuMemory or 0) // 2**20} for p in procs
    ]
    out["this_pid_on_gpu"] = any(p.pid == os.getpid() for p in procs)
print("RESULT " + json.dumps(out))
"""


def transcription(
    instance_env: dict[str, str],
    model: str,
    audio: str,
    cublas_dir: str | None,
    cache: Path,
) -> None:
    def child(label: str, device: str, extra: dict[str, str]) -> dict[str, Any]:
        env = {**os.environ, **extra}
        started = time.monotonic()
        rc, out, err = run(
            f"transcribe-{label}",
            [sys.executable, "-c", CHILD, device, model, audio],
            env=env,
            timeout=400,
        )
        said = {
            "rc": rc,
            "wall_seconds": round(time.monotonic() - started, 3),
            "stderr": err[-2500:],
        }
        for line in out.splitlines():
            if line.startswith("RESULT "):
                said.update(json.loads(line[7:]))
        return said

    gpu_env = dict(instance_env)
    if cublas_dir:
        gpu_env["LD_LIBRARY_PATH"] = cublas_dir + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    gpu_env["CUDA_CACHE_PATH"] = str(cache)

    @step("transcribe cuda (empty CUDA_CACHE_PATH: PTX JIT)")
    def _():
        shutil.rmtree(cache, ignore_errors=True)
        return child("cuda-cold", "cuda", gpu_env)

    @step("transcribe cuda (warm CUDA_CACHE_PATH)")
    def _():
        return child("cuda-warm", "cuda", gpu_env)

    @step("transcribe cpu")
    def _():
        return child("cpu", "cpu", {"CUDA_VISIBLE_DEVICES": ""})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--audio")
    parser.add_argument("--cublas-dir", help="a directory holding libcublas.so.12")
    parser.add_argument("--only-transcribe", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["cublas_dir"] = args.cublas_dir
    if args.cublas_dir:
        report["cublas_dir_listing"] = sorted(
            f"{p.name} -> {os.path.realpath(p)}" for p in Path(args.cublas_dir).glob("*")
        )
    facts_capture()
    instance_env: dict[str, str] = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if not args.only_transcribe:
        decisions()
    worker = report["steps"].get("morag_worker_gpus", {}).get("result") or {}
    if worker.get("instances"):
        first = worker["instances"][0]
        instance_env.update(
            CUDA_VISIBLE_DEVICES=first["cuda_visible_devices"],
            CUDA_DEVICE_ORDER=first["cuda_device_order"],
        )
    else:
        from morag import devices

        gpus = devices.parse_query_gpu(captures.get("smi-query-devices", ""))
        if gpus:
            instance_env["CUDA_VISIBLE_DEVICES"] = gpus[0].uuid
    report["instance_env"] = instance_env
    if not args.only_transcribe:
        detection(instance_env, args.cublas_dir)
    if args.model and args.audio:
        transcription(instance_env, args.model, args.audio, args.cublas_dir, out / "cuda-cache")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    with tarfile.open(out / "captures.tar.gz", "w:gz") as tar:
        for name, text in captures.items():
            data = text.encode()
            info = tarfile.TarInfo(f"captures/{name}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
