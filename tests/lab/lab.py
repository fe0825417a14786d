"""The container lab: systemd containers provisioned by the real site.yml with inventory/lab.

    python tests/lab/lab.py up        containers + site.yml + API key + one gpu=true job
    python tests/lab/lab.py create    only the containers (molecule's create step)
    python tests/lab/lab.py provision ansible-playbook site.yml -i inventory/lab
    python tests/lab/lab.py idempotence [-l LIMIT] [--tags TAGS]
                                      site.yml again through ansible-runner: fails naming
                                      each host that changed and its changed tasks
    python tests/lab/lab.py demo      submit generated speech with gpu=true, print the outcome
    python tests/lab/lab.py failover  the end-to-end check (GPU workers stopped and started)
    python tests/lab/lab.py down      remove containers, network, volume, API key

`make lab` / `make lab-down` run it (`up` checks idempotence after site.yml); the molecule
scenario `site` uses the same steps.
Containers: morag-lab-server (Redis, Ganesha, API published on 127.0.0.1:8080, a CPU
worker), morag-lab-gpu1/gpu2 (GPU workers, GPU code path on CPU), morag-lab-cpu1.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = ROOT / "inventory" / "lab"
API_KEY_FILE = INVENTORY / ".api-key"
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
IMAGE = "morag-test/debian12:latest"
NETWORK = "morag-lab"
VOLUME = "morag-lab-shared"
HA_NETWORK = "morag-lab-ha"  # tests/lab/ha.py
SERVER = "morag-lab-server"
GPU_WORKERS = ["morag-lab-gpu1", "morag-lab-gpu2"]
CPU_WORKERS = ["morag-lab-cpu1"]
CONTAINERS = [SERVER, *GPU_WORKERS, *CPU_WORKERS]
# The lab's API serves HTTPS (it listens on the lab network) with the morag_api role's CA.
API_URL = os.environ.get("MORAG_LAB_API_URL", "https://127.0.0.1:8080")
API_PUBLISH = os.environ.get("MORAG_LAB_API_PUBLISH", "127.0.0.1:8080")
SENTENCE = "Please send the report to the office before Friday."


def log(msg: str) -> None:
    print(f"[lab {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def docker(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", *args],
        check=check,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )


def state(name: str) -> str | None:
    out = docker("inspect", "-f", "{{.State.Status}}", name, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def wait_systemd(name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = docker("exec", name, "systemctl", "is-system-running", check=False)
        if out.stdout.strip() in ("running", "degraded"):
            return
        time.sleep(0.5)
    raise SystemExit(f"{name}: systemd did not come up")


def container_args(name: str) -> list[str]:
    """`docker run` arguments of a lab container (a systemd container on the lab network),
    before the image and any extra mounts or published ports."""
    return [
        "run",
        "-d",
        "--name",
        name,
        "--hostname",
        name,
        "--network",
        NETWORK,
        "--cap-add",
        "SYS_ADMIN",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--cgroupns=host",
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "--tmpfs",
        "/run",
        "--tmpfs",
        "/run/lock",
        # systemd's clean shutdown: `docker stop` = a graceful halt (warm worker shutdown).
        "--stop-signal",
        "SIGRTMIN+3",
        "--label",
        "morag-lab=1",
        # The controller's wheelhouse, shared read-only (as a site would share it): the
        # morag_app role finds identical files and copies nothing.
        "-v",
        f"{WHEELHOUSE}:/opt/morag/wheelhouse:ro",
    ]


def create() -> None:
    """Network, volume and containers; existing ones are reused (started if stopped)."""
    if docker("network", "inspect", NETWORK, check=False).returncode != 0:
        docker("network", "create", NETWORK)
    docker("volume", "create", VOLUME)
    for name in CONTAINERS:
        st = state(name)
        if st == "running":
            continue
        if st is not None:
            docker("start", name)
            continue
        args = container_args(name)
        if name == SERVER:
            # Ganesha exports from a real filesystem (the volume) and opens files by handle
            # (CAP_DAC_READ_SEARCH); the API is published on the host's loopback only.
            args += [
                "--cap-add",
                "DAC_READ_SEARCH",
                "-v",
                f"{VOLUME}:/var/lib/morag/shared",
                "-p",
                f"{API_PUBLISH}:8000",
            ]
        docker(*args, IMAGE)
        log(f"created {name}")
    for name in CONTAINERS:
        wait_systemd(name)


def ansible_env() -> dict[str, str]:
    return dict(
        os.environ,
        PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_PIPELINING="true",
    )


def provision() -> None:
    started = time.monotonic()
    subprocess.run(
        ["ansible-playbook", "site.yml", "-i", str(INVENTORY)],
        cwd=ROOT,
        env=ansible_env(),
        check=True,
    )
    log(f"site.yml done in {time.monotonic() - started:.0f}s")
    key = (INVENTORY / ".secrets" / "api_key").read_text().split()[0]
    API_KEY_FILE.write_text(key + "\n")
    API_KEY_FILE.chmod(0o600)


def idempotence(limit: str | None = None, tags: str | None = None) -> int:
    """site.yml once more, through ansible-runner (morag_fleet.idempotence): ``changed`` per
    host from the runner's stats, the changed tasks from its events; 0 when nothing changed."""
    from morag_fleet.idempotence import second_run

    check = second_run(
        ROOT / "site.yml",
        INVENTORY,
        project_dir=ROOT,  # the repository's ansible.cfg, as provision() uses
        limit=limit,
        tags=tags,
        env={"ANSIBLE_PIPELINING": "true"},
    )
    log(check.report())
    return check.exit_code


