"""Webhook signatures follow Standard Webhooks (checked with its reference library).
How a webhook is owed and delivered once: test_webhook_outbox.py."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
from morag import webhooks
from morag.config import Settings
from pydantic import SecretStr
from standardwebhooks import Webhook, WebhookVerificationError

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
