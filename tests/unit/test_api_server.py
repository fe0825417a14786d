"""How `morag api` configures uvicorn (api/server.py) and the API's TLS settings."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from morag.api.server import HeaderDeadlineProtocol, uvicorn_options
from morag.config import Settings
from pydantic import ValidationError

from tests.tls import ca_and_server_cert


def test_options_carry_the_slow_client_limits() -> None:
    settings = Settings(
        api_header_timeout=4,
        api_limit_concurrency=50,
        api_backlog=64,
        api_keepalive_timeout=3,
    )
    options = uvicorn_options(settings)
    assert issubclass(options["http"], HeaderDeadlineProtocol)
    assert options["http"].header_timeout == 4
    assert HeaderDeadlineProtocol.header_timeout == 10  # the base class is left alone
    assert (options["limit_concurrency"], options["backlog"]) == (50, 64)
    assert options["timeout_keep_alive"] == 3
    assert "ssl_certfile" not in options


def test_options_serve_https_with_both_files(tmp_path: Path) -> None:
    _, crt, key = ca_and_server_cert(tmp_path)
    options = uvicorn_options(Settings(api_tls_cert_file=crt, api_tls_key_file=key))
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == (str(crt), str(key))


@pytest.mark.parametrize("field", ["api_tls_cert_file", "api_tls_key_file"])
def test_one_tls_file_alone_is_refused(field: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        Settings(**{field: tmp_path / "x.pem"})


def test_clients_verify_with_the_ca_file_or_the_system_store(tmp_path: Path) -> None:
    assert Settings().api_tls_verify() is True
    ca, _, _ = ca_and_server_cert(tmp_path)
    context = Settings(api_ca_file=ca).api_tls_verify()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    with pytest.raises(OSError):
        Settings(api_ca_file=tmp_path / "missing.crt").api_tls_verify()
