"""The firewall role's SSH default, the plays' order and the check without CAP_NET_ADMIN.

- SSH used to be open to the world by default: now it is accepted from where Ansible's SSH
  connection comes from (`controller`, read from SSH_CONNECTION on the host), and from
  anywhere only with an explicit `any` (issue 18 item 6).
- The firewall was the server play's last step, loaded by a handler: a run that failed on
  the way left the host without one. Each play now applies it first and loads it at once.
- `firewall_apply: false` with a non-root login failed: `unshare -Urn nft -c` could not read
  Ansible's temporary file in the login's home (issue 22 item 7).
- A host that may not change its firewall (no CAP_NET_ADMIN) failed with nft's bare
  "Operation not permitted"; the failure now names `firewall_apply` (issue 22 item 8).

The role runs for real on this machine (local connection; the check-only mode,
firewall_apply false, so nothing is loaded); SSH_CONNECTION is what sshd would set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)
NFT = shutil.which("nft", path=f"/usr/sbin{os.pathsep}{os.environ['PATH']}")

PLAYBOOK = """
- name: Write the ruleset with the firewall role
  hosts: cases
  gather_facts: false
  # What sshd would set in the login's session (empty: Ansible does not come in over SSH).
  environment:
    SSH_CONNECTION: "{{ ssh_connection }}"
  tasks:
    - name: The role's preflight and its write-and-check, as a host runs them
      ansible.builtin.include_role:
        name: firewall
        tasks_from: "{{ step }}"
      loop: [preflight, configure]
      loop_control:
        loop_var: step
      vars:
        firewall_apply: false
        firewall_packages: []
        firewall_ruleset_file: "{{ out_dir }}/{{ inventory_hostname }}.nft"
