"""A dead worker is noticed within a second: its liveness subscription dies with its process.

Real Redis with the role's ACL users, real Celery workers. The GPU worker's heartbeat TTL is
30 s here, so nothing below can pass by waiting the heartbeat out: every deadline is a few
seconds (timing itself is measured in tests/bench/failover.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import redis_acl
from tests.conftest import RedisServer
from tests.integration.stack import Stack, wait_until

GPU_TTL = 30.0  # the dead GPU worker's heartbeat outlives every deadline of these tests
NOTICED = 5.0  # well below GPU_TTL; the goal (the benchmark) is under 1 s


def _numsub(client: redis.Redis, channel: str) -> int:
    return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))


def _start_fleet(stack: Stack) -> str:
    """The API, gpu0 (heartbeat TTL 30 s) and cpu0; returns gpu0's liveness channel."""
    stack.start_api()
    stack.start_worker("gpu0@test", "gpu-tasks", wait=False, heartbeat_ttl=GPU_TTL)
    stack.start_worker("cpu0@test", "celery", wait=False)
    for name in ("gpu0@test", "cpu0@test"):
        stack.wait_live(name)
    channel = wait_until(
        lambda: (stack.heartbeat("gpu0@test") or {}).get("liveness"), 30, "gpu0's channel"
    )
    assert _numsub(stack.redis, channel) == 1  # subscribed as the role's morag-worker user
    return channel


def test_a_killed_gpu_worker_leaves_routing_and_its_queue_is_rescued_before_its_ttl(
    make_stack: Any, speech_wav: Path
) -> None:
    stack = make_stack()
    channel = _start_fleet(stack)
    busy = stack.ingest(speech_wav, gpu=True, options={"fault": "slow:10"})
    stack.wait_job(busy["task_id"], timeout=30, states=("running",))
    stranded = [stack.ingest(speech_wav, gpu=True) for _ in range(2)]
    assert all(s["route"]["queue"] == "gpu-tasks" for s in stranded)

    stack.kill("gpu0@test")  # SIGKILL, its pool child too
    wait_until(lambda: _numsub(stack.redis, channel) == 0, NOTICED, "Redis to drop it")

    def routed_to_cpu() -> dict[str, Any] | None:
        accepted = stack.ingest(speech_wav, gpu=True)
        if accepted["route"]["queue"] == "gpu-tasks":
            stranded.append(accepted)  # routed before the death was seen: rescued below
            return None
        return accepted

    accepted = wait_until(routed_to_cpu, NOTICED, "gpu=true to be routed to celery")
    assert accepted["route"]["code"] == "no_gpu_worker"
    # Not by expiry: the dead worker's heartbeat is still there.
    assert stack.heartbeat("gpu0@test") is not None

    # The CPU worker notices as fast, and takes gpu-tasks after the rescue grace.
    wait_until(
        lambda: stack.heartbeat("cpu0@test")["rescuing"],
        stack.GRACE + NOTICED,
        "cpu0 to rescue gpu-tasks",
    )
    assert stack.heartbeat("gpu0@test") is not None
    for s in stranded:
        job = stack.wait_job(s["task_id"], timeout=60)
        assert job["status"] == "succeeded", job
        assert [(a["queue"], a["worker"]) for a in job["attempts"]] == [("gpu-tasks", "cpu0@test")]
        assert job["route"]["code"] == "rescued"
    with stack.client() as c:
        workers = c.get("/api/v1/workers").json()["workers"]
    assert [w["name"] for w in workers] == ["cpu0@test"]


def test_without_liveness_channels_a_dead_worker_waits_for_its_ttl(
    make_stack: Any, speech_wav: Path
) -> None:
    """MORAG_LIVENESS_CHANNEL=false (the path the benchmark compares against): no channel is
    advertised, and the heartbeat TTL alone decides, as before."""
    stack = make_stack(liveness_channel="false")
    stack.start_api()
    stack.start_worker("gpu0@test", "gpu-tasks", heartbeat_ttl=GPU_TTL)
    assert stack.heartbeat("gpu0@test")["liveness"] is None
    stack.kill("gpu0@test")
    with stack.client() as c:
        stats = c.get("/api/v1/status/stats/queues").json()["queues"]
    assert stats["gpu-tasks"]["workers"] == ["gpu0@test"]  # dead, not yet expired
    assert stack.ingest(speech_wav, gpu=True)["route"]["queue"] == "gpu-tasks"


PARENT = """
import os, sys, time
import redis
from morag.liveness import Subscription
sub = Subscription(redis.Redis.from_url(sys.argv[1], health_check_interval=1), "parent@test")
sub.start()
assert sub.live_channel(), "not subscribed"
child = os.fork()
if child == 0:
    time.sleep(60)  # a pool child that outlives its parent for a while
    os._exit(0)
print(sub.live_channel(), child, flush=True)
time.sleep(60)
"""


def test_a_forked_child_does_not_keep_a_dead_parent_subscribed(redis_server: RedisServer) -> None:
    """Celery forks pool children after the subscription exists (a replaced child): they
    inherit its socket, and must not keep it open when the parent is killed alone."""
    db = redis_server.fresh_db()
    admin = redis.Redis.from_url(redis_server.url(db))
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT, redis_server.role_urls(db)["worker"]],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = 0
    try:
        assert proc.stdout is not None
        channel, child_pid = proc.stdout.readline().split()
        child = int(child_pid)
        assert channel == f"morag:alive:{db}:parent@test"
        assert _numsub(admin, channel) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: _numsub(admin, channel) == 0, NOTICED, "the subscription to end")
        os.kill(child, 0)  # the child still lives
    finally:
        proc.kill()
        if child:
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize(
    ("role", "command", "allowed"),
    [
        ("worker", ("SUBSCRIBE", "morag:alive:0:gpu0@host"), True),
        ("store", ("SUBSCRIBE", "morag:alive:0:store@host"), True),
        ("worker", ("SUBSCRIBE", "morag:other"), False),
        ("worker", ("PUBLISH", "morag:alive:0:gpu0@host", "x"), False),
        ("api", ("SUBSCRIBE", "morag:alive:0:gpu0@host"), False),
        ("api", ("PUBSUB", "NUMSUB", "morag:alive:0:gpu0@host"), True),
        ("worker", ("PUBSUB", "NUMSUB", "morag:alive:0:gpu0@host"), True),
        ("store", ("PUBSUB", "NUMSUB", "morag:alive:0:gpu0@host"), True),
        ("worker", ("PUBSUB", "CHANNELS"), False),
        ("api", ("CLIENT", "LIST"), False),
    ],
)
def test_liveness_acl_is_least_privilege(
    redis_server: RedisServer, role: str, command: tuple[str, ...], allowed: bool
) -> None:
    """roles/redis: the users that run workers SUBSCRIBE to liveness channels only (besides
    Celery's), nobody PUBLISHes on them as a worker, every app user counts them, and nobody
    needs CLIENT LIST."""
    admin = redis.Redis.from_url(redis_server.url(0))
    name = redis_acl.role_users()[role].name
    verdict = admin.execute_command("ACL", "DRYRUN", name, *command)
    assert (verdict == b"OK") is allowed, verdict
