"""GPU worker instances (roles/morag_worker/filter_plugins/morag_worker_gpus.py).

nvidia-smi output comes from tests/data/gpu/smi-l-*.txt (``nvidia-smi -L`` captures, each
citing its source). The ``--query-gpu`` CSV rows below are built from the same captures: UUIDs
and names from ``nvidia-smi -L``, PCI bus ids and memory from the nvidia-smi tables or lspci
listings of the same sources where given, otherwise marked as illustrative.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import jinja2
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "gpu"
PLUGIN = ROOT / "roles" / "morag_worker" / "filter_plugins" / "morag_worker_gpus.py"
TEMPLATE = ROOT / "roles" / "morag_worker" / "templates" / "worker.env.j2"


def _load_plugin():
    spec = importlib.util.spec_from_file_location("morag_worker_gpus", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mw = _load_plugin()
FilterError = mw.AnsibleFilterError
HOST = "gpu-a.example.org"
SYSTEMD_INSTANCE = re.compile(r"^[A-Za-z0-9:_.\\-]+$")


def smi_l(name: str) -> str:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("#")) + "\n"


def uuids(name: str) -> list:
    return re.findall(r"\(UUID: (GPU-[0-9a-f-]+)\)", smi_l(name))


# 8x H100 of smi-l-hgx-h100.txt; bus ids from the VM's lspci in the same source (section
# 3.1.13: 0000:0d:00.0 .. 0000:14:00.0), memory as nvidia-smi reports an H100 80GB HBM3
# (81559 MiB, github.com/google/gvisor/issues/10413).
H100_BUSES = ["0D", "0E", "0F", "10", "11", "12", "13", "14"]
H100_CSV = "".join(
    f"{i}, {uuid}, 00000000:{bus}:00.0, NVIDIA H100 80GB HBM3, 81559, Disabled\n"
    for i, (uuid, bus) in enumerate(zip(uuids("smi-l-hgx-h100.txt"), H100_BUSES, strict=True))
)

# 4x L4 of smi-l-l4x4.txt: bus ids 38/3A from that source's nvidia-smi table, 3C/3E from its
# lspci listing; 23034 MiB and MIG "N/A" from its nvidia-smi table.
L4_CSV = "".join(
    f"{i}, {uuid}, 00000000:{bus}:00.0, NVIDIA L4, 23034, [N/A]\n"
    for i, (uuid, bus) in enumerate(
        zip(uuids("smi-l-l4x4.txt"), ["38", "3A", "3C", "3E"], strict=True)
    )
)

# The A100s of smi-l-a100-mig-mixed.txt, GPU 0 in MIG mode; bus ids illustrative, 81920 MiB
# as nvidia-smi reports an A100-SXM4-80GB (github.com/NVIDIA/nccl-tests/issues/228).
A100_BUSES = ["07", "0F", "47", "4E"]
A100_MIG_CSV = "".join(
    f"{i}, {uuid}, 00000000:{bus}:00.0, NVIDIA A100-SXM4-80GB, 81920, "
    f"{'Enabled' if i == 0 else 'Disabled'}\n"
    for i, (uuid, bus) in enumerate(zip(uuids("smi-l-a100-mig-mixed.txt"), A100_BUSES, strict=True))
)


def instances(gpus, **overrides) -> list:
    arguments = {
        "hostname": HOST,
        "queues": ["gpu-tasks"],
        "concurrency": 1,
        "device": "cuda",
        "mig": False,
        "fallback_count": 0,
    }
    arguments.update(overrides)
    return mw.gpu_instances(gpus, **arguments)


# ---------------------------------------------------------------------------------------------
# nvidia-smi


def test_parse_smi_hgx_h100() -> None:
    gpus = mw.parse_smi(H100_CSV, smi_l("smi-l-hgx-h100.txt"))
    assert len(gpus) == 8
    assert gpus[0] == {
        "index": 0,
        "uuid": "GPU-c7a0294c-c2c2-5476-438c-fb468eaa223b",
        "pci_bus_id": "00000000:0D:00.0",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_mb": 81559,
        "mig_mode": "Disabled",
        "mig_devices": [],
    }
    assert [gpu["uuid"] for gpu in gpus] == uuids("smi-l-hgx-h100.txt")


def test_parse_smi_without_list_output() -> None:
    gpus = mw.parse_smi(L4_CSV)
    assert [gpu["pci_bus_id"] for gpu in gpus] == [
        f"00000000:{b}:00.0" for b in ("38", "3A", "3C", "3E")
    ]
    assert {gpu["mig_mode"] for gpu in gpus} == {"[N/A]"}
    assert {gpu["memory_mb"] for gpu in gpus} == {23034}


def test_parse_smi_sorts_by_pci_bus_id_numerically() -> None:
    # nvidia-smi's index order is not PCI order; lower/upper case hex must not matter either.
    rows = H100_CSV.splitlines()
    scrambled = [
        rows[5],
        rows[0].replace(":0D:", ":0d:"),
        rows[7],
        rows[1],
        rows[2],
        rows[3],
        rows[4],
        rows[6],
    ]
    gpus = mw.parse_smi("\n".join(scrambled) + "\n")
    assert [gpu["uuid"] for gpu in gpus] == uuids("smi-l-hgx-h100.txt")


def test_parse_smi_attaches_mig_devices_to_their_gpu() -> None:
    gpus = mw.parse_smi(A100_MIG_CSV, smi_l("smi-l-a100-mig-mixed.txt"))
    assert [gpu["mig_mode"] for gpu in gpus] == ["Enabled", "Disabled", "Disabled", "Disabled"]
    assert gpus[0]["mig_devices"] == [
        {"uuid": "MIG-ce861fb0-a248-58ce-a9a8-f9adbc22a66a", "profile": "1g.20gb", "device": 0},
        {"uuid": "MIG-a45882f0-9215-5733-a0c1-49286ab31cb5", "profile": "1g.20gb", "device": 1},
        {"uuid": "MIG-f00d722c-f4e1-52c9-aa31-750441ae1bfe", "profile": "1g.20gb", "device": 2},
        {"uuid": "MIG-930574a9-d43a-5d2b-95da-3e68384c8d6b", "profile": "1g.20gb", "device": 3},
    ]
    assert [gpu["mig_devices"] for gpu in gpus[1:]] == [[], [], []]


def test_parse_smi_matches_mig_devices_by_gpu_uuid_not_position() -> None:
    mig_gpu, *whole = uuids("smi-l-a100-mig-mixed.txt")
    csv = (
        f"0, {whole[0]}, 00000000:07:00.0, NVIDIA A100-SXM4-80GB, 81920, Disabled\n"
        f"1, {whole[1]}, 00000000:0F:00.0, NVIDIA A100-SXM4-80GB, 81920, Disabled\n"
        f"2, {mig_gpu}, 00000000:47:00.0, NVIDIA A100-SXM4-80GB, 81920, Enabled\n"
        f"3, {whole[2]}, 00000000:4E:00.0, NVIDIA A100-SXM4-80GB, 81920, Disabled\n"
    )
    gpus = mw.parse_smi(csv, smi_l("smi-l-a100-mig-mixed.txt"))
    assert [len(gpu["mig_devices"]) for gpu in gpus] == [0, 0, 4, 0]
    assert [item["id"] for item in instances(gpus, mig=True)] == [
        "0",
        "1",
        "2-mig0",
        "2-mig1",
        "2-mig2",
        "2-mig3",
        "3",
    ]


def test_parse_smi_seven_mig_devices() -> None:
    uuid = uuids("smi-l-a100-mig7.txt")[0]
    gpus = mw.parse_smi(
        f"0, {uuid}, 00000000:07:00.0, NVIDIA A100-SXM4-80GB, 81920, Enabled\n",
        smi_l("smi-l-a100-mig7.txt"),
    )
    assert [device["device"] for device in gpus[0]["mig_devices"]] == list(range(7))
    assert {device["profile"] for device in gpus[0]["mig_devices"]} == {"1g.10gb"}


def test_parse_smi_legacy_mig_uuids() -> None:
    # R450/R460 named MIG devices MIG-GPU-<uuid>/<gi>/<ci>.
    listing = (
        "GPU 0: A100-PCIE-40GB (UUID: GPU-c66f2b7d-c5d2-c0d1-e453-6f7f47a3b1d4)\n"
        "  MIG 3g.20gb Device 0: (UUID: MIG-GPU-c66f2b7d-c5d2-c0d1-e453-6f7f47a3b1d4/1/0)\n"
        "  MIG 3g.20gb Device 1: (UUID: MIG-GPU-c66f2b7d-c5d2-c0d1-e453-6f7f47a3b1d4/2/0)\n"
    )
    csv = (
        "0, GPU-c66f2b7d-c5d2-c0d1-e453-6f7f47a3b1d4, 00000000:3B:00.0, A100-PCIE-40GB, 40536, "
        "Enabled\n"
    )
    devices = mw.parse_smi(csv, listing)[0]["mig_devices"]
    assert [device["uuid"] for device in devices] == [
        "MIG-GPU-c66f2b7d-c5d2-c0d1-e453-6f7f47a3b1d4/1/0",
        "MIG-GPU-c66f2b7d-c5d2-c0d1-e453-6f7f47a3b1d4/2/0",
    ]


def test_parse_smi_memory_not_available() -> None:
    csv = (
        "0, GPU-00000000-0000-0000-0000-000000000001, 00000000:01:00.0, NVIDIA GB10, [N/A], [N/A]\n"
    )
    assert mw.parse_smi(csv)[0]["memory_mb"] is None


def test_parse_smi_no_gpu() -> None:
    assert mw.parse_smi("", "") == []
    assert mw.parse_smi(None, None) == []
    assert mw.parse_smi("", "No devices found.\n") == []


@pytest.mark.parametrize(
    ("query", "listing"),
    [
        ("Failed to initialize NVML: Unknown Error\n", ""),
        ("0, GPU-1, 00000000:01:00.0, NVIDIA L4, 23034\n", ""),
        ("x, GPU-1, 00000000:01:00.0, NVIDIA L4, 23034, Disabled\n", ""),
        ("0, GPU-1, 01:00.0, NVIDIA L4, 23034, Disabled\n", ""),
        ("0, GPU-1, 00000000:01:00.0, NVIDIA L4, 23 GiB, Disabled\n", ""),
        (
            "0, GPU-1, 00000000:01:00.0, L4, 1, Disabled\n"
            "1, GPU-1, 00000000:02:00.0, L4, 1, Disabled\n",
            "",
        ),
        (L4_CSV, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"),
        (["0"], ""),
    ],
)
def test_parse_smi_refuses_malformed_output(query, listing) -> None:
    with pytest.raises(FilterError):
        mw.parse_smi(query, listing)


# ---------------------------------------------------------------------------------------------
# Instances


def test_one_instance_per_gpu_bound_by_uuid() -> None:
    gpus = mw.parse_smi(H100_CSV, smi_l("smi-l-hgx-h100.txt"))
    result = instances(gpus, concurrency=2)
    assert [item["id"] for item in result] == [str(i) for i in range(8)]
    assert result[0] == {
        "id": "0",
        "name": f"gpu0@{HOST}",
        "queues": ["gpu-tasks"],
        "concurrency": 2,
        "cuda_visible_devices": "GPU-c7a0294c-c2c2-5476-438c-fb468eaa223b",
        "cuda_device_order": "PCI_BUS_ID",
        "device": "cuda",
        "gpu_uuid": "GPU-c7a0294c-c2c2-5476-438c-fb468eaa223b",
        "pci_bus_id": "00000000:0D:00.0",
        "bound_by": "uuid",
    }
    assert [item["cuda_visible_devices"] for item in result] == uuids("smi-l-hgx-h100.txt")


def test_instance_ids_follow_pci_order_not_nvidia_smi_index() -> None:
    first, second = uuids("smi-l-l4x4.txt")[:2]
    csv = (
        f"0, {first}, 00000000:3A:00.0, NVIDIA L4, 23034, [N/A]\n"
        f"1, {second}, 00000000:38:00.0, NVIDIA L4, 23034, [N/A]\n"
    )
    result = instances(mw.parse_smi(csv))
    assert [(item["id"], item["cuda_visible_devices"]) for item in result] == [
        ("0", second),
        ("1", first),
    ]


def test_instances_resort_unsorted_gpus() -> None:
    gpus = mw.parse_smi(L4_CSV)
    result = instances(list(reversed(gpus)))
    assert [item["pci_bus_id"] for item in result] == [gpu["pci_bus_id"] for gpu in gpus]


def test_mig_gives_one_instance_per_mig_device_and_per_whole_gpu() -> None:
    gpus = mw.parse_smi(A100_MIG_CSV, smi_l("smi-l-a100-mig-mixed.txt"))
    result = instances(gpus, mig=True)
    assert [item["id"] for item in result] == [
        "0-mig0",
        "0-mig1",
        "0-mig2",
        "0-mig3",
        "1",
        "2",
        "3",
    ]
    assert [item["name"] for item in result][:2] == [f"gpu0-mig0@{HOST}", f"gpu0-mig1@{HOST}"]
    assert result[0]["cuda_visible_devices"] == "MIG-ce861fb0-a248-58ce-a9a8-f9adbc22a66a"
    assert result[0]["gpu_uuid"] == "GPU-513536b6-7d19-9063-b049-1e69664bb298"
    assert result[4]["cuda_visible_devices"] == "GPU-d8594bd4-0fc3-8595-e355-7c98138f3b95"
    assert all(item["bound_by"] == "uuid" for item in result)
    assert mw.gpu_problems(gpus, mig=True) == []


def test_mig_off_keeps_one_instance_per_gpu_and_reports_the_mig_gpu() -> None:
    gpus = mw.parse_smi(A100_MIG_CSV, smi_l("smi-l-a100-mig-mixed.txt"))
    assert [item["id"] for item in instances(gpus, mig=False)] == ["0", "1", "2", "3"]
    problems = mw.gpu_problems(gpus, mig=False)
    assert len(problems) == 1
    assert "morag_worker_mig: true" in problems[0] and "GPU-513536b6" in problems[0]


def test_mig_gpu_without_mig_devices_gets_no_worker() -> None:
    gpus = mw.parse_smi(A100_MIG_CSV, "")
    result = instances(gpus, mig=True)
    assert [item["id"] for item in result] == ["1", "2", "3"]
    assert any("without MIG devices" in problem for problem in mw.gpu_problems(gpus, mig=True))


@pytest.mark.parametrize("count", [1, 4, 8])
def test_fallback_by_index_when_nvidia_smi_does_not_answer(count: int) -> None:
    result = instances([], fallback_count=count)
    assert [item["cuda_visible_devices"] for item in result] == [str(i) for i in range(count)]
    assert {item["bound_by"] for item in result} == {"index"}
    assert {item["cuda_device_order"] for item in result} == {"PCI_BUS_ID"}
    assert [item["name"] for item in result] == [f"gpu{i}@{HOST}" for i in range(count)]


def test_no_gpu_and_no_fallback_means_no_gpu_instance() -> None:
    assert instances([], fallback_count=0) == []
    assert instances(None) == []


def test_gpus_from_nvidia_smi_win_over_the_lspci_count() -> None:
    result = instances(mw.parse_smi(L4_CSV), fallback_count=8)
    assert len(result) == 4
    assert {item["bound_by"] for item in result} == {"uuid"}


def test_instance_ids_are_valid_systemd_instance_names() -> None:
    gpus = mw.parse_smi(A100_MIG_CSV, smi_l("smi-l-a100-mig-mixed.txt"))
    everything = instances(gpus, mig=True) + instances(gpus) + instances([], fallback_count=3)
    assert all(SYSTEMD_INSTANCE.match(item["id"]) for item in everything)


def test_numbers_and_booleans_from_templating_are_accepted() -> None:
    result = instances(mw.parse_smi(L4_CSV), concurrency="2", mig="False", fallback_count="0")
    assert {item["concurrency"] for item in result} == {2}


@pytest.mark.parametrize(
    "overrides",
    [
        {"hostname": ""},
        {"queues": []},
        {"queues": "gpu-tasks"},
        {"concurrency": 0},
        {"concurrency": "many"},
        {"fallback_count": -1},
        {"device": 1},
        {"mig": "sometimes"},
    ],
)
def test_instances_refuse_malformed_arguments(overrides: dict) -> None:
    with pytest.raises(FilterError):
        instances(mw.parse_smi(L4_CSV), **overrides)


@pytest.mark.parametrize("gpus", ["GPU-1", [{"uuid": "GPU-1"}], [None]])
def test_instances_refuse_malformed_gpus(gpus) -> None:
    with pytest.raises(FilterError):
        instances(gpus)


# ---------------------------------------------------------------------------------------------
# Env files


def render(item: dict, extra_env: dict | None = None) -> str:
    """roles/morag_worker/templates/worker.env.j2, rendered like Ansible does."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters["comment"] = lambda text: "\n".join(
        f"# {line}" for line in text.splitlines()
    )
    template = environment.from_string(TEMPLATE.read_text(encoding="utf-8"))
    return template.render(
        item=item,
        ansible_managed="Ansible managed",
        morag_worker_extra_env=extra_env or {},
        morag_worker_cuda_cache_dir="/var/lib/morag/cuda-cache",
        morag_worker_split_min_seconds=300,
    )


