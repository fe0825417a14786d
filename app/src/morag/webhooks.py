"""Webhooks: when a job with a ``webhook_url`` ends, its final status is POSTed once.

The POST runs as a Celery task on the server's ``morag-store`` queue (retried with
exponential backoff), never inside the worker that ran the job. The body is the job's
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

log = logging.getLogger("morag.webhooks")

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of Standard Webhooks secrets
SENT_TTL = 7 * 24 * 3600
CLAIM_TTL = 60  # while one caller publishes; it expires if that caller dies mid-way
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


def notify_end(client: redis.Redis, record: JobRecord | None) -> bool:
    """Queue the webhook for an ended job, once per job (whoever ends it calls this).

    The job is marked as notified only once the message was published: a broker error
    leaves it unmarked (and logged) instead of losing the webhook behind a mark."""
    if record is None or not record.webhook_url or record.status not in TERMINAL:
        return False
    key = sent_key(record.task_id)
    try:
        if not client.set(key, "publishing", nx=True, ex=CLAIM_TTL):
            return False  # sent already, or another caller is publishing it now
    except Exception:  # a webhook must never fail the job or the worker
        log.exception("could not queue the webhook of job %s", record.task_id)
        return False
    try:
        from morag.celery_app import celery_app

        celery_app.send_task("morag.deliver_webhook", (record.task_id,), queue=STORE_QUEUE)
    except Exception:
        log.exception("could not queue the webhook of job %s", record.task_id)
        try:
            client.delete(key)  # not published: a later call may try again
        except Exception:
            log.exception("could not release the webhook claim of job %s", record.task_id)
        return False
    try:
        client.set(key, record.status.value, ex=SENT_TTL)
    except Exception:  # published; the claim expiring could at worst repeat the same id
        log.exception("could not mark the webhook of job %s as queued", record.task_id)
    return True


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
