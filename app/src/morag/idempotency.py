"""``Idempotency-Key``: a submission retried with the same key answers the first one's job.

A client that got no answer (a timeout, a dropped connection, a 503) cannot know whether its
job was created. With this header it sends the same request again: the first request's job
(or batch) comes back instead of a second one. The key is remembered per API key, for
MORAG_IDEMPOTENCY_TTL seconds, in Redis (``morag:idempotency:<client>:<key>``), written in the
same MULTI/EXEC as the job records, so two concurrent requests with one key create one job.
The same key with a different request is refused (422), as payment APIs do.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

HEADER = "Idempotency-Key"
MAX_LENGTH = 255
PREFIX = "morag:idempotency:"
# The entry's states: the first request is still sending the job's messages, or it answered.
SENDING, ACCEPTED = "sending", "accepted"


class KeyRefused(ValueError):
    """The header cannot be used, or names another request: ``status`` and ``code`` to answer."""

    def __init__(self, status: int, detail: str, code: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_key(raw: str) -> str:
    """The header's value, if usable: 1 to 255 visible ASCII characters."""
    key = raw.strip()
    if not key or len(key) > MAX_LENGTH or not all(33 <= ord(ch) < 127 for ch in key):
        raise KeyRefused(
            422,
            f"{HEADER} must be 1 to {MAX_LENGTH} visible ASCII characters (a UUID is typical)",
            "invalid_idempotency_key",
        )
    return key


@dataclass(frozen=True)
class Idempotency:
    """One request's key: where it is kept, and what the request was (its fingerprint)."""

    redis_key: str
    fingerprint: str
    ttl: int

    @classmethod
    def of(cls, client_key: str, key: str, route: str, request: Any, ttl: int) -> Idempotency:
        """``client_key``: the API key that authenticated the request (keys are per client;
        only its digest is kept). ``request``: what the job is made of (JSON-able)."""
        scope = _digest(f"morag-idempotency:{client_key}")[:32]
        body = json.dumps([route, request], sort_keys=True, separators=(",", ":"), default=str)
        return cls(f"{PREFIX}{scope}:{_digest(key)}", _digest(body), ttl)

    def entry(self, task_ids: list[str], batch_id: str | None, state: str = SENDING) -> str:
        return json.dumps(
            {
                "fingerprint": self.fingerprint,
                "task_ids": task_ids,
                "batch_id": batch_id,
                "state": state,
                "at": time.time(),
            }
        )


@dataclass(frozen=True)
class Earlier:
    """What a key already names: the first request's jobs (and batch), and its state."""

    task_ids: list[str]
    batch_id: str | None
    state: str
    at: float


def earlier(raw: bytes | str, idem: Idempotency) -> Earlier:
    """The stored entry of ``idem``'s key; KeyRefused when another request used the key."""
    value = json.loads(raw)
    if value.get("fingerprint") != idem.fingerprint:
        raise KeyRefused(
            422,
            f"this {HEADER} was used with a different request (another route, file or "
            "parameters); use a new key for a new request",
            "idempotency_key_reused",
        )
    return Earlier(
        task_ids=list(value["task_ids"]),
        batch_id=value.get("batch_id"),
        state=str(value.get("state", ACCEPTED)),
        at=float(value.get("at", 0.0)),
    )
