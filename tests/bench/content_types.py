"""Benchmark: time per job for each content type through a real stack (API, CPU worker,
morag-store worker), the real-time factor for audio, and ingestion chunks per second.

Not part of `make test`. Run: .venv/bin/python tests/bench/content_types.py [--runs N]
Needs a redis-server binary (started here on a free loopback port).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tests.conftest import SENTENCE, speak
from tests.integration import media
from tests.integration.stack import Stack, standalone_stack


def _time_file(stack: Stack, path: Path, runs: int) -> tuple[float, dict]:
    times, body = [], {}
    for _ in range(runs):
        with stack.client() as c, open(path, "rb") as f:
            t0 = time.monotonic()
            resp = c.post("/process/file", files={"file": (path.name, f)}, timeout=300)
            times.append(time.monotonic() - t0)
        assert resp.status_code == 200, resp.text
        body = resp.json()
    return min(times), body


def _time_url(stack: Stack, url: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        with stack.client() as c:
            t0 = time.monotonic()
            resp = c.post("/process/url", json={"url": url}, timeout=300)
            times.append(time.monotonic() - t0)
        assert resp.status_code == 200, resp.text
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="morag-bench-media-") as tmp:
        rows = run_all(Path(tmp), args.runs)
    print(f"\n{'content type':<24}{'s/job':>8}  notes")
    for name, seconds, extra in rows:
        print(f"{name:<24}{seconds:>8.2f}  {extra}")
    return 0


def run_all(root: Path, runs: int) -> list[tuple[str, float, str]]:
    d = root / "media"
    d.mkdir()
    long_text = "\n\n".join(f"## Part {i}\n\n" + media.FILLER * 6 for i in range(60))
    (d / "long.md").write_text(long_text)
    inputs = {
        "audio": speak(SENTENCE * 3, d / "speech.wav"),
        "video": media.speech_video(d / "speech.mp4"),
        "document (docx)": media.docx_file(d / "notes.docx"),
        "document (pdf)": media.pdf_file(d / "bees.pdf"),
        "image": media.png_file(d / "invoice.png"),
    }
    settings = {"qdrant_path": root / "qdrant", "store_ingested": "true", "process_wait": 300}
    rows = []
    with standalone_stack("morag-bench-", **settings) as stack:
        stack.start_api()
        stack.start_worker("cpu0@bench", "celery", wait=False)
        stack.start_worker("store@bench", "morag-store", wait=False)
        stack.wait_live("cpu0@bench")
        stack.wait_live("store@bench")
        for name, path in inputs.items():
            _time_file(stack, path, 1)  # warm-up: models load once per worker
            seconds, body = _time_file(stack, path, runs)
            extra = ""
            if name in ("audio", "video"):
                duration = body["result"]["metadata"]["duration"]
                extra = f"RTF {seconds / duration:.3f} ({duration:.1f}s of media)"
            rows.append((name, seconds, extra))
        with media.http_server(d) as web:
            media.html_page(d / "page.html")
            _time_url(stack, f"{web}/page.html", 1)
            rows.append(("web", _time_url(stack, f"{web}/page.html", runs), ""))
            _time_url(stack, f"{web}/speech.mp4", 1)
            rows.append(
                (
                    "youtube (yt-dlp)",
                    _time_url(stack, f"{web}/speech.mp4", runs),
                    "",
                )
            )
        # Ingestion: a long Markdown document, end to end and the store step alone.
        for attempt in range(2):
            t0 = time.monotonic()
            accepted = stack.ingest(d / "long.md", gpu=False)
            job = stack.wait_job(accepted["task_id"], timeout=600)
            total = time.monotonic() - t0
            assert job["status"] == "succeeded", job["error"]
            chunks = job["result"]["metadata"]["stored_chunks"]
            if attempt == 1:
                rows.append(
                    (
                        f"ingest ({chunks} chunks)",
                        total,
                        f"{chunks / total:.1f} chunks/s end to end",
                    )
                )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
