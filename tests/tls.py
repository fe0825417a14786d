"""Test certificates: a CA and a server certificate for 127.0.0.1, made with openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path


def ca_and_server_cert(directory: Path, name: str = "server") -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) under ``directory``: EC P-256, the
    server's names 127.0.0.1 and localhost, valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    crt, key, csr = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    openssl(
        *["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"],
        *["-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=test CA"],
    )
    openssl(
        *["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"],
        *["-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1"],
    )
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl(
        *["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)],
        *["-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext)],
    )
    return ca, crt, key
