"""How `morag api` runs uvicorn: connection limits, a request-header deadline, TLS."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from morag.config import Settings

log = logging.getLogger("morag.api")


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's line and headers.

    uvicorn has no such timeout (its timeout_keep_alive only covers the idle time between
    two requests and is reset by every byte), so a client that sends a partial header, or
    one byte at a time, holds its connection and a file descriptor forever (slowloris).
    uvicorn does not offer one (encode/uvicorn#157, `--timeout-request-start`, never built)
    and no maintained ASGI server plugs in here, so this subclass arms a timer when a
    connection opens or a new request's first byte arrives, and closes the connection when
    the headers are not complete in ``header_timeout`` seconds. The body is not covered:
    an upload may take long, and the API checks credentials and size before reading it."""

    header_timeout: ClassVar[float] = 10.0

    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        # A keep-alive connection starting its next request: the deadline starts again.
        if self.conn.their_state is h11.IDLE:
            self._arm_header_deadline()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._header_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            client = "%s:%d" % self.client if self.client else "a client"  # noqa: UP031
            log.info(
                "closed the connection of %s: no complete request header in %.0f s",
                client,
                self.header_timeout,
            )
            # abort, not close: nothing is owed to this client, and the descriptor is freed now.
            self.transport.abort()


def header_deadline_protocol(seconds: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn's ``http=`` option, with this deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": seconds})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run's keyword arguments (besides the app, host and port) from the settings."""
    options: dict[str, Any] = {
        "http": header_deadline_protocol(settings.api_header_timeout),
        # Past this many open connections or running requests a request gets 503 at once:
        # the API sheds load before it runs out of memory or of file descriptors.
        "limit_concurrency": settings.api_limit_concurrency,
        "backlog": settings.api_backlog,
        "timeout_keep_alive": settings.api_keepalive_timeout,
        "log_level": "info",
        "access_log": False,
    }
    if settings.api_tls_cert_file is not None and settings.api_tls_key_file is not None:
        # HTTPS: API keys, the worker token and uploads never cross the network in clear.
        options["ssl_certfile"] = str(settings.api_tls_cert_file)
        options["ssl_keyfile"] = str(settings.api_tls_key_file)
    return options
