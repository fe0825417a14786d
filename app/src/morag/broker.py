"""What a worker does with a message on its queue that is not a task message MoRAG sent.

Anyone whose Redis credential may push to a queue (a GPU host's ``morag-worker`` password,
a process taken over by a malicious media file) can put any bytes there. Celery copes with
part of it (a body it cannot decode, an unregistered task name), but two steps run before
or around its hooks and assume a well-formed message: kombu's Redis transport parses each
message's JSON envelope and builds its Message from it, and Celery's task handler reads the
protocol-2 headers and body. An exception in either escaped the event loop and stopped the
worker ("Unrecoverable error"), so one ``LPUSH morag-store msg`` took the store offline.

Here each layer checks what it relies on, with the hooks the libraries give:
- ``Transport`` (``broker_transport``): kombu's Redis transport, whose channel drops a message
  that is not a JSON kombu envelope (kombu's own pub/sub path already does the same);
- ``Consumer`` (``worker_consumer``): Celery's consumer, whose task handler first checks the
  protocol-2 message and hands an invalid one to Celery's ``on_invalid_task`` (log, reject).
A dropped message is logged (one line: queue, reason, the start of the message), counted in
``morag_messages_dropped_total`` and gone: never redelivered, and the worker takes the next.
The same holds for an entry of kombu's ``unacked`` hash (messages in flight, restored when
their worker is lost), which those credentials may write too.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

import redis
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.transport import redis as kombu_redis
from redis.sentinel import SentinelManagedConnection

from morag.config import DECLARED_QUEUES
from morag.redis_client import WRITE_REFUSALS

log = logging.getLogger("morag.broker")

# Reasons (the metric's label): not even a kombu envelope, or not a protocol-2 task message.
ENVELOPE = "envelope"
TASK_MESSAGE = "task_message"

_SHOWN = 200  # characters of a dropped message in the log line

# Protocol-2 headers (docs.celeryq.dev internals/protocol) that Celery's worker reads in the
# main process, by the type Celery sends; absent or null is allowed, as Celery allows it.
_TEXT_HEADERS = (
    "lang",
    "root_id",
    "parent_id",
    "group",
    "shadow",
    "eta",
    "expires",
    "argsrepr",
    "kwargsrepr",
    "origin",
)
_INT_HEADERS = ("retries", "replaced_task_nesting", "group_index")


def _shown(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text)} characters)"


def _count(reason: str, queue: str) -> None:
    """Count a dropped message; a metric must never stop the worker (Redis may be the cause)."""
    from morag import metrics
    from morag.runtime import get_runtime

    try:
        metrics.message_dropped(get_runtime().redis, reason, queue)
    except Exception:
        log.warning("could not count the dropped message (%s, %s)", reason, queue, exc_info=True)


def envelope_problem(raw: Any) -> str | None:
    """Why ``raw`` (a decoded queue item) is not the envelope kombu's Redis transport writes;
    None if it is. Checked: what kombu's Message and its delivery bookkeeping (the unacked
    hash, the restore of a lost worker's messages) read without checking."""
    if not isinstance(raw, dict):
        return f"a JSON {type(raw).__name__}, not a message envelope"
    props = raw.get("properties")
    if not isinstance(props, dict):
        return "no properties object"
    if not isinstance(props.get("delivery_tag"), str) or not props["delivery_tag"]:
        return "no delivery tag"
    if not isinstance(props.get("delivery_info"), dict):
        return "no delivery_info object"
    if not isinstance(raw.get("headers"), dict):
        return "no headers object"
    for key in ("content-type", "content-encoding"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            return f"{key} is not a string"
    body = raw.get("body")
    if not isinstance(body, str):  # Celery's log of a refused message reads its length
        return "the body is not a string"
    encoding = props.get("body_encoding")
    if encoding not in (None, "utf-8", "base64"):
        return f"unknown body encoding {_shown(encoding)}"
    if encoding == "base64" and body:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "the body is not base64"
    return None


def unacked_problem(raw: bytes) -> str | None:
    """Why ``raw`` (a value of kombu's ``unacked`` hash) is not ``[envelope, exchange,
    routing key]`` as kombu writes it for a message in flight; None if it is."""
    try:
        entry = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"not JSON: {exc}"
    if not isinstance(entry, list) or len(entry) != 3:
        return "not [message, exchange, routing key]"
    message, exchange, routing_key = entry
    if not isinstance(exchange, str) or not isinstance(routing_key, str):
        return "the exchange or routing key is not a string"
    return envelope_problem(message)


class QoS(kombu_redis.QoS):
    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        # kombu parses the entry inside its transaction and does not catch a failure: the
        # entry stays, and every later restore of what lost workers left in flight (Celery's
        # redelivery) fails at it again. The `unacked` hash is writable by the same
        # credentials as the queues, so an entry is checked first and a bad one removed.
        with self.channel.conn_or_acquire(client) as conn:
            raw = conn.hget(self.unacked_key, tag)
        problem = unacked_problem(raw) if raw else None
        if problem is None:
            super().restore_by_tag(tag, client, leftmost)
            return
        log.error(
            "dropped the unacked entry %s, which is not a message in flight (%s): %s",
            _shown(tag),
            problem,
            _shown(raw),
        )
        self._remove_from_indices(tag).execute()
        _count(ENVELOPE, "unacked")


class _RefusalIsLoss:
    """A connection on which Redis refusing writes for now (NOREPLICAS right after a
    failover, until a replica follows the new primary; OOM, MISCONF, ...) reads as a lost
    connection. kombu ends the worker on an error reply in several places (the BRPOP, the
    mutex of its restore at each connect, the refresh of the bindings): "Unrecoverable
    error: server:ResponseError". A refused write changed nothing; as a lost connection
    Celery reconnects, with its retries, until Redis takes writes again."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if str(exc).split(" ", 1)[0] not in WRITE_REFUSALS:
                raise
            raise redis.ConnectionError(f"Redis takes no writes for now: {exc}") from exc


class _Connection(_RefusalIsLoss, redis.Connection):
    pass


class _SSLConnection(_RefusalIsLoss, redis.SSLConnection):
    pass


class _SentinelConnection(_RefusalIsLoss, SentinelManagedConnection):
    pass


class _SentinelSSLConnection(_RefusalIsLoss, kombu_redis.SentinelManagedSSLConnection):
    pass


class _CheckingChannel:
    """What both channels (plain Redis and Sentinel) add to kombu's."""

    QoS = QoS

    def _brpop_read(self, **options: Any) -> bool:
        # kombu parses the popped item as JSON (and UTF-8) before anything else sees it, and
        # does not catch a failure there: it would end the worker. The item is already popped
        # (BRPOP) and not yet in the unacked hash, so there is nothing to ack: log and go on.
        # Nothing after that parse raises these two: the envelope is checked in _deliver and
        # Celery reports a body it cannot decode as DecodeError.
        try:
            return bool(super()._brpop_read(**options))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            queues = ",".join(sorted(self.active_queues)) or "?"
            log.error(
                "dropped a message on %s that is not a kombu message (not JSON: %s); "
                "whoever pushed it holds a Redis credential that may write this queue",
                queues,
                exc,
            )
            _count(ENVELOPE, queues)
            return True


class Channel(_CheckingChannel, kombu_redis.Channel):
    connection_class = _Connection
    connection_class_ssl = _SSLConnection


class SentinelChannel(_CheckingChannel, kombu_redis.SentinelChannel):
    connection_class = _SentinelConnection
    connection_class_ssl = _SentinelSSLConnection


class _CheckingTransport:
    """What both transports add to kombu's: a malformed message is dropped."""

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem is not None:
            log.error(
                "dropped a message on %s that is not a kombu message (%s): %s",
                queue,
                problem,
                _shown(message),
            )
            _count(ENVELOPE, queue)
            return
        super()._deliver(message, queue)


class Transport(_CheckingTransport, kombu_redis.Transport):
    """kombu's Redis transport (same URL, options, TLS) that drops malformed messages."""

    Channel = Channel


class SentinelTransport(_CheckingTransport, kombu_redis.SentinelTransport):
    """kombu's Sentinel transport (``sentinel://`` URLs, ``master_name``), likewise."""

    Channel = SentinelChannel


def task_message_problem(message: Any) -> str | None:
    """Why ``message`` (a kombu Message) is not a protocol-2 task message Celery's worker can
    take apart without failing; None if it is. Whether the task exists, and whether its
    arguments fit it, stay Celery's business (on_unknown_task; a failed task)."""
    headers = message.headers
    for key in ("task", "id"):
        if not isinstance(headers.get(key), str) or not headers[key]:
            return f"no {key!r} header (not a Celery protocol 2 task message)"
    for key in _TEXT_HEADERS:
        if headers.get(key) is not None and not isinstance(headers[key], str):
            return f"the {key!r} header is not a string"
    for key in _INT_HEADERS:
        value = headers.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return f"the {key!r} header is not an integer"
    for key in ("stamped_headers", "groups"):
        names = headers.get(key)
        if names is not None and not (
            isinstance(names, list | tuple) and all(isinstance(n, str) for n in names)
        ):
            return f"the {key!r} header is not a list of strings"
    if headers.get("stamps") is not None and not isinstance(headers["stamps"], dict):
        return "the 'stamps' header is not an object"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in limits
        )
    ):
        return "the 'timelimit' header is not [soft, hard]"
    try:
        body = message.decode()
    except (DecodeError, ContentDisallowed):
        return None  # Celery's own handlers log and discard these (on_decode_error/invalid)
    if not (
        isinstance(body, list | tuple)
        and len(body) == 3
        and isinstance(body[0], list | tuple)
        and isinstance(body[1], dict)
        and isinstance(body[2], dict)
    ):
        return "the body is not [args, kwargs, embed]"
    return None


class Consumer(CeleryConsumer):
    """Celery's worker consumer, whose task handler refuses malformed task messages through
    Celery's own ``on_invalid_task`` (logged, rejected without requeue) instead of failing."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        celery_handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            problem = task_message_problem(message)
            if problem is None:
                return celery_handler(message)
            # The routing key is the sender's word: only a declared queue becomes a label.
            queue = (message.delivery_info or {}).get("routing_key")
            _count(TASK_MESSAGE, queue if queue in DECLARED_QUEUES else "other")
            try:  # on_invalid_task logs the exception being handled
                raise InvalidTaskError(problem)
            except InvalidTaskError as exc:
                return self.on_invalid_task(None, message, exc)

        return on_task_received
