"""The CUDA check: a GPU worker really computes on its GPU before it takes a job.

``morag.devices.detect_device`` decides ``cuda`` from nvidia-smi and the CUDA libraries'
versions, never initialising CUDA (the Celery parent must not before its pool forks). That
passes with Fabric Manager down (CUDA error 802), a MIG GPU bound as a whole GPU (CUDA sees
no device), no ``/dev/nvidia-uvm`` (999) or a cuBLAS that fails when used. So a worker
decided ``cuda`` runs this check in a child process (``python -m morag.cuda_check --probe``):
initialise the device, allocate memory on it, and run one forward pass of a tiny transformer
encoder with CTranslate2, the engine faster-whisper uses, in the worker's compute type. Its
linear layers are cuBLAS GEMMs (the first one loads ``libcublas.so.12``), its layer norms and
softmax are CTranslate2's own kernels (Hopper and Blackwell JIT-compile them from PTX), and
the result is copied back, so asynchronous kernel errors surface. The model is built in the
child in a few milliseconds: nothing to download, and smaller than loading Whisper.

A failed check is a ``Problem`` naming the cause and what to check: ``MORAG_DEVICE=cuda``
exits 78 with it (``morag.runtime.require_device``), ``auto`` runs on CPU and says why, as
for the problems ``detect_device`` finds. The result travels in the worker's heartbeat
(``CudaCheck.heartbeat``); ``/ready`` counts a ``cuda`` worker only with a passed one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from morag import gpu_stack
from morag.devices import (
    DeviceInfo,
    DeviceUnavailable,
    Gpu,
    Problem,
    detect_device,
    run_smi,
    unavailable_message,
)

TIMEOUT_ENV = "MORAG_CUDA_CHECK_TIMEOUT"
# Generous: the first start on Hopper/Blackwell JIT-compiles CTranslate2's PTX (the H100
# capture: ~19 s for Whisper with an empty CUDA_CACHE_PATH); a hung GPU must still not block
# the worker's start for ever.
DEFAULT_TIMEOUT = 120.0
MEMORY_MB = 256  # allocated on the GPU: fails (out of memory) when another process holds it
MARKER = "MORAG_CUDA_CHECK "  # the child's answer line on stdout; anything else is noise
STEP_MARKER = "MORAG_CUDA_CHECK_STEP "  # progress, so a hang or a crash says where
UVM_NODE = Path("/dev/nvidia-uvm")
NO_DEVICE_COUNTED = "ctranslate2.get_cuda_device_count() is 0"

# -- what to check, per cause -----------------------------------------------------------------

FABRIC_MANAGER = (
    "Fabric Manager: on an NVSwitch (HGX/DGX) board `systemctl status nvidia-fabricmanager` "
    "must be active and `nv-fabricmanager --version` equal the driver's "
    "(`cat /proc/driver/nvidia/version`); the nvidia_driver role installs and pins it "
    '(docs/troubleshooting.md, "HGX boards: Fabric Manager")'
)
MIG = (
    "MIG: a GPU in MIG mode computes only through its MIG devices. Set morag_worker_mig: true "
    "(one worker per MIG device, bound by MIG UUID) and run site.yml for this host, or disable "
    "MIG on the GPU (`nvidia-smi -i <index> -mig 0`, then reset it)"
)
NO_DEVICE = (
    "CUDA_VISIBLE_DEVICES against `nvidia-smi -L`, MIG mode "
    "(`nvidia-smi --query-gpu=uuid,mig.mode.current --format=csv`) and that the worker user "
    "can open /dev/nvidia* (`ls -l /dev/nvidia*`)"
)
DEVICE_NODES = (
    "the device nodes: `systemctl status nvidia-devices` (the nvidia_driver role's oneshot loads "
    "nvidia_uvm and creates /dev/nvidia-uvm, which the hardened worker unit cannot), "
    "`lsmod | grep nvidia_uvm`, `ls -l /dev/nvidia-uvm*`; then restart the worker"
)
CUBLAS = (
    "the CUDA libraries: LD_LIBRARY_PATH from /etc/morag/cuda.env and the cuda_runtime role, "
    "which installs what `python -m morag.gpu_stack --json` lists; a libcublas.so.12 that loads "
    "but fails when used is damaged or not the one the role installed: run the role again"
)
OUT_OF_MEMORY = (
    "which process holds the GPU: `nvidia-smi --query-compute-apps=pid,process_name,"
    "used_memory --format=csv` (another worker instance or program bound to the same GPU?)"
)
BUSY = (
    "the GPU's compute mode: `nvidia-smi -q -d COMPUTE` (Exclusive_Process admits one process; "
    "another one holds the GPU)"
)
HANG = (
    "a GPU that does not answer: `nvidia-smi`, `dmesg | grep -i -e xid -e nvrm`; a first start "
    "on Hopper/Blackwell compiles PTX (CUDA_CACHE_PATH must be writable): raise "
    f"{TIMEOUT_ENV} if it is only slow"
)
CRASH = (
    "the driver's user-space libraries against its kernel module (`cat /proc/driver/nvidia/"
    "version`; a driver upgrade without a reboot) and `dmesg | grep -i -e xid -e nvrm`"
)
IMPORT = "the app's virtualenv: ctranslate2 comes with its audio extra (`pip show ctranslate2`)"
GENERIC = "the error with `nvidia-smi` and `dmesg | grep -i -e xid -e nvrm`"


def _driver_check() -> str:
    try:
        version, stack = gpu_stack.resolve()
    except gpu_stack.UnknownStack:
        return "the NVIDIA driver's branch against `python -m morag.gpu_stack`"
    return (
        f"the NVIDIA driver: ctranslate2 {version} needs driver branch {stack.min_driver_branch} "
        "or newer (`nvidia-smi`; nvidia_driver_branch; reboot after an upgrade) and the "
        "driver's libcuda.so.1 on the library path"
    )


# -- the result -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CudaCheck:
    passed: bool
    reason: str  # short: what ran, or why it failed (the heartbeat's)
    checked_at: str  # ISO 8601, UTC
    seconds: float
    check: str = ""  # what to check (failed only)
    report: Mapping[str, Any] = field(default_factory=dict)  # the child's answer, as it said it

    @property
    def problem(self) -> Problem:
        return Problem(self.reason, self.check)

    def heartbeat(self) -> dict[str, Any]:
        """What the worker's heartbeat carries (``/ready`` and ``morag workers`` read it)."""
        return {
            "passed": self.passed,
            "reason": self.reason,
            "checked_at": self.checked_at,
            "seconds": self.seconds,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.heartbeat(), "check": self.check, "report": dict(self.report)}


