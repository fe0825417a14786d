"""tests/bench/fleet_scale.py at a tiny size, so the benchmark keeps running as the app changes."""

from __future__ import annotations

from tests.bench import fleet_scale


def test_fleet_scale_runs_at_five_workers() -> None:
    rows = fleet_scale.run([5], rate=50, threads=2, seconds=0.5, ttl=3, reads=2, connections=2)
    (row,) = rows
    assert row.size == 5 and row.decisions > 0
    assert row.p99_ms >= row.p50_ms > 0
    assert row.commands_per_s > 0 and row.key_bytes > 0 and row.scrape_bytes > 0
    assert fleet_scale.report(rows, 50, 2)  # no 1,000-worker row: nothing to miss
