"""Webhooks: when a job with a ``webhook_url`` ends, its final status is POSTed once.

The POST runs as a Celery task on the server's ``morag-store`` queue (retried with
exponential backoff), never inside the worker that ran the job. The body is the job's
public view as JSON; ``X-MoRAG-Signature: sha256=<hex>`` is the HMAC-SHA256 of the exact
body bytes with ``MORAG_WEBHOOK_SECRET``, so receivers can verify it came from MoRAG.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any

import redis

from morag.config import STORE_QUEUE
from morag.jobs import TERMINAL, Record

log = logging.getLogger("morag.webhooks")

SIGNATURE_HEADER = "X-MoRAG-Signature"
SENT_TTL = 7 * 24 * 3600


def sent_key(task_id: str) -> str:
    return f"morag:webhook:{task_id}"


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str) -> bool:
    """What a receiver does: recompute the signature and compare in constant time."""
    return hmac.compare_digest(sign(body, secret), header)


def body_of(record: Record) -> bytes:
    from morag.jobs import public_view

    return json.dumps(public_view(record), sort_keys=True, separators=(",", ":")).encode()


def notify_end(client: redis.Redis, record: Record | None) -> bool:
    """Queue the webhook for an ended job, once per job (whoever ends it calls this)."""
    if not record or not record.get("webhook_url") or record["status"] not in TERMINAL:
        return False
    try:
        if not client.set(sent_key(record["task_id"]), record["status"], nx=True, ex=SENT_TTL):
            return False
        from morag.worker import celery_app

        celery_app.send_task("morag.deliver_webhook", (record["task_id"],), queue=STORE_QUEUE)
    except Exception:  # a webhook must never fail the job or the worker
        log.exception("could not queue the webhook of job %s", record["task_id"])
        return False
    return True


def headers_for(body: bytes, secret: str | None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", "User-Agent": "MoRAG-webhook/1"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    return headers