def test_parse_env_reads_what_the_template_writes() -> None:
    item = instances(mw.parse_smi(H100_CSV), queues=["gpu-tasks", "celery"], concurrency=3)[2]
    extra = {"HF_HOME": '/var/lib/morag/"hf" cache\\x', "MORAG_LOG_LEVEL": "debug"}
    parsed = mw.parse_env(render(item, extra), "2")
    assert parsed["id"] == "2"
    assert parsed["name"] == f"gpu2@{HOST}"
    assert parsed["queues"] == ["gpu-tasks", "celery"]
    assert parsed["concurrency"] == 3
    assert parsed["cuda_visible_devices"] == item["cuda_visible_devices"]
    assert parsed["device"] == "cuda"
    assert parsed["env"]["HF_HOME"] == extra["HF_HOME"]
    assert parsed["env"]["MORAG_LOG_LEVEL"] == "debug"
    assert parsed["env"]["MORAG_SPLIT_MIN_SECONDS"] in (300, "300")


@pytest.mark.parametrize(
    ("line", "queues"),
    [
        ("MORAG_WORKER_QUEUE_ARGS=--queue gpu-tasks", ["gpu-tasks"]),
        ("MORAG_WORKER_QUEUE_ARGS='--queue a --queue b'", ["a", "b"]),
        ('MORAG_WORKER_QUEUE_ARGS="--queue a --queue b"', ["a", "b"]),
        ("MORAG_WORKER_QUEUE_ARGS=--queue=celery", ["celery"]),
        ("MORAG_WORKER_QUEUE_ARGS=-Q gpu-tasks,celery", ["gpu-tasks", "celery"]),
        ("MORAG_WORKER_QUEUE_ARGS=", []),
        ("", []),
    ],
)
def test_parse_env_queue_args(line: str, queues: list) -> None:
    text = f'# Instance 0\n\nMORAG_WORKER_NAME="gpu0@h"\n{line}\nMORAG_WORKER_CONCURRENCY=1\n'
    assert mw.parse_env(text)["queues"] == queues


