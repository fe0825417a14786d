"""The layout script of the nvidia_mig role (files/nvidia_mig_layout.py), issue 17 item 7.

MIG instances do not survive a reboot; nvidia-mig-layout.service runs this script at boot to
recreate the inventory's layout before the workers start. Parsing and planning are pure and
tested over nvidia-smi output (tests/data/gpu: -L captures, -lgi/-lci tables); the apply
loop runs against a stand-in nvidia-smi that keeps the GPUs' MIG state in a JSON file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "roles" / "nvidia_mig" / "files" / "nvidia_mig_layout.py"
DATA = ROOT / "tests" / "data" / "gpu"

_spec = importlib.util.spec_from_file_location("nvidia_mig_layout", SCRIPT)
mig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mig)

MIG7_UUID = "GPU-7fdaf0a5-179b-f636-d15d-daf243e3ff16"  # smi-l-a100-mig7.txt


def data(name: str) -> str:
    lines = (DATA / name).read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith("#")) + "\n"


def mig7_gpu(mode: str = "Enabled") -> list:
    return mig.parse_query(f"0, {MIG7_UUID}, 00000000:07:00.0, {mode}, {mode}\n")


SEVEN = [{"devices": "all", "mig_enabled": True, "mig_devices": {"1g.10gb": 7}}]


def test_the_lgi_and_lci_tables_parse() -> None:
    gis = mig.parse_lgi(data("smi-mig-lgi-a100-mig7.txt"))
    assert [(gi["gpu"], gi["gi"], gi["profile"]) for gi in gis] == [
        (0, n, "1g.10gb") for n in range(7, 14)
    ]
    cis = mig.parse_lci(data("smi-mig-lci-a100-40gb-partial.txt"))
    assert [(ci["gi"], ci["ci"], ci["profile"]) for ci in cis] == [
        (11, 0, "1g.5gb"),
        (12, 0, "1g.5gb"),
        (6, 0, "1c.2g.10gb"),
        (1, 0, "1c.3g.20gb"),
    ]
    assert mig.parse_lgi(data("smi-mig-lgi-none.txt")) == []
    with pytest.raises(mig.LayoutError, match="no 'GPU instances:' table"):
        mig.parse_lgi(data("smi-fail-nvml.txt"))


def test_the_mig_devices_of_the_lgi_capture_are_those_of_the_list_capture() -> None:
    # The -lgi fixture is the one behind smi-l-a100-mig7.txt: same profiles, same count.
    listed = [line.split()[1] for line in data("smi-l-a100-mig7.txt").splitlines()[1:]]
    assert (
        sorted(gi["profile"] for gi in mig.parse_lgi(data("smi-mig-lgi-a100-mig7.txt"))) == listed
    )


def test_a_gpu_as_declared_is_left_alone() -> None:
    gis = mig.parse_lgi(data("smi-mig-lgi-a100-mig7.txt"))
    cis = mig.parse_lci(data("smi-mig-lci-a100-mig7.txt"))
    assert mig.plan(SEVEN, mig7_gpu(), gis, cis) == []
    # Named by UUID or by index: the same.
    for devices in ([MIG7_UUID], [0], ["0"]):
        layout = [{**SEVEN[0], "devices": devices}]
        assert mig.plan(layout, mig7_gpu(), gis, cis) == []


def test_a_different_layout_destroys_and_recreates_largest_first() -> None:
    gis = mig.parse_lgi(data("smi-mig-lgi-a100-mig7.txt"))
    cis = mig.parse_lci(data("smi-mig-lci-a100-mig7.txt"))
    layout = [{"devices": "all", "mig_devices": {"1g.10gb": 2, "3g.40gb": 1, "2g.20gb": 1}}]
    [action] = mig.plan(layout, mig7_gpu(), gis, cis)
    assert action["mig_mode"] is None
    assert "GPU instances 1g.10gb" in action["reason"]
    assert action["steps"] == [
        ["mig", "-i", "0", "-dci"],
        ["mig", "-i", "0", "-dgi"],
        ["mig", "-i", "0", "-cgi", "3g.40gb,2g.20gb,1g.10gb,1g.10gb", "-C"],
    ]


def test_instances_without_their_whole_compute_instance_are_recreated() -> None:
    gis = mig.parse_lgi(data("smi-mig-lgi-a100-40gb-4gi.txt"))
    cis = mig.parse_lci(data("smi-mig-lci-a100-40gb-partial.txt"))
    gpu = mig.parse_query(
        "0, GPU-14ac2834-0d81-0508-69eb-e25264c08d21, 00000000:0F:00.0, Enabled, Enabled"
    )
    layout = [{"devices": [0], "mig_devices": {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}}]
    [action] = mig.plan(layout, gpu, gis, cis)
    assert action["reason"] == "a GPU instance lacks its whole compute instance"
    assert action["steps"][-1] == ["mig", "-i", "0", "-cgi", "3g.20gb,2g.10gb,1g.5gb,1g.5gb", "-C"]
    # The same GPU instances, each with its whole compute instance: as declared.
    by_gi = {gi["gi"]: gi["profile"] for gi in gis}
    whole = [{**ci, "profile": by_gi[ci["gi"]]} for ci in cis]
    assert mig.plan(layout, gpu, gis, whole) == []


def test_mig_mode_is_enabled_and_disabled_where_the_layout_says() -> None:
    gpus = mig.parse_query(data("smi-query-a100x4-mig-modes.csv"))
    layout = [
        {"devices": ["GPU-513536b6-7d19-9063-b049-1e69664bb298"], "mig_enabled": False},
        {"devices": [2], "mig_devices": {"3g.40gb": 2}},
    ]
    actions = {action["gpu"]: action for action in mig.plan(layout, gpus, [], [])}
    assert sorted(actions) == [0, 2]  # GPUs 1 and 3: in no entry, left alone
    assert actions[0]["mig_mode"] == "disable"
    assert actions[0]["steps"] == [["-i", "0", "-mig", "0"]]
    assert actions[2]["mig_mode"] == "enable"
    assert actions[2]["steps"] == [["mig", "-i", "2", "-cgi", "3g.40gb,3g.40gb", "-C"]]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ([{"devices": [7], "mig_devices": {"1g.10gb": 1}}], "GPU 7 is not on this host"),
        (
            [
                {"devices": [0], "mig_devices": {"1g.10gb": 1}},
                {"devices": "all", "mig_enabled": False},
            ],
            "named by two layout entries",
        ),
        ([{"devices": "all", "mig_devices": {"1g.10": 1}}], "is not a GPU instance profile"),
        ([{"devices": "all", "mig_devices": {"1g.10gb": 0}}], "must be a positive integer"),
        ([{"devices": "all"}], "without mig_devices"),
        (
            [{"devices": "all", "mig_enabled": False, "mig_devices": {"1g.10gb": 1}}],
            "mig_enabled false",
        ),
        ([{"devices": [], "mig_devices": {"1g.10gb": 1}}], "devices must be"),
        (
            [{"devices": ["gpu0"], "mig_devices": {"1g.10gb": 1}}],
            "neither a GPU index nor a GPU-UUID",
        ),
        ([{"devices": "all", "mig_devices": {"1g.10gb": 1}, "profile": "x"}], "unknown keys"),
    ],
)
def test_a_layout_that_cannot_be_applied_is_refused_with_a_reason(
    layout: list, message: str
) -> None:
    with pytest.raises(mig.LayoutError, match=message):
        mig.plan(layout, mig7_gpu(), [], [])


def test_the_cap_nodes_are_those_of_the_instances_that_exist() -> None:
    existing = {
        "/proc/driver/nvidia/capabilities/mig/config",
        "/proc/driver/nvidia/capabilities/mig/monitor",
        "/proc/driver/nvidia/capabilities/gpu0/mig/gi2/access",
        "/proc/driver/nvidia/capabilities/gpu0/mig/gi2/ci0/access",
    }
    nodes = mig.cap_nodes(data("proc-nvidia-caps-mig-minors.txt"), existing.__contains__)
    assert nodes == [
        ("/proc/driver/nvidia/capabilities/mig/config", 1),
        ("/proc/driver/nvidia/capabilities/mig/monitor", 2),
        ("/proc/driver/nvidia/capabilities/gpu0/mig/gi2/access", 21),
        ("/proc/driver/nvidia/capabilities/gpu0/mig/gi2/ci0/access", 22),
    ]


# A stand-in nvidia-smi with state: {"gpus": [{index, uuid, mode, gis: [profile, ...]}]}.
FAKE_SMI = r"""
import json, sys
STATE = sys.argv[1]
args = sys.argv[2:]
state = json.load(open(STATE))
open(STATE + ".log", "a").write(" ".join(args) + "\n")
def gpu(i):
    return state["gpus"][int(i)]
