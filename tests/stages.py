"""Run `make` stages in order, time each, print a summary table; exit non-zero on failure.

Used by `make test`: python tests/stages.py lint unit wheelhouse images integration+molecule

A `+` joins stages that run at the same time: the first streams to the terminal, the others
write .cache/stages/<stage>.log, whose tail is printed when they end (all of it that matters
on failure). Integration tests mostly wait on their own processes and molecule mostly on
containers, so on 2 cores the pair takes far less than the two one after the other.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".cache" / "stages"


def make(stage: str, log: Path | None) -> subprocess.Popen:
    cmd = ["make", "--no-print-directory", stage]
    if log is None:
        return subprocess.Popen(cmd, cwd=ROOT)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def tail(log: Path, lines: int) -> str:
    return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def done_marker(stage: str) -> Path:
    """Touched when a stage of a group ends: a sibling may take over its share of the cores
    (molecule/run.py opens a lane when the integration tests are done)."""
    return LOGS / f"{stage}.done"


def run_group(group: list[str]) -> list[tuple[str, float, bool]]:
    """Start every stage of the group; wait for all (a failure does not stop its siblings:
    their own result is worth having and they clean up after themselves)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    for stage in group:
        done_marker(stage).unlink(missing_ok=True)
    started = time.monotonic()
    logs = {stage: (None if i == 0 else LOGS / f"{stage}.log") for i, stage in enumerate(group)}
    procs = {stage: make(stage, logs[stage]) for stage in group}
    for stage, log in logs.items():
        if log is not None:
            print(f"    ({stage} runs alongside, log: {log})", flush=True)
    pending = dict(procs)
    results: dict[str, tuple[float, bool]] = {}
    while pending:
        for stage, proc in list(pending.items()):
            if proc.poll() is not None:
                results[stage] = (time.monotonic() - started, proc.returncode == 0)
                del pending[stage]
                done_marker(stage).touch()
        time.sleep(1)
    for stage in group:
        log = logs[stage]
        if log is not None:
            ok = results[stage][1]
            print(f"\n--- {stage} ({'pass' if ok else 'FAIL'}), last lines of {log}:")
            print(tail(log, 30 if ok else 150), flush=True)
    return [(stage, *results[stage]) for stage in group]


# Where a stage leaves the lines that say why it failed (molecule/run.py does): printed last,
# as CI shows only the end of the output.
DIGEST = ROOT / ".cache" / "failures.txt"


def main(stages: list[str]) -> int:
    wall = time.monotonic()
    DIGEST.unlink(missing_ok=True)
    results: list[tuple[str, float, bool]] = []
    done: set[str] = set()
    for entry in stages:
        group = entry.split("+")
        print(f"\n=== stage: {' + '.join(group)} ===", flush=True)
        if len(group) == 1:
            started = time.monotonic()
            ok = subprocess.run(["make", "--no-print-directory", entry], cwd=ROOT).returncode == 0
            outcome = [(entry, time.monotonic() - started, ok)]
        else:
            outcome = run_group(group)
        results += outcome
        done.add(entry)
        if not all(ok for _, _, ok in outcome):
            break
    skipped = [s for entry in stages if entry not in done for s in entry.split("+")]
    width = max(len(s) for entry in stages for s in entry.split("+"))
    print("\n" + "stage".ljust(width) + "   time      result")
    for stage, seconds, ok in results:
        print(f"{stage.ljust(width)}  {seconds:6.1f}s   {'pass' if ok else 'FAIL'}")
    for stage in skipped:
        print(f"{stage.ljust(width)}  {'-':>6}    skipped")
    print(f"{'wall'.ljust(width)}  {time.monotonic() - wall:6.1f}s")
    if DIGEST.exists():
        print("\nwhy:\n" + DIGEST.read_text(), end="", flush=True)
    return 0 if results and all(ok for _, _, ok in results) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