def test_parse_env_of_an_older_cpu_instance() -> None:
    text = (
        "#\n# Ansible managed\n#\n"
        "# Instance store of morag-worker@.service, loaded after morag.env and cuda.env.\n"
        'MORAG_WORKER_NAME="store@srv"\nMORAG_WORKER_QUEUE_ARGS=--queue morag-store\n'
        'MORAG_WORKER_CONCURRENCY=1\nCUDA_VISIBLE_DEVICES=""\nMORAG_DEVICE="cpu"\n'
    )
    parsed = mw.parse_env(text)
    assert (
        parsed["queues"],
        parsed["device"],
        parsed["cuda_visible_devices"],
        parsed["cuda_device_order"],
    ) == (
        ["morag-store"],
        "cpu",
        "",
        "",
    )
    assert parsed["id"] == ""


@pytest.mark.parametrize(
    "text",
    [
        "MORAG_WORKER_NAME\n",
        "1BAD=x\n",
        'MORAG_WORKER_NAME="unterminated\n',
        'MORAG_WORKER_NAME="a"b"\n',
        "MORAG_WORKER_QUEUE_ARGS=--queue\n",
        "MORAG_WORKER_QUEUE_ARGS=--concurrency 4\n",
        "MORAG_WORKER_CONCURRENCY=two\n",
        b"MORAG_WORKER_NAME=x\n",
    ],
)
def test_parse_env_refuses_malformed_files(text) -> None:
    with pytest.raises(FilterError):
        mw.parse_env(text)


