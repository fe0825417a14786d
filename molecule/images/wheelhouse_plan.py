"""What a wheelhouse built for an inventory must hold, per host group, read from the
inventory's group_vars (the variables the playbooks pass to the roles).

    python molecule/images/wheelhouse_plan.py INVENTORY_DIR GPU_STACK_JSON [FIELD]

server, gpu_workers and cpu_workers install ``morag[<extras>]`` (morag_server_app_extras,
morag_gpu_worker_app_extras, morag_cpu_worker_app_extras; the playbooks' defaults when
unset); GPU workers whose cuda_runtime_method is ``wheels`` (the role's default) also
install the NVIDIA wheels the app's table names (``python -m morag.gpu_stack --json``),
kept in the ``cuda/`` subdirectory so only GPU hosts receive them. Extras that pull torch
(ingest, documents-layout, all) need the CPU build of torch first.
Vault-encrypted files are skipped: none of these variables are secrets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

GROUPS = {
    # group: (extras variable, the playbook's default)
    "server": ("morag_server_app_extras", ["all"]),
    "gpu_workers": ("morag_gpu_worker_app_extras", ["audio", "video", "youtube"]),
    "cpu_workers": ("morag_cpu_worker_app_extras", ["audio"]),
}
TORCH_EXTRAS = {"all", "ingest", "documents-layout"}
TORCH_PIN = "torch==2.13.0"  # the app's pin (app/pyproject.toml, Makefile)


class PlanError(Exception):
    pass


def _load(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if text.startswith("$ANSIBLE_VAULT"):
        return {}
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise PlanError(f"{path}: not a mapping")
    return data


def group_vars(inventory: Path, group: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in ("all", group):
        base = inventory / "group_vars"
        files = [base / f"{name}.yml", base / f"{name}.yaml"]
        if (base / name).is_dir():
            files += sorted((base / name).glob("*.y*ml"))
        for path in files:
            if path.is_file():
                merged.update(_load(path))
    return merged


def plan(inventory: Path, cuda_wheels: list[str]) -> dict[str, Any]:
    hosts: dict[str, Any] = {}
    for group, (variable, default) in GROUPS.items():
        values = group_vars(inventory, group)
        extras = values.get(variable, default)
        if not isinstance(extras, list) or not all(isinstance(e, str) for e in extras):
            raise PlanError(f"{inventory}: {variable} must be a list of extras, got {extras!r}")
        if any("{{" in e for e in extras):
            raise PlanError(f"{inventory}: {variable} is a template; give the list itself")
        requirements = []
        if TORCH_EXTRAS & set(extras):
            requirements.append(TORCH_PIN)
        requirements.append("morag" + (f"[{','.join(sorted(extras))}]" if extras else ""))
        cuda = group == "gpu_workers" and values.get("cuda_runtime_method", "wheels") == "wheels"
        hosts[group] = {
            "extras": sorted(extras),
            "requirements": requirements,
            "cuda_wheels": cuda_wheels if cuda else [],
        }
    union = sorted({e for h in hosts.values() for e in h["extras"]})
    return {
        "inventory": str(inventory),
        "hosts": hosts,
        "extras": union,
        "torch": any(TORCH_PIN in h["requirements"] for h in hosts.values()),
        "cuda_wheels": sorted({w for h in hosts.values() for w in h["cuda_wheels"]}),
    }


def field(result: dict[str, Any], name: str) -> str:
    """One value for a shell script: extras, torch, cuda_wheels, groups, requirements:GROUP."""
    if name == "extras":
        return ",".join(result["extras"])
    if name == "torch":
        return "true" if result["torch"] else "false"
    if name == "cuda_wheels":
        return " ".join(result["cuda_wheels"])
    if name == "groups":
        return " ".join(sorted(result["hosts"]))
    if name.startswith("requirements:"):
        host = result["hosts"][name.split(":", 1)[1]]
        return " ".join(host["requirements"] + host["cuda_wheels"])
    raise PlanError(f"unknown field {name!r}")


def main(argv: list[str]) -> int:
    """INVENTORY_DIR GPU_STACK_JSON [FIELD]: the whole plan as JSON, or one field."""
    if len(argv) not in (3, 4):
        print("usage: wheelhouse_plan.py INVENTORY_DIR GPU_STACK_JSON [FIELD]", file=sys.stderr)
        return 2
    inventory = Path(argv[1])
    if not (inventory / "group_vars").is_dir():
        print(f"error: {inventory} has no group_vars/", file=sys.stderr)
        return 2
    cuda_wheels = list(json.loads(argv[2]).get("wheels", []))
    try:
        result = plan(inventory, cuda_wheels)
        print(field(result, argv[3]) if len(argv) == 4 else json.dumps(result, sort_keys=True))
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
