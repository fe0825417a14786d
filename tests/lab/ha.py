"""High availability in the container lab: the lab's fleet made HA by the host lists alone.

    python tests/lab/ha.py up      add three Redis/Sentinel hosts, a second API host and an
                                   HAProxy entry to the running lab; site.yml -i inventory/lab-ha
    python tests/lab/ha.py chaos   jobs with webhooks through HAProxy while the Redis primary's
                                   container stops, an API is SIGKILLed, a Sentinel is cut off
    python tests/lab/ha.py down    remove what `up` added (tests/lab/lab.py down removes the rest)

`up` needs the lab (`make lab`, or molecule's `site` scenario, whose verify runs both steps).
inventory/lab-ha/hosts.yml is inventory/lab/hosts.yml plus `redis`, `api` and `haproxy` groups;
their group_vars derive the Sentinels, the WAIT and the entry from them, as in the example.

The Redis hosts' addresses must be fixed (Sentinel announces addresses, not names), so the HA
hosts also join a network with a subnet of our own (10.213.47.0/24): Redis at .11-.13; the
other lab containers join it too. The chaos run's webhook receiver listens on this machine,
the network's gateway (.1), which the hosts' MORAG_URL_ALLOWLIST lets through
(tests/lab/ha-vars.yml, passed with -e).

`chaos` prints, per fault, the submit unavailability window (first to last failed submission
after the fault), the 503s the clients saw and the slowest accepted submission; it fails
unless every job that got a 202 ended `succeeded` with one attempt that succeeded and
exactly one webhook.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab

ROOT = lab.ROOT
# Its group_vars are the lab's (a symlink): only the host lists differ.
HA_INVENTORY = ROOT / "inventory" / "lab-ha"
EXTRA_VARS = Path(__file__).resolve().parent / "ha-vars.yml"
# inventory/lab-ha/hosts.yml and tests/lab/ha-vars.yml name addresses in it.
SUBNET = ipaddress.ip_network("10.213.47.0/24")
HA_NETWORK = lab.HA_NETWORK
REDIS = ["morag-lab-redis1", "morag-lab-redis2", "morag-lab-redis3"]
API2 = "morag-lab-api2"
ENTRY = "morag-lab-entry"
ADDED = [*REDIS, API2, ENTRY]
ENTRY_PUBLISH = os.environ.get("MORAG_LAB_ENTRY_PUBLISH", "127.0.0.1:8443")
ENTRY_URL = f"https://{ENTRY_PUBLISH}"
WEBHOOK_PORT = int(os.environ.get("MORAG_LAB_WEBHOOK_PORT", "18090"))
log = lab.log


def redis_address(name: str) -> str:
    return str(SUBNET.network_address + 11 + REDIS.index(name))


def gateway() -> str:
    return str(SUBNET.network_address + 1)


def create() -> None:
    """The added containers (as the lab's, see lab.create) and the HA network."""
    if lab.docker("network", "inspect", HA_NETWORK, check=False).returncode != 0:
        lab.docker("network", "create", "--subnet", str(SUBNET), "--gateway", gateway(), HA_NETWORK)
    for name in ADDED:
        st = lab.state(name)
        if st == "running":
            continue
        if st is not None:
            lab.docker("start", name)
            continue
        extra: list[str] = []
        if name == API2:
            # The uploads: the volume the server exports (a real site mounts the NFS export;
            # the lab's containers have no NFS client in the kernel).
            extra = ["-v", f"{lab.VOLUME}:/var/lib/morag/shared"]
        if name == ENTRY:
            extra = ["-p", f"{ENTRY_PUBLISH}:443"]
        lab.docker(*lab.container_args(name), *extra, lab.IMAGE)
        log(f"created {name}")
    for name in [*lab.CONTAINERS, *ADDED]:
        attached = lab.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout
        if HA_NETWORK not in json.loads(attached):
            ip = ["--ip", redis_address(name)] if name in REDIS else []
            lab.docker("network", "connect", *ip, HA_NETWORK, name)
    for name in ADDED:
        lab.wait_systemd(name)


def provision() -> None:
    # The lab's secrets and CAs (inventory_dir/.secrets): the same passwords and certificates.
    secrets = HA_INVENTORY / ".secrets"
    if not secrets.is_symlink():
        secrets.symlink_to(Path("..") / "lab" / ".secrets")
    started = time.monotonic()
    subprocess.run(
        ["ansible-playbook", "site.yml", "-i", str(HA_INVENTORY), "-e", f"@{EXTRA_VARS}"],
        cwd=ROOT,
        env=lab.ansible_env(),
        check=True,
    )
    log(f"site.yml with the HA inventory done in {time.monotonic() - started:.0f}s")
    # The server no longer serves Redis: its firewall opens no Redis port any more (a Redis
    # left running there from before the conversion is out of the fleet's reach).
    ruleset = lab.docker("exec", lab.SERVER, "cat", "/etc/nftables.d/morag.nft").stdout
    opened = [line.strip() for line in ruleset.splitlines() if "6379" in line or "6380" in line]
    if opened:
        raise SystemExit(f"the server's firewall still opens Redis: {opened}")


def client(timeout: float = 30) -> httpx.Client:
    key = lab.API_KEY_FILE.read_text().strip()
    ca = lab.INVENTORY / ".secrets" / "api-tls" / "ca.crt"
    return httpx.Client(
        base_url=ENTRY_URL,
        headers={"X-API-Key": key},
        timeout=timeout,
        verify=ssl.create_default_context(cafile=str(ca)),
    )


def redis_cli(name: str, *args: str, port: int = 26379) -> str:
    """redis-cli on a Redis host as the Sentinel client user, over TLS with the role's CA."""
    password = (lab.INVENTORY / ".secrets" / "redis_sentinel_client_password").read_text()
    out = lab.docker(
        "exec",
        name,
        "redis-cli",
        "--tls",
        "--cacert",
        "/etc/redis/tls/ca.crt",
        "-h",
        redis_address(name),
        "-p",
        str(port),
        "--user",
        "morag-sentinel-client",
        "--pass",
        password.split()[0],
        "--no-auth-warning",
        *args,
        check=False,
    )
    return out.stdout.strip()


def gpu_consumers() -> list[str]:
    with client() as c:
        resp = c.get("/api/v1/workers")
    resp.raise_for_status()
    data = resp.json()
    found = data["workers"] if isinstance(data, dict) else data
    return [w["name"] for w in found if "gpu-tasks" in w.get("consuming", w.get("queues", []))]


def primary() -> str | None:
    """The Redis host the Sentinels name as primary (asked on any reachable one)."""
    for name in REDIS:
        if lab.state(name) != "running":
            continue
        answer = redis_cli(name, "SENTINEL", "get-master-addr-by-name", "morag").split()
        if answer:
            by_address = {redis_address(n): n for n in REDIS}
            return by_address.get(answer[0])
    return None


class Hooks:
    """The webhook receiver: counts deliveries per job id."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.lock = threading.Lock()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    job_id = json.loads(body)["task_id"]
                except (ValueError, KeyError):
                    self.send_response(400)
                    self.end_headers()
                    return
                with hooks.lock:
                    hooks.count[job_id] = hooks.count.get(job_id, 0) + 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("0.0.0.0", WEBHOOK_PORT), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{gateway()}:{WEBHOOK_PORT}/hook"


@dataclass
class Submission:
    started: float
    ended: float
    status: int | None  # None: no answer (connection error, timeout)
    detail: str = ""  # a failure's answer or error, shown with the figures


@dataclass
class Clients:
    """Submitting threads: each job is retried with its Idempotency-Key until it gets a 202,
    as a client following docs/api.md does; every attempt is recorded."""

    hook_url: str
    wav: Path
    jobs: int
    threads: int = 3
    # Each thread's pause between two jobs: the submissions span the three faults (about a
    # minute for 120 jobs) instead of arriving in a burst before the first.
    pause: float = 1.0
    attempts: list[Submission] = field(default_factory=list)
    accepted: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_job: int = 0

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.threads)]
        for t in threads:
            t.start()
        return threads

    def _loop(self) -> None:
        with client(timeout=20) as c:
            while True:
                with self.lock:
                    if self.next_job >= self.jobs:
                        return
                    n = self.next_job
                    self.next_job += 1
                self._submit(c, n)
                time.sleep(self.pause)

    def _submit(self, c: httpx.Client, n: int) -> None:
        key = str(uuid.uuid4())
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            status: int | None = None
            detail = ""
            try:
                with open(self.wav, "rb") as f:
                    resp = c.post(
                        "/api/v1/ingest/file",
                        files={"file": (f"speech-{n}.wav", f, "audio/wav")},
                        data={"gpu": str(n % 2 == 0).lower(), "webhook_url": self.hook_url},
                        headers={"Idempotency-Key": key},
                    )
                status = resp.status_code
                detail = resp.text[:200] if status != 202 else ""
            except httpx.HTTPError as exc:
                detail = f"{type(exc).__name__}: {exc}"[:200]
            with self.lock:
                self.attempts.append(Submission(t0, time.monotonic(), status, detail))
                if status == 202:
                    self.accepted[key] = resp.json()["task_id"]
                    return
            if status is not None and status not in (429, 502, 503, 504, 409):
                raise SystemExit(f"job {n}: HTTP {status} {resp.text[:300]}")
            time.sleep(0.2)
        raise SystemExit(f"job {n}: no 202 within 300 s")

    def accepted_count(self) -> int:
        with self.lock:
            return len(self.accepted)


def window(attempts: list[Submission], since: float, until: float) -> tuple[float, int, int, float]:
    """Unavailability after a fault: from the first failed submission to the end of the last
    one before `until`; the 503s and the other failures (no answer, 502/504) among them; and
    the slowest 202 (a submission that waited out the fault is no failure, but a wait)."""
    during = [a for a in attempts if since <= a.started < until]
    slowest = max((a.ended - a.started for a in during if a.status == 202), default=0.0)
    failed = [a for a in during if a.status != 202]
    if not failed:
        return 0.0, 0, 0, slowest
    span = max(a.ended for a in failed) - min(a.started for a in failed)
    n503 = sum(a.status == 503 for a in failed)
    return span, n503, sum(a.status != 503 for a in failed), slowest


def wait_accepted(clients: Clients, count: int, timeout: float = 300) -> None:
    lab.wait_for(lambda: clients.accepted_count() >= count, timeout, f"{count} accepted jobs", 0.2)


def chaos(jobs: int = 120) -> int:
    lab.wait_for(lambda: client().get("/ready").status_code == 200, 120, "the entry's /ready")
    lab.wait_for(gpu_consumers, 120, "a GPU worker consuming gpu-tasks")
    hooks = Hooks()
    clients = Clients(hook_url=hooks.url, wav=lab.speech(), jobs=jobs)
    started = time.monotonic()
    threads = clients.run()
    faults: list[tuple[str, float]] = []

    # 1. The Redis primary's container stops (a clean shutdown of the whole host).
    wait_accepted(clients, jobs // 6)
    old = primary()
    if old is None:
        raise SystemExit("no Sentinel names a primary")
    faults.append((f"Redis primary {old} stopped", time.monotonic()))
    lab.docker("stop", old)
    log(f"stopped {old} (the primary)")
    new = lab.wait_for(lambda: (p := primary()) and p != old and p, 60, "a new primary", 0.5)
    log(f"the Sentinels promoted {new}")
    wait_accepted(clients, jobs * 2 // 6)
    lab.docker("start", old)
    lab.wait_systemd(old)

    # 2. One API process is SIGKILLed (systemd restarts it; HAProxy takes it out meanwhile).
    faults.append((f"API on {API2} SIGKILLed", time.monotonic()))
    lab.docker("exec", API2, "systemctl", "kill", "-s", "SIGKILL", "morag-api.service")
    log(f"SIGKILLed the API on {API2}")
    wait_accepted(clients, jobs * 4 // 6)

    # 3. A Sentinel (and its Redis, a replica) is cut off the network.
    cut = next(n for n in REDIS if n != primary())
    faults.append((f"Sentinel {cut} cut off", time.monotonic()))
    lab.docker("network", "disconnect", HA_NETWORK, cut)
    log(f"cut {cut} off the network")
    wait_accepted(clients, jobs * 5 // 6)
    lab.docker("network", "connect", "--ip", redis_address(cut), HA_NETWORK, cut)
    log(f"{cut} back on the network")

    for t in threads:
        t.join(timeout=600)
    submitted = time.monotonic() - started
    ids = sorted(clients.accepted.values())
    log(f"{len(ids)} jobs accepted in {submitted:.0f}s; waiting for them to end")

    def ended() -> list[dict] | None:
        with client() as c:
            records = [c.get(f"/api/v1/status/{i}").json() for i in ids]
        final = ("succeeded", "failed", "cancelled")
        return records if all(r["status"] in final for r in records) else None

    records = lab.wait_for(ended, 900, f"{len(ids)} jobs to end", 5)
    lab.wait_for(lambda: all(hooks.count.get(i) for i in ids), 300, "a webhook for every job", 1)

    print()
    print(f"{'fault':<40} {'unavailable':>12} {'503s':>6} {'other':>6} {'slowest 202':>12}")
    bounds = [t for _, t in faults] + [time.monotonic()]
    for (name, at), until in zip(faults, bounds[1:], strict=True):
        span, n503, other, slowest = window(clients.attempts, at, until)
        print(f"{name:<40} {span:>11.2f}s {n503:>6} {other:>6} {slowest:>11.2f}s")
        for a in [a for a in clients.attempts if at <= a.started < until and a.status != 202][:8]:
            took = a.ended - a.started
            print(f"    +{a.started - at:6.1f}s took {took:5.1f}s {a.status}: {a.detail}")
    total503 = sum(a.status == 503 for a in clients.attempts)
    print(f"jobs {len(ids)}, submissions {len(clients.attempts)}, 503s {total503}")

    problems = []
    for r in records:
        done = [a for a in r["attempts"] if a.get("finished_at") and not a.get("error")]
        if r["status"] != "succeeded" or len(done) != 1:
            problems.append(
                f"{r['task_id']}: {r['status']}, {len(done)} succeeded attempts ({r.get('error')})"
            )
    extra = {i: n for i, n in hooks.count.items() if n != 1 or i not in ids}
    if extra:
        problems.append(f"webhooks not exactly once: {extra}")
    if len(set(ids)) != len(ids):
        problems.append("two idempotency keys got the same job")
    for p in problems:
        print("PROBLEM:", p)
    hooks.server.shutdown()
    return 1 if problems else 0


def down() -> None:
    for name in ADDED:
        if lab.state(name) is not None:
            lab.docker("rm", "-f", "-v", name)
            log(f"removed {name}")
    for name in lab.CONTAINERS:
        lab.docker("network", "disconnect", HA_NETWORK, name, check=False)
    lab.docker("network", "rm", HA_NETWORK, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "create", "provision", "chaos", "down"])
    parser.add_argument("--jobs", type=int, default=120)
    args = parser.parse_args()
    if args.command == "up":
        create()
        provision()
        return 0
    if args.command == "chaos":
        return chaos(args.jobs)
    {"create": create, "provision": provision, "down": down}[args.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