# ---------------------------------------------------------------------------------------------
# Scale check


def gpu_workers(count: int) -> list:
    return [{"id": str(i), "queues": ["gpu-tasks"], "device": "cuda"} for i in range(count)]


CPU_FALLBACK = [{"id": "0", "queues": ["celery"], "device": "cpu"}]


def test_same_gpu_workers_is_ok() -> None:
    assert mw.scale_check(gpu_workers(8), gpu_workers(8), False) == {
        "ok": True,
        "removed": [],
        "message": "",
    }


def test_losing_all_gpus_is_refused() -> None:
    result = mw.scale_check(
        gpu_workers(8), CPU_FALLBACK, False, "nvidia-smi: Failed to initialize NVML: Unknown Error"
    )
    assert result["ok"] is False
    assert result["removed"] == [str(i) for i in range(8)]
    assert "morag_worker_allow_scale_down: true" in result["message"]
    assert (
        "detected 0 GPUs (nvidia-smi: Failed to initialize NVML: Unknown Error)"
        in result["message"]
    )
    assert "8 GPU workers are configured" in result["message"]


def test_losing_one_gpu_is_refused() -> None:
    result = mw.scale_check(gpu_workers(8), gpu_workers(7), "false")
    assert (result["ok"], result["removed"]) == (False, ["7"])
    assert "detected 7 GPUs" in result["message"]


