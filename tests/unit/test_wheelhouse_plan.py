"""What a wheelhouse built for an inventory must hold (molecule/images/wheelhouse_plan.py),
read from the real example and lab inventories and from edited copies of them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAN_PY = ROOT / "molecule" / "images" / "wheelhouse_plan.py"
_spec = importlib.util.spec_from_file_location("wheelhouse_plan", PLAN_PY)
assert _spec is not None and _spec.loader is not None
wheelhouse_plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wheelhouse_plan)

STACK = json.loads(
    subprocess.run(
        [sys.executable, "-m", "morag.gpu_stack", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
)
CUBLAS = [w for w in STACK["wheels"] if w.startswith("nvidia-cublas-cu12==")]


def test_the_app_table_names_a_cublas_wheel() -> None:
    assert len(CUBLAS) == 1


def test_the_example_inventory_needs_torch_for_the_server_and_cublas_for_gpu_hosts() -> None:
    plan = wheelhouse_plan.plan(ROOT / "inventory" / "example", STACK["wheels"])
    server = plan["hosts"]["server"]
    assert "all" in server["extras"]
    assert server["requirements"][0] == "torch==2.13.0"
    assert server["cuda_wheels"] == []
    assert plan["hosts"]["gpu_workers"]["cuda_wheels"] == CUBLAS
    assert plan["hosts"]["cpu_workers"]["cuda_wheels"] == []
    assert plan["torch"] is True
    assert plan["cuda_wheels"] == CUBLAS


def test_the_lab_inventory_needs_neither() -> None:
    plan = wheelhouse_plan.plan(ROOT / "inventory" / "lab", STACK["wheels"])
    assert plan["torch"] is False
    assert plan["cuda_wheels"] == []  # cuda_runtime_method: none


def _copy(tmp_path: Path) -> Path:
    inventory = tmp_path / "inv"
    shutil.copytree(ROOT / "inventory" / "example", inventory)
    return inventory


def test_gpu_hosts_without_the_wheels_method_need_no_nvidia_wheels(tmp_path: Path) -> None:
    inventory = _copy(tmp_path)
    gpu = inventory / "group_vars" / "gpu_workers.yml"
    gpu.write_text(
        gpu.read_text().replace("cuda_runtime_method: wheels", "cuda_runtime_method: none")
    )
    plan = wheelhouse_plan.plan(inventory, STACK["wheels"])
    assert plan["cuda_wheels"] == []


def test_unset_extras_take_the_playbooks_defaults(tmp_path: Path) -> None:
    inventory = tmp_path / "inv"
    (inventory / "group_vars").mkdir(parents=True)
    plan = wheelhouse_plan.plan(inventory, STACK["wheels"])
    assert plan["hosts"]["server"]["extras"] == ["all"]
    assert plan["hosts"]["gpu_workers"]["extras"] == ["audio", "video", "youtube"]
    assert plan["hosts"]["cpu_workers"]["extras"] == ["audio"]
    assert plan["hosts"]["gpu_workers"]["cuda_wheels"] == CUBLAS  # the role's default method


def test_a_vault_file_is_skipped(tmp_path: Path) -> None:
    inventory = tmp_path / "inv"
    (inventory / "group_vars" / "all").mkdir(parents=True)
    (inventory / "group_vars" / "all" / "vault.yml").write_text("$ANSIBLE_VAULT;1.1;AES256\n6162\n")
    assert wheelhouse_plan.plan(inventory, [])["hosts"]["server"]["extras"] == ["all"]


def test_templated_extras_are_refused(tmp_path: Path) -> None:
    inventory = tmp_path / "inv"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "group_vars" / "server.yml").write_text(
        "morag_server_app_extras: ['{{ my_extras }}']\n"
    )
    with pytest.raises(wheelhouse_plan.PlanError, match="template"):
        wheelhouse_plan.plan(inventory, [])


def test_fields_for_the_shell_script() -> None:
    argv = [sys.executable, str(PLAN_PY), str(ROOT / "inventory" / "example"), json.dumps(STACK)]
    out = subprocess.run([*argv, "requirements:gpu_workers"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["morag[audio,video,youtube]", *CUBLAS]
    bad = subprocess.run([*argv[:2], str(ROOT / "nowhere"), "{}"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "no group_vars" in bad.stderr
