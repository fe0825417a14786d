"""The inventory: read it as Ansible does, and add a worker host to its hosts.yml.

The edit is a ruamel.yaml round trip, so the sysadmin's comments, order and quoting stay as
they were; only the new host's two lines appear.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

WORKER_GROUPS = {"gpu": "gpu_workers", "cpu": "cpu_workers"}
# RFC 1123 host names (labels of letters, digits and inner hyphens); inventory names too.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


class InventoryError(Exception):
    """A refused edit or an unreadable inventory, said for people."""


@dataclass(frozen=True)
class InventoryHost:
    name: str
    groups: tuple[str, ...]
    vars: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        """gpu, cpu, or None for hosts that run no worker of their own group."""
        if WORKER_GROUPS["gpu"] in self.groups:
            return "gpu"
        if WORKER_GROUPS["cpu"] in self.groups:
            return "cpu"
        return None

    def node_names(self) -> set[str]:
        """The names this host's workers may publish as their host part (``gpu0@HOST``) or
        ``hostname``: the inventory name, its short form, and morag_worker_hostname when the
        inventory sets it to a plain value (the role's default is the host's nodename)."""
        names = {self.name, self.name.split(".", 1)[0]}
        explicit = self.vars.get("morag_worker_hostname")
        if isinstance(explicit, str) and "{" not in explicit:
            names |= {explicit, explicit.split(".", 1)[0]}
        return names


def read_hosts(inventory: Path) -> list[InventoryHost]:
    """Every host of ``inventory`` with its groups, read by Ansible's own InventoryManager
    (so a YAML, INI or directory inventory reads as ansible-playbook reads it). group_vars
    and vaults are not loaded: only the inventory's own host variables are needed here."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    if not inventory.exists():
        raise InventoryError(f"{inventory} does not exist")
    manager = InventoryManager(loader=DataLoader(), sources=[str(inventory)])
    hosts = []
    for host in manager.get_hosts():
        groups = tuple(sorted(g.name for g in host.get_groups() if g.name != "all"))
        hosts.append(InventoryHost(host.name, groups, dict(host.vars)))
    if not hosts:
        raise InventoryError(f"{inventory}: no hosts (is it an Ansible inventory?)")
    return sorted(hosts, key=lambda h: h.name)


def check_address(address: str) -> str:
    """An IP address or a DNS name; refused with the reason otherwise."""
    text = address.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.split(".")
    # 10.0.0.300 is no name: all-numeric labels are meant as an IPv4 address.
    if all(label.isdigit() for label in labels) or not _HOSTNAME.fullmatch(text):
        raise InventoryError(
            f"bad address {address!r}: give an IPv4/IPv6 address (10.0.0.23) or a DNS name"
        )
    return text


def check_host_name(name: str) -> str:
    if not _HOSTNAME.fullmatch(name):
        raise InventoryError(
            f"bad host name {name!r}: letters, digits, hyphens and dots (gpu-03.example.com)"
        )
    return name


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: comments, order, quotes and the `---` kept
    yaml.preserve_quotes = True
    yaml.explicit_start = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # never re-fold a long comment or value
    return yaml


def _groups(node: Any, path: tuple[str, ...] = ()) -> dict[str, tuple[CommentedMap, tuple]]:
    """Every group mapping in a YAML inventory, by name (with the path of group names)."""
    found: dict[str, tuple[CommentedMap, tuple]] = {}
    if not isinstance(node, dict):
        return found
    for name, body in node.items():
        if isinstance(body, dict) or body is None:
            found.setdefault(str(name), (body, (*path, str(name))))
            if isinstance(body, dict) and isinstance(body.get("children"), dict):
                for child, value in _groups(body["children"], (*path, str(name))).items():
                    found.setdefault(child, value)
    return found


def _all_hosts(groups: dict[str, tuple[CommentedMap, tuple]]) -> dict[str, str]:
    hosts: dict[str, str] = {}
    for name, (body, _) in groups.items():
        if isinstance(body, dict) and isinstance(body.get("hosts"), dict):
            for host in body["hosts"]:
                hosts.setdefault(str(host), name)
    return hosts


def add_host(hosts_file: Path, kind: str, host: str, address: str) -> str:
    """Add ``host`` (``ansible_host: address``) under gpu_workers or cpu_workers of
    ``hosts_file``; the group is created beside the others when missing. Returns the group.
    Refused: an unknown kind, a bad name or address, a host the file already has."""
    if kind not in WORKER_GROUPS:
        raise InventoryError(f"unknown kind {kind!r}: gpu or cpu")
    group = WORKER_GROUPS[kind]
    check_host_name(host)
    address = check_address(address)
    yaml = _yaml()
    try:
        data = yaml.load(hosts_file.read_text())
    except FileNotFoundError as exc:
        raise InventoryError(f"{hosts_file} does not exist") from exc
    if not isinstance(data, dict):
        raise InventoryError(f"{hosts_file}: not a YAML inventory (a mapping of groups)")
    groups = _groups(data)
    existing = _all_hosts(groups)
    if host in existing:
        raise InventoryError(
            f"{host} is already in {hosts_file} (group {existing[host]}): to provision it "
            f"again, run `ansible-playbook -i {hosts_file} site.yml -l {host}`"
        )
    for other, in_group in existing.items():
        line = _host_line(groups, in_group, other)
        if line is not None and line == address:
            raise InventoryError(
                f"address {address} is already {other}'s (group {in_group}) in {hosts_file}"
            )
    if group in groups and groups[group][0] is not None:
        body = groups[group][0]
    else:
        body = CommentedMap()
        parent = _parent_of_new_group(data, groups)
        if group in parent:  # `gpu_workers:` with nothing under it
            parent[group] = body
        else:
            parent.insert(len(parent), group, body)
    if not isinstance(body.get("hosts"), dict):
        body["hosts"] = CommentedMap()
    entry = CommentedMap()
    entry["ansible_host"] = address
    body["hosts"][host] = entry
    _write(hosts_file, yaml, data)
    return group


def _host_line(groups: dict[str, tuple[CommentedMap, tuple]], group: str, host: str) -> Any:
    entry = groups[group][0]["hosts"][host]
    return entry.get("ansible_host") if isinstance(entry, dict) else None


def _parent_of_new_group(data: CommentedMap, groups: dict[str, tuple[CommentedMap, tuple]]) -> Any:
    """Where a missing worker group goes: the `children` that holds the server group or
    the other worker group (``morag.children`` in inventory/example), else the top level."""
    for sibling in ("gpu_workers", "cpu_workers", "server"):
        if sibling in groups:
            path = groups[sibling][1]
            if len(path) == 1:
                return data
            parent = data[path[0]]
            for name in path[1:-1]:
                parent = parent["children"][name]
            return parent["children"]
    return data


def _write(path: Path, yaml: YAML, data: Any) -> None:
    """Replace the file at once (a crash never leaves half an inventory), same mode."""
    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            yaml.dump(data, out)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
