"""`make molecule`: build the shared test images and the wheelhouse once, then run every
molecule scenario sequentially (2 cores), each timed; print a per-scenario table.

    python molecule/run.py                 every scenario (roles first, then site)
    python molecule/run.py redis site      only these
    python molecule/run.py worker_unit     the worker unit's devices on systemd 247/252/257

Entries of PYTEST are pytest files on the same images, not molecule scenarios.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = [
    "redis",
    "firewall",
    "nfs_server",
    "nfs_client",
    "nvidia_driver",
    "cuda_runtime",
    "morag_app",
    "morag_api",
    "morag_worker",
    "worker_unit",
    "site",
    "firstday",
]
# The hardened worker unit in systemd containers of Debian 11/12/13 (about 20 s; Debian 11's
# image, built only for it, about a minute more): tests/systemd/test_worker_unit_devices.py.
PYTEST = {"worker_unit": "tests/systemd"}


def run(cmd: list[str], log: Path | None = None) -> bool:
    env = dict(
        os.environ,
        PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
        PY_COLORS="0",
        ANSIBLE_FORCE_COLOR="0",
        NO_COLOR="1",
        MORAG_REQUIRE_DOCKER="1",
    )
    if log is None:
        return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode == 0
    with open(log, "w") as out:
        ok = (
            subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
            ).returncode
            == 0
        )
    if not ok:
        print(f"--- last lines of {log}:")
        print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-60:]))
    return ok


def main(selected: list[str]) -> int:
    scenarios = selected or SCENARIOS
    logs = ROOT / ".cache" / "molecule-logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: list[tuple[str, float, bool]] = []
    images = ["molecule/images/build.sh"]
    if PYTEST.keys() & set(scenarios):
        images += ["11", "12", "13"]  # Debian 11 only for worker_unit, built beside the others
    prepare = [("images", images)]
    if set(scenarios) - PYTEST.keys():  # the wheelhouse only for molecule scenarios
        prepare.append(("wheelhouse", ["molecule/images/wheelhouse.sh"]))
    for name, cmd in prepare:
        print(f"=== {name}", flush=True)
        started = time.monotonic()
        ok = run(cmd)
        results.append((name, time.monotonic() - started, ok))
        if not ok:
            return report(results, scenarios)
    for scenario in scenarios:
        if scenario in PYTEST:
            # -s: the log keeps the table of what each unit could open.
            cmd = [sys.executable, "-m", "pytest", "-q", "-s", PYTEST[scenario]]
            label = f"pytest {PYTEST[scenario]}"
        else:
            cmd = ["molecule", "test", "-s", scenario]
            label = " ".join(cmd)
        print(f"=== {label} (log: {logs / scenario}.log)", flush=True)
        started = time.monotonic()
        ok = run(cmd, logs / f"{scenario}.log")
        results.append((scenario, time.monotonic() - started, ok))
        print(f"    {'pass' if ok else 'FAIL'} in {results[-1][1]:.0f}s", flush=True)
        if not ok:
            break
    return report(results, scenarios)


def report(results: list[tuple[str, float, bool]], scenarios: list[str]) -> int:
    done = {name for name, _, _ in results}
    skipped = [s for s in scenarios if s not in done]
    width = max(len(n) for n in [*done, *scenarios, "scenario"])
    print("\n" + "scenario".ljust(width) + "    time   result")
    for name, seconds, ok in results:
        print(f"{name.ljust(width)}  {seconds:6.0f}s   {'pass' if ok else 'FAIL'}")
    for name in skipped:
        print(f"{name.ljust(width)}  {'-':>6}    skipped")
    print(f"{'total'.ljust(width)}  {sum(s for _, s, _ in results):6.0f}s")
    return 0 if all(ok for _, _, ok in results) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
