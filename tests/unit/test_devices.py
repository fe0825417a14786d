"""Device detection (morag.devices): nvidia-smi parsing, CUDA_VISIBLE_DEVICES, MORAG_DEVICE=cuda.

No GPU here: nvidia-smi is a fake executable on PATH that prints output captured on real
hosts (tests/data/gpu/smi-*, each citing its source) or fails the way the real one fails.
The CUDA library versions come from an injected query, or, in the subprocess tests, from the
compiled stand-in of tests/unit/test_gpu_stack.py found through LD_LIBRARY_PATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from morag import devices, gpu_stack
from morag.devices import DeviceUnavailable, Gpu, detect_device

from tests.conftest import free_port
from tests.unit.test_gpu_stack import build_stub, needs_cc

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "gpu"
A100_QUERY = "smi-query-a100x4-mig.csv"
A100_LIST = "smi-l-a100-mig-mixed.txt"  # GPU 0 split into four MIG 1g.20gb devices
GPU1 = "GPU-d8594bd4-0fc3-8595-e355-7c98138f3b95"
MIG1 = "MIG-a45882f0-9215-5733-a0c1-49286ab31cb5"
NVML_FAILS = "Failed to initialize NVML: Unknown Error"


def captured(name: str) -> str:
    """A capture without its source header (lines starting with '#')."""
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("#")) + "\n"


def fake_smi(
    bin_dir: Path,
    *,
    query: str = A100_QUERY,
    listing: str = A100_LIST,
    fail: str = "",
    code: int = 0,
) -> Path:
    """An ``nvidia-smi`` that prints the captures (``-L``: the listing), or fails with ``fail``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "query.out").write_text(captured(query))
    (bin_dir / "list.out").write_text(captured(listing))
    (bin_dir / "fail.out").write_text(captured(fail) if fail else "")
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f"echo \"$*\" >> '{bin_dir}/calls'\n"
        f"if [ -s '{bin_dir}/fail.out' ]; then /bin/cat '{bin_dir}/fail.out'; exit {code}; fi\n"
        f"case \"$1\" in -L) /bin/cat '{bin_dir}/list.out' ;;\n"
        f"  *) /bin/cat '{bin_dir}/query.out' ;;\nesac\n"
    )
    script.chmod(0o755)
    return bin_dir


@pytest.fixture
def smi_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = fake_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def cublas(version: tuple[int, int, int]) -> gpu_stack.VersionQuery:
    def query(soname: str) -> tuple[int, int, int]:
        assert soname == "libcublas.so.12"  # the pinned CTranslate2 needs nothing else
        return version

    return query


def gpus() -> list[Gpu]:
    return devices.parse_query_gpu(captured(A100_QUERY))


def migs() -> list[Gpu]:
    return devices.parse_mig_devices(captured(A100_LIST), gpus())


# -- parsers ------------------------------------------------------------------------------------


def test_parse_query_gpu() -> None:
    parsed = gpus()
    assert [g.index for g in parsed] == [0, 1, 2, 3]
    assert parsed[1] == Gpu(1, GPU1, "00000000:0F:00.0", "NVIDIA A100-SXM4-80GB", 81920)


def test_parse_query_gpu_tolerates_missing_memory_and_noise() -> None:
    text = "\n".join(
        [
            "WARNING: infoROM is corrupted at gpu 0000:01:00.0",
            "0, GPU-abc, 00000000:01:00.0, NVIDIA GB10, [N/A]",
            "",
        ]
    )
    assert devices.parse_query_gpu(text) == [
        Gpu(0, "GPU-abc", "00000000:01:00.0", "NVIDIA GB10", 0)
    ]


def test_parse_mig_devices() -> None:
    found = migs()
    assert len(found) == 4
    assert found[1] == Gpu(
        index=0,
        uuid=MIG1,
        pci_bus_id="00000000:07:00.0",
        name="NVIDIA A100-SXM4-80GB MIG 1g.20gb",
        memory_mb=20 * 1024,
        mig=True,
        parent_uuid="GPU-513536b6-7d19-9063-b049-1e69664bb298",
    )


def test_parse_mig_devices_of_a_gpu_split_in_seven() -> None:
    found = devices.parse_mig_devices(captured("smi-l-a100-mig7.txt"))
    assert len(found) == 7
    assert {g.parent_uuid for g in found} == {"GPU-7fdaf0a5-179b-f636-d15d-daf243e3ff16"}
    assert found[6].uuid == "MIG-1aae4990-b962-574e-8375-119d6d9b9687"


# -- CUDA_VISIBLE_DEVICES ------------------------------------------------------------------------


def visible(value: str | None) -> tuple[list[str], str]:
    chosen, note = devices.select_visible(gpus(), migs(), value)
    return [g.uuid for g in chosen], note


def test_unset_means_every_gpu() -> None:
    assert visible(None) == ([g.uuid for g in gpus()], "")


def test_empty_means_none() -> None:
    assert visible("") == ([], "CUDA_VISIBLE_DEVICES is empty")