def client() -> httpx.Client:
    key = API_KEY_FILE.read_text().strip()
    ca = INVENTORY / ".secrets" / "api-tls" / "ca.crt"
    verify = ssl.create_default_context(cafile=str(ca)) if API_URL.startswith("https") else True
    return httpx.Client(base_url=API_URL, headers={"X-API-Key": key}, timeout=30, verify=verify)


def workers() -> list[dict]:
    with client() as c:
        resp = c.get("/api/v1/workers")
    resp.raise_for_status()
    data = resp.json()
    return data["workers"] if isinstance(data, dict) else data


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def gpu_consumers() -> list[str]:
    return [
        w["name"]
        for w in workers()
        if "gpu-tasks" in w.get("consuming", w.get("queues", [])) and w["name"].startswith("gpu")
    ]


def rescuers() -> list[str]:
    """CPU workers consuming gpu-tasks (the rescue of queued GPU jobs)."""
    return [
        w["name"]
        for w in workers()
        if "gpu-tasks" in w.get("consuming", w.get("queues", []))
        and not w["name"].startswith("gpu")
    ]


def speech() -> Path:
    wav = Path(tempfile.gettempdir()) / "morag-lab-speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True)
    return wav


def run_job(gpu: bool = True, timeout: float = 180) -> dict:
    wav = speech()
    with client() as c, open(wav, "rb") as f:
        resp = c.post(
            "/api/v1/ingest/file",
            files={"file": (wav.name, f, "audio/wav")},
            data={"gpu": str(gpu).lower()},
        )
    if resp.status_code != 202:
        raise SystemExit(f"submit failed: {resp.status_code} {resp.text}")
    task_id = resp.json()["task_id"]

    def done():
        with client() as c:
            job = c.get(f"/api/v1/status/{task_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, f"job {task_id}", 0.5)


def describe(job: dict) -> str:
    attempt = job["attempts"][-1] if job.get("attempts") else {}
    result = job.get("result") or {}
    meta = result.get("metadata", {})
    return "\n".join(
        [
            f"status:        {job['status']}",
            f"route:         {job['route']['queue']} [{job['route'].get('code')}]"
            f" ({job['route']['reason']})",
            f"ran on:        {attempt.get('worker')} via {attempt.get('queue')}"
            f" ({attempt.get('device')})",
            f"file transfer: {meta.get('file_transfer')}",
            f"transcript:    {result.get('content') if result else job.get('error')}",
        ]
    )


def demo() -> int:
    wait_for(gpu_consumers, 120, "a GPU worker consuming gpu-tasks")
    started = time.monotonic()
    job = run_job(gpu=True)
    print(describe(job))
    print(f"took:          {time.monotonic() - started:.1f}s")
    print(f"\nAPI: {API_URL}  (X-API-Key in {API_KEY_FILE.relative_to(ROOT)})")
    return 0 if job["status"] == "succeeded" else 1


def check(job: dict, queue: str, worker_prefix: str) -> None:
    print(describe(job), flush=True)
    attempt = job["attempts"][-1]
    assert job["status"] == "succeeded", job
    assert job["route"]["queue"] == queue, job["route"]
    assert attempt["worker"].startswith(worker_prefix), attempt
    # In the lab the worker containers do not mount NFS (no kernel client): the file comes
    # over the authenticated HTTP path. The server's own CPU worker sees the shared dir.
    expected = "shared" if attempt["worker"].endswith("@" + SERVER) else "http"
    assert job["result"]["metadata"]["file_transfer"] == expected, job["result"]["metadata"]
    assert "report" in job["result"]["content"].lower(), job["result"]["content"]


def prometheus(expr: str) -> float | None:
    """The sum of a query's values in the lab's Prometheus (in the server container,
    installed by morag_monitoring on 127.0.0.1:9090); None when it does not answer."""
    code = (
        "import sys, urllib.parse as p, urllib.request as u\n"
        "url = 'http://127.0.0.1:9090/api/v1/query?query=' + p.quote(sys.argv[1])\n"
        "print(u.urlopen(url, timeout=10).read().decode())"
    )
    out = docker("exec", SERVER, "python3", "-c", code, expr, check=False)
    if out.returncode != 0:
        return None
    result = json.loads(out.stdout)["data"]["result"]
    return sum(float(r["value"][1]) for r in result)


def failover() -> int:
    log("1. gpu=true with GPU workers alive -> gpu-tasks on a GPU-worker container")
    wait_for(lambda: len(gpu_consumers()) == 2, 120, "both GPU workers")
    job = run_job(gpu=True)
    check(job, "gpu-tasks", "gpu")
    assert job["attempts"][-1]["worker"].split("@")[1] in GPU_WORKERS
    assert job["route"]["code"] == "gpu_worker", job["route"]
    query = 'sum(morag_workers{queue="gpu-tasks"})'
    wait_for(lambda: prometheus(query) == len(GPU_WORKERS), 60, f"Prometheus: {query} == 2")
    log(f"   Prometheus: {query} = {prometheus(query):.0f}")
    log("2. docker stop both GPU workers -> gpu=true runs on a CPU worker")
    fallbacks = 'sum(morag_gpu_fallbacks_total{code="no_gpu_worker"})'
    before = prometheus(fallbacks) or 0.0
    for name in GPU_WORKERS:
        docker("stop", name)
    wait_for(lambda: not gpu_consumers(), 60, "the GPU heartbeats to expire")
    job = run_job(gpu=True)
    check(job, "celery", "cpu")
    assert job["route"]["code"] == "no_gpu_worker", job["route"]
    wait_for(
        lambda: (prometheus(fallbacks) or 0.0) > before, 60, f"Prometheus: {fallbacks} to grow"
    )
    log(f"   Prometheus: {fallbacks} = {prometheus(fallbacks):.0f} (was {before:.0f})")
    log("3. docker start them again -> gpu=true goes back to gpu-tasks")
    for name in GPU_WORKERS:
        docker("start", name)
    wait_for(lambda: len(gpu_consumers()) == 2, 180, "both GPU workers back")
    # The CPU workers took gpu-tasks over (the rescue) while no GPU worker lived; a job sent
    # before they let go may be taken by one of them, legitimately: wait for that first.
    wait_for(lambda: not rescuers(), 120, "the CPU workers to stop consuming gpu-tasks")
    job = run_job(gpu=True)
    check(job, "gpu-tasks", "gpu")
    log("failover: all checks passed")
    return 0


def long_speech(seconds: float = 200) -> Path:
    """A recording of about `seconds` (below the workers' split threshold, 300 s)."""
    wav = Path(tempfile.gettempdir()) / "morag-lab-long-speech.wav"
    text = " ".join([SENTENCE] * 60)
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), text], check=True)
    with wave.open(str(wav)) as w:
        length = w.getnframes() / w.getframerate()
    if length > seconds:
        trimmed = wav.with_suffix(".trim.wav")
        subprocess.run(["sox", str(wav), str(trimmed), "trim", "0", str(seconds)], check=True)
        trimmed.replace(wav)
    return wav