if args[0].startswith("--query-gpu="):
    for g in state["gpus"]:
        print(f'{g["index"]}, {g["uuid"]}, 00000000:0{g["index"]}:00.0, {g["mode"]}, {g["mode"]}')
elif args[:2] == ["mig", "-lgi"] or args[:2] == ["mig", "-lci"]:
    rows = [(g, n, p) for g in state["gpus"] for n, p in enumerate(g["gis"], start=1)]
    if not rows:
        print("No GPU instances found: Not Found"); sys.exit(6)
    if args[1] == "-lgi":
        print("| GPU instances:  |")
        for g, n, p in rows:
            print(f'|   {g["index"]}  MIG {p}   19   {n}   0:1   |')
    else:
        print("| Compute instances:  |")
        for g, n, p in rows:
            print(f'|   {g["index"]}   {n}   MIG {p}   0   0   0:1   |')
elif args[0] == "-i" and args[2] == "-mig":
    gpu(args[1])["mode"] = "Enabled" if args[3] == "1" else "Disabled"
elif args[:2] == ["mig", "-i"] and args[3] in ("-dci", "-dgi"):
    if args[3] == "-dgi":
        gpu(args[2])["gis"] = []
elif args[:2] == ["mig", "-i"] and args[3] == "-cgi":
    gpu(args[2])["gis"] = args[4].split(",")
