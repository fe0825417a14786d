"""How every MoRAG process reaches Redis: the one place Redis clients and the broker URL are
built from the settings.

Without Sentinel (``MORAG_REDIS_SENTINELS`` empty) a client is ``MORAG_REDIS_URL`` as it
stands. With Sentinel, the URL still gives the scheme (``rediss``: TLS), user, password,
database and TLS options (``ssl_ca_certs``, ``ssl_cert_reqs``), and the primary's address is
asked of the Sentinels (``redis.sentinel``): a connection made after a failover goes to the
new primary, and one that finds a demoted primary (READONLY) is dropped and made again. The
Sentinels are reached with the same TLS options and their own ACL user
(``MORAG_REDIS_SENTINEL_USERNAME``/``_PASSWORD``). Celery reaches them through kombu's
Sentinel transport (``broker_settings``).

A client of a Sentinel-found primary also gets a socket timeout and a retry that lasts
``MORAG_REDIS_FAILOVER_SECONDS`` (unless the caller sets them): a primary that froze
without closing its connections (a hung host, a partition) would otherwise hold a command
forever while Sentinel promotes a replica, and the command that found the old primary gone
is sent again, until the Sentinels name the new one (a count of retries would end sooner or
later than the failover, depending on what each try costs: a timeout, a refused connect). Pub/Sub
subscribers check ``on_current_primary`` now and then for the same reason: a subscribed
connection waits for messages, and a frozen old primary sends none and no error either.

Every client carries a :class:`RedisHealth` (``redis_health``): its connections count the
connects, sends and reads that failed, and record the address they reached, so a change of
primary is seen (and logged) by the client that meets it. The API exports its own client's
(morag.metrics_export, docs/ha.md).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.client import Pipeline
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection, parse_url
from redis.retry import Retry
from redis.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from morag.config import Settings

log = logging.getLogger("morag.redis_client")

# Seconds a command may wait on a Sentinel-found primary before its connection is dropped
# and made again (to the primary the Sentinels name then), when the caller sets none.
SENTINEL_SOCKET_TIMEOUT = 5.0
# Connecting to it: a LAN host answers in milliseconds, TLS included; one that is gone (its
# address no longer answers ARP) fails in about 3 s.
SENTINEL_CONNECT_TIMEOUT = 3.0
# Connections to the Sentinels themselves: a Sentinel that does not answer is skipped.
SENTINEL_QUERY_TIMEOUT = 2.0
# kombu's checks of its BRPOP and pub/sub connections, seconds (morag.celery_app); with
# Sentinel shorter than without, so a consumer left on a frozen old primary moves within
# about 1 + 2 x this (celery#6348).
SENTINEL_BROKER_HEALTH_CHECK = 5

# Error codes Redis answers while it cannot take writes for a while: memory full under
# noeviction (OOM), a replica (READONLY), a failed snapshot (MISCONF), a busy script (BUSY),
# a failover (MASTERDOWN, NOREPLICAS, TRYAGAIN, CLUSTERDOWN). Waited out like an outage.
WRITE_REFUSALS = frozenset(
    {"OOM", "READONLY", "MISCONF", "BUSY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN"}
)


def redis_reason(exc: redis.RedisError) -> str:
    """What Redis answered, without redis-py's pipeline prefix (it quotes the command,
    which may be a job record)."""
    text = str(exc).rpartition("caused error: ")[2]
    code = exc.status_code
    return f"{code} {text}" if code and not text.startswith(code) else text


def passing_outage(exc: BaseException) -> str | None:
    """Why Redis did not take the command, when it is to be waited out (unreachable, or
    refusing writes for now); None for anything else (a missing permission, a bug)."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return f"Redis unavailable ({exc})"
    if isinstance(exc, redis.ResponseError):
        reason = redis_reason(exc)
        if reason.split(" ", 1)[0] in WRITE_REFUSALS:
            return f"Redis refuses writes ({reason})"
    return None


_SSL_CERT_REQS = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


def _url_options(settings: Settings) -> dict[str, Any]:
    """MORAG_REDIS_URL's connection options, without its address (the Sentinels give it)."""
    options = parse_url(settings.redis_url.get_secret_value())
    options.pop("host", None)
    options.pop("port", None)
    tls = options.pop("connection_class", None) is redis.SSLConnection
    if tls:
        options["ssl"] = True
    return options


def _tls_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k == "ssl" or k.startswith("ssl_")}


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection options of the Sentinels: their ACL user, MORAG_REDIS_URL's TLS options."""
    kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_QUERY_TIMEOUT,
        "socket_connect_timeout": SENTINEL_QUERY_TIMEOUT,
        # Asked once: the next Sentinel is asked instead. redis-py's default (three retries,
        # backoff up to 10 s) held every lookup about 15 s on a Sentinel whose host was gone
        # (the primary's, in a failover) before the next one was asked.
        "retry": Retry(NoBackoff(), 0),
        **_tls_options(_url_options(settings)),
    }
    password = settings.redis_sentinel_password
    if settings.redis_sentinel_username:
        kwargs["username"] = settings.redis_sentinel_username
    if password is not None and password.get_secret_value():
        kwargs["password"] = password.get_secret_value()
    return kwargs


