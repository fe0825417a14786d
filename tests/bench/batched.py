"""Batched against sequential transcription, on the same real recording, in one process.

Makes a real espeak-ng recording (the sentences of tests/integration/media.py, repeated:
about 50 s per repeat) and transcribes it with the service's own audio processor
(morag.processors.audio, the code a worker runs) with ``options.batched`` false (the
baseline) and true, alternating, ``--runs`` times each after one warm-up of each. Prints the
real-time factor (seconds of audio per second of work) and words per second (median run),
the ratio batched/sequential, and the word error rate of the batched transcript against the
sequential one and of each against the script that was spoken.

    .venv/bin/python tests/bench/batched.py                 # CPU, about 150 s of speech
    .venv/bin/python tests/bench/batched.py --device cuda   # on a GPU worker host
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from morag.config import Settings  # noqa: E402
from morag.processors.audio import AudioProcessor  # noqa: E402
from morag.processors.base import ProcessContext  # noqa: E402

from tests.integration import media  # noqa: E402


def _normal(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3, help="recording: sentence rounds")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each mode")
    ap.add_argument("--words", action="store_true", help="with word timestamps")
    args = ap.parse_args()

    settings = Settings()
    processor = AudioProcessor()
    with tempfile.TemporaryDirectory() as tmp:
        wav = media.long_speech(Path(tmp) / "speech.wav", repeats=args.repeats)
        ctx = ProcessContext(settings, args.device, Path(tmp), lambda _fraction: None)
        options = {"word_timestamps": args.words}

        def run(batched: bool) -> tuple[float, dict]:
            start = time.perf_counter()
            result = processor.process(wav, dict(options, batched=batched), ctx)
            return time.perf_counter() - start, result

        for batched in (False, True):  # warm-up: model load, VAD model load
            run(batched)
        times: dict[bool, list[float]] = {False: [], True: []}
        results: dict[bool, dict] = {}
        for _ in range(args.runs):
            for batched in (False, True):
                seconds, results[batched] = run(batched)
                times[batched].append(seconds)

    duration = results[False]["metadata"]["duration"]
    rows = []
    for batched in (False, True):
        median = statistics.median(times[batched])
        words = len(_normal(results[batched]["content"]).split())
        rows.append((batched, median, duration / median, words / median, words))
    meta = results[True]["metadata"]
    print(
        f"device={args.device} model={meta['model']} compute_type={meta['compute_type']} "
        f"audio={duration:.1f} s runs={args.runs} (median) word_timestamps={args.words}"
    )
    print(f"{'mode':<22}{'seconds':>9}{'RTF (x real time)':>19}{'words/s':>9}{'words':>7}")
    for batched, median, rtf, wps, words in rows:
        name = f"batched (batch {meta['batch_size']})" if batched else "sequential (baseline)"
        print(f"{name:<22}{median:>9.2f}{rtf:>19.1f}{wps:>9.1f}{words:>7}")
    script = _normal(" ".join(list(media.SENTENCES) * args.repeats))
    for batched in (False, True):
        wer = media.word_error_rate(script, _normal(results[batched]["content"]))
        print(f"WER against the script, {'batched' if batched else 'sequential'}: {wer:.1%}")
    speedup = rows[0][1] / rows[1][1]
    wer = media.word_error_rate(
        _normal(results[False]["content"]), _normal(results[True]["content"])
    )
    print(f"batched speed-up: {speedup:.2f}x   WER batched vs sequential: {wer:.1%}")


if __name__ == "__main__":
    main()
