"""No tag selection changes a GPU host's worker unit (issue 17, items 6 and 7).

The nvidia_driver role publishes the units GPU workers require (nvidia-devices.service,
nvidia-fabricmanager.service) from its `always` detection, and nvidia_mig the MIG layout unit;
`--skip-tags nvidia_driver` skips even `always` tasks of a role tagged nvidia_driver in
playbooks/gpu_workers.yml, and the unit used to lose its Requires=/After= without a word.
These tests run the real playbooks/gpu_workers.yml against this machine (local connection,
check mode with --diff: nothing is written, apt only simulates) with stand-ins on PATH:
`lspci` (an HGX H100 board with NVSwitches, two of its GPUs: fewer instances, a shorter
run), `nvidia-smi` (those GPUs) and `systemctl` (the GPU units enabled as those roles leave
them), and compare the unit morag_worker would write. The runs of a test go in parallel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAY = ROOT / "playbooks" / "gpu_workers.yml"
DATA = ROOT / "tests" / "data" / "gpu"
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)


def _apt_bindings() -> bool:
    # In check mode Ansible's apt module needs python3-apt (it re-executes under /usr/bin/python3).
    probe = subprocess.run(
        ["/usr/bin/python3", "-c", "import apt"], capture_output=True, check=False
    )
    return probe.returncode == 0


pytestmark = [
    pytest.mark.skipif(ANSIBLE is None, reason="ansible-playbook not installed"),
    pytest.mark.skipif(
        not Path("/usr/bin/python3").exists() or not _apt_bindings(),
        reason="python3-apt missing (apt in check mode)",
    ),
]

MIG_LAYOUT = [{"devices": [0], "mig_enabled": True, "mig_devices": {"1g.10gb": 7}}]


def _fixture(name: str) -> str:
    lines = (DATA / name).read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith("#")) + "\n"


GPUS = 2


def _lspci() -> str:
    """lspci-hgx-h100-nvswitch.txt with its NVSwitches and its first GPUS GPUs."""
    lines, gpus = [], 0
    for line in _fixture("lspci-hgx-h100-nvswitch.txt").splitlines():
        if "[10de:" in line and ("[0302]" in line or "[0300]" in line):
            gpus += 1
            if gpus > GPUS:
                continue
        lines.append(line)
    assert gpus >= GPUS
    return "\n".join(lines) + "\n"


def _smi_list() -> str:
    """The first GPUS lines of smi-l-hgx-h100.txt (nvidia-smi -L)."""
    return "\n".join(_fixture("smi-l-hgx-h100.txt").splitlines()[:GPUS]) + "\n"


def _smi_query() -> str:
    """The same GPUs in the morag_worker role's --query-gpu format."""
    rows = []
    for line in _smi_list().splitlines():
        match = re.match(r"^GPU (\d+): (.*) \(UUID: (GPU-[^)]+)\)$", line)
        if match:
            index, name, uuid = match.groups()
            rows.append(
                f"{index}, {uuid}, 00000000:{0x18 + int(index):02X}:00.0, {name}, 81559, Disabled"
            )
    assert len(rows) == GPUS
    return "\n".join(rows) + "\n"


SYSTEMCTL = """#!/bin/sh
echo "$*" >> "{calls}"
case "$1" in
    is-enabled)
        for unit; do :; done
        if [ -e "{enabled}/$unit" ]; then echo enabled; exit 0; fi
        echo disabled; exit 1 ;;
    show)
        for unit; do :; done
        printf 'Id=%s\\nLoadState=loaded\\nActiveState=inactive\\n' "$unit"
        printf 'SubState=dead\\nUnitFileState=enabled\\n' ;;
esac
exit 0
"""


