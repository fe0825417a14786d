"""Redis Sentinel (issue 19 items 1 and 2), on a real primary, two replicas and three
Sentinels (tests/integration/sentinel.py: the role's ACL users, TLS on every link):

- every client MoRAG builds finds the primary through the Sentinels and follows a failover,
  also when the old primary froze without closing its connections (Pub/Sub subscribers
  included: they would otherwise wait on it for ever);
- a real Celery worker consuming through ``sentinel://`` keeps consuming after its primary
  is killed (celery#6348), and so does the API's sending of jobs;
- with MORAG_REDIS_MIN_REPLICAS=1 a submission is answered 202 only once a replica has its
  record (WAIT on the connection that wrote it): replicas frozen, 503 and the job never runs.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from morag import job_events, liveness
from morag.config import Settings
from morag.job_events import EndListener
from morag.liveness import Subscription
from morag.redis_client import redis_client, redis_health, replicated_transaction

from tests import redis_acl
from tests.conftest import free_port
from tests.integration.conftest import _dump_logs
from tests.integration.sentinel import MASTER, Node, SentinelCluster, sentinel_cluster
from tests.integration.stack import Stack, wait_until

WORKER = "cpu0@sentinel"
READY_TIMEOUT = Settings.model_fields["ready_timeout"].default


def _settings(cluster: SentinelCluster, role: str, **extra: Any) -> Settings:
    return Settings(redis_url=cluster.role_urls()[role], **cluster.settings(), **extra)


def _subscribers(node: Node, channel: str) -> int:
    try:
        return int(dict(node.admin(socket_timeout=2).pubsub_numsub(channel))[channel.encode()])
    except redis.RedisError:
        return 0


def _grant_wait(cluster: SentinelCluster) -> None:
    """The API's user runs WAIT (MORAG_REDIS_MIN_REPLICAS); granted here while the redis role's
    defaults do not list it yet (roles/redis must, for a site that sets min replicas)."""
    if "wait" not in redis_acl.role_users()["api"].commands:
        cluster.grant("api", "+wait")


def test_clients_follow_a_failover_from_a_frozen_primary(tmp_path: Path) -> None:
    with sentinel_cluster(tmp_path / "redis") as cluster:
        old = cluster.primary()
        settings = _settings(cluster, "worker")
        client = redis_client(settings)
        client.set("morag:job:before", "1")
        assert old.admin().get("morag:job:before") == b"1"  # the primary, found by Sentinel

        # WAIT on the connection that ran the MULTI/EXEC: how many replicas have it.
        def write(pipe: Any) -> None:
            pipe.multi()
            pipe.incr("morag:job:counted")

        admin = old.admin(socket_timeout=15)
        paused = next(n for n in cluster.nodes if n is not old)
        paused.pause()
        try:
            assert replicated_transaction(admin, write, replicas=2, timeout_ms=300) == (1, None)
        finally:
            paused.resume()
        assert admin.get("morag:job:counted") == b"1"  # applied all the same
        assert replicated_transaction(admin, write, replicas=2, timeout_ms=10_000) == (2, None)
        assert paused.admin().get("morag:job:counted") == b"2"
        # The subscribers: a worker's liveness channel, the API's job end listener.
        sub = Subscription(redis_client(settings, health_check_interval=1), "w@sentinel")
        ends = EndListener(redis_client(_settings(cluster, "api"), **job_events.CLIENT_OPTIONS))
        sub.start()
        ends.start()
        try:
            wait_until(lambda: sub.live_channel() and ends.live, 30, "both subscriptions")
            assert _subscribers(old, liveness.channel("w@sentinel")) == 1
            assert _subscribers(old, job_events.channel(0)) == 1

            old.pause()  # frozen: its connections stay open, nothing answers
            try:
                new = cluster.wait_failover(old)
                # A new client writes to the new primary at once.
                redis_client(settings).set("morag:job:after", "2")
                assert new.admin().get("morag:job:after") == b"2"
                # Both subscriptions move to the new primary (readers count them there),
                # although the frozen one never closed their connections.
                wait_until(
                    lambda: (
                        _subscribers(new, liveness.channel("w@sentinel")) == 1
                        and _subscribers(new, job_events.channel(0)) == 1
                    ),
                    30,
                    "the subscriptions on the new primary",
                )
                assert sub.live_channel() and ends.live
                # The client from before: its command on the frozen primary times out (the
                # socket timeout a Sentinel client gets by default) instead of hanging for
                # ever, and is sent again to the primary the Sentinels name now.
                client.set("morag:job:old-client", "3")
                assert new.admin().get("morag:job:old-client") == b"3"
                # What the API exports of its own client (docs/ha.md): the command timed out
                # on the frozen primary, and the client now reaches another one.
                health = redis_health(client)
                assert health is not None and health.errors["timeout"] >= 1, health.errors
                assert health.primary == f"127.0.0.1:{new.port}"
                assert health.primary_changes == 1
            finally:
                old.resume()
        finally:
            sub.stop()
            ends.stop()


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, SentinelCluster]]:
    """The API and one CPU worker through the Sentinels; the API answers 202 only once one
    replica has the job (MORAG_REDIS_MIN_REPLICAS=1)."""
    root = tmp_path_factory.mktemp("ha")
    with sentinel_cluster(root / "redis") as cluster:
        _grant_wait(cluster)
        stack = Stack(
            cluster.admin_url(),
            root,
            free_port(),
            users=cluster.role_urls(),
            **cluster.settings(),
            redis_min_replicas=1,
            redis_wait_timeout_ms=500,
            outbox_grace=1,  # a reconciler would send a stranded job at once
            warmup="false",
        )
        stack.redis = cluster.admin()  # the tests' own reads follow the primary too
        try:
            stack.start({WORKER: "celery"})
            yield stack, cluster
        finally:
            _dump_logs(stack)
            stack.close()


def _submit(stack: Stack, speech: Path) -> Any:
    with stack.client() as c, open(speech, "rb") as f:
        return c.post(
            "/api/v1/ingest/file", files={"file": (speech.name, f)}, data={"gpu": "false"}
        )


def _record(stack: Stack, task_id: str) -> dict[str, Any]:
    return json.loads(stack.redis.get(f"morag:job:{task_id}"))


def test_a_submission_no_replica_acknowledged_is_refused_and_never_runs(
    ha: tuple[Stack, SentinelCluster], speech_wav: Path
) -> None:
    stack, cluster = ha
    refused_before = _refused(stack, "replicas")
    primary = cluster.primary()
    replicas = [n for n in cluster.nodes if n.proc is not None and n is not primary]
    assert replicas
    for node in replicas:
        node.pause()  # connected as far as the primary knows, but acknowledging nothing
    try:
        refused = _submit(stack, speech_wav)
    finally:
        for node in replicas:
            node.resume()
    assert refused.status_code == 503, refused.text
    body = refused.json()
    assert "replica" in body["detail"] and "will not run" in body["detail"], body
    assert _refused(stack, "replicas") == refused_before + 1
    [record] = [j for j in stack.jobs_in_redis() if j["status"] == "failed"]
    assert record["error"].startswith("not accepted"), record
    assert stack.redis.zscore("morag:outbox", record["task_id"]) is None

    accepted = _submit(stack, speech_wav)
    assert accepted.status_code == 202, accepted.text
    assert stack.wait_job(accepted.json()["task_id"], timeout=90)["status"] == "succeeded"
    # The worker and its reconcilers (outbox grace 1 s) had every chance: it never ran.
    wait_until(lambda: stack.redis.zcard("morag:outbox") == 0, 30, "an empty outbox")
    later = _record(stack, record["task_id"])
    assert later["status"] == "failed" and later["attempts"] == [], later


def test_a_primary_short_of_replicas_refuses_without_writing(
    ha: tuple[Stack, SentinelCluster], speech_wav: Path
) -> None:
    """min-replicas-to-write (the redis role sets it on a Sentinel primary): the primary
    discards the whole transaction, and the API says so without writing or withdrawing
    (after trying again for MORAG_REDIS_FAILOVER_SECONDS: right after a failover the new
    primary has no replica for a moment)."""
    stack, cluster = ha
    primary = cluster.primary().admin()
    before = len(stack.jobs_in_redis())
    refused_before = _refused(stack, "noreplicas")
    primary.config_set("min-replicas-to-write", 3)  # more than there are
    try:
        refused = _submit(stack, speech_wav)
    finally:
        primary.config_set("min-replicas-to-write", 0)
    assert refused.status_code == 503, refused.text
    assert "NOREPLICAS" in refused.json()["detail"], refused.text
    assert _refused(stack, "noreplicas") == refused_before + 1
    assert len(stack.jobs_in_redis()) == before  # nothing written
    # The worker's BRPOP met NOREPLICAS meanwhile: kombu ended the worker on it
    # ("Unrecoverable error: server:ResponseError"); it reconnects instead (morag.broker).
    assert stack.alive(WORKER), "the worker ended on NOREPLICAS"
    accepted = _submit(stack, speech_wav)
    assert accepted.status_code == 202, accepted.text
    assert stack.wait_job(accepted.json()["task_id"], timeout=90)["status"] == "succeeded"


def _refused(stack: Stack, reason: str) -> float:
    return stack.scrape().value("morag_submissions_refused_total", reason=reason) or 0.0


def _primary_changes(stack: Stack) -> float:
    return stack.scrape().value("morag_redis_primary_changes_total") or 0.0


def _runs_after_a_failover(
    stack: Stack, cluster: SentinelCluster, speech: Path, changes_before: float
) -> None:
    new = cluster.primary()
    stack.redis = cluster.admin()  # the tests' own client, not left on the old primary
    # MORAG_REDIS_MIN_REPLICAS=1: the remaining replica follows the new primary first.
    wait_until(lambda: cluster.replicas_of(new), 60, "a replica of the new primary")
    after = _submit(stack, speech)
    assert after.status_code == 202, after.text
    job = stack.wait_job(after.json()["task_id"], timeout=90)
    assert job["status"] == "succeeded", job
    assert [a["worker"] for a in job["attempts"]] == [WORKER]
    # The worker's heartbeat, liveness channel and the API's job end listener live on the
    # new primary.
    stack.wait_live(WORKER)
    assert _subscribers(new, stack.heartbeat(WORKER)["liveness"]) == 1
    wait_until(lambda: _subscribers(new, job_events.channel(0)) >= 1, 30, "the API's end listener")
    # The API's /metrics (docs/ha.md): the primary it uses now, and the change it saw.
    scrape = stack.scrape()
    assert scrape.value("morag_redis_primary_info", address=f"127.0.0.1:{new.port}") == 1
    assert scrape.value("morag_redis_primary_changes_total") == changes_before + 1


def test_a_worker_keeps_consuming_after_its_primary_is_killed(
    ha: tuple[Stack, SentinelCluster], speech_wav: Path
) -> None:
    """A primary that dies (its connections closed): the consumer reconnects through the
    Sentinels once they name the new primary."""
    stack, cluster = ha
    changes = _primary_changes(stack)
    old = cluster.primary()
    old.kill()
    cluster.wait_failover(old)
    try:
        _runs_after_a_failover(stack, cluster, speech_wav, changes)
    finally:
        cluster.rejoin(old)


def test_a_worker_keeps_consuming_after_its_primary_froze(
    ha: tuple[Stack, SentinelCluster], speech_wav: Path
) -> None:
    """celery#6348: a consumer whose primary stops answering without closing its connection
    (a hung or cut-off host) waited on it for ever; kombu's BRPOP health check (every 5 s
    with Sentinel) drops it, and the API's sends time out and go to the new primary."""
    stack, cluster = ha
    changes = _primary_changes(stack)
    old = cluster.primary()
    old.pause()
    try:
        cluster.wait_failover(old)
        _runs_after_a_failover(stack, cluster, speech_wav, changes)
    finally:
        old.resume()  # the Sentinels make it a replica of the new primary


