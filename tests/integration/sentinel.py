"""A Redis primary, its replicas and three Sentinels on loopback, for failover tests.

As an HA site runs them: the role's ACL users on every node (ACLs are not replicated), a
replication user (``masteruser``), a Sentinel user on the nodes (``sentinel auth-user``), a
user clients log in to the Sentinels with, and TLS on every link (clients, replication,
Sentinel to Redis, Sentinel to Sentinel) with one CA, unless MORAG_TEST_REDIS_TLS=0. A fast
failover: a node is down after 3 s without an answer (1 s, with TLS handshakes on a loaded
2-core machine, took a freshly promoted primary for down too).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis.sentinel import Sentinel

from tests import redis_acl
from tests.conftest import REDIS_PASSWORD, answers, free_port, redis_tls, spawn_redis, wait_until
from tests.tls import ca_and_server_cert

MASTER = "morag"
REPLICATION_USER, REPLICATION_PASSWORD = "replication", "test-replication-password"
# Sentinel's own user on the Redis nodes (what the Redis documentation grants it).
SENTINEL_NODE_USER, SENTINEL_NODE_PASSWORD = "sentinel", "test-sentinel-node-password"
SENTINEL_NODE_RULES = [
    "allchannels",
    "+multi",
    "+slaveof",
    "+ping",
    "+exec",
    "+subscribe",
    "+config|rewrite",
    "+role",
    "+publish",
    "+info",
    "+client|setname",
    "+client|kill",
    "+script|kill",
]
# The Sentinels' users: one they use among themselves, one for MoRAG's clients.
PEER_USER, PEER_PASSWORD = "sentinel-peer", "test-sentinel-peer-password"
CLIENT_USER, CLIENT_PASSWORD = "morag-sentinel", "test-sentinel-client-password"
CLIENT_RULES = [
    "-@all",
    "+auth",
    "+hello",
    "+ping",
    "+client|setname",
    "+sentinel|masters",
    "+sentinel|slaves",
    "+sentinel|replicas",
    "+sentinel|get-master-addr-by-name",
]


class Node:
    def __init__(self, cluster: SentinelCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.port = free_port()
        self.dir = cluster.root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def admin(self, **kwargs: Any) -> redis.Redis:
        """The node's `default` user (the tests' own admin account)."""
        return redis.Redis(
            "127.0.0.1", self.port, password=REDIS_PASSWORD, **self.cluster.tls, **kwargs
        )

    def pause(self) -> None:
        """SIGSTOP: a frozen host (its connections stay open, nothing answers)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


