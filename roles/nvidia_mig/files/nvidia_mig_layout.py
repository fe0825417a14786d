#!/usr/bin/python3
"""Apply the MIG layout declared in the inventory (Ansible role nvidia_mig).

MIG GPU and compute instances do not survive a reboot. nvidia-mig-layout.service runs this
script at boot, after nvidia-devices.service and before the workers that use MIG devices:
it reads the layout file the role wrote (JSON, a list of ``{"devices": "all" | [index or
GPU-uuid, ...], "mig_enabled": bool, "mig_devices": {profile: count}}``), compares it
with what ``nvidia-smi`` reports and, only for the GPUs that differ, enables or
disables MIG mode, destroys their compute and GPU instances and creates the declared ones
(one GPU instance per profile, each with its default compute instance: the whole instance,
the "MIG device" a worker binds to by UUID). It then creates the /dev/nvidia-caps nodes of
the instances, which hardened worker units cannot create themselves.

    nvidia-mig-layout [--layout FILE] --check   # 0: as declared; 10: would change (plan on stdout)
    nvidia-mig-layout [--layout FILE]           # apply; 0 when the GPUs match the layout

The parsing and planning functions are pure (no I/O) and unit-tested over captured
``nvidia-smi`` output (tests/unit/test_nvidia_mig_layout.py). Python 3.9+, standard library only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys

LAYOUT_FILE = "/etc/nvidia-mig/layout.json"
QUERY_FIELDS = "index,uuid,pci.bus_id,mig.mode.current,mig.mode.pending"
PROC_CAPS = "/proc/driver/nvidia/capabilities"
MIG_MINORS = "/proc/driver/nvidia-caps/mig-minors"
CAPS_DIR = "/dev/nvidia-caps"
# Exit status of --check when a GPU differs (2 is argparse's, 1 an error).
CHANGES = 10

# GPU instance profiles as nvidia-smi names them: 1g.10gb, 3g.40gb, 1g.10gb+me, 1g.20gb+gfx ...
PROFILE = re.compile(r"^[1-9][0-9]*g\.[0-9]+gb(\+[a-z]+)*$")
# | GPU   Name             Profile  Instance   Placement  |   (nvidia-smi mig -lgi)
_LGI_ROW = re.compile(
    r"^\|\s+(?P<gpu>\d+)\s+MIG\s+(?P<profile>\S+)\s+(?P<profile_id>\d+)\s+(?P<gi>\d+)\s+"
    r"(?P<placement>\d+:\d+)\s*\|$"
)
# | GPU     GPU       Name             Profile   Instance   Placement  |   (nvidia-smi mig -lci)
_LCI_ROW = re.compile(
    r"^\|\s+(?P<gpu>\d+)\s+(?P<gi>\d+)\s+MIG\s+(?P<profile>\S+)\s+(?P<profile_id>\d+)\s+"
    r"(?P<ci>\d+)\s+(?P<placement>\d+:\d+)\s*\|$"
)
# What nvidia-smi prints instead of a table when there is nothing to list.
_NOTHING = re.compile(r"No (GPU|compute) instances found|No MIG-enabled devices found", re.I)
_MINOR_LINE = re.compile(
    r"^(?P<name>config|monitor|gpu\d+/gi\d+/access|gpu\d+/gi\d+/ci\d+/access)\s+(?P<minor>\d+)$"
)


class LayoutError(ValueError):
    """The layout file or nvidia-smi's output cannot be used; the message says why."""


