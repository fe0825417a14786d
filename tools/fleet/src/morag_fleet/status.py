"""The inventory against the live fleet: which worker hosts have no live worker, which GPU
hosts compute on the CPU or failed their CUDA check, which run another app version."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from morag_fleet.inventory import InventoryHost

GPU_QUEUE = "gpu-tasks"


@dataclass
class HostStatus:
    host: str
    kind: str  # gpu or cpu
    workers: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class FleetReport:
    hosts: list[HostStatus]
    unknown: list[dict[str, Any]]  # live workers of no inventory host
    expected_version: str | None

    @property
    def problems(self) -> list[str]:
        lines = [f"{h.host}: {p}" for h in self.hosts for p in h.problems]
        lines += [
            f"{w.get('name')}: live, but its host {worker_host(w)} is not in the inventory"
            for w in self.unknown
        ]
        return lines

    def as_json(self) -> dict[str, Any]:
        return {
            "expected_version": self.expected_version,
            "hosts": [
                {
                    "host": h.host,
                    "kind": h.kind,
                    "workers": [w.get("name") for w in h.workers],
                    "problems": h.problems,
                }
                for h in self.hosts
            ],
            "unknown_workers": [w.get("name") for w in self.unknown],
            "problems": self.problems,
        }


def worker_host(hb: dict[str, Any]) -> str:
    """The host part of a Celery node name (gpu0@HOST), which morag_worker sets to the
    host's morag_worker_hostname; else the heartbeat's own hostname."""
    name = str(hb.get("name", ""))
    return name.split("@", 1)[1] if "@" in name else str(hb.get("hostname", ""))


def workers_of(host: InventoryHost, beats: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    names = host.node_names()
    return sorted(
        (b for b in beats if worker_host(b) in names or b.get("hostname") in names),
        key=lambda b: str(b.get("name")),
    )


def gpu_problem(hb: dict[str, Any]) -> str | None:
    """Why a worker of a GPU host is not a working GPU worker, or None."""
    name = hb.get("name")
    if GPU_QUEUE not in (hb.get("queues") or ()):
        return None  # the host's store or CPU instance: no GPU expected of it
    if hb.get("device") != "cuda":
        reason = hb.get("device_reason") or "no reason given"
        return f"{name} computes on {hb.get('device', '?')}: {reason}"
    check = hb.get("cuda_check")
    if not isinstance(check, dict):
        return f"{name} has no CUDA check in its heartbeat (a worker older than the check?)"
    if check.get("passed") is not True:
        return f"{name} failed its CUDA check: {check.get('reason') or 'no reason given'}"
    return None


def fleet_report(
    hosts: list[InventoryHost], beats: list[dict[str, Any]], expected_version: str | None
) -> FleetReport:
    report: list[HostStatus] = []
    # Workers of any inventory host are known (the server's store worker too).
    claimed = {str(w.get("name")) for host in hosts for w in workers_of(host, beats)}
    for host in hosts:
        if host.kind is None:
            continue
        status = HostStatus(host.name, host.kind, workers_of(host, beats))
        if not status.workers:
            status.problems.append("no live worker")
        if host.kind == "gpu" and status.workers:
            if not any(GPU_QUEUE in (w.get("queues") or ()) for w in status.workers):
                status.problems.append(f"no worker on {GPU_QUEUE}")
            status.problems += [p for w in status.workers if (p := gpu_problem(w))]
        for w in status.workers:
            version = w.get("version")
            if expected_version and version != expected_version:
                shown = version or "an unknown version (no version in its heartbeat)"
                status.problems.append(f"{w.get('name')} runs {shown}, expected {expected_version}")
        report.append(status)
    unknown = [b for b in beats if str(b.get("name")) not in claimed]
    return FleetReport(report, sorted(unknown, key=lambda b: str(b.get("name"))), expected_version)