# -- the child --------------------------------------------------------------------------------


def _tiny_encoder() -> Any:
    """A one-layer transformer encoder (width 16, random weights) as a CTranslate2 spec."""
    import numpy as np

    # ctranslate2.specs imports torch when installed (docling brings it): seconds, and not
    # needed for numpy weights. None in sys.modules fails that import, which specs expects.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    from ctranslate2 import specs

    width, inner, vocabulary = 16, 32, ["<unk>", "<s>", "</s>", "a"]
    rng = np.random.default_rng(0)

    def weights(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    def zeros(size: int) -> Any:
        return np.zeros(size, np.float32)

    encoder = specs.TransformerEncoderSpec(1, 2)
    encoder.embeddings[0].weight = weights(len(vocabulary), width)
    layer = encoder.layer[0]
    for norm in (encoder.layer_norm, layer.self_attention.layer_norm, layer.ffn.layer_norm):
        norm.gamma, norm.beta = np.ones(width, np.float32), zeros(width)
    qkv, out = layer.self_attention.linear
    qkv.weight, qkv.bias = weights(3 * width, width), zeros(3 * width)
    out.weight, out.bias = weights(width, width), zeros(width)
    layer.ffn.linear_0.weight, layer.ffn.linear_0.bias = weights(inner, width), zeros(inner)
    layer.ffn.linear_1.weight, layer.ffn.linear_1.bias = weights(width, inner), zeros(width)
    spec = specs.TransformerEncoderModelSpec(encoder)
    spec.register_vocabulary(vocabulary)
    spec.validate()
    spec.optimize(quantization=None)  # the compute type is chosen when the model loads
    return spec


def probe(compute_type: str, memory_mb: int, say: Callable[[str], None]) -> dict[str, Any]:
    """In the child: initialise CUDA, allocate, compute. Never raises: the answer says."""
    answer: dict[str, Any] = {"passed": False, "steps": {}}
    step = "import"

    def begin(name: str) -> float:
        nonlocal step
        step = name
        say(STEP_MARKER + name)
        return time.monotonic()

    def done(started: float) -> None:
        answer["steps"][step] = round(time.monotonic() - started, 3)

    try:
        started = begin("import")
        import ctranslate2
        import numpy as np

        answer["ctranslate2"] = ctranslate2.__version__
        done(started)

        started = begin("init")
        # get_cuda_device_count() swallows CUDA's error (0); the device's properties raise it.
        answer["device_count"] = count = ctranslate2.get_cuda_device_count()
        answer["compute_types"] = sorted(ctranslate2.get_supported_compute_types("cuda", 0))
        if count < 1:
            raise RuntimeError(NO_DEVICE_COUNTED)
        done(started)

        started = begin("memory")
        host = np.zeros(memory_mb * 2**20 // 2, dtype=np.float16)
        on_gpu = ctranslate2.StorageView.from_array(host).to_device(ctranslate2.Device.cuda)
        answer["allocated_mb"] = memory_mb
        del on_gpu
        done(started)

        started = begin("compute")
        with tempfile.TemporaryDirectory(prefix="morag-cuda-check-") as model_dir:
            _tiny_encoder().save(model_dir)
            encoder = ctranslate2.Encoder(model_dir, device="cuda", compute_type=compute_type)
            output = encoder.forward_batch([["<s>", "a", "a", "</s>"]])
            # Back on the host: waits for the GPU, so a failed kernel or GEMM raises here.
            hidden = np.asarray(output.last_hidden_state.to_device(ctranslate2.Device.cpu))
        if hidden.shape != (1, 4, 16) or not np.isfinite(hidden.astype(np.float32)).all():
            raise RuntimeError(f"the GPU computed a wrong result (shape {hidden.shape})")
        answer["compute_type"] = compute_type
        done(started)
        answer["passed"] = True
    except BaseException as exc:  # the parent classifies whatever CTranslate2 raised
        answer["step"] = step
        answer["error"] = f"{type(exc).__name__}: {exc}"
        answer["message"] = str(exc)
    return answer


# -- classifying a failure --------------------------------------------------------------------


def mig_enabled_gpus(gpus: Sequence[Gpu]) -> list[str]:
    """UUIDs of the whole GPUs in ``gpus`` whose MIG mode is enabled (nvidia-smi, not CUDA)."""
    whole = {g.uuid for g in gpus if not g.mig}
    if not whole:
        return []
    text, problem = run_smi(["--query-gpu=uuid,mig.mode.current", "--format=csv,noheader"])
    if problem or not text:
        return []
    enabled = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0] in whole and parts[-1] == "Enabled":
            enabled.append(parts[0])
    return enabled


def classify(
    step: str,
    message: str,
    *,
    gpus: Sequence[Gpu] = (),
    mig_enabled: Callable[[Sequence[Gpu]], list[str]] = mig_enabled_gpus,
    uvm_node: Path = UVM_NODE,
) -> Problem:
    """The cause of a failed check, from CTranslate2's error text (CUDA's own strings)."""
    said = message.lower()
    if "system not yet initialized" in said:
        return Problem(f"CUDA error 802, Fabric Manager not ready: {message}", FABRIC_MANAGER)
    if "no cuda-capable device" in said or NO_DEVICE_COUNTED.lower() in said:
        migs = mig_enabled(gpus)
        if migs:
            return Problem(
                f"MIG mode is enabled on {', '.join(migs)}, which this worker is bound to as a "
                f"whole GPU: CUDA sees no device ({message})",
                MIG,
            )
        listed = ", ".join(g.uuid for g in gpus) or "a GPU"
        return Problem(
            f"CUDA sees no device although nvidia-smi lists {listed}: {message}", NO_DEVICE
        )
    if "unknown error" in said or "os call failed" in said:
        node = f"{uvm_node} is missing" if not uvm_node.exists() else f"{uvm_node} exists"
        return Problem(f"CUDA cannot reach the GPU ({node}): {message}", DEVICE_NODES)
    if "cublas" in said:
        return Problem(f"cuBLAS fails when used: {message}", CUBLAS)
    if "out of memory" in said:
        return Problem(
            f"no GPU memory to allocate (another process holds it?): {message}", OUT_OF_MEMORY
        )
    if "busy or unavailable" in said:
        return Problem(f"the GPU is busy or unavailable: {message}", BUSY)
    if any(
        s in said
        for s in (
            "driver version is insufficient",
            "unsupported display driver",
            "no kernel image",
            "ptx",
        )
    ):
        return Problem(f"the driver cannot run this CTranslate2 build: {message}", _driver_check())
    if "not compiled with cuda" in said:
        return Problem(f"this CTranslate2 has no CUDA: {message}", "app/src/morag/gpu_stack.py")
    if step == "import":
        return Problem(f"ctranslate2 cannot be imported: {message}", IMPORT)
    return Problem(f"the CUDA check failed at step {step}: {message}", GENERIC)


# -- running it -------------------------------------------------------------------------------


def timeout_from(environ: Mapping[str, str]) -> float:
    raw = environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def _text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


def _last_step(stdout: str) -> str:
    steps = [
        ln[len(STEP_MARKER) :].strip() for ln in stdout.splitlines() if ln.startswith(STEP_MARKER)
    ]
    return steps[-1] if steps else "start"


def _tail(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[-limit:] or "nothing"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_check(
    environ: Mapping[str, str] | None = None,
    *,
    compute_type: str = "float16",
    timeout: float | None = None,
    memory_mb: int = MEMORY_MB,
    gpus: Sequence[Gpu] = (),
    python: str = sys.executable,
    uvm_node: Path = UVM_NODE,
) -> CudaCheck:
    """Run the probe in a child process with ``environ`` (default: this process's)."""
    env = dict(os.environ if environ is None else environ)
    limit = timeout if timeout is not None else timeout_from(env)
    argv = [python, "-m", "morag.cuda_check", "--probe", "--compute-type", compute_type]
    argv += ["--memory-mb", str(memory_mb)]
    checked_at = _now()
    started = time.monotonic()

    def failed(problem: Problem, report: Mapping[str, Any]) -> CudaCheck:
        seconds = round(time.monotonic() - started, 3)
        return CudaCheck(False, problem.reason, checked_at, seconds, problem.check, report)

    try:
        out = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=limit, check=False
        )
    except subprocess.TimeoutExpired as exc:  # run() killed the child
        step = _last_step(_text(exc.stdout))
        reason = f"the CUDA check did not finish within {limit:g}s (hung at step {step})"
        return failed(Problem(reason, HANG), {"step": step, "stderr": _tail(_text(exc.stderr))})
    except OSError as exc:
        return failed(Problem(f"the CUDA check could not start: {exc}", IMPORT), {})
    if out.returncode < 0:
        try:
            name = signal.Signals(-out.returncode).name
        except ValueError:
            name = str(-out.returncode)
        step = _last_step(out.stdout)
        reason = f"the CUDA check process was killed by signal {name} at step {step}"
        return failed(Problem(reason, CRASH), {"step": step, "stderr": _tail(out.stderr)})
    answers = [ln for ln in out.stdout.splitlines() if ln.startswith(MARKER)]
    try:
        report = json.loads(answers[-1][len(MARKER) :]) if answers else None
    except ValueError:
        report = None
    if not isinstance(report, dict):
        step = _last_step(out.stdout)
        reason = (
            f"the CUDA check process exited {out.returncode} at step {step} without an answer: "
            f"{_tail(out.stderr)}"
        )
        problem = classify(step, reason, gpus=gpus, uvm_node=uvm_node)
        return failed(problem, {"stderr": _tail(out.stderr, 2000)})
    if not report.get("passed"):
        step, message = str(report.get("step")), str(report.get("message"))
        problem = classify(step, message, gpus=gpus, uvm_node=uvm_node)
        return failed(problem, report)
    seconds = round(time.monotonic() - started, 3)
    reason = (
        f"ctranslate2 {report.get('ctranslate2')} computed a {compute_type} forward pass on "
        f"CUDA device 0 of {report.get('device_count')}"
    )
    return CudaCheck(True, reason, checked_at, seconds, "", report)


CheckRunner = Callable[..., CudaCheck]


def confirm(
    info: DeviceInfo,
    requested: str,
    *,
    environ: Mapping[str, str] | None = None,
    compute_type: str = "float16",
    timeout: float | None = None,
    run: CheckRunner = run_check,
) -> DeviceInfo:
    """``info`` with a passed check; ``auto``: cpu and why when it fails; ``cuda``: raises."""
    if info.device != "cuda":
        return info
    result = run(environ, compute_type=compute_type, timeout=timeout, gpus=info.gpus)
    if result.passed:
        return replace(info, cuda_check=result)
    if requested == "cuda":
        raise DeviceUnavailable(unavailable_message(result.problem), result.problem)
    return DeviceInfo(
        "cpu", f"no usable GPU: {result.reason}", info.gpus, info.libraries, cuda_check=result
    )


def decide(
    requested: str,
    *,
    environ: Mapping[str, str] | None = None,
    query: gpu_stack.VersionQuery | None = None,
    compute_type: str = "float16",
    timeout: float | None = None,
    run: CheckRunner = run_check,
) -> DeviceInfo:
    """``detect_device`` (no CUDA in this process), then the CUDA check when it says cuda."""
    info = detect_device(requested, environ=environ, query=query)
    return confirm(
        info, requested, environ=environ, compute_type=compute_type, timeout=timeout, run=run
    )


# -- command line (``morag gpu-check`` and the child) -----------------------------------------


def check_here(
    environ: Mapping[str, str] | None = None,
    *,
    compute_type: str = "float16",
    timeout: float | None = None,
    run: CheckRunner = run_check,
) -> tuple[DeviceInfo | None, CudaCheck | Problem]:
    """What a worker with MORAG_DEVICE=cuda in this environment would find: the device and
    the check's result, or the detection problem that stops before the check."""
    try:
        info = detect_device("cuda", environ=environ)
    except DeviceUnavailable as exc:
        return None, exc.problem or Problem(str(exc), GENERIC)
    return info, run(environ, compute_type=compute_type, timeout=timeout, gpus=info.gpus)


def _child(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m morag.cuda_check")
    parser.add_argument("--probe", action="store_true", required=True)
    parser.add_argument("--compute-type", default="float16")
    parser.add_argument("--memory-mb", type=int, default=MEMORY_MB)
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    answer = probe(args.compute_type, args.memory_mb, say)
    say(MARKER + json.dumps(answer, default=str))
    return 0 if answer["passed"] else 1


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
