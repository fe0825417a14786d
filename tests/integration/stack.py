"""A real MoRAG stack for tests: uvicorn API and Celery workers in their own processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis
from morag.job_writes import host_token
from prometheus_client.parser import text_string_to_metric_families

from tests import redis_acl
from tests.conftest import (
    REDIS_PASSWORD,
    admin_url,
    answers,
    free_port,
    redis_listen_args,
    running_redis,
    spawn_redis,
    wait_until,
)

API_KEY = "test-api-key"
# The usual test fleet: one worker on the GPU queue (running on CPU), one on the CPU queue.
FLEET = {"gpu0@test": "gpu-tasks", "cpu0@test": "celery"}
WORKER_TOKEN = "test-worker-token"
METRICS_TOKEN = "test-metrics-token"


class Stack:
    """One isolated deployment: its own Redis database, shared dir and processes.

    ``redis_url`` is the tests' own (admin) connection. ``users``: the URLs of the role's
    ACL users (api, worker, store) on the same database; then each process logs in as its
    own, as roles/morag_app deploys them: the API as `morag-api`, GPU/CPU workers as
    `morag-worker`, a morag-store worker as `morag-store`. Without ``users`` every process
    uses ``redis_url``."""

    TTL = 1.5
    GRACE = 2.0
    # After a Redis outage: time for a worker restarted meanwhile to come back (tests that
    # restart one give it more).
    OUTAGE_GRACE = 5.0

    def __init__(
        self,
        redis_url: str,
        root: Path,
        api_port: int,
        *,
        users: dict[str, str] | None = None,
        **settings: Any,
    ) -> None:
        self.root = root
        self.shared = root / "shared"
        self.shared.mkdir(parents=True, exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.api_port = api_port
        # With api_tls_cert_file the API serves HTTPS; api_ca_file is what clients trust.
        scheme = "https" if "api_tls_cert_file" in settings else "http"
        self.api_url = f"{scheme}://127.0.0.1:{api_port}"
        self.verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(settings["api_ca_file"]))
            if "api_ca_file" in settings
            else True
        )
        self.redis = redis.Redis.from_url(redis_url)
        self.users = users
        self.env = {
            **os.environ,
            "MORAG_REDIS_URL": users["api"] if users else redis_url,
            "MORAG_API_KEYS": f"{API_KEY},second-key",
            "MORAG_WORKER_TOKEN": WORKER_TOKEN,
            "MORAG_METRICS_TOKEN": METRICS_TOKEN,
            "MORAG_API_URL": self.api_url,
            "MORAG_SHARED_DIR": str(self.shared),
            "MORAG_WORK_DIR": str(root / "work"),
            "MORAG_DEVICE": "cpu",
            "MORAG_HEARTBEAT_TTL": str(self.TTL),
            "MORAG_RESCUE_GRACE": str(self.GRACE),
            "MORAG_OUTAGE_GRACE": str(self.OUTAGE_GRACE),
            "MORAG_FLEET_CACHE_SECONDS": "0.2",
            "MORAG_PROCESS_WAIT": "30",
            "MORAG_FAULT_INJECTION": "true",
            "MORAG_URL_ALLOWLIST": "127.0.0.1",
            "MORAG_STORE_INGESTED": "false",  # stacks with a morag-store worker set it true
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
        # As the roles ship (morag_app_job_writes: api): GPU/CPU workers write their jobs
        # through the API, whose watchdog requeues lost jobs. A test of the other mode passes
        # job_writes="redis" (then no API watchdog, as the role's api.env).
        if settings.get("job_writes", "api") == "api":
            settings = {"job_writes": "api", "api_watchdog": "true", **settings}
        for key, value in settings.items():
            self.env[f"MORAG_{key.upper()}"] = str(value)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- processes ----------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name.replace('@', '_')}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "morag.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_api(self) -> None:
        self._spawn("api", ["api", "--port", str(self.api_port)], self.env)

        def healthy() -> bool:
            try:
                resp = httpx.get(f"{self.api_url}/health", timeout=1, verify=self.verify)
                return resp.status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 30, "the API to answer /health")

    def start_worker(self, name: str, *queues: str, wait: bool = True, **settings: Any) -> None:
        env = dict(self.env)
        store = "morag-store" in queues
        if store:  # the store worker writes on its own credential (the role's redis-store.env)
            env["MORAG_JOB_WRITES"] = "redis"
        elif settings.get("job_writes", env.get("MORAG_JOB_WRITES")) == "api":
            # As the role's morag.env: this host's name and only its own token.
            host = name.partition("@")[2] or "localhost"
            env["MORAG_WORKER_HOST"] = host
            env["MORAG_WORKER_TOKEN"] = host_token(env["MORAG_WORKER_TOKEN"], host)
        for key, value in settings.items():
            env[f"MORAG_{key.upper()}"] = str(value)
        if self.users:
            # A worker writing its records through the API gets the role's user for that
            # (redis_worker_job_writes: api): records and leases read only.
            worker = "worker_api" if env.get("MORAG_JOB_WRITES") == "api" else "worker"
            env["MORAG_REDIS_URL"] = self.users["store" if store else worker]
        args = ["worker", "--name", name, "--loglevel", "INFO"]
        for q in queues:
            args += ["--queue", q]
        self._spawn(name, args, env)
        if wait:
            self.wait_live(name)

    def start(self, workers: dict[str, str]) -> None:
        """The API and the given workers (name -> queue), started in parallel, all live."""
        self.start_api()
        for name, queue in workers.items():
            self.start_worker(name, queue, wait=False)
        for name in workers:
            self.wait_live(name)

    def heartbeat(self, name: str) -> dict[str, Any] | None:
        raw = self.redis.get(f"morag:worker:{name}")
        return json.loads(raw) if raw else None

    def wait_live(self, name: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(lambda: self.heartbeat(name), timeout, f"worker {name} heartbeat")

    def wait_gone(self, name: str, timeout: float = 10) -> None:
        wait_until(lambda: self.heartbeat(name) is None, timeout, f"worker {name} to vanish")

    def kill(self, name: str) -> None:
        """SIGKILL the worker and its pool children, like a host that dies."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def jobs_in_redis(self) -> list[dict[str, Any]]:
        """Every job record in this stack's database (accepted or not)."""
        keys = list(self.redis.scan_iter("morag:job:*", count=500))
        return [json.loads(raw) for raw in self.redis.mget(keys) if raw] if keys else []

    def stop(self, name: str, timeout: float = 60) -> None:
        """SIGTERM: Celery's warm shutdown (the running job finishes)."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def close(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.redis.flushdb()

    # -- HTTP -----------------------------------------------------------------------------
    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.api_url, headers=headers, timeout=60, verify=self.verify)

    def ingest(
        self,
        path: Path,
        *,
        gpu: bool,
        options: dict[str, Any] | None = None,
        webhook_url: str | None = None,
    ) -> dict:
        with self.client() as c, open(path, "rb") as f:
            data = {"gpu": str(gpu).lower()}
            if options is not None:
                data["options"] = json.dumps(options)
            if webhook_url is not None:
                data["webhook_url"] = webhook_url
            resp = c.post("/api/v1/ingest/file", files={"file": (path.name, f)}, data=data)
        assert resp.status_code == 202, resp.text
        return resp.json()

    def scrape(self) -> Scrape:
        """GET /metrics with the metrics token, parsed."""
        resp = httpx.get(
            f"{self.api_url}/metrics",
            headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        return Scrape(resp.text)

    def job(self, task_id: str) -> dict[str, Any]:
        with self.client() as c:
            resp = c.get(f"/api/v1/status/{task_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def wait_job(
        self,
        task_id: str,
        timeout: float = 60,
        states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    ) -> dict[str, Any]:
        return wait_until(
            lambda: (j := self.job(task_id))["status"] in states and j,
            timeout,
            f"job {task_id} to reach {states}",
            interval=0.2,
        )


class Scrape:
    """One /metrics answer: samples by name and labels, and the declared families."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def names(self) -> set[str]:
        """Every series name the endpoint declares (histograms with their suffixes)."""
        names = set()
        for family in self.families.values():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
        return names

    def series(self, name: str, **labels: str) -> list[Any]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of ``name`` whose labels include ``labels``; None if none."""
        found = self.series(name, **labels)
        return sum(s.value for s in found) if found else None


class OwnRedis:
    """A redis-server of one test, persisted as the redis role configures it (AOF,
    ``appendfsync everysec``), that can be restarted, killed or paused on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.listen, self.ca = redis_listen_args(workdir, self.port)
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """The admin (`default` user) URL; ``users()`` are the app's."""
        return admin_url(self.port, db, self.ca)

    def users(self) -> dict[str, str]:
        return redis_acl.urls(self.port, 0, self.ca)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url(), socket_timeout=5)

    def start(self) -> None:
        self.proc = spawn_redis(
            self.dir,
            *[*self.listen, "--requirepass", REDIS_PASSWORD],
            *redis_acl.server_args(),
            *["--appendonly", "yes", "--appendfsync", "everysec"],
            log=self.dir / "redis.log",
        )
        wait_until(lambda: answers(self.client()), 30, "redis-server to answer", interval=0.05)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits (what `systemctl restart` does)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self, down_for: float) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def pause_writes(self, seconds: float) -> None:
        """CLIENT PAUSE WRITE: every write (and publish) waits until the pause ends."""
        self.client().execute_command("CLIENT", "PAUSE", int(seconds * 1000), "WRITE")

    def restrict_keys(self, role: str, *rules: str) -> None:
        """Limit the ACL user of ``role`` (api, worker, store) to these key rules."""
        redis_acl.restrict_keys(self.client(), role, *rules)

    def restore_keys(self, role: str) -> None:
        """Give the user of ``role`` back what roles/redis grants it."""
        redis_acl.restore_keys(self.client(), role)


@contextlib.contextmanager
def own_redis(workdir: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def stack_on_own_redis(root: Path, **settings: Any) -> Iterator[tuple[Stack, OwnRedis]]:
    """A Stack on a Redis of its own (to restart, pause or restrict); logs shown at the end."""
    with own_redis(root / "redis") as server:
        stack = Stack(server.url(0), root, free_port(), users=server.users(), **settings)
        try:
            yield stack, server
        finally:
            for log in sorted(stack.logs.glob("*.log")):
                lines = log.read_text(errors="replace").splitlines()[-40:]
                print(f"----- {log.name} (last {len(lines)} lines) -----")
                print("\n".join(lines))
            if server.proc is None:
                server.start()
            stack.close()


@contextlib.contextmanager
def standalone_stack(prefix: str, **settings: Any) -> Iterator[Stack]:
    """Redis and a Stack in a temporary directory, outside pytest (lab, benchmarks)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with running_redis(root) as server:
            stack = Stack(server.url(0), root, free_port(), users=server.role_urls(0), **settings)
            try:
                yield stack
            finally:
                stack.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
