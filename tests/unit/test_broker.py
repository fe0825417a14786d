"""morag.broker as configured: the Celery app uses its transport and consumer, TLS is chosen
as before (kombu keys it on its own transport names), and what the checks let through.
The behaviour on a real queue: tests/integration/test_poison_messages.py."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from celery import Celery
from morag import broker
from morag.celery_app import celery_config
from morag.config import Settings


def _connection(url: str) -> Any:
    app = Celery("unit", set_as_current=False)
    app.conf.update(celery_config(Settings(redis_url=url)))
    return app.connection_for_write()  # lazy: nothing connects


def test_the_app_uses_the_checking_transport_and_consumer() -> None:
    conf = celery_config(Settings(redis_url="redis://127.0.0.1:6379/0"))
    assert conf["worker_consumer"] == "morag.broker:Consumer"
    conn = _connection("redis://u:p@127.0.0.1:6379/0")
    assert conn.transport_cls == "morag.broker:Transport"
    assert conn.get_transport_cls() is broker.Transport
    # What Celery's Redis-only code (the unacked restore, the pidbox) checks.
    assert broker.Transport.driver_type == "redis"
    assert (conn.hostname, conn.port, conn.userid, conn.ssl) == (
        "127.0.0.1",
        6379,
        "u",
        False,
    )


def test_rediss_with_its_ca_keeps_the_urls_options() -> None:
    conn = _connection("rediss://u:p@10.0.0.1:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.crt")
    assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.crt"}


def test_bare_rediss_verifies_the_server() -> None:
    """kombu would fall back to CERT_NONE for its own `rediss` name; without it, no TLS at
    all. Verified TLS is what redis-py gives MoRAG's other clients for the same URL."""
    assert _connection("rediss://u:p@10.0.0.1:6380/0").ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


ENVELOPE = {
    "body": "W1siYWJjIl0sIHt9LCB7fV0=",
    "content-encoding": "utf-8",
    "content-type": "application/json",
    "headers": {"task": "morag.process_job", "id": "abc"},
    "properties": {
        "delivery_tag": "d3b1",
        "delivery_info": {"exchange": "celery", "routing_key": "celery"},
        "body_encoding": "base64",
        "priority": 0,
    },
}


def test_a_real_envelope_passes() -> None:
    assert broker.envelope_problem(ENVELOPE) is None


@pytest.mark.parametrize(
    ("envelope", "problem"),
    [
        ("msg", "a JSON str"),
        ([1], "a JSON list"),
        ({**ENVELOPE, "properties": None}, "no properties"),
        ({**ENVELOPE, "headers": None}, "no headers"),
        ({**ENVELOPE, "body": None}, "body is not a string"),
        ({**ENVELOPE, "body": "%%"}, "not base64"),
        (
            {
                **ENVELOPE,
                "properties": {**ENVELOPE["properties"], "body_encoding": "x"},
            },
            "encoding",
        ),
        (
            {**ENVELOPE, "properties": {**ENVELOPE["properties"], "delivery_tag": 1}},
            "tag",
        ),
    ],
)
def test_what_kombu_cannot_read_is_named(envelope: Any, problem: str) -> None:
    assert problem in (broker.envelope_problem(envelope) or "")