# -- what a client's connections met --------------------------------------------------------

ERROR_KINDS = ("connection", "timeout")


class RedisHealth:
    """Failed connects, sends and reads of one client's connections, by kind (ERROR_KINDS),
    and the address they last reached: a new one is a change of primary (with Sentinel)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.primary: str | None = None
        self.primary_changes = 0

    def failed(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def reached(self, address: str) -> None:
        with self._lock:
            before, self.primary = self.primary, address
            if before is None or before == address:
                return
            self.primary_changes += 1
        log.warning("Redis primary changed: %s -> %s", before, address)


class _Watched:
    """A connection that reports to its client's RedisHealth (the ``health`` option)."""

    _watching = False  # inside a watched call: a nested one (a connect in a send) counts once

    def __init__(self, *args: Any, health: RedisHealth | None = None, **kwargs: Any) -> None:
        self.health = health
        super().__init__(*args, **kwargs)

    def _watch(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._watching or self.health is None:
            return call(*args, **kwargs)
        self._watching, fresh = True, getattr(self, "_sock", None) is None
        try:
            result = call(*args, **kwargs)
        except redis.TimeoutError:
            self.health.failed("timeout")
            raise
        except redis.ConnectionError:  # refused, reset, READONLY of a demoted primary, no primary
            self.health.failed("connection")
            raise
        finally:
            self._watching = False
        if fresh and getattr(self, "_sock", None) is not None:
            path = getattr(self, "path", None)
            self.health.reached(str(path) if path else f"{self.host}:{self.port}")  # type: ignore[attr-defined]
        return result

    def connect(self) -> Any:
        return self._watch(super().connect)  # type: ignore[misc]

    def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        return self._watch(super().connect_check_health, *args, **kwargs)  # type: ignore[misc]

    def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
        return self._watch(super().send_packed_command, *args, **kwargs)  # type: ignore[misc]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        return self._watch(super().read_response, *args, **kwargs)  # type: ignore[misc]


class _PlainConnection(_Watched, Connection):
    pass


class _PlainSSLConnection(_Watched, SSLConnection):
    pass


class _UnixConnection(_Watched, UnixDomainSocketConnection):
    pass


_PLAIN_CLASSES = {"rediss": _PlainSSLConnection, "unix": _UnixConnection}


def redis_health(client: redis.Redis) -> RedisHealth | None:
    """What ``client``'s connections met (None for a client redis_client did not build)."""
    return client.connection_pool.connection_kwargs.get("health")


def refresh_primary(client: redis.Redis) -> None:
    """With Sentinel, ask the Sentinels for ``client``'s primary now (its health records a
    change; idle connections to the old one are dropped). Nothing without Sentinel or when
    no Sentinel answers."""
    pool = client.connection_pool
    health = redis_health(client)
    if not isinstance(pool, SentinelConnectionPool) or health is None:
        return
    try:
        host, port = pool.get_master_address()
    except redis.ConnectionError:
        return
    health.reached(f"{host}:{port}")


class _FollowingConnection:
    """redis-py's Sentinel-managed connection asks the Sentinels for the primary when the
    pool hands it out, but a command retried on the same connection (a timeout, a reset,
    READONLY from a demoted primary) reconnected to the address it had: a frozen old primary
    again. Here any reconnect asks the Sentinels first."""

    _addressed = False  # inside connect_to: the address was just asked for

    def connect_to(self, address: Any) -> None:
        self._addressed = True
        try:
            super().connect_to(address)
        finally:
            self._addressed = False

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True):
        if getattr(self, "_sock", None) is not None or self._addressed:
            return super().connect_check_health(check_health, retry_socket_connect)
        return self.connect()


class _Connection(_Watched, _FollowingConnection, SentinelManagedConnection):
    pass


class _SSLConnection(_Watched, _FollowingConnection, SentinelManagedSSLConnection):
    pass


