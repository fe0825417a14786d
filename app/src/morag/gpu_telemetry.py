"""GPU telemetry for the heartbeat: utilisation and memory of the GPUs this worker is bound to.

Read from NVML (``nvidia-ml-py``, module ``pynvml``) by the supervisor thread in the
worker's parent process, once per heartbeat. NVML is the driver's management library,
not CUDA: it creates no CUDA context, so the parent stays CUDA-free before it forks its
pool children. Everything fails soft: no ``pynvml``, no driver, no GPU or an NVML error
means no telemetry (an empty list), never an exception; a failed start is retried after
``RETRY_SECONDS`` (a driver may be loaded later).

The GPUs are the ones in ``CUDA_VISIBLE_DEVICES`` (indexes as ``nvidia-smi`` numbers them,
or ``GPU-<uuid>`` entries, prefixes allowed as CUDA allows them), resolved once to their
UUIDs; NVML handles are then kept per UUID. Unset means every GPU; an entry that matches
nothing ends the list, as it does for CUDA.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from morag.devices import Gpu, select_visible

log = logging.getLogger("morag.gpu_telemetry")

RETRY_SECONDS = 60.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def select_devices(devices: list[tuple[int, str]], visible: str | None) -> list[tuple[int, str]]:
    """The (index, uuid) pairs a CUDA_VISIBLE_DEVICES value selects, in its order: the
    same reading as the worker's device detection (morag.devices.select_visible)."""
    gpus = [Gpu(index, uuid, "", "", 0) for index, uuid in devices]
    chosen, _ = select_visible(gpus, (), visible)
    return [(g.index, g.uuid) for g in chosen]


class GpuTelemetry:
    """NVML samples of this process's GPUs; ``sample()`` never raises."""

    def __init__(
        self,
        visible: str | None = None,
        nvml: Any = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.visible = visible
        self._nvml = nvml
        self._clock = clock
        self._lock = threading.Lock()
        self._started = False
        self._disabled = False  # pynvml missing: nothing will ever change that
        self._retry_at = 0.0
        self._unavailable: str | None = None  # the reason last logged at info
        self._gpus: list[dict[str, Any]] = []  # {"index", "uuid", "name", "handle"}

    # -- start: import, init, resolve the bound GPUs ------------------------------------
    def _start(self) -> bool:
        if self._started:
            return True
        if self._disabled or self._clock() < self._retry_at:
            return False
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                log.info("nvidia-ml-py is not installed: no GPU telemetry")
                self._disabled = True
                return False
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:
            # Said once per reason: a GPU-less host retries every minute for its lifetime.
            reason = str(exc)
            level = logging.DEBUG if reason == self._unavailable else logging.INFO
            log.log(level, "NVML unavailable (%s): no GPU telemetry for now", reason)
            self._unavailable = reason
            self._retry_at = self._clock() + RETRY_SECONDS
            return False
        try:
            self._gpus = self._resolve(nvml)
        except Exception as exc:
            log.warning("NVML could not list the GPUs (%s): no GPU telemetry for now", exc)
            self._shutdown()
            self._retry_at = self._clock() + RETRY_SECONDS
            return False
        self._started = True
        self._unavailable = None
        log.info("GPU telemetry for %s", ", ".join(g["uuid"] for g in self._gpus) or "no GPU")
        return True

    def _resolve(self, nvml: Any) -> list[dict[str, Any]]:
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            devices.append((index, _text(nvml.nvmlDeviceGetUUID(handle))))
        gpus = []
        for index, uuid in select_devices(devices, self.visible):
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            try:
                name = _text(nvml.nvmlDeviceGetName(handle))
            except Exception:
                name = ""
            gpus.append({"index": index, "uuid": uuid, "name": name, "handle": handle})
        return gpus

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown: %s", exc)
        self._started = False
        self._gpus = []

    # -- sampling --------------------------------------------------------------------------
    def sample(self) -> list[dict[str, Any]]:
        """One dict per bound GPU: index, uuid, name, utilization (0-1), memory bytes."""
        with self._lock:
            try:
                if not self._start():
                    return []
                return [self._read(gpu) for gpu in self._gpus]
            except Exception as exc:  # never let telemetry break the heartbeat
                log.warning("GPU telemetry failed (%s): restarting NVML later", exc)
                self._shutdown()
                self._retry_at = self._clock() + RETRY_SECONDS
                return []

    def _read(self, gpu: dict[str, Any]) -> dict[str, Any]:
        nvml = self._nvml
        out: dict[str, Any] = {
            "index": gpu["index"],
            "uuid": gpu["uuid"],
            "name": gpu["name"],
            "utilization": None,
            "memory_used_bytes": None,
            "memory_total_bytes": None,
        }
        try:
            out["utilization"] = nvml.nvmlDeviceGetUtilizationRates(gpu["handle"]).gpu / 100.0
        except Exception as exc:  # NotSupported (MIG), GPU lost, ...
            log.debug("utilisation of %s: %s", gpu["uuid"], exc)
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(gpu["handle"])
            out["memory_used_bytes"] = int(memory.used)
            out["memory_total_bytes"] = int(memory.total)
        except Exception as exc:
            log.debug("memory of %s: %s", gpu["uuid"], exc)
        return out


_telemetry: GpuTelemetry | None = None
_pid: int | None = None


def sample() -> list[dict[str, Any]]:
    """This process's telemetry (created on first use, for the GPUs it is bound to)."""
    global _telemetry, _pid
    if _telemetry is None or _pid != os.getpid():
        _telemetry = GpuTelemetry(os.environ.get("CUDA_VISIBLE_DEVICES"))
        _pid = os.getpid()
    return _telemetry.sample()
