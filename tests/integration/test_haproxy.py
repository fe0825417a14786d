"""Two API hosts behind HAProxy (issue 19 item 3), without containers.

`ansible-playbook` (local connection) issues the two API hosts' certificates with
roles/morag_api's CA tasks and runs roles/haproxy's preflight, TLS and configure tasks: the
frontend certificate from that same CA and haproxy.cfg, checked by `haproxy -c`. Then a real
`haproxy` (Debian's) runs that file in front of two real `morag api` processes (uvicorn over
HTTPS, one Redis database and one shared directory, as two API hosts on one NFS export) and
two real Celery workers:

- jobs submitted through HAProxy succeed, and both API hosts serve;
- an API killed (SIGKILL) while two clients submit without pause: every 202 ends
  ``succeeded``, at most the requests in flight at the kill fail, HAProxy marks the API down
  by its /ready check and up again once it is restarted; the failures and the window of
  unavailability (kill to the end of the last failed submission) are printed;
- connections that send part of a header are answered 408 and closed at the header deadline
  (``timeout http-request``), and a normal request is served while they are open;
- passthrough mode: HAProxy checks /ready over HTTPS in TCP mode and the clients see the API's
  own certificate;
- HAProxy's Prometheus metrics (haproxy_metrics_enabled): both API hosts up, the killed one
  DOWN, and every haproxy_* series the dashboard and the alert rules read.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RedisServer, free_port, wait_until
from tests.integration import media
from tests.integration.stack import API_KEY, FLEET, Stack

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)
HAPROXY = shutil.which("haproxy", path=f"/usr/sbin{os.pathsep}{os.environ['PATH']}")
HEADER_DEADLINE = 3.0  # haproxy_timeout_http_request of the test's entry, seconds
PARTIAL = b"POST /api/v1/ingest/file HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "

PLAYBOOK = """
- name: The API hosts' certificates, from morag_api's CA on the controller
  hosts: api
  gather_facts: false
  tasks:
    - name: Issue them as the server play does
      ansible.builtin.include_role:
        name: morag_api
        tasks_from: tls_controller
      vars:
        morag_api_tls_enabled: true

- name: HAProxy's files, written and checked by the role
  hosts: haproxy
  gather_facts: false
  vars:
    haproxy_service_manage: false
    haproxy_packages: []
    haproxy_config_file: "{{ out_dir }}/{{ inventory_hostname }}/haproxy.cfg"
    haproxy_tls_cert_file: "{{ out_dir }}/{{ inventory_hostname }}/frontend.pem"
    haproxy_backend_ca_file: "{{ out_dir }}/{{ inventory_hostname }}/api-ca.crt"
    haproxy_stats_socket: "{{ out_dir }}/{{ inventory_hostname }}/admin.sock"
    haproxy_log_target: stdout format raw local0
    haproxy_bind_address: 127.0.0.1
    haproxy_timeout_http_request: 3s
  tasks:
    - name: Preflight, certificates and configuration, as an entry host runs them
      ansible.builtin.include_role:
        name: haproxy
        tasks_from: "{{ step }}"
      loop: [preflight, tls, configure]
      loop_control:
        loop_var: step
"""


class HAProxy:
    """A haproxy process in the foreground on a rendered file; its admin socket answers."""

    def __init__(self, config: Path, port: int, metrics_port: int | None = None) -> None:
        self.config = config
        self.port = port
        self.metrics_port = metrics_port
        self.socket = config.parent / "admin.sock"
        self.log = config.parent / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert HAPROXY is not None
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_until(self._answers, 30, "haproxy's admin socket", 0.05)

    def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return "Name: HAProxy" in self.command("show info")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` of the API hosts: status (UP, DOWN, "DOWN 1/2"...), stot (requests)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(text.splitlines())
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "morag_api" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def metrics(self, path: str = "/metrics") -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=10)

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The metrics of the morag_api backend and its servers: (name, labels) -> value."""
        resp = self.metrics()
        assert resp.status_code == 200, resp.text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text)
            for s in family.samples
            if s.labels.get("proxy") == "morag_api"
        }

    def server_state(self, server: str) -> str | None:
        """The state haproxy_server_status says the API host is in (UP, DOWN, ...)."""
        for (name, labels), value in self.samples().items():
            found = dict(labels)
            if name == "haproxy_server_status" and found.get("server") == server and value == 1:
                return found["state"]
        return None

    def status(self, server: str) -> str:
        return self.servers()[server]["status"]

    def served(self, server: str) -> int:
        return int(self.servers()[server]["stot"])