class FailoverRetry(Retry):
    """Sends a command again after connection errors and timeouts until ``seconds`` have
    passed since its first failure: a deadline, not a count of tries."""

    def __init__(self, seconds: float) -> None:
        super().__init__(ExponentialWithJitterBackoff(base=0.25, cap=1.0), -1)
        self.seconds = seconds

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        deadline: float | None = None
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                now = time.monotonic()
                deadline = deadline or now + self.seconds
                pause = self._backoff.compute(failures)
                if now + pause >= deadline:
                    raise error
                time.sleep(pause)


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client of the Redis primary; ``kwargs`` are redis-py connection options
    (socket_timeout, health_check_interval, ...)."""
    kwargs.setdefault("health", RedisHealth())
    if not settings.redis_sentinels:
        url = settings.redis_url.get_secret_value()
        kwargs.setdefault(
            "connection_class", _PLAIN_CLASSES.get(urlsplit(url).scheme, _PlainConnection)
        )
        return redis.Redis.from_url(url, **kwargs)
    kwargs.setdefault("socket_timeout", SENTINEL_SOCKET_TIMEOUT)
    kwargs.setdefault("socket_connect_timeout", SENTINEL_CONNECT_TIMEOUT)
    # A command that met the old primary (connection refused or reset, READONLY, timed out)
    # is sent again, on a connection to the primary the Sentinels name by then.
    kwargs.setdefault("retry", FailoverRetry(settings.redis_failover_seconds))
    options = _url_options(settings)
    options["connection_class"] = _SSLConnection if options.pop("ssl", False) else _Connection
    sentinel = Sentinel(
        settings.sentinel_addresses(), sentinel_kwargs=sentinel_kwargs(settings), **options
    )
    return sentinel.master_for(settings.redis_sentinel_master, **kwargs)


def on_current_primary(client: redis.Redis, connection: Any) -> bool:
    """Whether ``connection`` (of ``client``'s pool, e.g. a PubSub's) still talks to the
    primary the Sentinels name; always True without Sentinel. Asks a Sentinel: call it
    every few seconds, not per command. A Sentinel error counts as True (nothing to act on)."""
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool) or connection is None:
        return True
    if getattr(connection, "_sock", None) is None:
        return True  # not connected: its next connect asks the Sentinels anyway
    try:
        address = pool.get_master_address()
    except redis.ConnectionError:
        return True
    return (connection.host, int(connection.port)) == (address[0], int(address[1]))


def broker_settings(settings: Settings) -> dict[str, Any]:
    """Celery's broker_url, broker_transport_options (Sentinel's only: the caller adds its
    own) and broker_use_ssl, for kombu's Redis transport or, with Sentinel, its Sentinel
    transport (``sentinel://`` URLs, one per Sentinel, each with the user, password and
    database: kombu takes them from whichever Sentinel it connects through)."""
    url = settings.redis_url.get_secret_value()
    if not settings.redis_sentinels:
        # kombu picks TLS by the URL scheme only for its own transport names: rediss://
        # with no ssl_* options verifies the server, as redis-py does for the other clients.
        bare_rediss = urlsplit(url).scheme == "rediss" and "ssl_" not in urlsplit(url).query
        return {
            "broker_url": url,
            "broker_transport_options": {},
            **({"broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED}} if bare_rediss else {}),
        }
    parts = urlsplit(url)
    options = _url_options(settings)
    auth = ""
    if parts.username or parts.password:
        user = quote(unquote(parts.username or ""), safe="")
        auth = f"{user}:{quote(unquote(parts.password or ''), safe='')}@"
    db = int(options.get("db") or 0)
    broker_url = ";".join(
        f"sentinel://{auth}{f'[{host}]' if ':' in host else host}:{port}/{db}"
        for host, port in settings.sentinel_addresses()
    )
    result: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_transport_options": {
            "master_name": settings.redis_sentinel_master,
            "sentinel_kwargs": sentinel_kwargs(settings),
            "socket_timeout": SENTINEL_SOCKET_TIMEOUT,
            "health_check_interval": SENTINEL_BROKER_HEALTH_CHECK,
        },
    }
    tls = _tls_options(options)
    if tls.pop("ssl", False):
        reqs = tls.get("ssl_cert_reqs", "required")
        tls["ssl_cert_reqs"] = _SSL_CERT_REQS.get(reqs, reqs) if isinstance(reqs, str) else reqs
        result["broker_use_ssl"] = tls
    return result


# -- WAIT: a transaction acknowledged by replicas -------------------------------------------


class _WaitingPipeline(Pipeline):
    """A MULTI/EXEC pipeline that, right after a successful EXEC and on the same connection
    (WAIT counts the writes of its own connection), waits for ``replicas`` replicas to
    acknowledge it for at most ``timeout_ms``. ``acked``: how many did; ``error``: why WAIT
    itself failed (then ``acked`` is 0)."""

    def __init__(self, client: redis.Redis, replicas: int, timeout_ms: int) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, True, None)
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.acked = 0
        self.error: str | None = None

    def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        response = super()._execute_transaction(connection, commands, raise_on_error)
        if commands:
            try:
                connection.send_command("WAIT", self.replicas, self.timeout_ms)
                # The reply comes after the timeout at the latest; a margin for a busy server.
                self.acked = int(connection.read_response(timeout=self.timeout_ms / 1000 + 5))
            except (redis.RedisError, OSError) as exc:
                # Never retried with the transaction: it is applied; only its copies are unknown.
                self.acked, self.error = 0, f"{type(exc).__name__}: {exc}"
        return response


def replicated_transaction(
    client: redis.Redis,
    func: Callable[[Pipeline], None],
    *watches: str,
    replicas: int,
    timeout_ms: int,
) -> tuple[int, str | None]:
    """``client.transaction(func, *watches)``, then ``WAIT replicas timeout_ms`` on the
    connection that ran it: (how many replicas acknowledged it, why WAIT failed or None).
    An EXEC with nothing queued waits for nothing: (replicas, None)."""
    with _WaitingPipeline(client, replicas, timeout_ms) as pipe:
        while True:
            try:
                if watches:
                    pipe.watch(*watches)
                func(pipe)
                pipe.acked, pipe.error = replicas, None  # unless an EXEC with commands says
                pipe.execute()
                return pipe.acked, pipe.error
            except redis.WatchError:
                continue