def test_scale_down_when_allowed() -> None:
    result = mw.scale_check(gpu_workers(8), gpu_workers(2), True)
    assert result["ok"] is True
    assert result["removed"] == ["2", "3", "4", "5", "6", "7"]
    assert "morag_worker_allow_scale_down is true" in result["message"]


def test_scale_up_and_first_run_are_ok() -> None:
    assert mw.scale_check(gpu_workers(4), gpu_workers(8), False)["ok"] is True
    assert mw.scale_check([], gpu_workers(8), False) == {"ok": True, "removed": [], "message": ""}


def test_switching_to_mig_replaces_ids_without_scaling_down() -> None:
    wanted = [{"id": i, "queues": ["gpu-tasks"]} for i in ("0-mig0", "0-mig1", "1")]
    result = mw.scale_check(gpu_workers(2), wanted, False)
    assert (result["ok"], result["removed"]) == (True, ["0"])
    assert "replaced" in result["message"]


def test_cpu_and_store_instances_do_not_count() -> None:
    existing = [
        *gpu_workers(2),
        {"id": "store", "queues": ["morag-store"]},
        {"id": "cpu0", "queues": ["celery"]},
    ]
    assert mw.scale_check(existing, gpu_workers(2), False) == {
        "ok": True,
        "removed": [],
        "message": "",
    }


