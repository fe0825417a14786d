"""Run `make` stages in order, time each, print a summary table; exit non-zero on failure.

Used by `make test`: python tests/stages.py lint unit integration ...
"""

from __future__ import annotations

import subprocess
import sys
import time


def main(stages: list[str]) -> int:
    results: list[tuple[str, float, bool]] = []
    for stage in stages:
        print(f"\n=== stage: {stage} ===", flush=True)
        started = time.monotonic()
        ok = subprocess.run(["make", "--no-print-directory", stage], check=False).returncode == 0
        results.append((stage, time.monotonic() - started, ok))
        if not ok:
            break
    skipped = stages[len(results) :]
    width = max(len(s) for s in stages)
    print("\n" + "stage".ljust(width) + "   time      result")
    for stage, seconds, ok in results:
        print(f"{stage.ljust(width)}  {seconds:6.1f}s   {'pass' if ok else 'FAIL'}")
    for stage in skipped:
        print(f"{stage.ljust(width)}  {'-':>6}    skipped")
    total = sum(seconds for _, seconds, _ in results)
    print(f"{'total'.ljust(width)}  {total:6.1f}s")
    return 0 if results and all(ok for _, _, ok in results) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
