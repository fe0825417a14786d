"""`make molecule`: build the shared test images and the wheelhouse once, then run every
molecule scenario sequentially (2 cores), each timed; print a per-scenario table.

    python molecule/run.py                 every scenario (roles first, then site)
    python molecule/run.py redis site      only these
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
    "site",
    "firstday",
]


def run(cmd: list[str], log: Path | None = None) -> bool:
    env = dict(
        os.environ,
        PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
        PY_COLORS="0",
        ANSIBLE_FORCE_COLOR="0",
        NO_COLOR="1",
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
    for name, cmd in [
        ("images", ["molecule/images/build.sh"]),
        ("wheelhouse", ["molecule/images/wheelhouse.sh"]),
    ]:
        print(f"=== {name}", flush=True)
        started = time.monotonic()
        ok = run(cmd)
        results.append((name, time.monotonic() - started, ok))
        if not ok:
            return report(results, scenarios)
    for scenario in scenarios:
        print(f"=== molecule test -s {scenario} (log: {logs / scenario}.log)", flush=True)
        started = time.monotonic()
        ok = run(["molecule", "test", "-s", scenario], logs / f"{scenario}.log")
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