else:
    sys.exit(f"unexpected: {args}")
json.dump(state, open(STATE, "w"))
"""


def run_script(tmp_path: Path, state: dict, layout: list, *args: str) -> tuple[int, str, list]:
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "smi.py").write_text(FAKE_SMI)
    (tmp_path / "nvidia-smi").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "smi.py"}" '
        f'"{tmp_path / "state.json"}" "$@"\n'
    )
    (tmp_path / "nvidia-smi").chmod(0o755)
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--layout", str(tmp_path / "layout.json"), *args],
        env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    log = tmp_path / "state.json.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return out.returncode, out.stdout + out.stderr, calls


def test_at_boot_the_layout_is_recreated_once_and_then_left_alone(tmp_path: Path) -> None:
    # After a reboot: MIG mode still on (it persists), no instances (they do not).
    rebooted = {
        "gpus": [
            {"index": 0, "uuid": MIG7_UUID, "mode": "Enabled", "gis": []},
            {
                "index": 1,
                "uuid": "GPU-d8594bd4-0fc3-8595-e355-7c98138f3b95",
                "mode": "Disabled",
                "gis": [],
            },
        ]
    }
    layout = [{"devices": [MIG7_UUID], "mig_devices": {"1g.10gb": 7}}]
    rc, out, _ = run_script(tmp_path, rebooted, layout, "--check")
    assert rc == mig.CHANGES, out
    assert "GPU 0 (" in out and "GPU instances none, declared 1g.10gb" in out
    rc, out, calls = run_script(tmp_path, rebooted, layout)
    assert rc == 0, out
    assert ["mig -i 0 -cgi " + ",".join(["1g.10gb"] * 7) + " -C"] == [
        c for c in calls if "-cgi" in c
    ]
    assert not any(c.startswith(("-i 1", "mig -i 1")) for c in calls)  # GPU 1: not in the layout
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["gpus"][0]["gis"] == ["1g.10gb"] * 7
    # Applied: the next run (or boot with the instances in place) changes nothing.
    rc, out, calls = run_script(tmp_path, state, layout)
    assert rc == 0, out
    assert not any("-cgi" in c or "-dgi" in c or "-mig" in c for c in calls), calls
    assert run_script(tmp_path, state, layout, "--check")[0] == 0


def test_a_layout_that_cannot_be_reached_fails_the_unit(tmp_path: Path) -> None:
    state = {"gpus": [{"index": 0, "uuid": MIG7_UUID, "mode": "Disabled", "gis": []}]}
    rc, out, _ = run_script(tmp_path, state, [{"devices": [3], "mig_devices": {"1g.10gb": 1}}])
    assert rc == 1
    assert "GPU 3 is not on this host" in out
