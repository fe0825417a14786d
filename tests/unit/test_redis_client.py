"""Redis Sentinel settings and what morag.redis_client builds from them, without connecting:
the variables and their refusals, the clients' pools, and Celery's broker URL and options
(kombu's Sentinel transport). Failover on real processes: tests/integration/test_sentinel.py."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import redis
from celery import Celery
from morag import broker
from morag.celery_app import celery_config
from morag.config import Settings
from morag.redis_client import (
    SENTINEL_SOCKET_TIMEOUT,
    broker_settings,
    on_current_primary,
    redis_client,
    sentinel_kwargs,
)
from pydantic import ValidationError
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

TLS_URL = "rediss://morag-api:s3cret@ignored:6380/3?ssl_cert_reqs=required&ssl_ca_certs=/ca.crt"
SENTINELS = "10.0.0.5:26379, 10.0.0.6:26380,[fd00::7]:26379"


def _sentinel_settings(**extra: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": TLS_URL,
        "redis_sentinels": SENTINELS,
        "redis_sentinel_username": "morag-sentinel",
        "redis_sentinel_password": "sentinel-pw",
    }
    return Settings(**{**values, **extra})


def test_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORAG_REDIS_SENTINELS", SENTINELS)
    monkeypatch.setenv("MORAG_REDIS_SENTINEL_MASTER", "fleet")
    monkeypatch.setenv("MORAG_REDIS_SENTINEL_USERNAME", "morag-sentinel")
    monkeypatch.setenv("MORAG_REDIS_SENTINEL_PASSWORD", "sentinel-pw")
    monkeypatch.setenv("MORAG_REDIS_MIN_REPLICAS", "1")
    monkeypatch.setenv("MORAG_REDIS_WAIT_TIMEOUT_MS", "250")
    s = Settings()
    assert s.sentinel_addresses() == [
        ("10.0.0.5", 26379),
        ("10.0.0.6", 26380),
        ("fd00::7", 26379),
    ]
    assert (s.redis_sentinel_master, s.redis_sentinel_username) == ("fleet", "morag-sentinel")
    assert (s.redis_min_replicas, s.redis_wait_timeout_ms) == (1, 250)
    assert "sentinel-pw" not in repr(s)


def test_defaults_leave_sentinel_and_wait_off() -> None:
    s = Settings()
    assert s.redis_sentinels == [] and s.sentinel_addresses() == []
    assert (s.redis_sentinel_master, s.redis_min_replicas, s.redis_wait_timeout_ms) == (
        "morag",
        0,
        500,
    )


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("10.0.0.5", "is not host:port"),
        (":26379", "is not host:port"),
        ("10.0.0.5:", "is not host:port"),
        ("10.0.0.5:sentinel", "has no valid port"),
        ("[10.0.0.5]:26379", "has no valid host"),
        ("10.0.0.5:0", "has no valid port"),
        ("10.0.0.5:70000", "has no valid port"),
        ("fd00::7:26379", "has no valid host"),
        ("user@10.0.0.5:26379", "has no valid host"),
        ("sentinel://10.0.0.5:26379", "has no valid host"),
    ],
)
def test_a_malformed_sentinel_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, entry: str, problem: str
) -> None:
    monkeypatch.setenv("MORAG_REDIS_SENTINELS", f"10.0.0.6:26379,{entry}")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert f"MORAG_REDIS_SENTINELS: {entry!r} {problem}" in str(info.value)


def test_sentinel_needs_a_tcp_redis_url() -> None:
    with pytest.raises(ValidationError, match="MORAG_REDIS_SENTINELS needs a redis:// or rediss"):
        Settings(redis_url="unix:///run/redis.sock", redis_sentinels="10.0.0.5:26379")


@pytest.mark.parametrize(
    ("field", "value"), [("redis_min_replicas", -1), ("redis_wait_timeout_ms", 0)]
)
def test_wait_settings_are_checked(field: str, value: int) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: value})


# -- clients ----------------------------------------------------------------------------------


def test_without_sentinel_a_client_is_the_url() -> None:
    client = redis_client(Settings(redis_url="redis://u:p@10.0.0.1:6380/2"), socket_timeout=3)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["socket_timeout"]) == (
        "10.0.0.1",
        6380,
        2,
        3,
    )
    assert not isinstance(client.connection_pool, SentinelConnectionPool)
    assert on_current_primary(client, None)


def test_a_sentinel_client_keeps_the_urls_user_database_and_tls() -> None:
    client = redis_client(_sentinel_settings(redis_sentinel_master="fleet"))
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "fleet"
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("morag-api", "s3cret", 3)
    assert "host" not in kwargs and "port" not in kwargs  # the Sentinels say where
    assert issubclass(pool.connection_class, SentinelManagedSSLConnection)
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"]) == ("/ca.crt", "required")
    assert kwargs["socket_timeout"] == SENTINEL_SOCKET_TIMEOUT  # a frozen primary is left
    sentinels = pool.sentinel_manager.sentinels
    assert [(s.connection_pool.connection_kwargs["host"]) for s in sentinels] == [
        "10.0.0.5",
        "10.0.0.6",
        "fd00::7",
    ]
    to_sentinel = sentinels[0].connection_pool.connection_kwargs
    assert (to_sentinel["username"], to_sentinel["password"]) == ("morag-sentinel", "sentinel-pw")
    assert to_sentinel["ssl_ca_certs"] == "/ca.crt"  # the same CA as the data connections
    assert sentinels[0].connection_pool.connection_class is redis.SSLConnection


def test_caller_options_win_and_plain_redis_stays_plain() -> None:
    settings = Settings(redis_url="redis://:pw@x:1/0", redis_sentinels="127.0.0.1:26379")
    client = redis_client(settings, socket_timeout=1, health_check_interval=7)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["health_check_interval"]) == (1, 7)
    assert not issubclass(client.connection_pool.connection_class, redis.SSLConnection)
    assert "username" not in sentinel_kwargs(settings)  # no Sentinel user set: none sent
    assert "password" not in sentinel_kwargs(settings)


# -- Celery's broker ------------------------------------------------------------------------


def _connection(settings: Settings) -> Any:
    app = Celery("unit", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app.connection_for_write()  # lazy: nothing connects


def test_without_sentinel_the_broker_is_unchanged() -> None:
    url = "rediss://u:p@10.0.0.1:6380/0"
    assert broker_settings(Settings(redis_url=url)) == {
        "broker_url": url,
        "broker_transport_options": {},
        "broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED},
    }
    conf = celery_config(Settings(redis_url="redis://10.0.0.1:6379/0"))
    assert conf["broker_transport"] == "morag.broker:Transport"
    assert "broker_use_ssl" not in conf
    assert "master_name" not in conf["broker_transport_options"]


def test_the_broker_finds_the_primary_through_each_sentinel() -> None:
    settings = _sentinel_settings(redis_url=TLS_URL.replace("s3cret", "p%40ss%2Fword"))
    conf = celery_config(settings)
    # One sentinel:// URL per Sentinel, each with the user, password and database: kombu
    # reads them from whichever it fails over to.
    auth = "morag-api:p%40ss%2Fword@"
    assert conf["broker_url"] == ";".join(
        [
            f"sentinel://{auth}10.0.0.5:26379/3",
            f"sentinel://{auth}10.0.0.6:26380/3",
            f"sentinel://{auth}[fd00::7]:26379/3",
        ]
    )
    assert conf["broker_transport"] == "morag.broker:SentinelTransport"
    options = conf["broker_transport_options"]
    assert options["master_name"] == "morag"
    assert options["visibility_timeout"] == settings.visibility_timeout
    assert options["sentinel_kwargs"] == sentinel_kwargs(settings)
    assert options["sentinel_kwargs"]["username"] == "morag-sentinel"
    assert conf["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.crt"}

    conn = _connection(settings)
    assert conn.get_transport_cls() is broker.SentinelTransport
    assert broker.SentinelTransport.Channel is broker.SentinelChannel
    assert broker.SentinelTransport.driver_type == "redis"  # Celery's Redis-only paths
    assert len(conn.alt) == 3
    assert (conn.userid, conn.password, conn.virtual_host) == ("morag-api", "p@ss/word", "3")
    assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.crt"}
    assert conn.transport_options["master_name"] == "morag"
    conn.switch(conn.alt[2])  # kombu's failover to the third Sentinel keeps the login
    assert (conn.hostname, conn.port, conn.userid, conn.virtual_host) == (
        "fd00::7",
        26379,
        "morag-api",
        "3",
    )


def test_the_checking_channel_is_kept_with_sentinel() -> None:
    """A malformed message is dropped by the Sentinel transport too (morag.broker)."""
    assert issubclass(broker.SentinelChannel, broker._CheckingChannel)
    assert broker.SentinelChannel.QoS is broker.QoS
    assert issubclass(broker.SentinelTransport, broker._CheckingTransport)
