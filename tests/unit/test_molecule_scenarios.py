"""Every role has a molecule scenario of its own that `make molecule` runs (molecule/run.py)
with a measured weight, so the lanes stay balanced and no role goes untested."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
# Roles without a scenario, and where they are tested instead.
NO_SCENARIO = {
    "nvidia_mig": "MIG needs a real GPU: tests/unit/test_nvidia_mig_layout.py",
}


def runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("molecule_run", ROOT / "molecule" / "run.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_role_has_a_scenario_that_make_molecule_runs() -> None:
    run = runner()
    roles = {p.name for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir()}
    missing = {
        role
        for role in roles - NO_SCENARIO.keys()
        if not (ROOT / "molecule" / role / "molecule.yml").is_file() or role not in run.SCENARIOS
    }
    assert missing == set(), "roles without a molecule scenario in molecule/run.py"
    assert NO_SCENARIO.keys() <= roles, "an exemption for a role that no longer exists"


def test_every_scenario_has_a_weight() -> None:
    run = runner()
    assert set(run.SCENARIOS) - run.WEIGHT.keys() == set()
    for name in set(run.SCENARIOS) - run.PYTEST.keys():
        assert (ROOT / "molecule" / name / "molecule.yml").is_file(), name