def validate_layout(layout) -> list:
    """Problems of a layout (a list of entries), as sentences; empty when it is valid."""
    errors = []
    if not isinstance(layout, list):
        return ["the layout must be a list of {devices, mig_enabled, mig_devices} entries"]
    for number, entry in enumerate(layout, start=1):
        where = f"entry {number}"
        if not isinstance(entry, dict):
            errors.append(f"{where} is not a mapping")
            continue
        unknown = set(entry) - {"devices", "mig_enabled", "mig_devices"}
        if unknown:
            errors.append(f"{where} has unknown keys {sorted(unknown)}")
        devices = entry.get("devices")
        if devices != "all":
            if not isinstance(devices, list) or not devices:
                errors.append(
                    f"{where}: devices must be 'all' or a list of GPU indexes / GPU-UUIDs"
                )
            else:
                for device in devices:
                    index_ok = isinstance(device, int) and device >= 0
                    text_ok = isinstance(device, str) and (
                        device.isdigit() or device.startswith("GPU-")
                    )
                    if isinstance(device, bool) or not (index_ok or text_ok):
                        errors.append(f"{where}: {device!r} is neither a GPU index nor a GPU-UUID")
        enabled = entry.get("mig_enabled", True)
        if not isinstance(enabled, bool):
            errors.append(f"{where}: mig_enabled must be true or false")
        profiles = entry.get("mig_devices", {})
        if not isinstance(profiles, dict):
            errors.append(f"{where}: mig_devices must map profiles (1g.10gb) to counts")
            continue
        for profile, count in profiles.items():
            if not isinstance(profile, str) or PROFILE.match(profile) is None:
                errors.append(
                    f"{where}: {profile!r} is not a GPU instance profile such as 1g.10gb or 3g.40gb"
                )
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                errors.append(
                    f"{where}: the count of {profile} must be a positive integer, got {count!r}"
                )
        if enabled is False and profiles:
            errors.append(f"{where}: mig_devices on GPUs with mig_enabled false")
        if enabled is True and not profiles:
            errors.append(
                f"{where}: mig_enabled without mig_devices leaves the GPUs without a MIG device"
            )
    return errors


def parse_query(text: str) -> list:
    """``nvidia-smi --query-gpu=QUERY_FIELDS --format=csv,noheader``: index, uuid, bus id, modes."""
    gpus = []
    rows = [line for line in text.splitlines() if line.strip()]
    for row in csv.reader(rows, skipinitialspace=True):
        if len(row) != 5 or not row[0].strip().isdigit() or not row[1].strip().startswith("GPU-"):
            raise LayoutError(f"unexpected nvidia-smi --query-gpu line: {', '.join(row)!r}")
        index, uuid, bus_id, current, pending = (field.strip() for field in row)
        gpus.append(
            {
                "index": int(index),
                "uuid": uuid,
                "pci_bus_id": bus_id,
                "mig_current": current,
                "mig_pending": pending,
            }
        )
    return gpus


def _table(text: str, banner: str, row: re.Pattern) -> list:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not any(banner in line for line in lines):
        if any(_NOTHING.search(line) for line in lines) or not lines:
            return []
        raise LayoutError(f"nvidia-smi printed no '{banner}' table: {' '.join(lines)[:200]!r}")
    matches = []
    for line in lines:
        match = row.match(line)
        if match:
            matches.append(match.groupdict())
    return matches


def parse_lgi(text: str) -> list:
    """``nvidia-smi mig -lgi``: [{gpu, gi, profile, profile_id, placement}]."""
    return [
        {
            "gpu": int(m["gpu"]),
            "gi": int(m["gi"]),
            "profile": m["profile"],
            "profile_id": int(m["profile_id"]),
            "placement": m["placement"],
        }
        for m in _table(text, "GPU instances:", _LGI_ROW)
    ]


def parse_lci(text: str) -> list:
    """``nvidia-smi mig -lci``: [{gpu, gi, ci, profile, profile_id, placement}]."""
    return [
        {
            "gpu": int(m["gpu"]),
            "gi": int(m["gi"]),
            "ci": int(m["ci"]),
            "profile": m["profile"],
            "profile_id": int(m["profile_id"]),
            "placement": m["placement"],
        }
        for m in _table(text, "Compute instances:", _LCI_ROW)
    ]


def _size(profile: str) -> tuple:
    slices, memory = profile.split("+")[0].split(".")
    return (int(slices[:-1]), int(memory[:-2]), profile)


