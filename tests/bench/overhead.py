"""Per-job overhead: a 10 s recording through ``POST /process/file`` against bare faster-whisper.

Makes a real espeak-ng recording of about 10 s, then, in one run:

1. one after the other, ``--jobs`` times (so that a shared, loaded machine slows each alike):
   bare faster-whisper in this process (the same model, compute type, threads and beam size
   1 as a worker uses: the baseline); the service's own audio processor in this process
   (``AudioProcessor.process`` with a ``ProcessContext``: what processing adds to the
   model); a request to ``/process/file`` on a local stack (Redis with the role's ACL users,
   the real API under uvicorn, one Celery worker). Each job's timestamps give the
   breakdown: upload and submission (client send -> record created), queue (created ->
   claimed by the worker), worker (claimed -> ended: file fetch, processing, the end's
   write) and answer (ended -> the client has the response: the API's wait for the end);
2. a freshly started worker with MORAG_WARMUP off, then on: the time from its start to its
   first heartbeat (when it advertises itself), its first job's latency, the median of the
   next three, and the difference (the first-job penalty: the model's load without warm-up).

Prints the medians, the ratio of the whole request to the bare model (median of the
interleaved pairs; target at most 1.1) and the first-job latencies.

    .venv/bin/python tests/bench/overhead.py            # about two minutes on 2 cores
    .venv/bin/python tests/bench/overhead.py --jobs 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from morag.config import Settings  # noqa: E402
from morag.processors.audio import AudioProcessor, resolve_model  # noqa: E402
from morag.processors.base import ProcessContext  # noqa: E402

from tests.integration import media  # noqa: E402
from tests.integration.stack import API_KEY, standalone_stack  # noqa: E402

MODEL = "tiny.en"


def recording(dest: Path, seconds: float) -> Path:
    """Real speech (espeak-ng sentences with pauses), cut to ``seconds`` at 16 kHz mono."""
    long = media.long_speech(dest.with_name("long.wav"))
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-i", str(long), "-t", str(seconds), str(dest)],
        check=True,
    )
    return dest


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


class Bare:
    """faster-whisper alone, in this process: the same model, compute type, threads and
    beam size as a worker uses."""

    def __init__(self, threads: int) -> None:
        from faster_whisper import WhisperModel

        self.model = WhisperModel(
            resolve_model(MODEL), device="cpu", compute_type="int8", cpu_threads=threads
        )

    def run(self, path: Path) -> float:
        start = time.perf_counter()
        segments, _info = self.model.transcribe(str(path), beam_size=1, language="en")
        text = " ".join(s.text for s in segments)
        assert text.strip(), "the bare model heard nothing"
        return time.perf_counter() - start


class InProcess:
    """The service's audio processor in this process (no queue, no API)."""

    def __init__(self, threads: int, scratch: Path) -> None:
        settings = Settings(whisper_model=MODEL, whisper_cpu_threads=threads)
        self.processor = AudioProcessor()
        self.ctx = ProcessContext(settings, "cpu", scratch, lambda _fraction: None)

    def run(self, path: Path) -> float:
        start = time.perf_counter()
        self.processor.process(path, {}, self.ctx)
        return time.perf_counter() - start


def post(stack: Any, path: Path) -> tuple[float, float, dict[str, Any]]:
    """One /process/file request: (sent at, answered at, the job record)."""
    with stack.client() as client:
        sent = time.time()
        resp = client.post(
            "/process/file",
            files={"file": (path.name, path.read_bytes(), "audio/wav")},
            data={"options": json.dumps({"language": "en"})},
            headers={"X-API-Key": API_KEY},
            timeout=120,
        )
        answered = time.time()
        resp.raise_for_status()
        body = resp.json()
        assert body["result"]["content"], body
        return sent, answered, stack.job(body["task_id"])


