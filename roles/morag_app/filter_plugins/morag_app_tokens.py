"""The worker token of one host, as an Ansible filter: the same derivation as the app's
``morag.job_writes.host_token`` (HMAC-SHA256 of the host name under the fleet's worker
token), so a host's env file holds only its own token and the API, holding the fleet's,
recognises it. tests/unit/test_morag_app_env_file.py checks that both agree."""

from __future__ import annotations

import hashlib
import hmac
import re

try:  # Ansible is present when the role runs; the unit tests load this file directly.
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - exercised only without ansible-core installed

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        """Stand-in with the same name when ansible-core is not importable."""


# Keep in step with morag.job_writes (the app is not installed on the controller).
TOKEN_CONTEXT = b"morag worker host token v1\x00"
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


def worker_host_token(fleet_token: str, host: str) -> str:
    if not isinstance(fleet_token, str) or not fleet_token:
        raise AnsibleFilterError("morag_app_worker_host_token: the fleet's worker token is empty")
    if not isinstance(host, str) or not HOST_NAME.match(host):
        raise AnsibleFilterError(
            f"morag_app_worker_host_token: {host!r} is not a host name (letters, digits, . _ -)"
        )
    mac = hmac.new(fleet_token.encode(), TOKEN_CONTEXT + host.encode(), hashlib.sha256)
    return mac.hexdigest()


class FilterModule:
    """Ansible filters of the morag_app role."""

    def filters(self) -> dict:
        return {"morag_app_worker_host_token": worker_host_token}
