"""The API's requests to the store worker (search, delete), authenticated by Redis' ACL.

A Celery message on ``morag-store`` can be sent by any credential that may push to that
queue, the GPU/CPU workers' included, so a message alone proves nothing. The API therefore
writes the operation under ``morag:vector-request:<id>``, a key only the API and the store
worker may touch (roles/redis), and the message carries nothing but the id. The store worker
takes the request (GET and DEL in one transaction) and runs only what it found: a forged
message finds nothing, a replayed one finds the request already taken, and one that waited
past ``MORAG_SEARCH_TIMEOUT`` (the API gave up and answered 503) finds it expired.
"""

from __future__ import annotations

import json
from typing import Any

import redis

PREFIX = "morag:vector-request:"


def request_key(request_id: str) -> str:
    return PREFIX + request_id


def put(client: redis.Redis, request_id: str, op: str, params: dict[str, Any], ttl: float) -> None:
    """Record the API's request before its message is sent; it lives as long as the API waits."""
    body = json.dumps({"op": op, "params": params})
    client.set(request_key(request_id), body, px=max(1, int(ttl * 1000)))


def take(client: redis.Redis, request_id: str) -> tuple[str, dict[str, Any]] | None:
    """The request the API recorded under ``request_id``, removed so it runs once; None if
    there is none (forged, replayed or expired)."""
    pipe = client.pipeline(transaction=True)
    pipe.get(request_key(request_id))
    pipe.delete(request_key(request_id))
    raw, _ = pipe.execute()
    if raw is None:
        return None
    body = json.loads(raw)
    return str(body["op"]), dict(body["params"])
