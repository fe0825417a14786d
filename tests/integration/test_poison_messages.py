"""Whatever a stolen worker credential (`morag-worker`) pushes onto a queue, the workers on it
drop it with a log line and go on: not JSON, not UTF-8, JSON of another shape, kombu envelopes
that kombu cannot read, task messages Celery cannot take apart, unknown tasks, and every
header of a real task message replaced by a wrong type. Real Redis with the role's ACL users,
real Celery workers (GPU queue, CPU queue, morag-store); afterwards the same workers run real
jobs to the end (processed and stored) and none of them has exited. morag.broker."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from morag.celery_app import PROCESS_TASK, celery_config
from morag.config import Settings

from tests.conftest import RedisServer
from tests.integration import media
from tests.integration.conftest import running_stack
from tests.integration.stack import Stack, wait_until

WORKERS = {
    "gpu0@poison": "gpu-tasks",
    "cpu0@poison": "celery",
    "store@poison": "morag-store",
}
# One line per discarded message: the transport's (morag.broker), or Celery's own for a task
# message it refuses (on_invalid_task / on_unknown_message / on_unknown_task / decode error).
DROPPED = (
    "that is not a kombu message",
    "Received invalid task message",
    "Received and deleted unknown message",
    "Received unregistered task of type",
    "Can't decode message body",
)
WRONG = (None, 1, 1.5, True, "x", [], [1, 2, 3], {}, {"a": 1})


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("poison")
    settings = {"qdrant_path": root / "qdrant", "store_ingested": "true"}
    with running_stack(redis_server, root, WORKERS, **settings) as s:
        yield s


def _real_message(redis_server: RedisServer, task: str, queue: str) -> dict[str, Any]:
    """The envelope Celery and kombu write for ``task`` (a job id nobody has), taken from
    a database no worker consumes."""
    db = redis_server.fresh_db()
    app = Celery("poison-template", set_as_current=False)
    app.conf.update(celery_config(Settings(redis_url=redis_server.url(db))))
    app.send_task(task, (uuid.uuid4().hex,), queue=queue)
    raw = redis.Redis.from_url(redis_server.url(db)).rpop(queue)
    assert raw is not None
    return json.loads(raw)


def _with_body(envelope: dict[str, Any], body: Any) -> dict[str, Any]:
    return {**envelope, "body": base64.b64encode(json.dumps(body).encode()).decode()}


def _poison(template: dict[str, Any]) -> list[bytes]:
    """Hand-made garbage, each item a kind that stopped the worker or could."""
    props, headers = template["properties"], template["headers"]
    items: list[Any] = [
        b"msg",
        b"\xff\xfe\x00 not utf-8",
        b"{not json",
        b"",
        42,
        "a string",
        [1, 2, 3],
        None,
        {"body": "x"},
        {**template, "properties": "x"},
        {**template, "properties": {**props, "delivery_tag": None}},
        {**template, "properties": {**props, "delivery_info": None}},
        {**template, "properties": {**props, "body_encoding": "rot13"}},
        {**template, "body": "%%% not base64 %%%"},
        {**template, "body": 7},
        {**template, "headers": None},
        {**template, "headers": {}},
        {**template, "headers": {**headers, "task": "morag.no_such_task"}},
        {**template, "headers": {**headers, "task": ["morag.process_job"]}},
        {**template, "headers": {**headers, "id": None}},
        {**template, "content-type": "application/x-python-serialize"},
        {**template, "body": base64.b64encode(b"not json").decode()},
        _with_body(template, []),
        _with_body(template, "args"),
        _with_body(template, 5),
        _with_body(template, [[], {}]),
        _with_body(template, [{}, [], {}]),
    ]
    return [i if isinstance(i, bytes) else json.dumps(i).encode() for i in items]


def _mutants(template: dict[str, Any]) -> list[bytes]:
    """Each header of a real task message, each property and the envelope's own keys
    replaced by each wrong type: none may stop the worker (some are still valid messages,
    which run the task for a job that does not exist)."""
    out = []
    for part in ("headers", "properties", None):
        fields = template[part] if part else template
        for key in fields:
            for value in WRONG:
                if part:
                    mutant = {**template, part: {**template[part], key: value}}
                else:
                    mutant = {**template, key: value}
                out.append(json.dumps(mutant).encode())
    return out


def _log(stack: Stack, name: str) -> str:
    return (stack.logs / f"{name.replace('@', '_')}.log").read_text(errors="replace")


def _drops(stack: Stack, name: str) -> int:
    log = _log(stack, name)
    return sum(log.count(line) for line in DROPPED)


def _ingest_through_every_worker(stack: Stack, tmp_path: Path) -> None:
    """A gpu=true and a gpu=false document: processed by gpu0 and cpu0, stored by store."""
    jobs = [
        stack.ingest(media.docx_file(tmp_path / f"harbour-{gpu}.docx"), gpu=gpu)
        for gpu in (True, False)
    ]
    assert [j["route"]["queue"] for j in jobs] == ["gpu-tasks", "celery"]
    for job in jobs:
        done = stack.wait_job(job["task_id"], timeout=180)
        assert done["status"] == "succeeded", done["error"]
        meta = done["result"]["metadata"]
        assert meta["stored"] is True and meta["stored_chunks"] > 0, meta


def _queue_and_message(redis_server: RedisServer, name: str) -> tuple[str, dict[str, Any]]:
    """The queue worker ``name`` consumes and a real message of the task it runs."""
    queue = WORKERS[name]
    task = "morag.vector_op" if queue == "morag-store" else PROCESS_TASK
    return queue, _real_message(redis_server, task, queue)


def _push_as_worker(stack: Stack, queue: str, items: list[bytes]) -> None:
    """LPUSH as the morag-worker ACL user: what a GPU host's stolen password allows."""
    assert stack.users is not None
    attacker = redis.Redis.from_url(stack.users["worker"])
    for item in items:
        attacker.lpush(queue, item)