@dataclass
class _Answer:
    started: float
    took: float
    status: int | None  # None: no answer within the client's timeout
    body: str = ""


def _submitting(stack: Stack, speech: Path, answers: list[_Answer], stop: threading.Event) -> None:
    """A client as docs/api.md describes one: each submission with an Idempotency-Key."""
    with stack.client() as c:
        c.timeout = httpx.Timeout(30)
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                with open(speech, "rb") as f:
                    resp = c.post(
                        "/api/v1/ingest/file",
                        files={"file": (speech.name, f)},
                        data={"gpu": "false"},
                        headers={"Idempotency-Key": str(uuid.uuid4())},
                    )
                answers.append(_Answer(t0, time.monotonic() - t0, resp.status_code, resp.text))
            except httpx.HTTPError:
                answers.append(_Answer(t0, time.monotonic() - t0, None))
            time.sleep(0.2)


def _named_primary(cluster: SentinelCluster) -> tuple[str, int] | None:
    """The primary a Sentinel still running names (not the frozen first one)."""
    try:
        host, port = cluster.sentinel_client(cluster.sentinels[1]).sentinel_get_master_addr_by_name(
            MASTER
        )
    except redis.RedisError:
        return None
    return (host.decode() if isinstance(host, bytes) else host), int(port)


