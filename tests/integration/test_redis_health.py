"""What an API process exports about its own Redis client (docs/ha.md), on a real
redis-server: the address its connections reached, the connection errors they met once the
server is gone, and the submissions refused by reason. The same numbers through a real
Sentinel failover: tests/integration/test_sentinel.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from morag.config import Settings
from morag.metrics import Refusals
from morag.metrics_export import ApiRedisCollector
from morag.redis_client import redis_client, redis_health
from prometheus_client import CollectorRegistry, generate_latest

from tests import redis_acl
from tests.conftest import running_redis
from tests.integration.stack import Scrape


def _scrape(client: redis.Redis, refusals: Refusals) -> Scrape:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ApiRedisCollector(client, refusals))
    return Scrape(generate_latest(registry).decode())


def test_the_primary_and_the_connection_errors_of_a_client(tmp_path: Path) -> None:
    refusals = Refusals()
    with running_redis(tmp_path) as server:
        client = redis_client(Settings(redis_url=redis_acl.urls(server.port, 0, server.ca)["api"]))
        assert client.ping()
        scrape = _scrape(client, refusals)
        address = f"127.0.0.1:{server.port}"
        assert scrape.value("morag_redis_primary_info", address=address) == 1
        assert scrape.value("morag_redis_primary_changes_total") == 0
        assert scrape.value("morag_redis_connection_errors_total", kind="connection") == 0
        assert scrape.value("morag_redis_connection_errors_total", kind="timeout") == 0
        assert {s.labels["reason"] for s in scrape.series("morag_submissions_refused_total")} == {
            "replicas",
            "noreplicas",
            "redis",
            "broker",
            "unknown",
        }
    # The server is gone: the command fails, once per attempt of the client.
    with pytest.raises(redis.ConnectionError):
        client.ping()
    health = redis_health(client)
    assert health is not None and health.errors["connection"] >= 1
    refusals.count("replicas")
    scrape = _scrape(client, refusals)
    assert scrape.value("morag_redis_connection_errors_total", kind="connection") >= 1
    assert scrape.value("morag_redis_primary_info", address=address) == 1  # the last reached
    assert scrape.value("morag_redis_primary_changes_total") == 0  # no Sentinel, no change
    assert scrape.value("morag_submissions_refused_total", reason="replicas") == 1
    with pytest.raises(KeyError):
        refusals.count("because")