def desired(layout: list, gpus: list) -> dict:
    """{GPU index: {"mig_enabled": bool, "profiles": [...]}} for the GPUs the layout names."""
    errors = validate_layout(layout)
    if errors:
        raise LayoutError("; ".join(errors))
    by_index = {gpu["index"]: gpu for gpu in gpus}
    by_uuid = {gpu["uuid"]: gpu for gpu in gpus}
    wanted = {}
    for number, entry in enumerate(layout, start=1):
        if entry["devices"] == "all":
            selected = [gpu["index"] for gpu in gpus]
        else:
            selected = []
            for device in entry["devices"]:
                gpu = (
                    by_uuid.get(device)
                    if isinstance(device, str) and device.startswith("GPU-")
                    else by_index.get(int(device))
                )
                if gpu is None:
                    raise LayoutError(
                        f"entry {number}: GPU {device} is not on this host (nvidia-smi lists "
                        f"{', '.join(str(g['index']) + ' ' + g['uuid'] for g in gpus) or 'none'})"
                    )
                selected.append(gpu["index"])
        for index in selected:
            if index in wanted:
                raise LayoutError(
                    f"GPU {index} ({by_index[index]['uuid']}) is named by two layout entries"
                )
            enabled = entry.get("mig_enabled", True)
            profiles = (
                [p for p, count in entry.get("mig_devices", {}).items() for _ in range(count)]
                if enabled
                else []
            )
            wanted[index] = {
                "mig_enabled": enabled,
                "profiles": sorted(profiles, key=_size, reverse=True),
            }
    return wanted


def plan(layout: list, gpus: list, gis: list, cis: list) -> list:
    """What to do per GPU that differs from the layout, as nvidia-smi argument lists.

    Returns [{"gpu": index, "uuid", "reason", "mig_mode": "enable"|"disable"|None,
    "steps": [[args], ...]}].
    A GPU matches when its MIG mode is the declared one and, with MIG on, its GPU instances
    have exactly the declared profiles, each with one compute instance covering it whole.
    """
    wanted = desired(layout, gpus)
    actions = []
    for gpu in gpus:
        want = wanted.get(gpu["index"])
        if want is None:
            continue  # not in the layout: left alone
        index = str(gpu["index"])
        mine = [gi for gi in gis if gi["gpu"] == gpu["index"]]
        mode_on = gpu["mig_current"] == "Enabled"
        destroy = []
        if mine:
            destroy = [["mig", "-i", index, "-dci"], ["mig", "-i", index, "-dgi"]]
        if not want["mig_enabled"]:
            if mode_on or gpu["mig_pending"] == "Enabled":
                actions.append(
                    {
                        "gpu": gpu["index"],
                        "uuid": gpu["uuid"],
                        "mig_mode": "disable",
                        "reason": "MIG mode is on, the layout wants it off",
                        "steps": [*destroy, ["-i", index, "-mig", "0"]],
                    }
                )
            continue
        current = sorted((gi["profile"] for gi in mine), key=_size, reverse=True)
        whole = all(
            [ci["profile"] for ci in cis if ci["gpu"] == gpu["index"] and ci["gi"] == gi["gi"]]
            == [gi["profile"]]
            for gi in mine
        )
        create = [["mig", "-i", index, "-cgi", ",".join(want["profiles"]), "-C"]]
        if not mode_on:
            actions.append(
                {
                    "gpu": gpu["index"],
                    "uuid": gpu["uuid"],
                    "mig_mode": "enable",
                    "reason": "MIG mode is off",
                    "steps": destroy + create,
                }
            )
        elif current != want["profiles"] or not whole:
            reason = (
                f"GPU instances {', '.join(current) or 'none'}, "
                f"declared {', '.join(want['profiles'])}"
                if current != want["profiles"]
                else "a GPU instance lacks its whole compute instance"
            )
            actions.append(
                {
                    "gpu": gpu["index"],
                    "uuid": gpu["uuid"],
                    "mig_mode": None,
                    "reason": reason,
                    "steps": destroy + create,
                }
            )
    return actions