def test_submissions_and_readiness_ride_out_a_failover(
    ha: tuple[Stack, SentinelCluster], speech_wav: Path
) -> None:
    """What HAProxy and the clients see while the primary's host is frozen, with the first
    Sentinel the clients ask, and the others promote a replica (docs/ha.md): /ready answers
    within MORAG_READY_TIMEOUT every time (HAProxy's check timeout is 2 s) and says
    `degraded`, not 503, within MORAG_READY_REDIS_GRACE, so the balancer keeps the API; the
    submissions sent meanwhile wait for the new primary (MORAG_REDIS_FAILOVER_SECONDS) and
    are accepted: none is refused or left unanswered, and each accepted job is on the new
    primary. A Sentinel that does not answer is asked once, then the next one: redis-py's
    default retries held each lookup about 15 s on it, so nothing was accepted for 90 s."""
    stack, cluster = ha
    answers: list[_Answer] = []
    stop = threading.Event()
    clients = [
        threading.Thread(target=_submitting, args=(stack, speech_wav, answers, stop))
        for _ in range(3)
    ]
    for t in clients:
        t.start()
    ready: list[tuple[float, float, int, str]] = []  # (since the fault, took, status, body)
    old = cluster.primary()
    try:
        wait_until(lambda: len(answers) >= 3, 60, "submissions before the fault")
        fault = time.monotonic()
        # The host is gone with its Sentinel, the first the clients ask (as in the lab's
        # chaos run): each lookup through it costs its timeout until another one answers.
        sentinel = cluster.sentinels[0]
        old.pause()
        sentinel.pause()
        try:
            new, promoted = None, 0.0
            with httpx.Client(base_url=stack.api_url, timeout=10, verify=stack.verify) as c:
                # HAProxy's view: a check a second until the new primary takes writes.
                while new is None or time.monotonic() - promoted < 5:
                    if new is None and time.monotonic() - fault > 60:
                        raise AssertionError(f"no failover away from {old.name} in 60 s")
                    t0 = time.monotonic()
                    r = c.get("/ready")
                    ready.append((t0 - fault, time.monotonic() - t0, r.status_code, r.text))
                    named = _named_primary(cluster)
                    if new is None and named not in (None, old.address):
                        new = next(n for n in cluster.nodes if n.address == named)
                        promoted = time.monotonic()
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
            wait_until(lambda: cluster.replicas_of(new), 60, "a replica of the new primary")
            after = time.monotonic()
            wait_until(
                lambda: sum(a.started > after and a.status == 202 for a in answers) >= 3,
                90,
                "submissions accepted after the failover",
            )
        finally:
            stop.set()
            for t in clients:
                t.join(60)
            old.resume()
            sentinel.resume()
        stack.redis = cluster.admin()
        during = [a for a in answers if a.started >= fault - 5]
        print(f"\nfailover of {old.name}: promoted {promoted - fault:.1f} s after the freeze")
        print(f"{'since':>7} {'took':>6} status  (/ready)")
        for since, took, status, body in ready:
            print(f"{since:7.1f} {took:6.2f} {status}  {json.loads(body)['status']}")
        print(
            f"submissions from 5 s before: {len(during)}, slowest "
            f"{max(a.took for a in during):.1f} s; "
            f"not 202: {[(a.status, a.body[:120]) for a in during if a.status != 202]}"
        )
        slow = [(s, took) for s, took, _, _ in ready if took > READY_TIMEOUT + 0.5]
        assert not slow, f"/ready slower than MORAG_READY_TIMEOUT: {slow}"
        refused = [(s, status, body) for s, _, status, body in ready if status != 200]
        assert not refused, f"/ready not 200 during the failover: {refused}"
        failed = [a for a in answers if a.status != 202]
        assert not failed, f"submissions not accepted: {failed}"
        ids = [json.loads(a.body)["task_id"] for a in answers]
        missing = [i for i in ids if stack.redis.get(f"morag:job:{i}") is None]
        assert not missing, f"accepted jobs lost in the failover: {missing}"
    finally:
        with stack.client() as c:  # the next tests' worker need not run them all
            for a in answers:
                if a.status == 202:
                    c.delete(f"/api/v1/ingest/{json.loads(a.body)['task_id']}")
