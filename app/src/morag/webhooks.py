"""Webhooks: when a job with a ``webhook_url`` ends, its final status is POSTed once.

Owed, queued, delivered (the outbox pattern, as for job messages in morag.jobs):

1. The transaction that ends the job (``JobStore.update``: a worker's result or failure,
   the time limit, the delivery cap, the API's cancel, the store worker) also adds the job
   id to ``morag:outbox:webhooks``. No process can end a job and lose its webhook.
2. The process that ended it then publishes ``morag.deliver_webhook`` on the server's
   ``morag-store`` queue at once (``notify_end``). If it dies first, or the broker refuses,
   the reconciler (``resend_due``, in every worker's supervisor) publishes it once the
   entry is due.
3. The store worker, the only one whose Redis user may touch ``morag:webhook:*``, claims
   the delivery (``claim_delivery``), POSTs (retried with exponential backoff), then marks
   it ``delivered`` (or given up) and removes the outbox entry in one transaction
   (``settle``). A duplicate message (a redelivery, the reconciler's resend) finds the mark
   and sends nothing.

GPU/CPU workers therefore only add a job id to a sorted set they already write (job ids,
no URL, body or secret); they cannot read or forge delivery marks. The POST never runs in
the worker that ran the job. The body is the job's
public view as JSON, signed the Standard Webhooks way (https://www.standardwebhooks.com/):

- ``webhook-id``: ``msg_<task id>``, the same on every retry, so a receiver can drop
  duplicates;
- ``webhook-timestamp``: Unix seconds of this attempt; receivers refuse old ones, so a
  captured delivery cannot be replayed later;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``.

The key is ``MORAG_WEBHOOK_SECRET``: a ``whsec_<base64>`` secret (what Standard Webhooks
libraries generate) is base64-decoded, any other value is used as its UTF-8 bytes. Without
a secret the webhook goes out unsigned, with ``webhook-id`` and ``webhook-timestamp`` and
no ``webhook-signature``; the API says so when it starts and every delivery logs it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import redis

from morag.config import STORE_QUEUE
from morag.job_record import TERMINAL, JobRecord, Webhook
from morag.jobs import WEBHOOK_OUTBOX, JobStore
from morag.metrics import parse_time

log = logging.getLogger("morag.webhooks")

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of Standard Webhooks secrets
SENT_TTL = 7 * 24 * 3600  # how long a delivery mark outlives the delivery
CLAIM_TTL = 60  # while one store worker POSTs; it expires if that worker dies mid-way
RESEND_AFTER = 300.0  # a published delivery message not done by then is published again
# Delivery marks (``morag:webhook:<task id>``), written by the store worker only:
SENDING = "sending"  # "sending:<owner>", for CLAIM_TTL, while one POSTs
DELIVERED, GAVE_UP, REFUSED, DROPPED = "delivered", "gave_up", "refused", "dropped"
FINAL_MARKS = frozenset({DELIVERED, GAVE_UP, REFUSED, DROPPED})
# Any other value was written by an older release's notify_end ("publishing", or the job's
# final status, meaning "published"): read as "not delivered yet".
UNSIGNED_NOTE = (
    "MORAG_WEBHOOK_SECRET is not set: webhooks are sent unsigned (no webhook-signature "
    "header), receivers cannot tell them from forgeries"
)


def secret_of(settings: Any) -> str | None:
    """MORAG_WEBHOOK_SECRET, or None when it is unset or empty (deliveries go unsigned)."""
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    return secret or None


def webhook_view(url: str, settings: Any) -> Webhook:
    """What a job says about its webhook: the URL, and whether deliveries are signed."""
    signed = secret_of(settings) is not None
    return Webhook(url=url, signed=signed, note=None if signed else UNSIGNED_NOTE)


def sent_key(task_id: str) -> str:
    return f"morag:webhook:{task_id}"


def message_id(task_id: str) -> str:
    return f"msg_{task_id}"


def secret_key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :] + "==", validate=False)
        except ValueError as exc:
            raise ValueError("MORAG_WEBHOOK_SECRET starts with whsec_ but is not base64") from exc
    return secret.encode()


def sign(msg_id: str, timestamp: int, body: bytes, secret: str) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    body: bytes, secret: str, headers: dict[str, str], tolerance: float = 300, now: float = 0
) -> bool:
    """What a receiver does (tests use the ``standardwebhooks`` package instead)."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp = lower.get(ID_HEADER, ""), lower.get(TIMESTAMP_HEADER, "")
    if not msg_id or not stamp.isdigit():
        return False
    if abs((now or time.time()) - int(stamp)) > tolerance:
        return False
    expected = sign(msg_id, int(stamp), body, secret)
    given = lower.get(SIGNATURE_HEADER, "").split(" ")
    return any(hmac.compare_digest(expected, sig) for sig in given)


