"""GPU against CPU on one machine, through the service's own code: the table of docs/performance.md.

Transcribes the same real recording with ``AudioProcessor.process`` (what a worker runs, with
a ``ProcessContext``) on the GPU and on all the CPU cores of the same machine, sequential
(``batched: false``) and batched (``batched: true``): one untimed run of each, then
``--runs`` timed runs (median). Prints, and writes to ``--out``, the markdown table with the
GPU's name from nvidia-smi, the CPU's model and cores.

Without a GPU (no nvidia-smi, or it lists none) it exits 0 saying so, unless ``--cpu-only``,
which measures the CPU rows alone (the script's check on a machine without a GPU). Not part
of ``make test``. On a GPU host, from the repository root (a few minutes):

    PYTHONPATH=app/src python tests/device/gpu_vs_cpu.py --out perf.md [--model DIR --audio WAV]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "app" / "src"))


def gpu_names() -> list[str]:
    """The GPUs nvidia-smi lists ([] without nvidia-smi, a driver or a GPU)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(audio: Path, model: str, device: str, batched: bool, runs: int) -> dict[str, Any]:
    from morag.config import Settings
    from morag.processors.audio import AudioProcessor
    from morag.processors.base import ProcessContext

    threads = (os.cpu_count() or 1) if device == "cpu" else 0
    settings = Settings(whisper_model=model, whisper_cpu_threads=threads)
    processor = AudioProcessor()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = ProcessContext(settings, device, Path(tmp), lambda _fraction: None)
        options = {"batched": batched}
        result = processor.process(audio, options, ctx)  # untimed: load, first run
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            result = processor.process(audio, options, ctx)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    meta = result["metadata"]
    words = len(result["content"].split())
    return {
        "device": device,
        "mode": f"batched (batch {meta['batch_size']})" if meta["batched"] else "sequential",
        "seconds": seconds,
        "duration": meta["duration"],
        "rtf": meta["duration"] / seconds,
        "wps": words / seconds,
        "compute_type": meta["compute_type"],
    }


def table(rows: list[dict[str, Any]], gpus: list[str], model: str) -> str:
    base = next(r for r in rows if r["device"] == "cpu" and r["mode"] == "sequential")
    lines = [
        f"GPU: {', '.join(gpus) if gpus else 'none (CPU rows only)'}; "
        f"CPU: {cpu_name()}, {os.cpu_count()} cores; model {model}; "
        f"{base['duration']:.1f} s of speech; median of the timed runs.",
        "",
        "| device | mode | compute type | seconds | x real time | words/s | vs CPU sequential |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['mode']} | {r['compute_type']} | {r['seconds']:.2f} | "
            f"{r['rtf']:.1f} | {r['wps']:.1f} | {base['seconds'] / r['seconds']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny.en", help="MORAG_WHISPER_MODEL (name or dir)")
    ap.add_argument("--audio", type=Path, help="a recording (default: espeak-ng speech)")
    ap.add_argument("--repeats", type=int, default=3, help="default recording: ~50 s each")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each row")
    ap.add_argument("--cpu-only", action="store_true", help="measure the CPU rows only")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    gpus = [] if args.cpu_only else gpu_names()
    if not gpus and not args.cpu_only:
        print("no GPU here (nvidia-smi lists none): skipped; --cpu-only measures the CPU rows")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        audio = args.audio
        if audio is None:
            from tests.integration import media

            audio = media.long_speech(Path(tmp) / "speech.wav", repeats=args.repeats)
        rows = []
        for device in (["cuda"] if gpus else []) + ["cpu"]:
            for batched in (False, True):
                rows.append(measure(audio, args.model, device, batched, args.runs))
                print(f"measured {device} batched={batched}", flush=True)
    text = table(rows, gpus, args.model)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