def test_removed_ids_sort_naturally() -> None:
    result = mw.scale_check(gpu_workers(12), gpu_workers(0), False)
    assert result["removed"] == [str(i) for i in range(12)]


def test_scale_check_takes_parsed_env_files() -> None:
    gpus = mw.parse_smi(H100_CSV)
    existing = [mw.parse_env(render(item), item["id"]) for item in instances(gpus)]
    assert mw.scale_check(existing, instances(gpus[:4]), False)["removed"] == ["4", "5", "6", "7"]


@pytest.mark.parametrize(
    ("existing", "wanted", "allow"),
    [
        ("0", gpu_workers(1), False),
        ([{"queues": ["gpu-tasks"]}], gpu_workers(1), False),
        ([{"id": "0", "queues": "gpu-tasks"}], gpu_workers(1), False),
        (gpu_workers(1), gpu_workers(1), "perhaps"),
    ],
)
def test_scale_check_refuses_malformed_input(existing, wanted, allow) -> None:
    with pytest.raises(FilterError):
        mw.scale_check(existing, wanted, allow)


def test_filter_module_exports() -> None:
    assert set(mw.FilterModule().filters()) == {
        "morag_worker_parse_smi",
        "morag_worker_gpu_instances",
        "morag_worker_gpu_problems",
        "morag_worker_parse_env",
        "morag_worker_scale_check",
    }
