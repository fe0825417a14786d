"""The diagrams in docs/architecture.md name what the code has: the job states of the
lifecycle diagram are JobStatus, and every route code the troubleshooting table explains
exists in routing (and the other way round)."""

from __future__ import annotations

import re
from pathlib import Path

from morag.api.schemas import JobStatus
from morag.routing import ROUTE_CODES

ROOT = Path(__file__).resolve().parents[2]


def mermaid_blocks(text: str) -> list[str]:
    return re.findall(r"```mermaid\n(.*?)```", text, flags=re.S)


def test_lifecycle_diagram_states_are_the_job_states() -> None:
    blocks = mermaid_blocks((ROOT / "docs" / "architecture.md").read_text())
    (lifecycle,) = [b for b in blocks if b.startswith("stateDiagram")]
    states: set[str] = set()
    for line in lifecycle.splitlines():
        m = re.match(r"\s*(\[\*\]|\w+)\s*-->\s*(\[\*\]|\w+)", line)
        if m:
            states |= {m.group(1), m.group(2)} - {"[*]"}
    assert states == {s.value for s in JobStatus}


def test_every_diagram_has_a_known_kind_and_balanced_blocks() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    blocks = mermaid_blocks(text)
    kinds = {b.split(None, 1)[0] for b in blocks}
    assert kinds == {"stateDiagram-v2", "sequenceDiagram", "flowchart"}
    for block in blocks:
        assert block.count("[") == block.count("]"), block
        assert block.count("(") == block.count(")"), block


def test_troubleshooting_explains_every_route_code() -> None:
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    section = text.split("### My `gpu=true` job ran on a CPU", 1)[1].split("\n### ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))
    assert documented == set(ROUTE_CODES) - {"not_requested"}
