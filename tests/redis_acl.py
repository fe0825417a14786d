"""The Redis ACL users exactly as roles/redis configures them, for tests on a local redis-server.

The lists of commands, keys and channels are read from the role's defaults, so a test that runs
the app as these users fails as soon as the app needs a command or key the role does not grant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

DEFAULTS = Path(__file__).resolve().parent.parent / "roles" / "redis" / "defaults" / "main.yml"
# worker_api: the GPU/CPU workers' user as the role makes it with redis_worker_job_writes: api
# (named `<worker user>-api` here, so that one test server holds both forms).
ROLES = ("api", "worker", "store", "worker_api")


@dataclass(frozen=True)
class AclUser:
    role: str
    name: str
    commands: tuple[str, ...]
    keys: tuple[str, ...]
    channels: tuple[str, ...]
    # Redis 7 selectors, each the words inside one `(...)` (redis_acl_worker_selectors).
    selectors: tuple[str, ...] = ()
    read_keys: tuple[str, ...] = ()  # `%R~pattern`: read only

    def rules(self, password: str) -> list[str]:
        """The words after `user` in redis.conf (roles/redis/templates/redis.conf.j2)."""
        return [
            self.name,
            "on",
            f">{password}",
            "resetkeys",
            "resetchannels",
            "-@all",
            *(f"+{c.lower()}" for c in self.commands),
            *(f"~{k}" for k in self.keys),
            *(f"%R~{k}" for k in self.read_keys),
            *(f"&{c}" for c in self.channels),
            *(f"({s})" for s in self.selectors),
        ]


# The users that run workers, and so hold a liveness channel (redis_acl_liveness_channels).
LIVENESS_ROLES = ("worker", "store")


def role_users() -> dict[str, AclUser]:
    """As roles/redis/vars/main.yml (_redis_acl_app_users) builds them: a role with selectors
    (the workers) gets Celery's keys only through them; the roles that run workers get the
    liveness channels."""
    d = yaml.safe_load(DEFAULTS.read_text())
    users = {}
    for role in ROLES:
        base = "worker" if role == "worker_api" else role
        selectors = list(d.get(f"redis_acl_{base}_selectors", []))
        celery_keys = [] if selectors else d["redis_acl_celery_keys"]
        keys = celery_keys + d[f"redis_acl_{base}_keys"]
        read_keys: list[str] = []
        if role == "worker":  # redis_worker_job_writes: redis
            keys += d["redis_acl_worker_record_keys"]
            selectors += d["redis_acl_worker_record_selectors"]
        elif role == "worker_api":
            read_keys = d["redis_acl_worker_read_keys"]
        liveness = d["redis_acl_liveness_channels"] if base in LIVENESS_ROLES else []
        # The worker user publishes job ends through a selector only.
        ends = d["redis_acl_job_end_channels"] if base != "worker" else []
        name = d[f"redis_acl_{base}_user"]
        users[role] = AclUser(
            role=role,
            name=f"{name}-api" if role == "worker_api" else name,
            commands=tuple(d["redis_acl_common_commands"] + d[f"redis_acl_{base}_commands"]),
            keys=tuple(keys),
            channels=tuple(d["redis_acl_channels"] + liveness + ends),
            selectors=tuple(selectors),
            read_keys=tuple(read_keys),
        )
    return users


def password(role: str) -> str:
    return f"test-{role}-password"


def server_args() -> list[str]:
    """redis-server arguments that create the three users (one `--user` per user)."""
    args: list[str] = []
    for role, user in role_users().items():
        args += ["--user", *user.rules(password(role))]
    return args


def tls_query(ca: Path) -> str:
    """The query roles/morag_app puts after a TLS Redis URL (rediss://): verify the server
    against the role's CA."""
    return f"?ssl_cert_reqs=required&ssl_ca_certs={quote(str(ca), safe='')}"


def url(port: int, role: str, db: int = 0, ca: Path | None = None) -> str:
    """The MORAG_REDIS_URL of ``role`` (api, worker, store) as roles/morag_app writes it:
    rediss:// verified against ``ca`` when given (the role's default off loopback)."""
    scheme, query = ("rediss", tls_query(ca)) if ca is not None else ("redis", "")
    return f"{scheme}://{role_users()[role].name}:{password(role)}@127.0.0.1:{port}/{db}{query}"


def urls(port: int, db: int = 0, ca: Path | None = None) -> dict[str, str]:
    """Each role's URL: the API, the GPU/CPU workers and the store worker log in separately."""
    return {role: url(port, role, db, ca) for role in ROLES}


def allow_database(admin: Any, db: int) -> None:
    """What roles/redis/README.md says to add for an app on database ``db``: Celery's
    broadcast channel of that database (PSUBSCRIBE needs the pattern written exactly so)."""
    for user in role_users().values():
        admin.execute_command("ACL", "SETUSER", user.name, f"&/{db}.celery.pidbox")


def restrict_keys(admin: Any, role: str, *rules: str) -> None:
    """Replace ``role``'s key permissions by ``rules`` (``~pattern``, ``%R~pattern``, ...)."""
    admin.execute_command("ACL", "SETUSER", role_users()[role].name, "resetkeys", *rules)


def restore_keys(admin: Any, role: str) -> None:
    """Give ``role`` back the key patterns the role grants it."""
    user = role_users()[role]
    restrict_keys(admin, role, *(f"~{k}" for k in user.keys), *(f"%R~{k}" for k in user.read_keys))