@pytest.fixture
def host(tmp_path: Path) -> dict:
    """Stand-ins for an HGX H100 host on which nvidia_driver (and nvidia_mig) ran before."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "lspci.txt").write_text(_lspci())
    (tmp_path / "query.csv").write_text(_smi_query())
    (tmp_path / "list.txt").write_text(_smi_list())
    enabled = tmp_path / "enabled"
    enabled.mkdir()
    for unit in ("nvidia-devices.service", "nvidia-fabricmanager.service"):
        (enabled / unit).touch()
    calls = tmp_path / "calls"
    scripts = {
        "lspci": f'#!/bin/sh\ncat "{tmp_path / "lspci.txt"}"\n',
        "nvidia-smi": (
            "#!/bin/sh\n"
            f'case "$*" in *--query-gpu*) cat "{tmp_path / "query.csv"}" ;;\n'
            f'  -L) cat "{tmp_path / "list.txt"}" ;; *) exit 9 ;; esac\n'
        ),
        "systemctl": SYSTEMCTL.format(calls=calls, enabled=enabled),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    config = tmp_path / "etc"
    config.mkdir()
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        json.dumps(
            {
                "gpu_workers": {
                    "hosts": {
                        "localhost": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                            "ansible_become": False,
                        }
                    }
                }
            }
        )
    )
    return {
        "tmp": tmp_path,
        "bin": bin_dir,
        "enabled": enabled,
        "config": config,
        "inventory": inventory,
        "calls": calls,
    }


def unit(host: dict, *args: str, layout: list | None = None) -> str:
    """The morag-worker@.service content the play would write, run with these tag options."""
    extra = {
        # Never written (check mode); its own path for each run.
        "_morag_worker_unit_path": str(host["tmp"] / f"unit-{abs(hash(args))}"),
        "morag_worker_config_dir": str(host["config"]),
        "morag_worker_venv": str(host["tmp"] / "venv"),
        "morag_worker_ip_allow_hosts": [],
        "nfs_client_server": "127.0.0.1",
        "nfs_client_export": "/srv/morag",
        "nvidia_mig_layout": layout or [],
        "morag_worker_mig": bool(layout),
    }
    env = {
        **os.environ,
        "PATH": f"{host['bin']}{os.pathsep}{os.environ['PATH']}",
        "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
    }
    command = [str(ANSIBLE), "-i", str(host["inventory"]), str(PLAY), "--check", "--diff"]
    out = subprocess.run(
        [*command, "-e", json.dumps(extra), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    results = json.loads(out.stdout)
    for play in results["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].endswith("Install the templated systemd unit"):
                return task["hosts"]["localhost"]["diff"][0]["after"]
    raise AssertionError("morag_worker did not render its unit")


def requires(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("Requires=", "After=nvidia"))]


def units(host: dict, *runs: tuple, layout: list | None = None) -> list[str]:
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        return list(pool.map(lambda args: unit(host, *args, layout=layout), runs))


def test_skipping_the_driver_role_keeps_the_units_gpu_dependencies(host: dict) -> None:
    whole, skipped, install_only = units(
        host,
        # nvidia_driver's detection (tag always) runs: its fact nvidia_driver_worker_units.
        ("--tags", "morag_worker"),
        ("--tags", "morag_worker", "--skip-tags", "nvidia_driver"),
        ("--tags", "morag_worker_install", "--skip-tags", "nvidia_driver,nvidia_mig"),
    )
    assert requires(whole) == [
        "Requires=nvidia-devices.service nvidia-fabricmanager.service",
        "After=nvidia-devices.service nvidia-fabricmanager.service",
    ]
    assert skipped == whole
    assert install_only == whole


def test_a_mig_layout_makes_the_workers_require_the_mig_unit_whatever_the_tags(
    host: dict,
) -> None:
    (host["enabled"] / "nvidia-mig-layout.service").touch()
    whole, skipped = units(
        host,
        ("--tags", "morag_worker"),
        ("--tags", "morag_worker", "--skip-tags", "nvidia_driver,nvidia_mig"),
        layout=MIG_LAYOUT,
    )
    assert requires(whole) == [
        "Requires=nvidia-devices.service nvidia-fabricmanager.service nvidia-mig-layout.service",
        "After=nvidia-devices.service nvidia-fabricmanager.service nvidia-mig-layout.service",
    ]
    assert skipped == whole
