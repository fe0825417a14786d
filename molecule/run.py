"""`make molecule`: build the shared test images and the wheelhouse once, then run every
molecule scenario, each timed; print a per-scenario table.

    python molecule/run.py                 every scenario
    python molecule/run.py redis site      only these
    python molecule/run.py -j 1 site       one at a time
    python molecule/run.py worker_unit     the worker unit's devices on systemd 247/252/257

Scenarios run in MORAG_MOLECULE_JOBS lanes (default 2), longest first. A scenario spends
most of its time waiting on containers (a role scenario uses about a fifth of one core), so
two lanes on 2 cores take little more than half the time of one. Every scenario has its own
containers, networks and controller files; none publishes a port but the lab's API.
With MORAG_MOLECULE_LANE_AFTER=FILE one more lane opens once FILE exists: `make test` runs
the integration tests beside this stage and tests/stages.py touches FILE when they end, so
the role scenarios no longer wait for site and firstday to free a lane.
After a failure no new scenario starts; those running finish and are reported.

Entries of PYTEST are pytest files on the same images, not molecule scenarios.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = [
    "redis",
    "redis_sentinel",
    "firewall",
    "nfs_server",
    "nfs_client",
    "nvidia_driver",
    "morag_monitoring",
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
# Seconds each took in CI with one lane: the longest start first so the lanes end together.
WEIGHT = {
    # Measured 1485 s here beside the integration stage, 2674 s in a red CI run.
    "site": 1500,
    "firstday": 650,
    "morag_worker": 500,
    "morag_api": 410,
    "morag_app": 360,
    # Measured here with one lane while other sessions' tests kept the load at 8-9 on 2 cores
    # (the Prometheus package about 40 s of it; a fresh image spares its apt-get update).
    "morag_monitoring": 270,
    "nvidia_driver": 190,
    "redis": 140,
    # Three hosts, a failover and a second converge; measured 270 s here with one lane while
    # other sessions kept the load at 5-6 on 2 cores (the single redis scenario: 100 s then).
    "redis_sentinel": 300,
    "firewall": 140,
    "nfs_server": 120,
    "nfs_client": 70,
    "cuda_runtime": 70,
    "worker_unit": 40,
}


# Lines of a failed scenario's log that say why: Ansible's failures and their messages, the
# lab scripts' PROBLEM and wait_for lines, pytest's failure lines.
WHY = re.compile(
    r"^(fatal: |failed: |ERROR|\[ERROR\]: |CRITICAL|PROBLEM:|SystemExit|TimeoutError|E  |FAILED |"
    r"\S*(Error|Exception): )|\"msg\": |timed out|gave up"
)
# Noise that matches: retries still under way, molecule's note on the scenario without default.
NOT_WHY = re.compile(r"FAILED - RETRYING|glob failed")
# `make test` prints this file after its stage table, the last lines CI shows.
DIGEST = ROOT / ".cache" / "failures.txt"


def why(log: Path, lines: int = 12) -> list[str]:
    """The last lines of the log that say why it failed, each cut to 300 characters."""
    found = [
        line.strip()[:300]
        for line in log.read_text(errors="replace").splitlines()
        if WHY.search(line.strip()) and not NOT_WHY.search(line)
    ]
    return found[-lines:]


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
        # One print: lanes running beside this one do not cut into it.
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-60:])
        print(f"--- last lines of {log}:\n{tail}", flush=True)
        reasons = why(log) or ["(no line of the log says; read it whole)"]
        with open(DIGEST, "a") as digest:
            digest.write(f"{log.stem} failed (log: {log}):\n")
            digest.writelines(f"  {line}\n" for line in reasons)
    return ok


def command(scenario: str) -> tuple[list[str], str]:
    if scenario in PYTEST:
        # -s: the log keeps the table of what each unit could open.
        return [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            PYTEST[scenario],
        ], f"pytest {PYTEST[scenario]}"
    cmd = ["molecule", "test", "-s", scenario]
    return cmd, " ".join(cmd)


def main(argv: list[str]) -> int:
    jobs = int(os.environ.get("MORAG_MOLECULE_JOBS", "2"))
    if argv[:1] == ["-j"]:
        jobs, argv = int(argv[1]), argv[2:]
    scenarios = argv or SCENARIOS
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {' '.join(SCENARIOS)}")
        return 2
    logs = ROOT / ".cache" / "molecule-logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("MORAG_PREPARED"):
        DIGEST.unlink(missing_ok=True)  # `make test` empties it before its stages
    results: list[tuple[str, float, bool]] = []
    images = ["molecule/images/build.sh"]
    if PYTEST.keys() & set(scenarios):
        images += ["11", "12", "13"]  # Debian 11 only for worker_unit, built beside the others
    prepare = [("images", images)]
    if set(scenarios) - PYTEST.keys():  # the wheelhouse only for molecule scenarios
        prepare.append(("wheelhouse", ["molecule/images/wheelhouse.sh"]))
    if os.environ.get("MORAG_PREPARED"):
        # `make test` built both before starting the integration tests beside this run: a
        # second wheelhouse.sh would replace the morag wheel under them.
        prepare = []
    for name, cmd in prepare:
        print(f"=== {name}", flush=True)
        started = time.monotonic()
        ok = run(cmd)
        results.append((name, time.monotonic() - started, ok))
        if not ok:
            return report(results, scenarios)
    queue = sorted(scenarios, key=lambda s: -WEIGHT.get(s, 0))
    lock = threading.Lock()
    failed = threading.Event()

    def lane() -> None:
        while not failed.is_set():
            with lock:
                if not queue:
                    return
                scenario = queue.pop(0)
            cmd, label = command(scenario)
            print(f"=== {label} (log: {logs / scenario}.log)", flush=True)
            started = time.monotonic()
            ok = run(cmd, logs / f"{scenario}.log")
            with lock:
                results.append((scenario, time.monotonic() - started, ok))
                print(
                    f"    {scenario}: {'pass' if ok else 'FAIL'} in {results[-1][1]:.0f}s",
                    flush=True,
                )
            if not ok:
                failed.set()

    def late_lane(marker: Path) -> None:
        while not marker.exists():
            with lock:
                if not queue or failed.is_set():
                    return
            time.sleep(5)
        print(f"=== {marker} exists: one more lane", flush=True)
        lane()

    started = time.monotonic()
    lanes = [threading.Thread(target=lane) for _ in range(max(1, min(jobs, len(queue))))]
    if os.environ.get("MORAG_MOLECULE_LANE_AFTER") and len(queue) > len(lanes):
        marker = ROOT / os.environ["MORAG_MOLECULE_LANE_AFTER"]
        lanes.append(threading.Thread(target=late_lane, args=(marker,)))
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    print(f"=== {len(lanes)} lane(s), wall {time.monotonic() - started:.0f}s", flush=True)
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
    if DIGEST.exists():
        print(DIGEST.read_text(), end="")
    return 0 if all(ok for _, _, ok in results) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