def journal(container: str, unit: str = "morag-worker@*") -> str:
    return docker(
        "exec", container, "journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False
    ).stdout


def partition() -> int:
    """A GPU worker cut off the network (docker network disconnect) during a long job: the
    job completes once elsewhere, and the cut-off worker's late result is discarded."""
    wait_for(lambda: len(gpu_consumers()) == 2, 180, "both GPU workers")
    wav = long_speech()
    with client() as c, open(wav, "rb") as f:
        resp = c.post(
            "/api/v1/ingest/file",
            files={"file": (wav.name, f, "audio/wav")},
            data={"gpu": "true"},
        )
    if resp.status_code != 202:
        raise SystemExit(f"submit failed: {resp.status_code} {resp.text}")
    task_id = resp.json()["task_id"]

    def status() -> dict:
        with client() as c:
            return c.get(f"/api/v1/status/{task_id}").json()

    def running_on_gpu():
        job = status()
        attempt = (job.get("attempts") or [{}])[-1]
        if job["status"] == "running" and attempt.get("worker", "").startswith("gpu"):
            return job
        assert job["status"] in ("queued", "running"), f"job ended before the cut: {job}"
        return None

    job = wait_for(running_on_gpu, 180, f"job {task_id} running on a GPU worker", 0.2)
    worker = job["attempts"][-1]["worker"]
    container = worker.split("@", 1)[1]
    assert container in GPU_WORKERS, worker
    log(f"partition: job {task_id} runs on {worker}: docker network disconnect {container}")
    cut = time.monotonic()
    docker("network", "disconnect", NETWORK, container)
    try:
        final = wait_for(
            lambda: (j := status())["status"] in ("succeeded", "failed", "cancelled") and j,
            600,
            f"job {task_id} to end without {container}",
            0.5,
        )
        log(f"   ended {final['status']} {time.monotonic() - cut:.0f}s after the cut")
    finally:
        docker("network", "connect", NETWORK, container)
    assert final["status"] == "succeeded", describe(final)
    last = final["attempts"][-1]
    assert not last["worker"].endswith("@" + container), final["attempts"]
    assert final["attempts"][0]["worker"] == worker, final["attempts"]
    log(f"   completed once elsewhere: {last['worker']} via {last['queue']}")
    log(f"   attempts: {[(a['worker'], a.get('error')) for a in final['attempts']]}")
    # Back on the network, the cut-off worker settles the job it held: it must not change it.
    name = worker

    def back_and_idle():
        entry = next((w for w in workers() if w["name"] == name), None)
        said = [line for line in journal(container).splitlines() if task_id in line]
        return entry is not None and not entry.get("busy") and any("discarded" in s for s in said)

    wait_for(back_and_idle, 600, f"{name} back, idle, and its result of the job discarded")
    after = status()
    for key in ("status", "result", "attempts", "error"):
        assert after.get(key) == final.get(key), f"the late worker changed {key}: {after.get(key)}"
    said = [line for line in journal(container).splitlines() if task_id in line]
    log(f"   {name} on the job, after the cut: " + (said[-1] if said else "(nothing)"))
    log("partition: all checks passed")
    return 0