"""

# Each case is a host of one run (local connection): name -> its variables.
CASES: dict[str, dict[str, object]] = {
    "default": {"ssh_connection": "10.9.8.7 50022 10.0.0.2 22"},
    "mapped": {"ssh_connection": "::ffff:10.9.8.7 50022 ::ffff:10.0.0.2 22"},
    "any": {"ssh_connection": "10.9.8.7 50022 10.0.0.2 22", "firewall_ssh_sources": ["any"]},
    "listed": {
        "ssh_connection": "2001:db8::7 50022 2001:db8::2 22",
        "firewall_ssh_sources": ["controller", "192.0.2.0/24"],
    },
    "no_ssh": {"ssh_connection": ""},
    "empty": {"ssh_connection": "10.9.8.7 50022 10.0.0.2 22", "firewall_ssh_sources": []},
    # Ansible's temporary files in a non-root login's home (0700, its uid): the check's
    # user namespace maps only root and used to get "Permission denied" there.
    "login_home": {"ssh_connection": "10.9.8.7 50022 10.0.0.2 22"},
    # A server-like ruleset that serves the fleet (the default case above serves nothing).
    "fleet_rule": {
        "ssh_connection": "10.9.8.7 50022 10.0.0.2 22",
        "firewall_rules": [{"name": "Redis", "from": ["fleet"], "ports": [6379]}],
    },
}


def ansible_env() -> dict[str, str]:
    """ansible-playbook's environment, run outside the repository (its ansible.cfg wants a
    vault password and an inventory): no ANSIBLE_*/SSH_* of the caller, this role's path,
    and /usr/sbin for nft."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "SSH_"))}
    env |= {"ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_LOCALHOST_WARNING": "false"}
    env["PATH"] = f"/usr/sbin{os.pathsep}{env['PATH']}"
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One ansible-playbook run over every case: its output and the rulesets it wrote."""
    if ANSIBLE is None:
        pytest.skip("ansible-playbook is not installed")
    if NFT is None or shutil.which("unshare") is None:
        pytest.skip("nftables is installed by make deps")
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another uid")
    tmp = tmp_path_factory.mktemp("firewall")
    home = tmp / "home"
    (home / ".ansible" / "tmp").mkdir(parents=True)
    for path in (home, home / ".ansible", home / ".ansible" / "tmp"):
        os.chown(path, 65534, 65534)
        path.chmod(0o700)
    hosts = {name: dict(case) for name, case in CASES.items()}
    hosts["login_home"]["ansible_remote_tmp"] = str(home / ".ansible" / "tmp")
    for case in hosts.values():
        case |= {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    # The fleet is the server group: localhost, whose name resolves on this machine.
    inventory = {
        "all": {
            "children": {
                "cases": {"hosts": hosts},
                "server": {"hosts": {"localhost": {"ansible_connection": "local"}}},
            }
        }
    }
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp / "fw.yml").write_text(PLAYBOOK)
    args = [ANSIBLE, "-i", str(tmp / "hosts.yml"), str(tmp / "fw.yml"), "-e", f"out_dir={tmp}"]
    # Run outside the repository: its ansible.cfg wants a vault password and an inventory.
    env = ansible_env()
    done = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    rulesets = {name: (tmp / f"{name}.nft") for name in CASES}
    return {
        "output": done.stdout + done.stderr,
        "rulesets": {n: p.read_text() for n, p in rulesets.items() if p.exists()},
    }


def ruleset(run: dict[str, object], case: str) -> str:
    found = run["rulesets"]  # type: ignore[index]
    assert case in found, run["output"]
    return str(found[case])


def ssh_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "dport 22 " in line]


def set_elements(text: str, name: str) -> str:
    found = re.search(rf"set {name} {{[^}}]*?(elements = {{ ([^}}]*) }})?\s*}}", text)
    assert found, name
    return found.group(2) or ""


def test_ssh_is_accepted_from_the_controller_only_by_default(run: dict[str, object]) -> None:
    text = ruleset(run, "default")
    assert set_elements(text, "ssh4") == "10.9.8.7"
    assert ssh_lines(text) == [
        "ip saddr @ssh4 tcp dport 22 accept",
        "ip6 saddr @ssh6 tcp dport 22 accept",
    ]


def test_an_ipv4_mapped_controller_address_is_written_as_ipv4(run: dict[str, object]) -> None:
    assert set_elements(ruleset(run, "mapped"), "ssh4") == "10.9.8.7"


def test_ssh_from_anywhere_is_an_explicit_opt_in(run: dict[str, object]) -> None:
    assert ssh_lines(ruleset(run, "any")) == ["tcp dport 22 accept"]


def test_listed_networks_and_the_controller_together(run: dict[str, object]) -> None:
    text = ruleset(run, "listed")
    assert set_elements(text, "ssh4") == "192.0.2.0/24"
    assert set_elements(text, "ssh6") == "2001:db8::7"


def test_without_an_ssh_connection_ssh_is_not_opened_to_the_world(
    run: dict[str, object],
) -> None:
    text = ruleset(run, "no_ssh")
    assert "tcp dport 22 accept" not in ssh_lines(text)
    assert set_elements(text, "ssh4") == "" and set_elements(text, "ssh6") == ""
    assert "SSH is accepted from loopback only" in str(run["output"])


def test_only_a_ruleset_that_serves_the_fleet_lists_it(run: dict[str, object]) -> None:
    # A worker's ruleset (no `fleet` rule) must not change when a host joins the fleet: adding
    # a host then changes the server (admit_on_server.yml) and nothing else (issue 22 item 4).
    assert set_elements(ruleset(run, "default"), "fleet4") == ""
    served = ruleset(run, "fleet_rule")
    assert "127.0.0.1" in set_elements(served, "fleet4")
    assert "ip saddr @fleet4 tcp dport { 6379 } accept" in served


def test_an_empty_source_list_is_refused_naming_the_variable(run: dict[str, object]) -> None:
    assert "empty" not in run["rulesets"]  # type: ignore[operator]
    output = str(run["output"])
    assert "an empty list no" in output and "write [any] for that" in output


def test_the_check_reads_a_ruleset_in_a_non_root_logins_home(run: dict[str, object]) -> None:
    assert set_elements(ruleset(run, "login_home"), "ssh4") == "10.9.8.7"


def _play_steps(path: Path) -> list[str]:
    """The role names of a play's provisioning steps, in order (pre_tasks excluded)."""
    play = yaml.safe_load(path.read_text())[0]
    if "roles" in play:
        return [r["role"] if isinstance(r, dict) else r for r in play["roles"]]
    block = play["tasks"][0]["block"]
    return [
        t["ansible.builtin.import_role"]["name"]
        for t in block
        if "ansible.builtin.import_role" in t
    ]


@pytest.mark.parametrize("play", ["server.yml", "gpu_workers.yml", "cpu_workers.yml"])
def test_each_play_applies_the_firewall_first(play: str) -> None:
    steps = _play_steps(ROOT / "playbooks" / play)
    assert steps[0] == "firewall", steps
    assert steps.count("firewall") == 1


def _tasks(tasks: list[dict]) -> list[dict]:
    """Every task, those of blocks and rescues included."""
    flat = []
    for task in tasks:
        flat.append(task)
        for part in ("block", "rescue", "always"):
            flat += _tasks(task.get(part, []))
    return flat


