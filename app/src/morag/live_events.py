"""Live events of a running job: what the worker has transcribed so far, and its progress.

The worker that runs an attempt appends each finished segment (``text``, ``start``, ``end``)
and its progress to a Redis Stream per job, ``morag:events:<task_id>`` (XADD, capped with
``MAXLEN ~ MORAG_LIVE_EVENTS_MAX``, expiring ``MORAG_LIVE_EVENTS_TTL`` after the last
event). The API reads it with XREAD from the last id it sent, for the SSE routes
(``/v1/audio/transcriptions`` with ``stream=true``, ``/api/v1/status/{id}/events``).

A Stream, not Pub/Sub: a reader that connects late (the native route is opened after the
submission) or reconnects (``Last-Event-ID``) gets what it missed; readers hold no
subscribed connection (the API polls with XREAD, like its long-poll of the job record);
an event the worker wrote while no one listened is not lost. The job record stays the
truth (state, route, result); these events are a preview and may be cut by the cap.

Each entry names its attempt (1, 2, ...: the job's attempts list): after a GPU failure
the CPU attempt transcribes the file again, and a reader tells its segments from the
first attempt's.

ACL: the worker user may only XADD and EXPIRE these keys (a selector of
``redis_acl_worker_selectors``); the API user reads them with XREAD.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger("morag.live_events")

SEGMENT = "segment"
PROGRESS = "progress"


def events_key(task_id: str) -> str:
    return f"morag:events:{task_id}"


class Publisher:
    """The worker's side, for one attempt of one job. Never raises: a lost event costs a
    live preview, never the job (the result goes to the job record)."""

    def __init__(
        self, client: redis.Redis, task_id: str, attempt: int, *, ttl: int, max_len: int
    ) -> None:
        self._client = client
        self._key = events_key(task_id)
        self._attempt = attempt
        self._ttl = ttl
        self._max_len = max_len
        self._warned = False

    def _add(self, kind: str, data: dict[str, Any]) -> None:
        fields = {"type": kind, "attempt": self._attempt, "data": json.dumps(data)}
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.xadd(self._key, fields, maxlen=self._max_len, approximate=True)  # type: ignore[arg-type]
            pipe.expire(self._key, self._ttl)
            pipe.execute()
        except redis.RedisError as exc:
            if not self._warned:  # once per attempt: a Redis outage would flood the log
                log.warning("live events of %s not published (%s)", self._key, exc)
                self._warned = True

    def segment(self, segment: dict[str, Any]) -> None:
        """A finished segment: only what a live reader needs (words and scores stay in the
        result)."""
        self._add(
            SEGMENT,
            {
                "start": segment.get("start"),
                "end": segment.get("end"),
                "text": segment.get("text", ""),
            },
        )

    def progress(self, fraction: float) -> None:
        self._add(PROGRESS, {"progress": round(min(max(fraction, 0.0), 1.0), 3)})


@dataclass(frozen=True)
class LiveEvent:
    id: str  # the Stream entry id, the SSE ``id``
    type: str  # segment or progress
    attempt: int
    data: dict[str, Any]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_after(client: redis.Redis, task_id: str, after: str, count: int = 1000) -> list[LiveEvent]:
    """The events after entry id ``after`` (``0`` for all); at most ``count``. Entries that
    cannot be read (not written by a Publisher) are skipped."""
    answer = client.xread({events_key(task_id): after}, count=count)
    return list(_parse(answer))


def _parse(answer: Any) -> Iterator[LiveEvent]:
    streams = answer.items() if isinstance(answer, dict) else answer or []  # RESP3 / RESP2
    for _key, entries in streams:
        for entry_id, fields in entries:
            f = {_text(k): _text(v) for k, v in fields.items()}
            try:
                yield LiveEvent(
                    _text(entry_id), f["type"], int(f["attempt"]), json.loads(f["data"])
                )
            except (KeyError, ValueError):
                continue


def valid_event_id(value: str | None) -> bool:
    """A Stream entry id (``<ms>-<seq>``) as a reconnecting client sends it back in
    ``Last-Event-ID``."""
    if not value:
        return False
    ms, _, seq = value.partition("-")
    return ms.isdigit() and seq.isdigit() and len(value) <= 41


def sse(data: dict[str, Any], *, event: str | None = None, event_id: str | None = None) -> str:
    """One Server-Sent Event (data on one line: JSON has no raw newlines)."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"


KEEPALIVE = ": keepalive\n\n"  # an SSE comment: readers ignore it, proxies see traffic
