"""Webhook signatures follow Standard Webhooks (checked with its reference library), and a
webhook is marked as sent only once its message was published."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time

import pytest
from morag import webhooks
from morag.config import Settings
from pydantic import SecretStr
from standardwebhooks import Webhook, WebhookVerificationError

from tests.conftest import RedisServer, free_port

BODY = b'{"status":"succeeded","task_id":"abc"}'


def _settings(secret: str | None) -> Settings:
    return Settings(webhook_secret=SecretStr(secret) if secret else None)


def test_plain_secrets_verify_with_the_reference_library() -> None:
    headers = webhooks.signed_headers("abc", BODY, _settings("s3cret"))
    assert headers["webhook-id"] == "msg_abc"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert Webhook(b"s3cret").verify(BODY, headers) == json.loads(BODY)


def test_whsec_secrets_are_base64_keys_as_the_standard_says() -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    headers = webhooks.signed_headers("abc", BODY, _settings(secret))
    Webhook(secret).verify(BODY, headers)
    assert webhooks.verify(BODY, secret, headers)


def test_tampering_and_replays_are_refused() -> None:
    old = int(time.time()) - 3600
    replayed = webhooks.headers_for(BODY, "s3cret", msg_id="msg_abc", timestamp=old)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(b"s3cret").verify(BODY, replayed)
    # Moving the timestamp forward breaks the signature (it covers the timestamp).
    fresh = {**replayed, "webhook-timestamp": str(int(time.time()))}
    with pytest.raises(WebhookVerificationError):
        Webhook(b"s3cret").verify(BODY, fresh)
    good = webhooks.headers_for(BODY, "s3cret", msg_id="msg_abc")
    with pytest.raises(WebhookVerificationError):
        Webhook(b"s3cret").verify(BODY + b" ", good)
    assert not webhooks.verify(BODY, "s3cret", replayed)


def test_without_a_secret_the_webhook_says_it_is_unsigned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="morag.webhooks"):
        headers = webhooks.signed_headers("abc", BODY, _settings(None))
    assert "webhook-signature" not in headers
    assert headers["webhook-id"] == "msg_abc" and headers["webhook-timestamp"].isdigit()
    assert "MORAG_WEBHOOK_SECRET is not set" in caplog.text
    assert "unsigned" in caplog.text


_NOTIFY = """
import json, sys, redis
from morag.worker import celery_app
from morag.webhooks import notify_end
celery_app.conf.task_publish_retry = False
celery_app.conf.broker_connection_retry = False
celery_app.conf.broker_connection_max_retries = 0
client = redis.Redis.from_url(sys.argv[1])
from morag.job_record import JobRecord
record = JobRecord(
    task_id=sys.argv[2], status="succeeded", content_type="web", webhook_url="http://127.0.0.1/h",
    source={"type": "url", "url": "http://127.0.0.1/p"}, attempts=[], created_at="t",
    updated_at="t", route={"queue": "celery", "gpu_requested": False, "code": "c", "reason": "r"},
)
print(json.dumps({"queued": notify_end(client, record)}))
"""


def _notify(markers: str, broker: str, task_id: str) -> bool:
    env = {**os.environ, "MORAG_REDIS_URL": broker}
    out = subprocess.run(
        [sys.executable, "-c", _NOTIFY, markers, task_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["queued"]


def test_a_webhook_is_marked_only_once_published(redis_server: RedisServer) -> None:
    import redis

    db = redis_server.fresh_db()
    markers = redis_server.url(db)
    client = redis.Redis.from_url(markers)
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    assert _notify(markers, dead_broker, "job1") is False
    assert client.get(webhooks.sent_key("job1")) is None, "marked although never published"
    # Once the broker answers, the same job's webhook is published and then marked.
    assert _notify(markers, markers, "job1") is True
    assert client.get(webhooks.sent_key("job1")) == b"succeeded"
    assert client.llen("morag-store") == 1
    # A second caller does not publish it again.
    assert _notify(markers, markers, "job1") is False
    assert client.llen("morag-store") == 1
