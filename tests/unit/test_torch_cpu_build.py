"""GPU-less hosts get torch's CPU build (issue 22 item 2).

`morag_server_app_extras: [all]` pulled PyPI's torch onto the server: the CUDA build, a
5.9 GB venv and 2 min 51 s of pip, for a host without a GPU. morag_app now installs torch
first from PyTorch's CPU index where the package index would be used (source `wheel`) and
the extras pull torch; the server and CPU-worker plays ask for it. The wheelhouse path
already holds the CPU build (molecule/images/wheelhouse_plan.py).

The role's own variables are evaluated by ansible-playbook here, per kind of host.
"""

from __future__ import annotations

import json
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

PLAY = """
- name: Evaluate the morag_app role's torch decision per host
  hosts: cases
  gather_facts: false
  vars_files:
    - {root}/roles/morag_app/vars/main.yml
  tasks:
    - name: Print it
      ansible.builtin.debug:
        msg: "DECISION {{{{ _decision | to_json }}}}"
      vars:
        _decision:
          host: "{{{{ inventory_hostname }}}}"
          needed: "{{{{ _morag_app_torch_cpu_needed | bool }}}}"
          args: "{{{{ _morag_app_torch_cpu_args }}}}"
"""

CASES = {
    # The server play: every extra, morag_app_torch_cpu from playbooks/server.yml.
    "server": {"morag_app_extras": ["all"], "morag_app_torch_cpu": True},
    # A CPU-worker host whose extras pull torch.
    "cpu_ingest": {"morag_app_extras": ["audio", "ingest"], "morag_app_torch_cpu": True},
    # A GPU host: the default (morag_app_device auto) keeps PyPI's CUDA build.
    "gpu": {"morag_app_extras": ["all"]},
    # A host on the CPU by setting: the default follows morag_app_device.
    "device_cpu": {"morag_app_extras": ["documents-layout"], "morag_app_device": "cpu"},
    # No torch extra: nothing to install first.
    "audio_only": {"morag_app_extras": ["audio"], "morag_app_torch_cpu": True},
    # The wheelhouse (--no-index) already holds the CPU build.
    "wheelhouse": {
        "morag_app_extras": ["all"],
        "morag_app_torch_cpu": True,
        "morag_app_source": "wheelhouse",
    },
}


@pytest.fixture(scope="module")
def decisions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    if ANSIBLE is None:
        pytest.skip("ansible-playbook is not installed")
    tmp = tmp_path_factory.mktemp("torch")
    hosts = {
        name: case | {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
        for name, case in CASES.items()
    }
    # The role's defaults as the inventory's `all` vars: below every host's own, as role
    # defaults are below inventory variables.
    defaults = yaml.safe_load((ROOT / "roles/morag_app/defaults/main.yml").read_text())
    defaults["role_path"] = str(ROOT / "roles/morag_app")
    inventory = {"all": {"vars": defaults, "children": {"cases": {"hosts": hosts}}}}
    (tmp / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp / "play.yml").write_text(PLAY.format(root=ROOT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env |= {"ANSIBLE_LOCALHOST_WARNING": "false", "ANSIBLE_STDOUT_CALLBACK": "default"}
    done = subprocess.run(
        [ANSIBLE, "-i", str(tmp / "hosts.yml"), str(tmp / "play.yml")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = [
        json.loads(m) for m in re.findall(r'"DECISION (\{.*\})"', done.stdout.replace('\\"', '"'))
    ]
    assert len(found) == len(CASES), done.stdout + done.stderr
    return {d["host"]: d for d in found}


@pytest.mark.parametrize("host", ["server", "cpu_ingest", "device_cpu"])
def test_a_gpu_less_host_installs_the_cpu_build_first(decisions: dict, host: str) -> None:
    assert decisions[host]["needed"] is True
    assert decisions[host]["args"] == [
        "--index-url",
        "https://download.pytorch.org/whl/cpu",
        "torch==2.13.0",
    ]


@pytest.mark.parametrize("host", ["gpu", "audio_only", "wheelhouse"])
def test_others_install_as_before(decisions: dict, host: str) -> None:
    assert decisions[host]["needed"] is False


@pytest.mark.parametrize("play", ["server.yml", "cpu_workers.yml"])
def test_the_gpu_less_plays_ask_for_it(play: str) -> None:
    text = (ROOT / "playbooks" / play).read_text()
    assert re.search(r"morag_app_torch_cpu: .*true", text), play


def test_the_role_installs_the_apps_torch_pin() -> None:
    defaults = yaml.safe_load((ROOT / "roles/morag_app/defaults/main.yml").read_text())
    pyproject = (ROOT / "app/pyproject.toml").read_text()
    pins = set(re.findall(r'"(torch==[^"]+)"', pyproject))
    assert pins == {defaults["morag_app_torch_requirement"]}
