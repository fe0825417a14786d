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
    # Without containers (CI time): the role's real haproxy.cfg run by a real haproxy in
    # front of two APIs, and its preflight and keepalived configuration.
    "haproxy": "tests/integration/test_haproxy.py, tests/unit/test_haproxy_role.py",
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


def test_a_lane_opens_when_the_stage_beside_it_ends(tmp_path: Path, monkeypatch) -> None:
    """`make test`: the role scenarios run in a third lane once the integration tests end,
    instead of waiting for the long scenarios to free one of the two."""
    import threading

    run = runner()
    release_long = threading.Event()
    ran: list[str] = []

    def fake_run(cmd: list[str], log: Path | None = None) -> bool:
        scenario = cmd[-1]
        if scenario == "site":
            assert release_long.wait(60), "the short scenarios never ran beside the long one"
        ran.append(scenario)
        return True

    marker = tmp_path / "integration.done"
    monkeypatch.setattr(run, "run", fake_run)
    monkeypatch.setenv("MORAG_PREPARED", "1")
    monkeypatch.setenv("MORAG_MOLECULE_LANE_AFTER", str(marker))
    result: list[int] = []
    main = threading.Thread(
        target=lambda: result.append(run.main(["-j", "1", "site", "redis", "nfs_client"]))
    )
    main.start()
    try:
        # Before the marker: one lane, held by `site`; nothing else may start.
        threading.Event().wait(0.3)
        assert ran == []
        marker.touch()
        deadline = threading.Event()
        for _ in range(600):
            if sorted(ran) == ["nfs_client", "redis"]:
                break
            deadline.wait(0.1)
        assert sorted(ran) == ["nfs_client", "redis"], ran
    finally:
        release_long.set()
        main.join(60)
    assert ran[-1] == "site" and result == [0]
