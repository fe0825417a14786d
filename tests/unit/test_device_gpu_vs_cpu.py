"""tests/device/gpu_vs_cpu.py on a machine without a GPU: it skips cleanly, and its CPU path
(--cpu-only) measures through the service's own audio processor and writes the table."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "device" / "gpu_vs_cpu.py"


def test_without_a_gpu_it_skips_with_exit_0(tmp_path: Path) -> None:
    if (
        shutil.which("nvidia-smi")
        and subprocess.run(["nvidia-smi", "-L"], check=False).returncode == 0
    ):
        pytest.skip("this machine has a GPU")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "t.md")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "no GPU here" in out.stdout
    assert not (tmp_path / "t.md").exists()


def test_the_cpu_path_writes_the_table(tmp_path: Path, speech_wav: Path) -> None:
    table = tmp_path / "perf.md"
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--cpu-only",
            "--runs",
            "1",
            "--audio",
            str(speech_wav),
            "--out",
            str(table),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in table.read_text().splitlines() if line.startswith("| cpu |")]
    assert [row.split("|")[2].strip().split(" ")[0] for row in rows] == ["sequential", "batched"]
    assert "GPU: none" in table.read_text()
