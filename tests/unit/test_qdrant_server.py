"""The store worker's Qdrant client: local mode by default, a Qdrant server with a URL (issue
19 item 4).

No Qdrant server can run on these machines (no binary, no image), so the server path is
proven as configuration: the keyword arguments the app builds from its settings, and the
real qdrant-client objects they make, constructed without connecting (its server version
check, the one thing that would connect, is off where a test builds a remote client)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from morag.config import Settings
from morag.vectors import store
from pydantic import ValidationError
from qdrant_client import QdrantClient
from qdrant_client.local.qdrant_local import QdrantLocal
from qdrant_client.qdrant_remote import QdrantRemote

from tests.tls import ca_and_server_cert

SERVER = "https://qdrant.internal:6333"


def test_without_a_url_the_store_is_local_mode_at_the_path(tmp_path: Path) -> None:
    settings = Settings(qdrant_path=tmp_path / "qdrant", qdrant_api_key="ignored-here")
    options = store.client_options(settings)
    assert options == {"path": str(tmp_path / "qdrant")}
    client = QdrantClient(**options)
    try:
        assert isinstance(client._client, QdrantLocal)
    finally:
        client.close()


def test_a_url_and_an_api_key_make_a_remote_client() -> None:
    settings = Settings(qdrant_url=SERVER, qdrant_api_key="s3cret")
    options = store.client_options(settings)
    assert options == {"url": SERVER, "api_key": "s3cret"}
    client = QdrantClient(**options | {"check_compatibility": False})
    try:
        remote = client._client
        assert isinstance(remote, QdrantRemote)
        assert remote.rest_uri == SERVER
        assert remote._rest_headers["api-key"] == "s3cret"
    finally:
        client.close()


def test_a_ca_file_is_what_the_https_client_verifies_against(tmp_path: Path) -> None:
    ca, _, _ = ca_and_server_cert(tmp_path)
    settings = Settings(qdrant_url=SERVER, qdrant_api_key="s3cret", qdrant_ca_file=ca)
    options = store.client_options(settings)
    context = options["verify"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [dict(field[0] for field in c["subject"]) for c in context.get_ca_certs()] == [
        {"commonName": "test CA"}
    ]
    # The version check would ignore the CA: off, so building the client connects nowhere.
    assert options["check_compatibility"] is False
    client = QdrantClient(**options)
    try:
        assert client._client._rest_args["verify"] is context
    finally:
        client.close()


def test_open_client_keeps_one_remote_client_per_url(tmp_path: Path) -> None:
    ca, _, _ = ca_and_server_cert(tmp_path)
    local = tmp_path / "local"
    settings = Settings(qdrant_url=SERVER, qdrant_api_key="k", qdrant_ca_file=ca, qdrant_path=local)
    try:
        with (
            store.open_client(settings) as first,
            store.open_client(settings) as second,
        ):
            assert first is second
            assert isinstance(first._client, QdrantRemote)
        # Local mode was not touched: no directory, no lock file.
        assert list(tmp_path.glob("*local*")) == []
    finally:
        store._server_clients.pop(SERVER).close()


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6333", "http://localhost:6333", "http://[::1]:6333", SERVER],
)
def test_an_api_key_goes_over_https_or_loopback(url: str) -> None:
    assert Settings(qdrant_url=url, qdrant_api_key="k").qdrant_url == url


@pytest.mark.parametrize("url", ["http://qdrant.internal:6333", "http://10.0.0.7:6333"])
def test_an_api_key_in_clear_over_the_network_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="MORAG_QDRANT_API_KEY would cross the network"):
        Settings(qdrant_url=url, qdrant_api_key="k")
    # Without a key there is no secret to protect (a server on a private network).
    assert Settings(qdrant_url=url).qdrant_url == url


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"qdrant_url": "qdrant.internal:6333"}, "must be an http:// or https:// URL"),
        ({"qdrant_url": "ftp://qdrant.internal"}, "must be an http:// or https:// URL"),
        (
            {"qdrant_url": "http://127.0.0.1:6333", "qdrant_ca_file": "/etc/ca.crt"},
            "MORAG_QDRANT_CA_FILE needs an https://",
        ),
    ],
)
def test_unusable_qdrant_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)


def test_the_environment_selects_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the role writes into the store worker's env file.
    monkeypatch.setenv("MORAG_QDRANT_URL", SERVER)
    monkeypatch.setenv("MORAG_QDRANT_API_KEY", "from-env")
    monkeypatch.setenv("MORAG_QDRANT_COLLECTION", "site")
    settings = Settings()
    assert store.client_options(settings) == {"url": SERVER, "api_key": "from-env"}
    assert settings.qdrant_collection == "site"
