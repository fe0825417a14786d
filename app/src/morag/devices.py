"""Which device this worker computes on, decided without initialising CUDA.

CUDA must not be initialised in the Celery parent before the pool forks, so detection
asks ``nvidia-smi`` (a separate process) and only checks that the CUDA libraries the
GPU stack loads can be found; the model itself loads lazily in the child.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass, field

# CTranslate2 4.x (faster-whisper) loads these; cuDNN 9 for the convolution front end.
CUDA_LIBRARIES = ("libcublas.so.12", "libcudnn.so.9")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mb: int


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # "cpu" or "cuda"
    reason: str
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)

    def gpus_as_dicts(self) -> list[dict[str, object]]:
        return [{"index": g.index, "name": g.name, "memory_mb": g.memory_mb} for g in self.gpus]


def list_gpus(timeout: float = 10.0) -> tuple[tuple[Gpu, ...], str]:
    """GPUs visible to this process (honours CUDA_VISIBLE_DEVICES), and why none if empty."""
    if shutil.which("nvidia-smi") is None:
        return (), "nvidia-smi not found (no NVIDIA driver)"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return (), f"nvidia-smi failed: {exc}"
    if out.returncode != 0:
        detail = (out.stdout + out.stderr).strip().splitlines()
        return (), f"nvidia-smi failed: {detail[0] if detail else out.returncode}"
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            memory = int(float(parts[2])) if parts[2].replace(".", "").isdigit() else 0
            gpus.append(Gpu(int(parts[0]), parts[1], memory))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = {v.strip() for v in visible.split(",") if v.strip()}
        gpus = [g for g in gpus if str(g.index) in wanted]
    return tuple(gpus), "" if gpus else "no GPU visible (CUDA_VISIBLE_DEVICES or none present)"


def missing_cuda_libraries() -> list[str]:
    missing = []
    for lib in CUDA_LIBRARIES:
        try:
            ctypes.CDLL(lib)
        except OSError:
            missing.append(lib)
    return missing


def detect_device(requested: str) -> DeviceInfo:
    """Resolve MORAG_DEVICE (auto|cpu|cuda) to what this worker really uses."""
    if requested == "cpu":
        return DeviceInfo("cpu", "MORAG_DEVICE=cpu")
    gpus, why = list_gpus()
    if not gpus:
        return DeviceInfo("cpu", f"no usable GPU: {why}")
    missing = missing_cuda_libraries()
    if missing:
        return DeviceInfo(
            "cpu", f"CUDA libraries not found: {', '.join(missing)} (see cuda_runtime)", gpus
        )
    return DeviceInfo("cuda", f"{len(gpus)} GPU(s) visible", gpus)