@pytest.mark.parametrize("name", list(WORKERS))
def test_garbage_on_a_queue_is_dropped_and_the_worker_goes_on(
    stack: Stack, redis_server: RedisServer, name: str
) -> None:
    queue, real = _queue_and_message(redis_server, name)
    poison = _poison(real)
    before = _drops(stack, name)
    _push_as_worker(stack, queue, poison)
    # Each one is answered by a line in the worker's log, and none is left in flight.
    wait_until(
        lambda: _drops(stack, name) >= before + len(poison) or not stack.alive(name),
        60,
        f"{name} to drop {len(poison)} messages",
    )
    assert stack.alive(name), _log(stack, name)[-3000:]
    assert _drops(stack, name) == before + len(poison), _log(stack, name)[-3000:]
    wait_until(lambda: stack.redis.hlen("unacked") == 0, 30, "no message left unacked")
    assert stack.redis.llen(queue) == 0
    assert "Unrecoverable error" not in _log(stack, name)


@pytest.mark.parametrize("name", list(WORKERS))
def test_mutated_task_messages_do_not_stop_the_worker(
    stack: Stack, redis_server: RedisServer, name: str
) -> None:
    queue, real = _queue_and_message(redis_server, name)
    _push_as_worker(stack, queue, _mutants(real))
    wait_until(
        lambda: stack.redis.llen(queue) == 0 or not stack.alive(name),
        120,
        f"{name} to drain",
    )
    wait_until(
        lambda: stack.redis.hlen("unacked") == 0 or not stack.alive(name),
        120,
        "no message left unacked",
    )
    assert stack.alive(name), _log(stack, name)[-3000:]
    assert "Unrecoverable error" not in _log(stack, name)


def test_the_workers_still_run_jobs_to_the_end(stack: Stack, tmp_path: Path) -> None:
    """After all of the above: a job through each worker (GPU queue, CPU queue, storing)."""
    _ingest_through_every_worker(stack, tmp_path)
    for name in WORKERS:
        assert stack.alive(name), _log(stack, name)[-3000:]


def test_dropped_messages_are_counted(stack: Stack) -> None:
    scrape = stack.scrape()
    assert (scrape.value("morag_messages_dropped_total", reason="envelope") or 0) > 0
    assert (scrape.value("morag_messages_dropped_total", reason="task_message") or 0) > 0
    assert scrape.value("morag_messages_dropped_total", queue="morag-store")


def test_garbage_in_the_unacked_hash_does_not_block_redelivery(make_stack, tmp_path: Path) -> None:
    """kombu's `unacked` hash (messages in flight) is writable by the worker credential too.
    A message left there by a worker that died is sent again by the next worker's restore
    (every 10 s); entries that are not messages are dropped instead of failing that restore
    each time, before it reaches the real one."""
    stack = make_stack()
    stack.start_api()
    job = stack.ingest(media.docx_file(tmp_path / "lost.docx"), gpu=False)
    # A worker took the message and died: it is in `unacked`, not on the queue.
    raw = stack.redis.rpop("celery")
    assert raw is not None
    message = json.loads(raw)
    tag = message["properties"]["delivery_tag"]
    stack.redis.hset("unacked", tag, json.dumps([message, "celery", "celery"]))
    stack.redis.zadd("unacked_index", {tag: 0})
    assert stack.users is not None
    attacker = redis.Redis.from_url(stack.users["worker"])
    garbage = {"evil-1": b"msg", "evil-2": b"[1, 2]", "evil-3": json.dumps([5, "a", "b"])}
    for n, (key, value) in enumerate(garbage.items(), start=1):
        attacker.hset("unacked", key, value)
        attacker.zadd("unacked_index", {key: n})  # restored first (highest score first)
    stack.start_worker("cpu0@test", "celery")
    done = stack.wait_job(job["task_id"], timeout=120)
    assert done["status"] == "succeeded", done
    wait_until(lambda: stack.redis.hlen("unacked") == 0, 30, "an empty unacked hash")
    assert stack.redis.zcard("unacked_index") == 0
    assert _log(stack, "cpu0@test").count("dropped the unacked entry") == len(garbage)
    assert stack.alive("cpu0@test")
