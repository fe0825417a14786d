"""A webhook receiver on loopback for the integration tests: every POST it got, with its
headers and body, verified the Standard Webhooks way."""

from __future__ import annotations

import http.server
import threading
from collections import Counter
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


class Receiver:
    """Answers every POST with 204 and keeps it, verified on arrival as a real receiver
    does (the signature, and a timestamp within Standard Webhooks' 5 minutes); ``close()``
    stops it."""

    def __init__(self, secret: str) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.verified: list[tuple[str, dict[str, Any] | str]] = []  # (id, payload or error)
        calls, verified, hook = self.calls, self.verified, Webhook(secret.encode())

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                calls.append((headers, body))
                try:
                    payload: dict[str, Any] | str = hook.verify(body, headers)
                except WebhookVerificationError as exc:
                    payload = f"refused: {exc}"
                verified.append((headers.get("webhook-id", ""), payload))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, task_id: str) -> list[dict[str, Any]]:
        """The payloads delivered for ``task_id``; one that failed verification fails here."""
        found = [p for i, p in list(self.verified) if i == f"msg_{task_id}"]
        for payload in found:
            assert isinstance(payload, dict), payload
        return found  # type: ignore[return-value]

    def deliveries(self) -> Counter[str]:
        """How many POSTs each webhook id got; any that failed verification fails here."""
        refused = [(i, p) for i, p in list(self.verified) if not isinstance(p, dict)]
        assert not refused, refused[:5]
        return Counter(i for i, _ in list(self.verified))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
