"""GPU telemetry from NVML: which GPUs a worker reports, and failing soft without NVML."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from morag import gpu_telemetry
from morag.gpu_telemetry import GpuTelemetry, select_devices

DEVICES = [(0, "GPU-aaaa1111-0000"), (1, "GPU-bbbb2222-0000"), (2, "GPU-cccc3333-0000")]


@pytest.mark.parametrize(
    "visible,expected",
    [
        (None, [0, 1, 2]),
        ("1", [1]),
        ("2,0", [2, 0]),
        ("GPU-bbbb2222-0000", [1]),
        ("GPU-cccc", [2]),  # a unique prefix, as CUDA accepts it
        ("GPU-", []),  # ambiguous prefix: CUDA stops there
        ("0,7,1", [0]),  # an invalid entry ends the list
        ("-1", []),
        ("", []),
        ("1,GPU-aaaa1111-0000", [1, 0]),
    ],
)
def test_cuda_visible_devices_selects_gpus(visible, expected) -> None:
    assert [i for i, _ in select_devices(DEVICES, visible)] == expected


class NvmlError(Exception):
    pass


class FakeNvml:
    """The few pynvml calls the telemetry makes, over three fake GPUs."""

    def __init__(self, *, init_fails: bool = False) -> None:
        self.init_fails = init_fails
        self.inits = 0
        self.by_uuid: list[str] = []
        self.util = {0: 10, 1: 87, 2: 0}

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_fails:
            raise NvmlError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(DEVICES)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return DEVICES[handle][1].encode()  # older bindings answer bytes

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        self.by_uuid.append(uuid)
        return next(i for i, u in DEVICES if u == uuid)

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        if handle == 2:
            raise NvmlError("Not Supported")
        return SimpleNamespace(gpu=self.util[handle], memory=5)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30, free=0)


def test_samples_the_bound_gpus_by_uuid() -> None:
    nvml = FakeNvml()
    telemetry = GpuTelemetry("GPU-bbbb2222-0000,2", nvml=nvml)
    first = telemetry.sample()
    assert [g["uuid"] for g in first] == ["GPU-bbbb2222-0000", "GPU-cccc3333-0000"]
    assert first[0] == {
        "index": 1,
        "uuid": "GPU-bbbb2222-0000",
        "name": "NVIDIA H100 80GB HBM3",
        "utilization": 0.87,
        "memory_used_bytes": 2 * 2**30,
        "memory_total_bytes": 80 * 2**30,
    }
    assert first[1]["utilization"] is None  # not supported: that field only is missing
    assert first[1]["memory_used_bytes"] == 3 * 2**30
    nvml.util[1] = 3
    assert telemetry.sample()[0]["utilization"] == 0.03
    assert nvml.inits == 1 and nvml.by_uuid == ["GPU-bbbb2222-0000", "GPU-cccc3333-0000"]


def test_no_nvml_means_no_telemetry_and_a_later_retry() -> None:
    now = [100.0]
    nvml = FakeNvml(init_fails=True)
    telemetry = GpuTelemetry(None, nvml=nvml, clock=lambda: now[0])
    assert telemetry.sample() == []
    assert telemetry.sample() == []
    assert nvml.inits == 1  # not retried at every heartbeat
    now[0] += gpu_telemetry.RETRY_SECONDS
    nvml.init_fails = False
    assert [g["index"] for g in telemetry.sample()] == [0, 1, 2]


def test_a_failing_read_never_raises() -> None:
    nvml = FakeNvml()
    nvml.nvmlDeviceGetMemoryInfo = None  # type: ignore[assignment]  # calling it raises
    telemetry = GpuTelemetry("0", nvml=nvml)
    [gpu] = telemetry.sample()
    assert gpu["utilization"] == 0.1 and gpu["memory_used_bytes"] is None


def test_without_a_driver_here_the_real_module_answers_nothing(monkeypatch) -> None:
    # This machine has nvidia-ml-py but no NVIDIA driver: NVML fails to load, softly.
    monkeypatch.setattr(gpu_telemetry, "_telemetry", None)
    assert gpu_telemetry.sample() == []


def test_a_gpu_less_host_says_nvml_is_unavailable_once(caplog) -> None:
    now = [100.0]
    nvml = FakeNvml(init_fails=True)
    telemetry = GpuTelemetry(None, nvml=nvml, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="morag.gpu_telemetry"):
        for _ in range(5):  # five minutes of heartbeats on a host without a driver
            assert telemetry.sample() == []
            now[0] += gpu_telemetry.RETRY_SECONDS
    assert nvml.inits == 5
    said = [r for r in caplog.records if "NVML unavailable" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
