"""The Redis ACL users of roles/redis on a real redis-server: the API, the GPU/CPU workers and the
store worker each log in as their own user and the whole flow works (ingest on both queues,
storing, search, webhooks, cancel), without a single ACL denial; and none of them can wipe or
reconfigure Redis, nor a worker touch what is not its business."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import redis

from tests import redis_acl
from tests.conftest import answers, free_port, spawn_redis
from tests.integration import media
from tests.integration.conftest import _dump_logs
from tests.integration.stack import Stack, wait_until
from tests.tls import ca_and_server_cert

ADMIN_PASSWORD = "test-admin-password"


class AclRedis:
    def __init__(self, port: int, ca: Path | None = None) -> None:
        self.port = port
        self.ca = ca

    def url(self, role: str | None = None) -> str:
        """The URL as roles/morag_app writes it (rediss:// with the CA required under TLS)."""
        scheme, query = "redis", ""
        if self.ca is not None:
            scheme, query = "rediss", f"?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"
        user, password = "", ADMIN_PASSWORD
        if role is not None:
            user, password = redis_acl.role_users()[role].name, redis_acl.password(role)
        return f"{scheme}://{user}:{password}@127.0.0.1:{self.port}/0{query}"

    def client(self, role: str | None = None) -> redis.Redis:
        return redis.Redis.from_url(self.url(role), socket_timeout=10)

    def denials(self) -> list[dict]:
        return self.client().acl_log()


@contextlib.contextmanager
def _acl_redis_server(workdir: Path, tls: bool) -> Iterator[AclRedis]:
    port = free_port()
    args = ["--appendonly", "no"]
    ca = None
    if tls:
        # As the role does off loopback: TLS only, the plain port closed.
        ca, crt, key = ca_and_server_cert(workdir)
        args += ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
        args += [
            "--tls-cert-file",
            str(crt),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
        ]
    else:
        args += ["--port", str(port)]
    args += ["--requirepass", ADMIN_PASSWORD, *redis_acl.server_args()]
    proc = spawn_redis(workdir, *args)
    server = AclRedis(port, ca)
    try:
        wait_until(lambda: answers(server.client()), 10, "redis-server with the role's ACL users")
        yield server
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    with _acl_redis_server(tmp_path_factory.mktemp("aclredis"), tls=False) as server:
        yield server


@pytest.fixture(scope="module")
def tls_acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    with _acl_redis_server(tmp_path_factory.mktemp("tlsredis"), tls=True) as server:
        yield server


@pytest.mark.parametrize("role", redis_acl.ROLES)
@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "appendonly", "no"),
        ("KEYS", "*"),
        ("DEBUG", "SLEEP", "0"),
        ("MODULE", "LIST"),
        ("SHUTDOWN", "NOSAVE"),
        ("ACL", "LIST"),
        ("SCRIPT", "FLUSH"),
        ("BGREWRITEAOF",),
        ("SWAPDB", "0", "1"),
    ],
)
def test_app_users_cannot_wipe_or_reconfigure(acl_redis: AclRedis, role: str, command) -> None:
    # ACL DRYRUN answers what the ACL decides, also for commands that redis.conf disables
    # besides (DEBUG, MODULE); the ones that would not harm this test's server also run.
    name = redis_acl.role_users()[role].name
    verdict = acl_redis.client().execute_command("ACL", "DRYRUN", name, *command)
    assert verdict != b"OK" and b"no permissions" in verdict, verdict
    if command[0] in ("FLUSHALL", "FLUSHDB", "CONFIG", "KEYS", "ACL", "SCRIPT"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            acl_redis.client(role).execute_command(*command)


def test_lua_runs_with_the_callers_permissions(acl_redis: AclRedis) -> None:
    worker = acl_redis.client("worker")
    with pytest.raises(
        redis.exceptions.ResponseError,
        match=r"(?i)can.t run this command|can.t access|no permissions",
    ):
        worker.eval("return redis.call('FLUSHALL')", 0)
    with pytest.raises(
        redis.exceptions.ResponseError,
        match=r"(?i)can.t run this command|can.t access|no permissions",
    ):
        worker.eval("return redis.call('SET', KEYS[1], 'x')", 1, "morag:batch:forged")


@pytest.mark.parametrize(
    ("role", "key", "allowed"),
    [
        ("worker", "morag:job:abc", True),
        ("worker", "morag:worker:gpu0@host", True),
        ("worker", "morag:batch:abc", False),
        ("worker", "morag:webhook:abc", False),
        ("worker", "morag:outbox:webhooks", True),  # owed webhooks: job ids, with the end
        ("worker", "morag:outbox:other", False),
        ("worker", "morag:reply:abc", False),
        ("worker", "morag:vector-request:abc", False),  # the API's orders to the store
        ("store", "morag:vector-request:abc", True),
        ("worker", "qdrant", False),
        ("store", "morag:webhook:abc", True),
        ("store", "morag:reply:abc", True),
        ("store", "morag:batch:abc", False),
        ("api", "morag:batch:abc", True),
        ("api", "other:key", False),
    ],
)
def test_key_patterns(acl_redis: AclRedis, role: str, key: str, allowed: bool) -> None:
    client = acl_redis.client(role)
    if allowed:
        assert client.set(key, "1")
        # Workers may DEL only a few of their keys (test_a_worker_cannot_destroy_or_command).
        assert (acl_redis.client() if role == "worker" else client).delete(key) == 1
    else:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set(key, "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.delete(key)


@pytest.mark.parametrize(
    "command",
    [
        ("DEL", "celery"),
        ("DEL", "gpu-tasks"),
        ("UNLINK", "morag-store"),
        ("SET", "celery", "x"),
        ("EXPIRE", "gpu-tasks", "0"),
        ("DEL", "_kombu.binding.celery"),
        ("SREM", "_kombu.binding.morag-store", "x"),
        ("DEL", "unacked"),
        ("DEL", "unacked_index"),
        ("DEL", "morag:job:abc"),
        ("UNLINK", "morag:job:abc"),
        ("BRPOP", "morag-store", "1"),
        ("RPOP", "morag-store"),
        ("LRANGE", "morag-store", "0", "-1"),
        ("PUBLISH", "/0.celery.pidbox", "{}"),
        ("PUBLISH", "/7.celery.pidbox", "{}"),
        # Live events: append only, and only on morag:events:* (morag.live_events).
        ("XADD", "morag:job:abc", "*", "type", "segment"),
        ("DEL", "morag:events:abc"),
        ("XTRIM", "morag:events:abc", "MAXLEN", "0"),
        ("XREAD", "STREAMS", "morag:events:abc", "0"),
    ],
)
def test_a_worker_cannot_destroy_or_command(acl_redis: AclRedis, command: tuple[str, ...]) -> None:
    """A GPU/CPU worker's credential (redis_acl_worker_selectors): no DEL/SET/EXPIRE of a queue,
    a binding, the unacked hash or a job record; no taking the store's messages; no PUBLISH on
    Celery's remote-control channel (revoke, shutdown, add_consumer to every worker)."""
    with pytest.raises(redis.exceptions.NoPermissionError):
        acl_redis.client("worker").execute_command(*command)


@pytest.mark.parametrize(
    "command",
    [
        ("LPUSH", "morag-store", "msg"),  # store_job, deliver_webhook
        ("LPUSH", "celery", "msg"),
        ("BRPOP", "celery", "gpu-tasks", "1"),  # consume (rescue: gpu-tasks too)
        ("SET", "morag:lease:abc", "me"),
        ("DEL", "morag:lease:abc"),
        ("SET", "morag:job:abc", "{}"),  # a worker writes records (the job store's checks)
        ("PUBLISH", "/0.celeryev/worker.heartbeat", "{}"),  # MORAG_CELERY_EVENTS
        ("XADD", "morag:events:abc", "MAXLEN", "~", "100", "*", "type", "segment"),
        ("EXPIRE", "morag:events:abc", "60"),
    ],
)
def test_a_worker_can_still_do_its_work(acl_redis: AclRedis, command: tuple[str, ...]) -> None:
    try:
        acl_redis.client("worker").execute_command(*command)
    finally:  # a "msg" left on a queue would reach the real workers of a later test
        acl_redis.client().delete(
            "morag-store", "celery", "morag:lease:abc", "morag:job:abc", "morag:events:abc"
        )


def test_the_api_reads_live_events_and_writes_none(acl_redis: AclRedis) -> None:
    """The API's user reads a job's live events (XREAD) for its SSE routes; only workers
    append them."""
    acl_redis.client("worker").xadd("morag:events:abc", {"type": "progress"})
    try:
        api = acl_redis.client("api")
        assert api.xread({"morag:events:abc": "0"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            api.xadd("morag:events:abc", {"type": "segment"})
    finally:
        acl_redis.client().delete("morag:events:abc")


def test_default_password_is_not_an_app_user(acl_redis: AclRedis) -> None:
    """A worker's password opens only its own user."""
    wrong = redis.Redis(
        host="127.0.0.1",
        port=acl_redis.port,
        username=redis_acl.role_users()["api"].name,
        password=redis_acl.password("worker"),
    )
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()


class _Receiver(http.server.BaseHTTPRequestHandler):
    calls: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        type(self).calls.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_whole_flow_runs_as_the_role_users(
    acl_redis: AclRedis, tmp_path: Path, speech_wav: Path
) -> None:
    """API, gpu0 and cpu0 (worker user), store (store user): no ACL denial anywhere."""
    acl_redis.client().flushdb()  # what the key and command cases above left behind
    acl_redis.client().acl_log_reset()
    docx = media.docx_file(tmp_path / "harbour.docx")
    stack = Stack(
        acl_redis.url(),  # the test's own reads (heartbeats) and cleanup: the admin user
        tmp_path / "stack",
        free_port(),
        qdrant_path=tmp_path / "qdrant",
        store_ingested="true",
        webhook_secret="acl-webhook-secret",
        webhook_backoff=0.2,
        fault_injection="true",
    )
    stack.env["MORAG_REDIS_URL"] = acl_redis.url("api")
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    try:
        stack.start_api()
        stack.start_worker("gpu0@acl", "gpu-tasks", wait=False, redis_url=acl_redis.url("worker"))
        stack.start_worker("cpu0@acl", "celery", wait=False, redis_url=acl_redis.url("worker"))
        stack.start_worker("store@acl", "morag-store", wait=False, redis_url=acl_redis.url("store"))
        for name in ("gpu0@acl", "cpu0@acl", "store@acl"):
            stack.wait_live(name)
        audio = stack.ingest(speech_wav, gpu=True)
        with stack.client() as c, open(docx, "rb") as f:
            resp = c.post(
                "/api/v1/ingest/file",
                files={"file": (docx.name, f)},
                data={"gpu": "false", "webhook_url": hook},
            )
        assert resp.status_code == 202, resp.text
        doc = resp.json()
        slow = stack.ingest(speech_wav, gpu=False, options={"fault": "slow:30"})
        for accepted in (audio, doc):
            job = stack.wait_job(accepted["task_id"], timeout=180)
            assert job["status"] == "succeeded", job
            assert job["result"]["metadata"]["stored"] is True, job
        stack.wait_job(slow["task_id"], timeout=60, states=("running",))
        with stack.client() as c:
            hits = c.post("/api/v1/search", json={"query": "harbour", "limit": 3}, timeout=90)
            assert hits.status_code == 200, hits.text
            assert c.delete(f"/api/v1/ingest/{slow['task_id']}").status_code == 200
            assert c.get("/ready").status_code == 200
            assert c.get("/api/v1/status/stats/queues").status_code == 200
        assert stack.wait_job(slow["task_id"], timeout=60)["status"] == "cancelled"
        wait_until(lambda: _Receiver.calls, 30, "the webhook")
        stack.scrape()
        # A worker lost mid-job: kombu restores its unacked message (unacked_mutex, Lua).
        stack.kill("cpu0@acl")
        stack.start_worker("cpu0@acl", "celery", redis_url=acl_redis.url("worker"))
        time.sleep(1)
        denials = [
            {k: d.get(k) for k in ("username", "reason", "object", "context")}
            for d in acl_redis.denials()
        ]
        assert denials == [], denials
    finally:
        hooks.shutdown()
        _dump_logs(stack)
        stack.close()


def test_tls_needs_the_ca(tls_acl_redis: AclRedis) -> None:
    plain = redis.Redis(host="127.0.0.1", port=tls_acl_redis.port, socket_timeout=5)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    untrusted = redis.Redis.from_url(
        tls_acl_redis.url("worker").split("?")[0] + "?ssl_cert_reqs=required", socket_timeout=5
    )
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate"):
        untrusted.ping()
    assert tls_acl_redis.client("worker").ping()


def test_api_and_celery_worker_over_tls(
    tls_acl_redis: AclRedis, tmp_path: Path, speech_wav: Path
) -> None:
    """rediss:// with the CA, as morag_app writes it: kombu and redis-py both verify."""
    stack = Stack(tls_acl_redis.url(), tmp_path / "stack", free_port())
    stack.env["MORAG_REDIS_URL"] = tls_acl_redis.url("api")
    try:
        stack.start_api()
        stack.start_worker("cpu0@tls", "celery", redis_url=tls_acl_redis.url("worker"))
        job = stack.wait_job(stack.ingest(speech_wav, gpu=False)["task_id"], timeout=120)
        assert job["status"] == "succeeded", job
        assert tls_acl_redis.denials() == []
    finally:
        _dump_logs(stack)
        stack.close()