def down() -> None:
    # Every lab container, also those tests/lab/ha.py added (the same label), then networks.
    labelled = docker("ps", "-a", "--filter", "label=morag-lab=1", "--format", "{{.Names}}")
    for name in sorted(set(CONTAINERS) | set(labelled.stdout.split())):
        if state(name) is not None:
            docker("rm", "-f", "-v", name)
            log(f"removed {name}")
    for network in (NETWORK, HA_NETWORK):
        docker("network", "rm", network, check=False)
    docker("volume", "rm", "-f", VOLUME, check=False)
    API_KEY_FILE.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command",
        choices=[
            "up",
            "create",
            "provision",
            "idempotence",
            "demo",
            "failover",
            "partition",
            "down",
            "workers",
        ],
    )
    parser.add_argument("-l", "--limit", help="idempotence: only these hosts")
    parser.add_argument("--tags", help="idempotence: only these tags")
    args = parser.parse_args()
    cmd = args.command
    if cmd == "idempotence":
        return idempotence(args.limit, args.tags)
    if cmd == "up":
        t0 = time.monotonic()
        create()
        log(f"containers ready in {time.monotonic() - t0:.0f}s")
        provision()
        if idempotence() != 0:
            return 1
        wait_for(gpu_consumers, 120, "a GPU worker consuming gpu-tasks")
        log(f"bare containers -> GPU workers consuming gpu-tasks: {time.monotonic() - t0:.0f}s")
        return demo()
    if cmd == "workers":
        print(json.dumps(workers(), indent=2))
        return 0
    result = {
        "create": create,
        "provision": provision,
        "demo": demo,
        "failover": failover,
        "partition": partition,
        "down": down,
    }[cmd]()
    return result or 0


if __name__ == "__main__":
    sys.exit(main())
