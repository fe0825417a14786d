"""The API's systemd unit as the morag_api role renders it (its own install task).

1,100 idle connections took /health down (EMFILE) under systemd's default 1024 descriptors:
the unit raises LimitNOFILE and hands the slow-client limits to the API; off loopback it
serves HTTPS, as Redis does (issue 18 item 5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)

# Each case: the role variables of one rendering (JSON, so types survive as Ansible's).
CASES: dict[str, dict[str, object]] = {
    "defaults": {},
    "tuned": {"morag_api_limit_nofile": 200000, "morag_api_header_timeout": 4},
    "all_addresses": {"morag_api_host": "0.0.0.0"},
    "ipv6_loopback": {"morag_api_host": "::1"},
    "private_address": {"morag_api_host": "10.0.0.5"},
    "tls_off": {"morag_api_host": "0.0.0.0", "morag_api_tls_enabled": False},
    "tls_forced": {"morag_api_host": "127.0.0.1", "morag_api_tls_enabled": True},
}


def _playbook(unit_dir: Path) -> list[dict[str, object]]:
    tasks = [
        {
            "name": f"Render the unit: {case}",
            "ansible.builtin.include_role": {"name": "morag_api", "tasks_from": "install"},
            # morag_api_enabled false: nothing to restart here, the handlers are skipped.
            "vars": {
                **variables,
                "morag_api_enabled": False,
                "_morag_api_unit_path": str(unit_dir / f"{case}.service"),
            },
        }
        for case, variables in CASES.items()
    ]
    play = {"name": "Render", "hosts": "localhost", "connection": "local"}
    return [{**play, "gather_facts": False, "tasks": tasks}]


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]]]:
    """Each case's [Service] section: every key with its values in order."""
    if ANSIBLE is None:
        pytest.skip("ansible-playbook is not installed")
    tmp = tmp_path_factory.mktemp("morag_api_unit")
    playbook = tmp / "render.yml"
    playbook.write_text(json.dumps(_playbook(tmp)))  # JSON is YAML
    args = [ANSIBLE, "-i", "localhost,", str(playbook)]
    args += ["-e", f"ansible_python_interpreter={sys.executable}"]
    # Run outside the repository: its ansible.cfg wants a vault password and an inventory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env |= {"ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_LOCALHOST_WARNING": "false"}
    done = subprocess.run(
        args, check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rendered = {}
    for case in CASES:
        service: dict[str, list[str]] = {}
        section = None
        for line in (tmp / f"{case}.service").read_text().splitlines():
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                service.setdefault(key, []).append(value)
        rendered[case] = service
    return rendered


def _env(service: dict[str, list[str]]) -> dict[str, str]:
    return dict(value.partition("=")[::2] for value in service["Environment"])


def test_unit_raises_the_descriptor_limit_and_sets_the_slow_client_limits(units) -> None:
    service = units["defaults"]
    assert service["LimitNOFILE"] == ["65536"]
    assert _env(service) == {
        "MORAG_API_HEADER_TIMEOUT": "10",
        "MORAG_API_LIMIT_CONCURRENCY": "1024",
        "MORAG_API_KEEPALIVE_TIMEOUT": "5",
        "MORAG_API_BACKLOG": "2048",
    }


def test_unit_takes_the_role_variables(units) -> None:
    assert units["tuned"]["LimitNOFILE"] == ["200000"]
    assert _env(units["tuned"])["MORAG_API_HEADER_TIMEOUT"] == "4"


def test_unit_serves_https_off_loopback_by_default(units) -> None:
    env = _env(units["all_addresses"])
    assert env["MORAG_API_TLS_CERT_FILE"] == "/etc/morag/api-tls/api.crt"
    assert env["MORAG_API_TLS_KEY_FILE"] == "/etc/morag/api-tls/api.key"


@pytest.mark.parametrize(
    ("case", "tls"),
    [
        ("defaults", False),
        ("ipv6_loopback", False),
        ("private_address", True),
        ("tls_off", False),
        ("tls_forced", True),
    ],
)
def test_unit_tls_follows_the_bind_address_unless_told(units, case: str, tls: bool) -> None:
    assert ("MORAG_API_TLS_CERT_FILE" in _env(units[case])) == tls


def test_role_issues_a_certificate_its_ca_verifies_for_the_api_names(tmp_path: Path) -> None:
    """The role's TLS tasks (tls.yml: CA and certificate on the controller, installed on the
    host), run on this machine as both: the certificate verifies against the CA for the
    names clients use, and the key is readable by the service group only."""
    import grp

    from cryptography import x509

    if ANSIBLE is None:
        pytest.skip("ansible-playbook is not installed")
    group = grp.getgrgid(os.getgid()).gr_name
    host_dir = tmp_path / "host"
    variables = {
        "morag_api_host": "0.0.0.0",
        "morag_api_enabled": False,
        "morag_api_group": group,
        "morag_api_tls_controller_dir": str(tmp_path / "controller"),
        "morag_api_tls_cert_sans": ["morag.example.org", "10.0.0.5"],
        "morag_api_tls_cert_file": str(host_dir / "api.crt"),
        "morag_api_tls_key_file": str(host_dir / "api.key"),
        "morag_api_tls_ca_cert_file": str(host_dir / "ca.crt"),
    }
    task = {"ansible.builtin.include_role": {"name": "morag_api", "tasks_from": "tls"}}
    play = {"name": "TLS", "hosts": "localhost", "connection": "local", "gather_facts": False}
    playbook = tmp_path / "tls.yml"
    playbook.write_text(json.dumps([{**play, "vars": variables, "tasks": [task]}]))
    args = [ANSIBLE, "-i", "localhost,", str(playbook)]
    args += ["-e", f"ansible_python_interpreter={sys.executable}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env |= {"ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_LOCALHOST_WARNING": "false"}
    done = subprocess.run(
        args, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr

    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(host_dir / "ca.crt"), str(host_dir / "api.crt")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    cert = x509.load_pem_x509_certificate((host_dir / "api.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(sans.get_values_for_type(x509.DNSName))
    addresses = {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "morag.example.org"} <= names
    assert {"127.0.0.1", "10.0.0.5"} <= addresses
    key = (host_dir / "api.key").stat()
    assert key.st_mode & 0o777 == 0o640
    assert (tmp_path / "controller").stat().st_mode & 0o777 == 0o700