@pytest.mark.parametrize("value", ["1", GPU1, "GPU-d8594bd4", "gpu-D8594BD4", " 1 "])
def test_one_gpu_by_index_uuid_or_prefix(value: str) -> None:
    assert visible(value) == ([GPU1], "")


def test_the_order_of_the_list_is_kept() -> None:
    uuids, _ = visible("3,1")
    assert uuids == [gpus()[3].uuid, GPU1]


def test_a_mig_device_by_uuid_and_prefix() -> None:
    assert visible(MIG1) == ([MIG1], "")
    assert visible("MIG-a45882f0") == ([MIG1], "")


@pytest.mark.parametrize(
    ("value", "kept", "said"),
    [
        ("0,7,1", 1, "'7' is not a GPU index here"),
        ("0,-1,1", 1, "'-1' is not a GPU index here"),
        ("GPU-0000,1", 0, "'GPU-0000' matches no UUID"),
        ("GPU-,1", 0, "'GPU-' is a prefix of several UUIDs"),
        ("MIG-ffff", 0, "'MIG-ffff' matches no UUID"),
        ("gpu0", 0, "'gpu0' is neither a GPU index"),
    ],
)
def test_cuda_stops_at_the_first_invalid_entry(value: str, kept: int, said: str) -> None:
    uuids, note = visible(value)
    assert len(uuids) == kept
    assert said in note and note.endswith("CUDA stops there")


def test_integer_indexes_on_mixed_gpus_need_pci_bus_order() -> None:
    mixed = devices.parse_query_gpu(captured("smi-query-a10-t4.csv"))
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in devices._order_note(mixed, "2", None)
    assert devices._order_note(mixed, "2", "PCI_BUS_ID") == ""
    assert devices._order_note(mixed, mixed[2].uuid, None) == ""
    assert devices._order_note(gpus(), "2", None) == ""  # identical GPUs: same order either way


def test_the_query_capture_matches_its_listing() -> None:
    # Both captures describe the same host: the names and UUIDs must agree.
    listed = [line for line in captured("smi-list-a10-t4.txt").splitlines() if line]
    queried = devices.parse_query_gpu(captured("smi-query-a10-t4.csv"))
    assert [f"GPU {g.index}: {g.name} (UUID: {g.uuid})" for g in queried] == listed


# -- detect_device ---------------------------------------------------------------------------------


def test_cpu_never_asks(smi_path: Path) -> None:
    assert detect_device("cpu") == devices.DeviceInfo("cpu", "MORAG_DEVICE=cpu")
    assert not (smi_path / "calls").exists()


def test_auto_uses_the_pinned_gpu(smi_path: Path) -> None:
    info = detect_device("auto", environ={"CUDA_VISIBLE_DEVICES": GPU1}, query=cublas((12, 8, 4)))
    assert info.device == "cuda"
    assert [g.uuid for g in info.gpus] == [GPU1]
    assert dict(info.libraries) == {"libcublas.so.12": "12.8.4"}
    assert info.gpus_as_dicts() == [
        {
            "index": 1,
            "uuid": GPU1,
            "pci_bus_id": "00000000:0F:00.0",
            "name": "NVIDIA A100-SXM4-80GB",
            "memory_mb": 81920,
            "mig": False,
            "parent_uuid": None,
        }
    ]


def test_a_mig_worker_asks_for_the_listing(smi_path: Path) -> None:
    info = detect_device("cuda", environ={"CUDA_VISIBLE_DEVICES": MIG1}, query=cublas((12, 8, 4)))
    assert [g.uuid for g in info.gpus] == [MIG1] and info.gpus[0].mig
    assert "-L" in (smi_path / "calls").read_text().split()


def test_auto_without_nvidia_smi_is_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    info = detect_device("auto", environ={})
    assert info.device == "cpu"
    assert info.reason.startswith("no usable GPU: nvidia-smi not found")


def test_cuda_without_nvidia_smi_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeviceUnavailable) as caught:
        detect_device("cuda", environ={})
    message = str(caught.value)
    assert message.startswith("MORAG_DEVICE=cuda but this worker cannot use CUDA: ")
    assert "nvidia-smi not found" in message
    assert "NVIDIA driver" in message
    assert 'docs/troubleshooting.md, "My GPU worker runs on CPU"' in message


@pytest.mark.parametrize(
    ("capture", "code", "said"),
    [
        ("smi-fail-nvml.txt", 255, f"nvidia-smi failed (exit 255): {NVML_FAILS}"),
        ("smi-fail-driver.txt", 9, "nvidia-smi failed (exit 9): NVIDIA-SMI has failed because"),
    ],
)
def test_a_failing_nvidia_smi_is_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capture: str, code: int, said: str
) -> None:
    bin_dir = fake_smi(tmp_path / "bin", fail=capture, code=code)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert said in detect_device("auto", environ={}).reason
    with pytest.raises(DeviceUnavailable, match=said.replace("(", r"\(").replace(")", r"\)")):
        detect_device("cuda", environ={})


