"""The local lab without containers: Redis, the API, one `gpu-tasks` and one `celery` worker
as local processes; submits generated speech with gpu=true and prints what happened.

`make lab-local` runs it. Everything stops when the job is done (--keep leaves it up).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import SENTENCE
from tests.integration.stack import API_KEY, Stack, standalone_stack


def show_logs(stack: Stack) -> None:
    for log in sorted(stack.logs.glob("*.log")):
        print(f"--- {log.name}", *log.read_text(errors="replace").splitlines()[-15:], sep="\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args()
    settings = {"fault_injection": "false", "heartbeat_ttl": 5, "rescue_grace": 15}
    with standalone_stack("morag-lab-", **settings) as stack:
        try:
            stack.start({"gpu0@lab": "gpu-tasks", "cpu0@lab": "celery"})
            wav = stack.root / "speech.wav"
            subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True)
            print(f"API {stack.api_url} (X-API-Key: {API_KEY}); workers gpu0@lab, cpu0@lab")
            started = time.monotonic()
            job = stack.wait_job(stack.ingest(wav, gpu=True)["task_id"], timeout=120)
        except (AssertionError, OSError):
            show_logs(stack)
            raise
        attempt = job["attempts"][-1]
        print(f"status:     {job['status']} in {time.monotonic() - started:.2f}s")
        print(f"route:      {job['route']['queue']} ({job['route']['reason']})")
        print(f"ran on:     {attempt['worker']} via {attempt['queue']} ({attempt['device']})")
        print(f"transcript: {job['result']['content'] if job['result'] else job['error']}")
        if args.keep:
            print("running; Ctrl-C stops it")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0 if job["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
