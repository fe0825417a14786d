"""The morag_worker role's store workers with a Qdrant server (issue 19 item 4).

Qdrant's local mode allows one writer: the role keeps one store instance unless the
inventory points the store at a Qdrant server or cluster (morag_worker_qdrant_url), and
refuses more without one. The role's preflight runs for real here (ansible-playbook, local
connection, a host per case); then its templates are rendered for the instances it decided,
as configure.yml writes them (the rest of configure.yml drives systemd, absent here). No
Qdrant server runs on these machines: this is the proof the server path has.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "morag_worker"
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)
KEY = "qdrant-key-from-the-vault"
# Numeric: resolving it (preflight's getent for IPAddressAllow=) needs no DNS.
SERVER = "https://10.0.0.7:6333"

CASES: dict[str, dict] = {
    "local": {},
    "server": {
        "morag_worker_qdrant_url": SERVER,
        "morag_worker_qdrant_api_key": KEY,
        "morag_worker_qdrant_collection": "site",
        "morag_worker_store_count": 2,
    },
    "two_local": {"morag_worker_store_count": 2},
    "key_in_clear": {
        "morag_worker_qdrant_url": "http://10.0.0.7:6333",
        "morag_worker_qdrant_api_key": KEY,
    },
}

PLAYBOOK = f"""
- name: The store workers of a server, per case
  hosts: cases
  gather_facts: true
  # As playbooks/server.yml sets them; the cases' own variables are in the inventory.
  vars:
    morag_worker_mode: cpu
    morag_worker_store_instance: true
    morag_worker_hostname: srv
    morag_worker_config_dir: "{{{{ out_dir }}}}/{{{{ inventory_hostname }}}}"
    morag_worker_venv: "{{{{ out_dir }}}}/venv"
  tasks:
    - name: The role's preflight, as the server play runs it
      ansible.builtin.include_role:
        name: morag_worker
        tasks_from: preflight
        public: true

    - name: Report the instances
      ansible.builtin.debug:
        msg: "INSTANCES {{{{ {{'host': inventory_hostname,
                             'ids': _morag_worker_instances | map(attribute='id') | list,
                             'names': _morag_worker_instances
                                       | map(attribute='name') | list}} | to_json }}}}"

    - name: Write each instance's env file with the role's template
      ansible.builtin.template:
        src: {ROLE}/templates/worker.env.j2
        dest: "{{{{ out_dir }}}}/{{{{ inventory_hostname }}}}/worker-{{{{ item.id }}}}.env"
        mode: "0640"
      loop: "{{{{ _morag_worker_instances }}}}"

    - name: Render the unit with the role's template
      ansible.builtin.template:
        src: {ROLE}/templates/morag-worker@.service.j2
        dest: "{{{{ out_dir }}}}/{{{{ inventory_hostname }}}}/morag-worker@.service"
        mode: "0644"
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, dict]]:
    if ANSIBLE is None:
        pytest.skip("ansible-playbook is not installed")
    tmp = tmp_path_factory.mktemp("store-qdrant")
    (tmp / "venv" / "bin").mkdir(parents=True)
    # Preflight checks that the app is installed.
    (tmp / "venv" / "bin" / "morag").touch()
    hosts = {}
    for name, case in CASES.items():
        (tmp / name).mkdir()
        hosts[name] = case | {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
        }
    (tmp / "hosts.yml").write_text(
        yaml.safe_dump({"all": {"children": {"cases": {"hosts": hosts}}}})
    )
    (tmp / "pb.yml").write_text(PLAYBOOK)
    # Outside the repository: its ansible.cfg wants a vault password and an inventory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env |= {
        "ANSIBLE_ROLES_PATH": str(ROLE.parent),
        "ANSIBLE_LOCALHOST_WARNING": "false",
    }
    done = subprocess.run(
        [
            ANSIBLE,
            "-i",
            str(tmp / "hosts.yml"),
            str(tmp / "pb.yml"),
            "-e",
            f"out_dir={tmp}",
        ],
        check=False,
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    instances = {}
    for line in output.splitlines():
        if '"msg": "INSTANCES ' in line:
            found = json.loads(
                json.loads("{" + line.strip() + "}")["msg"].removeprefix("INSTANCES ")
            )
            instances[found["host"]] = found
    return tmp, output, instances


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.partition("=") for line in path.read_text().splitlines() if "=" in line)
    return {key: value.strip('"') for key, _, value in pairs if not key.startswith("#")}


def unit_allow(tmp: Path, host: str) -> list[str]:
    for line in (tmp / host / "morag-worker@.service").read_text().splitlines():
        if line.startswith("IPAddressAllow="):
            return line.removeprefix("IPAddressAllow=").split()
    raise AssertionError("no IPAddressAllow= line")


def test_by_default_one_store_worker_on_local_qdrant(run: tuple) -> None:
    tmp, output, instances = run
    assert instances["local"]["ids"] == ["0", "store"], output
    assert instances["local"]["names"] == ["cpu0@srv", "store@srv"]
    store = env_file(tmp / "local" / "worker-store.env")
    assert store["MORAG_WORKER_QUEUE_ARGS"] == "--queue morag-store"
    assert not [key for key in store if key.startswith("MORAG_QDRANT_")]
    assert "10.0.0.7" not in unit_allow(tmp, "local")


def test_a_qdrant_server_gets_its_url_and_key_and_two_store_workers(run: tuple) -> None:
    tmp, output, instances = run
    assert "fatal: [server]" not in output, output
    assert instances["server"]["ids"] == ["0", "store", "store1"]
    assert instances["server"]["names"] == ["cpu0@srv", "store@srv", "store1@srv"]
    for instance in ("store", "store1"):
        store = env_file(tmp / "server" / f"worker-{instance}.env")
        assert store["MORAG_WORKER_QUEUE_ARGS"] == "--queue morag-store"
        assert store["MORAG_QDRANT_URL"] == SERVER
        assert store["MORAG_QDRANT_API_KEY"] == KEY
        assert store["MORAG_QDRANT_COLLECTION"] == "site"
        assert "MORAG_QDRANT_CA_FILE" not in store
    # Only the store workers hold the key.
    assert "QDRANT" not in (tmp / "server" / "worker-0.env").read_text()
    # The unit's address filter lets the workers reach the Qdrant server.
    assert "10.0.0.7" in unit_allow(tmp, "server")


def test_two_store_workers_without_a_qdrant_server_are_refused(run: tuple) -> None:
    tmp, output, instances = run
    assert "fatal: [two_local]: FAILED!" in output, output
    assert (
        "two_local: morag_worker_store_count is 2, but morag_worker_qdrant_url is empty" in output
    )
    assert "Qdrant in local mode on disk, which allows one writer at a time" in output
    assert "or set morag_worker_store_count: 1" in output
    assert "two_local" not in instances  # it stopped in the preflight
    assert not list((tmp / "two_local").glob("worker-*.env"))


def test_an_api_key_in_clear_to_a_remote_qdrant_is_refused(run: tuple) -> None:
    _, output, _ = run
    assert "fatal: [key_in_clear]: FAILED!" in output, output
    assert "key_in_clear: morag_worker_qdrant_url (http://10.0.0.7:6333) must be" in output
    assert "the key would cross the network in clear" in output
    assert KEY not in output