def test_the_ruleset_is_loaded_at_once_not_by_a_handler() -> None:
    # A handler runs at the end of the play: a failure in between skips it.
    configure = _tasks(yaml.safe_load((ROOT / "roles/firewall/tasks/configure.yml").read_text()))
    assert not any("notify" in task for task in configure)
    loads = [
        t
        for t in configure
        if t.get("ansible.builtin.command", {}).get("argv", [])[:2] == ["nft", "-f"]
    ]
    assert len(loads) == 1


def test_a_host_without_cap_net_admin_is_told_to_set_firewall_apply(
    tmp_path: Path,
) -> None:
    """firewall_apply true (the default) where nft may not talk to the kernel: the run
    fails naming the variable, as on a container without CAP_NET_ADMIN."""
    if ANSIBLE is None or NFT is None:
        pytest.skip("ansible-playbook and nftables come with make deps")
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to drop CAP_NET_ADMIN")
    inventory = {
        "all": {
            "children": {
                "cases": {
                    "hosts": {
                        "nocap": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                            "ssh_connection": "10.9.8.7 50022 10.0.0.2 22",
                        }
                    }
                },
                "server": {"hosts": {"localhost": {"ansible_connection": "local"}}},
            }
        }
    }
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "fw.yml").write_text(
        PLAYBOOK.replace("firewall_apply: false", "firewall_apply: true")
    )
    env = ansible_env()
    args = [setpriv, "--bounding-set", "-net_admin", "--inh-caps", "-net_admin", ANSIBLE]
    args += ["-i", str(tmp_path / "hosts.yml"), str(tmp_path / "fw.yml")]
    args += ["-e", f"out_dir={tmp_path}"]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Operation not permitted" in output and "Set firewall_apply: false" in output, output
    assert not (tmp_path / "nocap.nft").exists()  # validate refused it: nothing half-written


def test_a_fleet_name_that_does_not_resolve_is_named(tmp_path: Path) -> None:
    """The fleet's names are resolved in one command on the host; one that does not resolve
    fails the host with every such name, and the two ways to fix it."""
    if ANSIBLE is None or NFT is None:
        pytest.skip("ansible-playbook and nftables are installed by make deps")
    case = dict(CASES["fleet_rule"])
    case |= {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {
        "all": {
            "children": {
                "cases": {"hosts": {"fleet_rule": case}},
                "server": {
                    "hosts": {
                        "localhost": {"ansible_connection": "local"},
                        "ghost-1.invalid": {},
                        "ghost-2.invalid": {},
                    }
                },
            }
        }
    }
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "fw.yml").write_text(PLAYBOOK)
    args = [ANSIBLE, "-i", "hosts.yml", "fw.yml", "-e", f"out_dir={tmp_path}"]
    env = ansible_env()
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "ghost-1.invalid, ghost-2.invalid (fleet hosts) do not resolve on fleet_rule" in output
    assert "firewall_fleet_extra" in output
    assert "localhost, ghost" not in output and "invalid, localhost" not in output
    assert not (tmp_path / "fleet_rule.nft").exists()


SERVED_PLAY = """
- name: The server's rules as an HA inventory leaves them
  hosts: server
  gather_facts: false
  vars_files: [{defaults}]
  tasks:
    - name: Show them
      ansible.builtin.debug:
        msg: "SERVED {{{{ firewall_server_rules_served | map(attribute='name') | join(',') }}}}"
"""


@pytest.mark.parametrize(
    ("groups", "served"),
    [
        ({}, "redis,nfs,api"),
        ({"redis": ["r1", "r2", "r3"]}, "nfs,api"),
        ({"api": ["a2"]}, "redis,nfs"),
        ({"redis": ["r1", "r2", "r3"], "api": ["srv", "a2"]}, "nfs,api"),
    ],
)
def test_the_server_opens_only_what_it_serves(
    tmp_path: Path, groups: dict[str, list[str]], served: str
) -> None:
    """With a `redis` group the server runs no Redis, with an `api` group it is not in no
    API: their ports stay shut there (a Redis left from before an HA conversion included)."""
    inventory = {"all": {"children": {"server": {"hosts": {"srv": None}}}}}
    for group, hosts in groups.items():
        inventory["all"]["children"][group] = {"hosts": dict.fromkeys(hosts)}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    defaults = ROOT / "roles" / "firewall" / "defaults" / "main.yml"
    (tmp_path / "play.yml").write_text(SERVED_PLAY.format(defaults=defaults))
    out = subprocess.run(
        [ANSIBLE, "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "play.yml")],
        env={**ansible_env(), "ANSIBLE_CONNECTION": "local"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SERVED {served}" in out.stdout, out.stdout
