"""A worker's liveness channel: a Redis Pub/Sub subscription that dies with the process.

A heartbeat key outlives a killed worker by up to one TTL. A subscription does not: when
the process dies (SIGKILL, the OOM killer, a crash in CUDA) the kernel closes its socket,
Redis drops the subscription within milliseconds, and ``PUBSUB NUMSUB`` of the channel
drops to 0. Readers (morag.fleet) count it; the heartbeat TTL stays for hosts that vanish
without closing their connections (power loss, partition).

The subscription is held by a thread of the worker's parent process. Pool children forked
later inherit the socket; each closes its copy at once (without a shutdown, which would end
the parent's session too), so a dead parent is not kept "alive" by its children.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import redis

from morag.redis_client import on_current_primary

log = logging.getLogger("morag.liveness")

PREFIX = "morag:alive:"
# How long a blocking read waits before it looks at the stop flag again.
_READ_TIMEOUT = 1.0
_RETRY_MAX = 1.0  # a Redis back from an outage gets the subscription within a second
PRIMARY_CHECK = 3.0  # seconds between asking Sentinel whether the primary moved


def channel(name: str, db: int = 0) -> str:
    """The liveness channel of the worker ``name`` (its Celery hostname) on database ``db``.

    Pub/Sub is server-wide, not per database: two deployments on one Redis (databases 0 and
    1) may both have a ``cpu0@host``, and must not keep each other's workers alive."""
    return f"{PREFIX}{db}:{name}"


class Subscription:
    """Keeps ``channel(name)`` subscribed, reconnecting after a Redis outage.

    ``live_channel()`` is the channel only while Redis confirmed the subscription: the
    heartbeat advertises it only then, so a reader never takes a worker whose subscription
    is not (yet) there for dead.

    ``client`` (morag.redis_client, its own: a subscribed connection takes no other command)
    should have keepalive and a periodic PING, so that a Redis host that vanished is noticed
    and the subscription made again on the next one. With Sentinel the subscription also
    moves to a new primary within ``PRIMARY_CHECK`` seconds of a failover, even when the old
    one froze without closing its connections (readers count subscribers on the new one)."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.client = client
        self.channel = channel(
            name, int(self.client.connection_pool.connection_kwargs.get("db") or 0)
        )
        self._pubsub: redis.client.PubSub | None = None
        self._subscribed = threading.Event()
        self._refused = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="morag-liveness", daemon=True)

    def start(self, wait: float = 5.0) -> None:
        """Subscribe, and wait up to ``wait`` seconds for Redis to confirm it."""
        os.register_at_fork(after_in_child=self._close_in_child)
        self._thread.start()
        self._subscribed.wait(wait)

    def stop(self) -> None:
        self._stopped.set()

    def live_channel(self) -> str | None:
        return self.channel if self._subscribed.is_set() else None

    def _run(self) -> None:
        delay = 0.1
        while not self._stopped.is_set():
            try:
                self._listen()
                return
            except redis.exceptions.NoPermissionError as exc:
                # The Redis role predates liveness channels: the heartbeat TTL alone says.
                self._subscribed.clear()
                if not self._refused:
                    log.warning(
                        "liveness channel %s refused (%s): a death of this worker is noticed "
                        "by its heartbeat TTL only; update the redis role's ACL",
                        self.channel,
                        exc,
                    )
                self._refused = True
            except (redis.RedisError, OSError) as exc:
                if self._subscribed.is_set():
                    log.warning("liveness channel %s lost: %s", self.channel, exc)
                    delay = 0.1  # it worked until now: try again at once
                self._subscribed.clear()
            self._drop()
            self._stopped.wait(delay)
            delay = min(_RETRY_MAX, delay * 2)

    def _listen(self) -> None:
        pubsub = self.client.pubsub()
        self._pubsub = pubsub
        pubsub.subscribe(self.channel)
        next_check = time.monotonic() + PRIMARY_CHECK
        while not self._stopped.is_set():
            message = pubsub.get_message(timeout=_READ_TIMEOUT)
            if message is not None and message.get("type") == "subscribe":
                self._subscribed.set()  # Redis confirmed it (also after a reconnect)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + PRIMARY_CHECK
                if not on_current_primary(self.client, pubsub.connection):
                    raise redis.ConnectionError("Sentinel names another primary now")
        self._drop()

    def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()

    def _close_in_child(self) -> None:
        # In a forked pool child: close this process's copy of the socket only. redis-py
        # skips the shutdown() in a process other than the one that connected.
        pubsub = self._pubsub
        connection = pubsub.connection if pubsub is not None else None
        if connection is not None:
            with contextlib.suppress(Exception):  # never break a fork over this
                connection.disconnect()
        self._pubsub = None