@pytest.mark.parametrize("value", ["", "4", "GPU-0000"])
def test_cuda_with_no_visible_gpu(smi_path: Path, value: str) -> None:
    with pytest.raises(DeviceUnavailable) as caught:
        detect_device("cuda", environ={"CUDA_VISIBLE_DEVICES": value}, query=cublas((12, 8, 4)))
    message = str(caught.value)
    assert f"no GPU visible for CUDA_VISIBLE_DEVICES={value!r}" in message
    assert GPU1 in message  # what is present, to compare with
    assert "nvidia-smi -L" in message


def test_wrong_cublas_version(smi_path: Path) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "1"}
    expected = "libcublas.so.12 is 12.1.3, the app needs 12.8 (see cuda_runtime)"
    info = detect_device("auto", environ=env, query=cublas((12, 1, 3)))
    assert info.device == "cpu" and info.reason == f"no usable GPU: {expected}"
    assert dict(info.libraries) == {"libcublas.so.12": "12.1.3"}
    with pytest.raises(DeviceUnavailable, match=expected.replace("(", r"\(").replace(")", r"\)")):
        detect_device("cuda", environ=env, query=cublas((12, 1, 3)))


def test_missing_cublas(smi_path: Path) -> None:
    def missing(soname: str) -> tuple[int, int, int]:
        raise OSError(f"{soname}: cannot open shared object file: No such file or directory")

    with pytest.raises(DeviceUnavailable) as caught:
        detect_device("cuda", environ={"CUDA_VISIBLE_DEVICES": "1"}, query=missing)
    message = str(caught.value)
    assert "libcublas.so.12 cannot be loaded: libcublas.so.12: cannot open shared object" in message
    assert "/etc/morag/cuda.env" in message and "cuda_runtime" in message


def test_aarch64_wheels_have_no_cuda(smi_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CTranslate2's aarch64 wheels are built CPU-only (its build script): a GH200 or DGX
    # Spark host must not be reported as cuda. The architecture cannot be changed here.
    monkeypatch.setattr(devices.platform, "machine", lambda: "aarch64")
    info = detect_device("auto", environ={"CUDA_VISIBLE_DEVICES": "1"}, query=cublas((12, 8, 4)))
    assert info.device == "cpu"
    assert "wheels for aarch64 are built without CUDA" in info.reason


# -- the worker refuses to start -------------------------------------------------------------------


def worker_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    # Redis on a port where nothing listens: the worker must exit before it connects.
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MORAG_DEVICE": "cuda",
        "MORAG_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        **extra,
    }


def run(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=90, check=False)
    return out, time.monotonic() - started


MORAG_WORKER = [sys.executable, "-m", "morag.cli", "worker", "-Q", "gpu-tasks", "--name", "gpu0@t"]
CELERY_WORKER = [sys.executable, "-m", "celery", "-A", "morag.worker:celery_app", "worker"]


@pytest.mark.parametrize("command", [MORAG_WORKER, CELERY_WORKER], ids=["morag", "celery"])
def test_worker_exits_78_when_cuda_is_unusable(tmp_path: Path, command: list[str]) -> None:
    bin_dir = fake_smi(tmp_path / "bin", fail="smi-fail-nvml.txt", code=255)
    out, took = run(command, worker_env(bin_dir))
    assert out.returncode == devices.EX_CONFIG == 78, out.stderr[-2000:]
    assert f"nvidia-smi failed (exit 255): {NVML_FAILS}" in out.stderr
    assert "My GPU worker runs on CPU" in out.stderr
    assert took < 60


@needs_cc
def test_worker_exits_78_on_a_wrong_cublas(tmp_path: Path) -> None:
    libs = tmp_path / "lib"
    build_stub(libs, "libcublas.so.12", cublas="12.1.3")
    env = worker_env(
        fake_smi(tmp_path / "bin"), LD_LIBRARY_PATH=str(libs), CUDA_VISIBLE_DEVICES=GPU1
    )
    out, _ = run(MORAG_WORKER, env)
    assert out.returncode == 78, out.stderr[-2000:]
    assert "libcublas.so.12 is 12.1.3, the app needs 12.8 (see cuda_runtime)" in out.stderr


@needs_cc
def test_the_right_cublas_found_through_ld_library_path(tmp_path: Path) -> None:
    libs = tmp_path / "lib"
    build_stub(libs, "libcublas.so.12", cublas="12.8.4")
    env = worker_env(
        fake_smi(tmp_path / "bin"), LD_LIBRARY_PATH=str(libs), CUDA_VISIBLE_DEVICES="GPU-d8594bd4"
    )
    code = (
        "import json; from morag.devices import detect_device; i = detect_device('cuda'); "
        "print(json.dumps([i.device, i.gpus_as_dicts(), dict(i.libraries)]))"
    )
    out, _ = run([sys.executable, "-c", code], env)
    assert out.returncode == 0, out.stderr
    device, gpus_seen, libraries = json.loads(out.stdout)
    assert device == "cuda"
    assert [g["uuid"] for g in gpus_seen] == [GPU1]
    assert libraries == {"libcublas.so.12": "12.8.4"}
