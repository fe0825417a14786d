"""The local lab without containers: Redis, the API, one `gpu-tasks` and one `celery` worker
as local processes; submits generated speech with gpu=true and prints what happened.

`make lab` runs it. The processes stop when the job is done (use --keep to leave them up).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import REDIS_PASSWORD, SENTENCE, free_port
from tests.integration.stack import API_KEY, Stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="morag-lab-"))
    port = free_port()
    redis_proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--requirepass",
            REDIS_PASSWORD,
            "--dir",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
    )
    stack = Stack(
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0",
        root,
        free_port(),
        fault_injection="false",
        heartbeat_ttl=5,
        rescue_grace=15,
    )
    try:
        time.sleep(0.3)
        stack.start_api()
        stack.start_worker("gpu0@lab", "gpu-tasks", wait=False)
        stack.start_worker("cpu0@lab", "celery")
        stack.wait_live("gpu0@lab")
        wav = root / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True)
        print(f"API {stack.api_url} (X-API-Key: {API_KEY}); workers gpu0@lab, cpu0@lab")
        started = time.monotonic()
        job = stack.wait_job(stack.ingest(wav, gpu=True)["task_id"], timeout=120)
        attempt = job["attempts"][-1]
        print(f"status:     {job['status']} in {time.monotonic() - started:.2f}s")
        print(f"route:      {job['route']['queue']} ({job['route']['reason']})")
        print(f"ran on:     {attempt['worker']} via {attempt['queue']} ({attempt['device']})")
        print(f"transcript: {job['result']['content'] if job['result'] else job['error']}")
        if args.keep:
            print("running; Ctrl-C stops it")
            while True:
                time.sleep(3600)
        return 0 if job["status"] == "succeeded" else 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.close()
        redis_proc.terminate()
        redis_proc.wait(10)
        if "job" not in locals() or job["status"] != "succeeded":
            for log in sorted(stack.logs.glob("*.log")):
                print(
                    f"--- {log.name}", *log.read_text(errors="replace").splitlines()[-15:], sep="\n"
                )
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