def cap_nodes(mig_minors: str, proc_exists) -> list:
    """[(proc capability path, minor)] of the MIG capabilities that exist now.

    ``mig_minors``: /proc/driver/nvidia-caps/mig-minors ("config 1", "gpu0/gi3/access 30",
    "gpu0/gi3/ci0/access 31", ...). ``proc_exists(path)`` tells whether the capability's
    /proc file exists (it does for the GPU and compute instances that exist).
    """
    nodes = []
    for line in mig_minors.splitlines():
        match = _MINOR_LINE.match(line.strip())
        if match is None:
            continue
        name = match["name"]
        if name in ("config", "monitor"):
            path = f"{PROC_CAPS}/mig/{name}"
        else:
            gpu, rest = name.split("/", 1)
            path = f"{PROC_CAPS}/{gpu}/mig/{rest}"
        if proc_exists(path):
            nodes.append((path, int(match["minor"])))
    return nodes


# ---- I/O below: runs nvidia-smi and mknod on the host. ----


def _smi(*args: str, check: bool = True) -> str:
    out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, check=False)
    text = out.stdout + out.stderr
    if check and out.returncode != 0 and not _NOTHING.search(text):
        raise LayoutError(
            f"nvidia-smi {' '.join(args)} failed (rc {out.returncode}): {text.strip()[:400]}"
        )
    return text


def _state(layout: list) -> list:
    gpus = parse_query(_smi(f"--query-gpu={QUERY_FIELDS}", "--format=csv,noheader"))
    return plan(layout, gpus, parse_lgi(_smi("mig", "-lgi")), parse_lci(_smi("mig", "-lci")))


def _make_cap_nodes() -> None:
    if not os.path.exists(MIG_MINORS):
        return
    with open("/proc/devices", encoding="ascii") as handle:
        majors = [line.split()[0] for line in handle if line.split()[1:] == ["nvidia-caps"]]
    if not majors:
        return
    with open(MIG_MINORS, encoding="ascii") as handle:
        nodes = cap_nodes(handle.read(), os.path.exists)
    os.makedirs(CAPS_DIR, mode=0o755, exist_ok=True)
    modprobe = any(
        os.access(os.path.join(d, "nvidia-modprobe"), os.X_OK)
        for d in os.environ.get("PATH", "").split(":")
    )
    for path, minor in nodes:
        node = f"{CAPS_DIR}/nvidia-cap{minor}"
        if os.path.exists(node):
            continue
        if modprobe:
            subprocess.run(["nvidia-modprobe", "-f", path], check=True)
            continue
        mode = 0o444
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("DeviceFileMode:"):
                    mode = int(line.split()[1])
        os.mknod(node, 0o020000 | mode, os.makedev(int(majors[0]), minor))
        os.chmod(node, mode)


def _describe(actions: list) -> str:
    return "\n".join(
        f"GPU {a['gpu']} ({a['uuid']}): {a['reason']}: "
        + "; ".join("nvidia-smi " + " ".join(s) for s in a["steps"])
        for a in actions
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default=LAYOUT_FILE)
    parser.add_argument(
        "--check", action="store_true", help=f"exit {CHANGES} when the GPUs differ from the layout"
    )
    args = parser.parse_args(argv)
    try:
        with open(args.layout, encoding="utf-8") as handle:
            layout = json.load(handle)
        actions = _state(layout)
        if args.check:
            print(_describe(actions) or "MIG layout as declared")
            return CHANGES if actions else 0
        for action in actions:
            index = str(action["gpu"])
            print(f"GPU {index} ({action['uuid']}): {action['reason']}", flush=True)
            if action["mig_mode"] == "enable":
                _smi("-i", index, "-mig", "1")
                gpu = next(
                    g
                    for g in parse_query(
                        _smi(f"--query-gpu={QUERY_FIELDS}", "--format=csv,noheader")
                    )
                    if g["index"] == action["gpu"]
                )
                if gpu["mig_current"] != "Enabled":
                    # A100/A30: the new mode takes effect at a GPU reset (nothing may hold the GPU).
                    _smi("-i", index, "-r")
            for step in action["steps"]:
                _smi(*step)
        left = _state(layout)
        if left:
            raise LayoutError(
                "after applying, the GPUs still differ from the layout:\n" + _describe(left)
            )
        _make_cap_nodes()
    except (LayoutError, OSError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"nvidia-mig-layout: {exc}", file=sys.stderr)
        return 1
    print("MIG layout as declared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