@dataclass
class Entry:
    """Two API hosts (a: api-1 with the workers, b: api-2) behind a HAProxy."""

    a: Stack
    b: Stack
    haproxy: HAProxy
    ca: Path
    passthrough: HAProxy
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"https://127.0.0.1:{self.haproxy.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"X-API-Key": API_KEY},
            timeout=60,
            verify=ssl.create_default_context(cafile=str(self.ca)),
        )


def _ansible(
    tmp: Path, api_ports: dict[str, int], entry_ports: dict[str, int], metrics_port: int
) -> str:
    """Run the playbook; the certificates land in tmp/pki, each entry's files in tmp/<name>."""
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    api = {
        n: {**local, "ansible_host": "127.0.0.1", "morag_api_port": p} for n, p in api_ports.items()
    }
    entries = {
        n: {**local, "ansible_host": "127.0.0.1", "haproxy_port": p} for n, p in entry_ports.items()
    }
    entries["lb-pt"]["haproxy_tls_mode"] = "passthrough"
    entries["lb"] |= {
        "haproxy_metrics_enabled": True,
        "haproxy_metrics_port": metrics_port,
        "haproxy_metrics_allowed_sources": ["127.0.0.1"],
    }
    inventory = {
        "all": {
            "vars": {"morag_api_tls_controller_dir": str(tmp / "pki"), "out_dir": str(tmp)},
            "children": {"api": {"hosts": api}, "haproxy": {"hosts": entries}},
        }
    }
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp / "pb.yml").write_text(PLAYBOOK)
    # Outside the repository: its ansible.cfg wants a vault password and an inventory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env |= {"ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_LOCALHOST_WARNING": "false"}
    env["PATH"] = f"/usr/sbin{os.pathsep}{env['PATH']}"  # haproxy -c
    done = subprocess.run(
        [ANSIBLE, "-i", str(tmp / "hosts.yml"), str(tmp / "pb.yml")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _dump(path: Path) -> None:
    if path.exists():
        lines = path.read_text(errors="replace").splitlines()[-30:]
        print(f"----- {path.name} (last {len(lines)} lines) -----")
        print("\n".join(lines))


@pytest.fixture(scope="module")
def entry(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Entry]:
    if ANSIBLE is None:
        pytest.skip("ansible-playbook is not installed")
    if HAPROXY is None:
        pytest.fail("haproxy is not installed: run `make test` (make deps installs it)")
    if os.geteuid() != 0:
        pytest.skip("the role's files are owned by root")
    tmp = tmp_path_factory.mktemp("haproxy")
    api_ports = {"api-1": free_port(), "api-2": free_port()}
    entry_ports = {"lb": free_port(), "lb-pt": free_port()}
    metrics_port = free_port()
    _ansible(tmp, api_ports, entry_ports, metrics_port)
    pki = tmp / "pki"
    db = redis_server.fresh_db()
    stacks = []
    for name, root in (("api-1", "a"), ("api-2", "b")):
        # Both on one database and one shared directory: two API hosts on one NFS export.
        shared = {"shared_dir": stacks[0].shared} if stacks else {}
        tls = {
            "api_tls_cert_file": pki / f"{name}.crt",
            "api_tls_key_file": pki / f"{name}.key",
            "api_ca_file": pki / "ca.crt",
        }
        stacks.append(
            Stack(
                redis_server.url(db),
                tmp / root,
                api_ports[name],
                users=redis_server.role_urls(db),
                **tls,
                **shared,
            )
        )
    a, b = stacks
    haproxy = HAProxy(tmp / "lb" / "haproxy.cfg", entry_ports["lb"], metrics_port)
    passthrough = HAProxy(tmp / "lb-pt" / "haproxy.cfg", entry_ports["lb-pt"])
    try:
        # api-2 starts beside api-1 and the workers.
        starting = threading.Thread(target=b.start_api, daemon=True)
        starting.start()
        a.start(FLEET)
        starting.join(60)
        assert b.alive("api"), "api-2 did not start"
        haproxy.start()
        wait_until(
            lambda: all(haproxy.status(s) == "UP" for s in api_ports),
            30,
            "HAProxy to see both API hosts up",
        )
        yield Entry(a, b, haproxy, pki / "ca.crt", passthrough)
    finally:
        passthrough.stop()
        haproxy.stop()
        for stack in (a, b):
            for log in sorted(stack.logs.glob("*.log")):
                _dump(log)
        _dump(haproxy.log)
        _dump(passthrough.log)
        b.close()
        a.close()


def _submit(client: httpx.Client, speech: Path, gpu: bool) -> httpx.Response:
    with open(speech, "rb") as f:
        return client.post(
            "/api/v1/ingest/file",
            files={"file": ("speech.wav", f)},
            data={"gpu": str(gpu).lower()},
        )


def _wait_succeeded(entry: Entry, task_ids: list[str], timeout: float) -> None:
    """Every job ends succeeded (read from api-1, which stays up)."""
    ended: dict[str, dict] = {}

    def all_ended() -> bool:
        for task_id in task_ids:
            if task_id not in ended:
                job = entry.a.job(task_id)
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    ended[task_id] = job
        return len(ended) == len(task_ids)

    wait_until(all_ended, timeout, f"{len(task_ids)} jobs to end", 0.5)
    bad = {t: (j["status"], j.get("error")) for t, j in ended.items() if j["status"] != "succeeded"}
    assert bad == {}, bad


def test_jobs_through_haproxy_succeed_on_both_api_hosts(entry: Entry, speech_wav: Path) -> None:
    served = {s: entry.haproxy.served(s) for s in ("api-1", "api-2")}
    with entry.client() as client:
        # The frontend's certificate comes from the API's CA (the client verifies it).
        assert client.get("/ready").status_code == 200
        accepted = []
        for i in range(4):
            resp = _submit(client, speech_wav, gpu=i % 2 == 0)
            assert resp.status_code == 202, resp.text
            accepted.append(resp.json()["task_id"])
        # Read through HAProxy too: any API host answers for any job.
        for task_id in accepted:
            resp = client.get(f"/api/v1/status/{task_id}", params={"wait": 30})
            assert resp.status_code == 200, resp.text
    _wait_succeeded(entry, accepted, 120)
    after = {s: entry.haproxy.served(s) for s in served}
    assert all(after[s] > served[s] for s in served), (served, after)


def _closed(sock: ssl.SSLSocket) -> bytes | None:
    """What the server sent before it closed this connection; None while it is open."""
    try:
        data = sock.recv(4096)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    except OSError:  # reset
        return b""
    if not data:
        return b""
    # The 408, then the close.
    sock.setblocking(True)
    sock.settimeout(5)
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


def test_partial_headers_are_cut_at_the_deadline_and_block_nothing(entry: Entry) -> None:
    context = ssl.create_default_context(cafile=str(entry.ca))
    socks: list[ssl.SSLSocket] = []
    sent: list[float] = []
    try:
        for _ in range(100):
            raw = socket.create_connection(("127.0.0.1", entry.haproxy.port), timeout=10)
            sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            sent.append(time.monotonic())
            sock.sendall(PARTIAL)
            sock.setblocking(False)
            socks.append(sock)
        answered: dict[int, tuple[float, bytes]] = {}
        served_while_open = 0

        def all_cut() -> bool:
            nonlocal served_while_open
            # A whole request is served throughout, also while every slow connection is open.
            with entry.client() as client:
                assert client.get("/ready").status_code == 200
            if not answered:
                served_while_open += 1
            for i, sock in enumerate(socks):
                if i not in answered and (data := _closed(sock)) is not None:
                    answered[i] = (time.monotonic(), data)
            return len(answered) == len(socks)

        wait_until(all_cut, HEADER_DEADLINE + 60, "HAProxy to cut the partial requests", 0.5)
    finally:
        for sock in socks:
            sock.close()
    assert served_while_open >= 1
    # Not before the deadline (each one's started with its connection).
    assert min(t - sent[i] for i, (t, _) in answered.items()) >= HEADER_DEADLINE * 0.9
    statuses = {data.split(b"\r\n", 1)[0] for _, data in answered.values()}
    assert statuses == {b"HTTP/1.1 408 Request Time-out"}, statuses


def test_passthrough_checks_ready_over_https_and_shows_the_api_certificate(entry: Entry) -> None:
    entry.passthrough.start()
    try:
        wait_until(
            lambda: all(entry.passthrough.status(s) == "UP" for s in ("api-1", "api-2")),
            30,
            "HAProxy (passthrough) to see both API hosts up",
        )
        context = ssl.create_default_context(cafile=str(entry.ca))
        names = set()
        for _ in range(4):
            with (
                socket.create_connection(("127.0.0.1", entry.passthrough.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
            ):
                cert = sock.getpeercert()
                names.add(dict(x[0] for x in cert["subject"])["commonName"])
                sock.sendall(
                    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        # The API hosts' own certificates (the morag_api role names them by host), not HAProxy's.
        assert names == {"api-1", "api-2"}, names
    finally:
        entry.passthrough.stop()


PROXY = (("proxy", "morag_api"),)
HAPROXY_METRIC = re.compile(r"(?<![$\w])haproxy_[a-z0-9_]+\b")  # not $haproxy_job


def _haproxy_queries() -> list[tuple[str, str]]:
    """(panel title or alert name, PromQL) of every dashboard query and rule using haproxy_*."""
    board = json.loads((ROOT / "monitoring" / "grafana" / "morag-fleet.json").read_text())
    rules = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "morag-alerts.yml").read_text())
    found = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    found += [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]
    return [(where, expr) for where, expr in found if "haproxy_" in expr]


def test_haproxy_exports_its_metrics_for_prometheus(entry: Entry) -> None:
    samples = entry.haproxy.samples()
    assert samples[("haproxy_backend_active_servers", PROXY)] == 2
    assert samples[("haproxy_backend_status", (("proxy", "morag_api"), ("state", "UP")))] == 1
    assert entry.haproxy.server_state("api-1") == entry.haproxy.server_state("api-2") == "UP"
    assert entry.haproxy.metrics("/stats").status_code == 404  # the exporter's path only
    # Every haproxy_* series the dashboard and the alert rules read is exported.
    text = entry.haproxy.metrics().text
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    queries = _haproxy_queries()
    assert queries, "no dashboard panel or alert reads HAProxy's metrics"
    for where, expr in queries:
        used = set(HAPROXY_METRIC.findall(expr))
        assert used <= exported, f"{where}: not exported: {sorted(used - exported)}"


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    page = media.html_page(tmp_path_factory.mktemp("haproxy-web") / "page.html")
    with media.http_server(page.parent) as url:
        yield f"{url}/page.html"


@dataclass
class Submission:
    started: float
    ended: float
    outcome: str  # "202", another status, or the exception's name
    task_id: str | None = None


class Submitter(threading.Thread):
    """Submits jobs through HAProxy, one after another, until told to stop: a web page by
    URL (JSON), and every third time a speech upload (multipart)."""

    PAUSE = 0.3  # seconds between two submissions: the workers keep up

    def __init__(self, entry: Entry, speech: Path, page_url: str, index: int) -> None:
        super().__init__(name=f"submitter-{index}", daemon=True)
        self.entry = entry
        self.speech = speech
        self.page_url = page_url
        self.index = index
        self.done: list[Submission] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with self.entry.client() as client:
            i = 0
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    if i % 3 == self.index:
                        resp = _submit(client, self.speech, gpu=i % 2 == 0)
                    else:
                        resp = client.post(
                            "/api/v1/ingest/url", json={"url": self.page_url, "gpu": False}
                        )
                except httpx.HTTPError as exc:
                    self.done.append(Submission(started, time.monotonic(), type(exc).__name__))
                else:
                    task_id = resp.json()["task_id"] if resp.status_code == 202 else None
                    self.done.append(
                        Submission(started, time.monotonic(), str(resp.status_code), task_id)
                    )
                i += 1
                self.stop.wait(self.PAUSE)


def test_a_killed_api_host_costs_at_most_the_requests_in_flight(
    entry: Entry, speech_wav: Path, page_url: str
) -> None:
    submitters = [Submitter(entry, speech_wav, page_url, i) for i in range(2)]

    def accepted(since: float = 0.0) -> int:
        return sum(
            1 for s in submitters for d in s.done if d.outcome == "202" and d.started > since
        )

    for submitter in submitters:
        submitter.start()
    try:
        wait_until(lambda: accepted() >= 6, 60, "submissions through HAProxy")
        kill_sent = time.monotonic()
        entry.b.kill("api")  # SIGKILL: an API host that dies (returns once it is gone)
        killed_at = time.monotonic()
        wait_until(lambda: entry.haproxy.status("api-2").startswith("DOWN"), 30, "api-2 down")
        down_at = time.monotonic()
        # What Prometheus reads (MoragHaproxyBackendDown, MoragHaproxyFewBackends).
        assert entry.haproxy.server_state("api-2") == "DOWN"
        assert entry.haproxy.samples()[("haproxy_backend_active_servers", PROXY)] == 1
        wait_until(lambda: accepted(down_at) >= 6, 60, "submissions with api-2 down")
        entry.b.start_api()
        restarted_at = time.monotonic()
        wait_until(lambda: entry.haproxy.status("api-2") == "UP", 30, "api-2 up again")
        up_at = time.monotonic()
        served = entry.haproxy.served("api-2")
        wait_until(lambda: entry.haproxy.served("api-2") >= served + 3, 60, "api-2 to serve again")
    finally:
        for submitter in submitters:
            submitter.stop.set()
        for submitter in submitters:
            submitter.join(90)
    done = sorted((d for s in submitters for d in s.done), key=lambda d: d.started)
    ok = [d for d in done if d.outcome == "202"]
    failed = [d for d in done if d.outcome != "202"]
    window = max((d.ended - kill_sent for d in failed), default=0.0)
    killed = entry.haproxy.servers()["api-2"]
    print(
        f"\nHAProxy, SIGKILL of one of two API hosts: {len(done)} submissions, {len(ok)} accepted, "
        f"{len(failed)} failed ({', '.join(d.outcome for d in failed) or 'none'}); "
        f"unavailability window (kill to the end of the last failed submission) {window:.2f} s; "
        f"marked down {down_at - kill_sent:.2f} s after the kill; up again "
        f"{up_at - restarted_at:.2f} s after its restart answered /health; requests whose "
        f"connection to it failed and went to the other host: {killed['wredis']} "
        f"(retries {killed['wretr']})"
    )
    # Only what was in flight on the killed host can fail: one request per client, sent
    # before it died. A request sent after that and routed to it (its connection refused
    # until its checks failed) was retried on the other host.
    assert len(failed) <= len(submitters), [(d.outcome, d.started - killed_at) for d in failed]
    assert all(d.started < killed_at for d in failed), [
        (d.outcome, d.started - killed_at) for d in failed
    ]
    assert all(d.outcome in ("502", "503", "504") or not d.outcome.isdigit() for d in failed)
    _wait_succeeded(entry, [d.task_id for d in ok if d.task_id], 240)
