"""A long recording on one worker against the same recording split across two idle workers.

Makes a long real recording (espeak-ng speech of the sentences of tests/integration/media.py,
repeated; ``--minutes``, default 60), starts a real stack (Redis, the API, Celery workers with
one thread each, MORAG_WHISPER_CPU_THREADS=1, each worker pinned to its own core), and submits
it twice through the API: first with one worker (no idle peer: it runs whole, the baseline),
then with a second worker started and idle (it is cut at silences into two pieces, one per
worker, merged). Prints the cores used, the wall time of each (submit to end), the ratio
(goal: at most 0.6x on two cores), and the word error rate of each transcript against the
script that was spoken and of the merged transcript against the whole one (goal: at most 1
point worse).

    .venv/bin/python tests/bench/split.py                # 60 minutes of speech (about 25 min here)
    .venv/bin/python tests/bench/split.py --minutes 10
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import wait_until  # noqa: E402
from tests.integration import media  # noqa: E402
from tests.integration.stack import Stack, standalone_stack  # noqa: E402

SECONDS_PER_REPEAT = 49.0  # one round of media.SENTENCES with its pauses, measured


def _normal(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


def wer(reference: str, hypothesis: str) -> float:
    try:
        import jiwer
    except ImportError:
        return media.word_error_rate(reference, hypothesis)
    return float(jiwer.wer(reference, hypothesis))


def pin(stack: Stack, name: str, cores: set[int]) -> None:
    """Every thread of the worker's processes (its process group) onto ``cores``; threads
    made later (the model's) inherit it."""
    pgid = stack.procs[name].pid
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            for task in (proc / "task").iterdir():
                os.sched_setaffinity(int(task.name), cores)
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue


def run(stack: Stack, path: Path, timeout: float) -> tuple[float, dict[str, Any]]:
    def idle() -> bool:
        beats = [stack.heartbeat(n) for n in list(stack.procs) if n != "api"]
        return all(b is not None and not b.get("active") for b in beats)

    wait_until(idle, 60, "the workers idle")
    start = time.perf_counter()
    task_id = stack.ingest(path, gpu=False, options={})["task_id"]
    job = wait_until(
        lambda: (j := stack.job(task_id))["status"] in ("succeeded", "failed") and j,
        timeout,
        f"job {task_id}",
        interval=0.2,
    )
    seconds = time.perf_counter() - start
    assert job["status"] == "succeeded", job
    return seconds, job["result"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the recording")
    args = ap.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    repeats = max(1, math.ceil(args.minutes * 60 / SECONDS_PER_REPEAT))
    with tempfile.TemporaryDirectory() as tmp:
        wav = media.long_speech(Path(tmp) / "long.wav", repeats=repeats)
        with standalone_stack(
            "morag-split-bench-",
            whisper_cpu_threads=1,
            max_upload_bytes=2 * 1024**3,
            job_time_limit=6 * 3600,
            visibility_timeout=7 * 3600,
        ) as stack:
            stack.start({"cpu0@bench": "celery"})
            pin(stack, "cpu0@bench", {cores[0]})
            timeout = args.minutes * 60 * 2 + 600
            whole_s, whole = run(stack, wav, timeout)
            stack.start_worker("cpu1@bench", "celery")
            pin(stack, "cpu1@bench", {cores[1 % len(cores)]})
            split_s, split = run(stack, wav, timeout)

    duration = whole["metadata"]["duration"]
    script = _normal(" ".join(list(media.SENTENCES) * repeats))
    rows = []
    for name, seconds, result in (
        ("one worker (whole)", whole_s, whole),
        ("two workers (split)", split_s, split),
    ):
        meta = result["metadata"]["split"]
        rows.append(
            (name, meta.get("workers", 1), meta["pieces"], seconds, seconds / whole_s,
             wer(script, _normal(result["content"])))
        )  # fmt: skip
    print(
        f"cores: {len(cores)} available ({','.join(map(str, cores))}); each worker 1 thread "
        f"(MORAG_WHISPER_CPU_THREADS=1), cpu0 on core {cores[0]}, cpu1 on core "
        f"{cores[1 % len(cores)]}"
    )
    print(
        f"recording: {duration / 60:.1f} min of espeak-ng speech; model "
        f"{whole['metadata']['model']}, {whole['metadata']['compute_type']}"
    )
    print(
        f"{'run':<22}{'workers':>8}{'pieces':>8}{'wall s':>9}{'x of one':>10}{'WER vs script':>15}"
    )
    for name, workers, pieces, seconds, ratio, error in rows:
        print(f"{name:<22}{workers:>8}{pieces:>8}{seconds:>9.1f}{ratio:>9.2f}x{error:>15.1%}")
    between = wer(_normal(whole["content"]), _normal(split["content"]))
    worse = (rows[1][5] - rows[0][5]) * 100
    print(
        f"ratio {rows[1][4]:.2f}x (goal <= 0.60x); WER merged vs whole {between:.1%}; merged "
        f"{worse:+.1f} points against the script (goal <= +1.0)"
    )


if __name__ == "__main__":
    main()