class SentinelCluster:
    def __init__(self, root: Path, replicas: int = 2, sentinels: int = 3) -> None:
        self.root = root
        self.ca: Path | None = None
        self.tls: dict[str, Any] = {}
        self._listen: list[str] = []
        if redis_tls():
            self.ca, crt, key = ca_and_server_cert(root / "tls")
            self.tls = {"ssl": True, "ssl_ca_certs": str(self.ca), "ssl_cert_reqs": "required"}
            self._listen = ["--tls-cert-file", str(crt), "--tls-key-file", str(key)]
            self._listen += ["--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"]
            self._listen += ["--tls-replication", "yes"]
        self.nodes = [Node(self, "redis0")] + [Node(self, f"redis{i + 1}") for i in range(replicas)]
        self.sentinels = [Node(self, f"sentinel{i}") for i in range(sentinels)]
        self._granted: list[list[str]] = []  # ACL SETUSER arguments, for nodes started later

    # -- start ----------------------------------------------------------------------------
    def _port_args(self, port: int) -> list[str]:
        if self.tls:
            return ["--port", "0", "--tls-port", str(port), *self._listen]
        return ["--port", str(port)]

    def _start_node(self, node: Node, primary: Node | None) -> None:
        args = [*self._port_args(node.port), "--requirepass", REDIS_PASSWORD]
        args += ["--appendonly", "no", *redis_acl.server_args()]
        args += ["--user", REPLICATION_USER, "on", f">{REPLICATION_PASSWORD}"]
        args += ["+psync", "+replconf", "+ping"]
        args += ["--user", SENTINEL_NODE_USER, "on", f">{SENTINEL_NODE_PASSWORD}"]
        args += SENTINEL_NODE_RULES
        args += ["--masteruser", REPLICATION_USER, "--masterauth", REPLICATION_PASSWORD]
        if primary is not None:
            args += ["--replicaof", "127.0.0.1", str(primary.port)]
        node.proc = spawn_redis(node.dir, *args, log=node.dir / "redis.log")

    def _start_sentinel(self, node: Node) -> None:
        primary = self.nodes[0]
        lines = [
            "bind 127.0.0.1",
            f"dir {node.dir}",
            *(" ".join(a) for a in _pairs(self._port_args(node.port))),
            f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2",
            f"sentinel down-after-milliseconds {MASTER} 3000",
            f"sentinel failover-timeout {MASTER} 2000",
            f"sentinel parallel-syncs {MASTER} 2",
            f"sentinel auth-user {MASTER} {SENTINEL_NODE_USER}",
            f"sentinel auth-pass {MASTER} {SENTINEL_NODE_PASSWORD}",
            f"sentinel sentinel-user {PEER_USER}",
            f"sentinel sentinel-pass {PEER_PASSWORD}",
            "user default off",
            f"user {PEER_USER} on >{PEER_PASSWORD} allchannels +@all",
            f"user {CLIENT_USER} on >{CLIENT_PASSWORD} {' '.join(CLIENT_RULES)}",
        ]
        conf = node.dir / "sentinel.conf"
        conf.write_text("\n".join(lines) + "\n")
        exe = "redis-server"
        log = open(node.dir / "sentinel.log", "ab")  # noqa: SIM115 - the process holds it
        node.proc = subprocess.Popen(
            [exe, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def start(self) -> None:
        primary = self.nodes[0]
        for node in self.nodes:
            self._start_node(node, None if node is primary else primary)
        for node in self.nodes:
            wait_until(lambda n=node: answers(n.admin(socket_timeout=5)), 30, f"{node.name}")
        # The role's database 0 rules, on every node (ACLs are not replicated).
        for node in self.nodes:
            redis_acl.allow_database(node.admin(), 0)
        wait_until(
            lambda: len(self.replicas_of(primary)) == len(self.nodes) - 1,
            30,
            "the replicas to sync",
        )
        for node in self.sentinels:
            self._start_sentinel(node)
        wait_until(self._sentinels_agree, 60, "the Sentinels to see the replicas and each other")

    def rejoin(self, node: Node) -> None:
        """Start a killed node again, as a replica of the primary the Sentinels name (what
        a site does with a repaired host), and wait until that primary has it."""
        primary = self.primary()
        self._start_node(node, primary)
        wait_until(lambda: answers(node.admin(socket_timeout=5)), 30, f"{node.name}")
        redis_acl.allow_database(node.admin(), 0)
        for rules in self._granted:
            node.admin().execute_command("ACL", "SETUSER", *rules)
        wait_until(
            lambda: any(r.get("port") == node.port for r in self.replicas_of(primary)),
            60,
            f"{node.name} to replicate {primary.name}",
        )

    def grant(self, role: str, *rules: str) -> None:
        """Add ACL rules to ``role``'s user on every node (e.g. what the role does not grant)."""
        name = redis_acl.role_users()[role].name
        self._granted.append([name, *rules])
        for node in self.nodes:
            if node.proc is not None:
                node.admin().execute_command("ACL", "SETUSER", name, *rules)

    # -- what the Sentinels and nodes say -----------------------------------------------------
    def sentinel_client(self, node: Node) -> redis.Redis:
        return redis.Redis(
            "127.0.0.1",
            node.port,
            username=PEER_USER,
            password=PEER_PASSWORD,
            socket_timeout=2,
            **self.tls,
        )

    def _sentinels_agree(self) -> bool:
        for node in self.sentinels:
            if node.proc is not None and node.proc.poll() is not None:
                log = (node.dir / "sentinel.log").read_text(errors="replace")
                raise AssertionError(f"{node.name} exited:\n{log[-2000:]}")
        try:
            for node in self.sentinels:
                state = self.sentinel_client(node).sentinel_master(MASTER)
                if state["num-slaves"] < len(self.nodes) - 1:
                    return False
                if state["num-other-sentinels"] < len(self.sentinels) - 1:
                    return False
        except redis.RedisError:
            return False
        return True

    def primary_address(self) -> tuple[str, int] | None:
        """The primary the Sentinels name (any that answers)."""
        for node in self.sentinels:
            if node.proc is None:
                continue
            with contextlib.suppress(redis.RedisError):
                host, port = self.sentinel_client(node).sentinel_get_master_addr_by_name(MASTER)
                return (host.decode() if isinstance(host, bytes) else host), int(port)
        return None

    def primary(self) -> Node:
        address = self.primary_address()
        return next(n for n in self.nodes if n.address == address)

    @staticmethod
    def replicas_of(node: Node) -> list[Any]:
        with contextlib.suppress(redis.RedisError):
            info = node.admin(socket_timeout=5).info("replication")
            return [
                v
                for k, v in info.items()
                if k.startswith("slave") and k[5:].isdigit() and v.get("state") == "online"
            ]
        return []

    def wait_failover(self, old: Node, timeout: float = 60) -> Node:
        """Until the Sentinels name another primary and it answers as one."""

        def promoted() -> Node | None:
            address = self.primary_address()
            if address is None or address == old.address:
                return None
            node = next(n for n in self.nodes if n.address == address)
            with contextlib.suppress(redis.RedisError):
                if node.admin(socket_timeout=2).execute_command("ROLE")[0] == b"master":
                    return node
            return None

        return wait_until(promoted, timeout, f"a failover away from {old.name}")

    # -- what clients are given -----------------------------------------------------------
    def sentinel_list(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.sentinels)

    def role_urls(self) -> dict[str, str]:
        """The role's URLs (their host:port the first node's: unused with Sentinel)."""
        return redis_acl.urls(self.nodes[0].port, 0, self.ca)

    def admin_url(self) -> str:
        from tests.conftest import admin_url

        return admin_url(self.nodes[0].port, 0, self.ca)

    def settings(self) -> dict[str, str]:
        """The MORAG_* settings (lower case, as Stack takes them) that use the Sentinels."""
        return {
            "redis_sentinels": self.sentinel_list(),
            "redis_sentinel_master": MASTER,
            "redis_sentinel_username": CLIENT_USER,
            "redis_sentinel_password": CLIENT_PASSWORD,
        }

    def admin(self) -> redis.Redis:
        """The tests' admin client of whichever node is the primary (through Sentinel)."""
        sentinel = Sentinel(
            [n.address for n in self.sentinels],
            sentinel_kwargs={
                "username": PEER_USER,
                "password": PEER_PASSWORD,
                "socket_timeout": 2,
                **self.tls,
            },
            password=REDIS_PASSWORD,
            socket_timeout=10,
            **self.tls,
        )
        return sentinel.master_for(MASTER)

    def close(self) -> None:
        for node in [*self.sentinels, *self.nodes]:
            node.stop()


def _pairs(args: list[str]) -> list[list[str]]:
    """redis-server's ``--name value`` arguments as sentinel.conf lines."""
    lines: list[list[str]] = []
    for arg in args:
        if arg.startswith("--"):
            lines.append([arg[2:]])
        else:
            lines[-1].append(arg)
    return lines


@contextlib.contextmanager
def sentinel_cluster(
    root: Path, replicas: int = 2, sentinels: int = 3
) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(root, replicas, sentinels)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