def body_of(record: JobRecord) -> bytes:
    view = record.public().model_dump(mode="json")
    return json.dumps(view, sort_keys=True, separators=(",", ":")).encode()


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def publish(task_id: str) -> None:
    """Send the delivery message of an ended job to the store worker's queue."""
    from morag.celery_app import celery_app

    celery_app.send_task("morag.deliver_webhook", (task_id,), queue=STORE_QUEUE)


def notify_end(
    store: JobStore, record: JobRecord | None, *, resend_after: float = RESEND_AFTER
) -> bool:
    """The fast path, called by whoever ended the job once the end is written: publish the
    delivery message now. The webhook is already owed (its outbox entry was written with
    the end), so a failure here only delays it until the reconciler publishes it.
    True when published; the entry's next resend is then ``resend_after`` away."""
    if record is None or not record.webhook_url or record.status not in TERMINAL:
        return False
    try:
        publish(record.task_id)
    except Exception:  # a webhook must never fail the job or the worker
        log.warning(
            "could not publish the webhook of job %s now; it stays in %s and is sent later",
            record.task_id,
            WEBHOOK_OUTBOX,
            exc_info=True,
        )
        return False
    try:
        # Only an entry still owed (xx): a delivery that finished already is not re-added.
        store.webhook_published(record.task_id, time.time() + resend_after)
    except redis.RedisError:  # published; at worst the reconciler publishes it again
        log.warning("webhook of job %s published; its resend time stays", record.task_id)
    return True


def resend_due(store: JobStore, due: list[str], *, resend_after: float) -> int:
    """The reconciler: publish the delivery message of each owed webhook in ``due`` (its
    ender died before publishing, the broker refused, or the message was lost with a store
    worker). The next resend waits ``resend_after``, or as long as the job has been ended if
    that is longer: should a store worker of an older release deliver without marking, its
    repeats thin out instead of coming every ``resend_after``. An entry whose job is gone
    (expired) is dropped. The number published."""
    sent = 0
    now = time.time()
    for task_id in due:
        record = store.get(task_id)
        if record is None or not record.webhook_url:
            store.r.zrem(WEBHOOK_OUTBOX, task_id)
            continue
        ended = parse_time(record.updated_at) or now
        publish(task_id)
        store.r.zadd(WEBHOOK_OUTBOX, {task_id: now + max(resend_after, now - ended)}, xx=True)
        log.warning("webhook of job %s was owed and not delivered: published again", task_id)
        sent += 1
    return sent


def claim_delivery(client: redis.Redis, task_id: str, owner: str, *, hold: float) -> str:
    """The store worker is about to POST: "send" (the claim is its own for CLAIM_TTL),
    "done" (delivered or given up before: a duplicate message) or "busy" (another POSTs
    it now). ``hold``: seconds the outbox entry waits before a resend, should this
    worker die while it holds the claim."""
    key = sent_key(task_id)
    verdict = {"v": "send"}

    def txn(pipe: redis.client.Pipeline) -> None:
        mark = _text(pipe.get(key)) or ""
        pipe.multi()
        if mark in FINAL_MARKS:
            verdict["v"] = "done"
            pipe.zrem(WEBHOOK_OUTBOX, task_id)
        elif mark.startswith(SENDING):
            verdict["v"] = "busy"
        else:
            verdict["v"] = "send"
            pipe.set(key, f"{SENDING}:{owner}", ex=CLAIM_TTL)
            pipe.zadd(WEBHOOK_OUTBOX, {task_id: time.time() + max(hold, CLAIM_TTL)}, xx=True)

    client.transaction(txn, key)
    return verdict["v"]


def settle(client: redis.Redis, task_id: str, mark: str) -> None:
    """The webhook is done with (``mark``: delivered, gave_up, refused, dropped): marked,
    and out of the outbox, in one transaction."""
    pipe = client.pipeline()
    pipe.set(sent_key(task_id), mark, ex=SENT_TTL)
    pipe.zrem(WEBHOOK_OUTBOX, task_id)
    pipe.execute()


def release(client: redis.Redis, task_id: str, *, retry_at: float, hold: float) -> None:
    """A POST failed and is retried at ``retry_at``: the claim goes (the retry claims
    again) and the outbox waits ``hold`` past the retry before a resend."""
    pipe = client.pipeline()
    pipe.delete(sent_key(task_id))
    pipe.zadd(WEBHOOK_OUTBOX, {task_id: retry_at + hold}, xx=True)
    pipe.execute()


def headers_for(
    body: bytes, secret: str | None, *, msg_id: str, timestamp: int | None = None
) -> dict[str, Any]:
    stamp = int(time.time()) if timestamp is None else timestamp
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "MoRAG-webhook/2",
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(stamp),
    }
    if secret:
        headers[SIGNATURE_HEADER] = sign(msg_id, stamp, body, secret)
    return headers


def signed_headers(task_id: str, body: bytes, settings: Any) -> dict[str, Any]:
    """The headers of one delivery attempt (a fresh timestamp each time)."""
    secret = secret_of(settings)
    if secret is None:
        log.warning("webhook of job %s: %s", task_id, UNSIGNED_NOTE)
    return headers_for(body, secret, msg_id=message_id(task_id))
