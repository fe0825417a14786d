"""Job ends announced on Redis Pub/Sub, so that a request waiting for a job wakes at once.

Whoever ends a job (a worker, the store worker, the API cancelling it, the watchdog) writes
the end in its transaction (morag.jobs) and then PUBLISHes the job id on
``morag:ended:<db>``. The API holds one subscription per process (``EndListener``, a
thread) and wakes the requests waiting for that id (``/process/*``, the status long-poll,
``/v1/audio/*``), which read the record again. Without it they polled with a back-off up to
0.5 s, a quarter second lost per job on average.

A hint, never the truth: the record is read after each wake-up, and a waiter still reads it
every ``MORAG_JOB_WAIT_POLL`` seconds, so a lost announcement (published outside the
transaction, a Redis restart between the end and the publish, a Redis role from before this
channel that refuses PUBLISH or SUBSCRIBE) costs at most that, never the answer. While the
subscription is not confirmed waiters poll as they did before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis

from morag.redis_client import on_current_primary

log = logging.getLogger("morag.job_events")

PREFIX = "morag:ended:"
_READ_TIMEOUT = 1.0  # how long a blocking read waits before it looks at the stop flag
_RETRY_MAX = 2.0
PRIMARY_CHECK = 3.0  # seconds between asking Sentinel whether the primary moved
# The listener's own client: keepalive and a PING every 30 s on an idle connection.
CLIENT_OPTIONS = {"socket_keepalive": True, "health_check_interval": 30}
_refusal_logged_until = [0.0]  # monotonic time before which a PUBLISH refusal is not logged


def channel(db: int = 0) -> str:
    """The end channel of database ``db`` (Pub/Sub is server-wide, not per database)."""
    return f"{PREFIX}{db}"


def _db(client: redis.Redis) -> int:
    return int(client.connection_pool.connection_kwargs.get("db") or 0)


def announce_end(client: redis.Redis, task_id: str) -> None:
    """PUBLISH the end of ``task_id``; never raises (the end is already written)."""
    try:
        client.publish(channel(_db(client)), task_id)
    except redis.exceptions.NoPermissionError as exc:
        now = time.monotonic()
        if now >= _refusal_logged_until[0]:  # once a minute, not at every job
            _refusal_logged_until[0] = now + 60
            log.warning(
                "PUBLISH on %s refused (%s): waiting requests notice job ends by polling "
                "(MORAG_JOB_WAIT_POLL); update the redis role's ACL",
                channel(_db(client)),
                exc,
            )
    except (redis.RedisError, OSError) as exc:
        log.debug("end of job %s not announced: %s", task_id, exc)


@dataclass(eq=False)
class Waiter:
    """One waiting request: its event loop and the event the listener sets."""

    loop: asyncio.AbstractEventLoop
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        self.loop.call_soon_threadsafe(self.event.set)


class EndListener:
    """The API process's subscription to ``channel(db)``, and the requests waiting on it."""

    def __init__(self, client: redis.Redis) -> None:
        # Its own client (a subscribed connection takes no other command), as the API's
        # Redis user; keepalive and a periodic PING (``CLIENT_OPTIONS``) notice a Redis host
        # that vanished, and with Sentinel a check every PRIMARY_CHECK seconds a failover.
        self.client = client
        self.channel = channel(_db(self.client))
        self._waiters: dict[str, set[Waiter]] = {}
        self._lock = threading.Lock()
        self._live = threading.Event()
        self._stopped = threading.Event()
        self._refused = False
        self._thread = threading.Thread(target=self._run, name="morag-job-ends", daemon=True)

    @property
    def live(self) -> bool:
        """Redis confirmed the subscription: an end published from now on wakes its waiters."""
        return self._live.is_set()

    def start(self, wait: float = 2.0) -> None:
        self._thread.start()
        self._live.wait(wait)

    def stop(self) -> None:
        self._stopped.set()

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[Waiter]:
        """Register before reading the record: an end published after the read wakes it."""
        waiter = Waiter(asyncio.get_running_loop())
        with self._lock:
            self._waiters.setdefault(task_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            with self._lock:
                waiters = self._waiters.get(task_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[task_id]

    def waiting(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._waiters.values())

    def _wake(self, task_id: str | None) -> None:
        """The waiters of ``task_id``; all of them for None (ends may have been missed)."""
        with self._lock:
            if task_id is None:
                targets = [w for ws in self._waiters.values() for w in ws]
            else:
                targets = list(self._waiters.get(task_id, ()))
        for waiter in targets:
            with contextlib.suppress(RuntimeError):  # its loop closed: the request is gone
                waiter.wake()

    def _run(self) -> None:
        delay = 0.1
        while not self._stopped.is_set():
            try:
                self._listen()
                return
            except redis.exceptions.NoPermissionError as exc:
                if not self._refused:
                    log.warning(
                        "SUBSCRIBE %s refused (%s): waiting requests poll job records every "
                        "MORAG_JOB_WAIT_POLL seconds; update the redis role's ACL",
                        self.channel,
                        exc,
                    )
                self._refused = True
            except (redis.RedisError, OSError) as exc:
                if self._live.is_set():
                    log.warning("job end channel %s lost: %s", self.channel, exc)
                    delay = 0.1
            self._live.clear()
            self._stopped.wait(delay)
            delay = min(_RETRY_MAX, delay * 2)

    def _listen(self) -> None:
        pubsub = self.client.pubsub()
        try:
            pubsub.subscribe(self.channel)
            next_check = time.monotonic() + PRIMARY_CHECK
            while not self._stopped.is_set():
                message = pubsub.get_message(timeout=_READ_TIMEOUT)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + PRIMARY_CHECK
                    if not on_current_primary(self.client, pubsub.connection):
                        raise redis.ConnectionError("Sentinel names another primary now")
                if message is None:
                    continue
                if message.get("type") == "subscribe":
                    self._live.set()
                    self._wake(None)  # ends announced while not subscribed were missed
                elif message.get("type") == "message":
                    data = message.get("data")
                    self._wake(data.decode() if isinstance(data, bytes) else str(data))
        finally:
            self._live.clear()
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()