def interleaved(path: Path, threads: int, jobs: int) -> dict[str, list[float]]:
    """Bare model, in-process processor and a request through the stack, one after the
    other ``jobs`` times: a shared, loaded machine slows all three alike."""
    stages: dict[str, list[float]] = {
        k: [] for k in ("bare", "processor", "total", "submit", "queue", "worker", "answer")
    }
    model, processor = Bare(threads), InProcess(threads, path.parent)
    with standalone_stack("morag-bench-overhead-", whisper_cpu_threads=threads) as stack:
        stack.start({"cpu0@bench": "celery"})
        model.run(path), processor.run(path), post(stack, path)  # untimed: first runs
        for _ in range(jobs):
            stages["bare"].append(model.run(path))
            stages["processor"].append(processor.run(path))
            sent, answered, job = post(stack, path)
            attempt = job["attempts"][-1]
            created, started = _epoch(job["created_at"]), _epoch(attempt["started_at"])
            ended = _epoch(attempt["finished_at"])
            stages["total"].append(answered - sent)
            stages["submit"].append(created - sent)
            stages["queue"].append(started - created)
            stages["worker"].append(ended - started)
            stages["answer"].append(answered - ended)
    return stages


def first_job(path: Path, threads: int, warmup: bool, later: int = 3) -> dict[str, float]:
    """A fresh worker: start to first heartbeat, its first job, the median of later ones."""
    with standalone_stack(
        "morag-bench-firstjob-", whisper_cpu_threads=threads, warmup=str(warmup).lower()
    ) as stack:
        stack.start_api()
        begun = time.monotonic()
        stack.start_worker("cpu0@first", "celery")  # returns at its first heartbeat
        advertised = time.monotonic() - begun
        sent, answered, _job = post(stack, path)
        first = answered - sent
        others = []
        for _ in range(later):
            sent, answered, _job = post(stack, path)
            others.append(answered - sent)
        return {"advertised": advertised, "first": first, "later": statistics.median(others)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="recording length")
    ap.add_argument("--jobs", type=int, default=10, help="timed requests through the stack")
    ap.add_argument("--threads", type=int, default=1, help="CTranslate2 CPU threads (both)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        wav = recording(Path(tmp) / "speech.wav", args.seconds)
        runs = interleaved(wav, args.threads, args.jobs)
        cold = first_job(wav, args.threads, warmup=False)
        warm = first_job(wav, args.threads, warmup=True)

    stages = {k: statistics.median(v) for k, v in runs.items()}
    ratio = statistics.median(t / b for t, b in zip(runs["total"], runs["bare"], strict=True))
    print(
        f"model={MODEL} device=cpu compute_type=int8 threads={args.threads} "
        f"audio={args.seconds:.1f} s jobs={args.jobs} (medians; interleaved runs)"
    )
    print(f"{'stage':<58}{'seconds':>9}")
    rows = [
        ("bare faster-whisper, in this process (baseline)", stages["bare"]),
        ("AudioProcessor.process, in this process", stages["processor"]),
        ("/process/file, whole request (client clock)", stages["total"]),
        ("  upload and submission (sent -> record created)", stages["submit"]),
        ("  queue (record created -> claimed by the worker)", stages["queue"]),
        ("  worker (claimed -> ended: fetch, process, record)", stages["worker"]),
        ("  answer (ended -> response received)", stages["answer"]),
    ]
    for name, value in rows:
        print(f"{name:<58}{value:>9.3f}")
    print(
        f"overhead per job: {stages['total'] - stages['bare']:.3f} s   "
        f"ratio /process/file / bare (median of pairs): {ratio:.2f}x (target <= 1.10)"
    )
    print(
        f"{'fresh worker':<32}{'start->advertised':>18}{'first job':>11}{'later':>9}{'penalty':>9}"
    )
    for name, r in (("MORAG_WARMUP=false (before)", cold), ("MORAG_WARMUP=true (after)", warm)):
        print(
            f"{name:<32}{r['advertised']:>18.2f}{r['first']:>11.3f}{r['later']:>9.3f}"
            f"{r['first'] - r['later']:>9.3f}"
        )


if __name__ == "__main__":
    main()
