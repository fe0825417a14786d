"""playbooks/rolling_update.yml: an 8-GPU host drains in one go, and reboots before any start.

Issue 8, item 12. The site scenario runs the play over the lab's GPU hosts (one instance
each, no reboot in containers); these tests run the real ansible-playbook for what that
cannot show: the drain against a host with eight instances (a stand-in `systemctl` records
its calls and which units are enabled), and the order Ansible itself gives the tasks,
imported roles included.

Issue 17, item 5: the drain disables the instances (systemd would start the old app at a
reboot otherwise); only morag_worker enables them again, at the end. The reboot stand-in is
Ansible's own: `ansible.builtin.reboot` refuses a local connection ("would reboot the control
node") and fails, which is also the failed update whose message must say how to resume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAY = ROOT / "playbooks" / "rolling_update.yml"
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)

pytestmark = pytest.mark.skipif(ANSIBLE is None, reason="ansible-playbook not installed")


def playbook(
    *args: str, env: dict[str, str] | None = None, rc: int = 0
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [
            str(ANSIBLE),
            "-i",
            "localhost,",
            "-c",
            "local",
            str(PLAY),
            "-e",
            "morag_update_group=all",
            *args,
        ],
        cwd=ROOT,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == rc, out.stdout[-3000:] + out.stderr[-3000:]
    return out


IDS = [str(i) for i in range(8)] + ["0-mig1"]

# Records each call, and keeps one file per enabled unit in ENABLED (enable/disable only).
FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "{calls}"
verb=$1
shift
for arg in "$@"; do
    case "$arg" in
        -*) ;;
        *) case "$verb" in
               enable) touch "{enabled}/$arg" ;;
               disable) rm -f "{enabled}/$arg" ;;
           esac ;;
    esac
done
"""


def worker_host(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, str]]:
    """An /etc/morag with nine instances, all enabled, and a stand-in systemctl on PATH."""
    config = tmp_path / "etc"
    config.mkdir()
    enabled = tmp_path / "enabled"
    enabled.mkdir()
    for instance in IDS:
        (config / f"worker-{instance}.env").write_text("MORAG_DEVICE=cuda\n")
        (enabled / f"morag-worker@{instance}.service").touch()
    (config / "morag.env").write_text("")  # not a worker instance
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL.format(calls=calls, enabled=enabled))
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return config, enabled, calls, env


def test_all_instances_of_a_host_are_stopped_and_disabled_by_one_systemctl_call(
    tmp_path: Path,
) -> None:
    config, enabled, calls, env = worker_host(tmp_path)
    playbook(
        "--tags",
        "drain",
        "--skip-tags",
        "always",
        "-e",
        f"morag_worker_config_dir={config}",
        "-e",
        "ansible_become=false",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        env=env,
    )
    lines = calls.read_text().splitlines()
    assert len(lines) == 1, lines
    words = lines[0].split()
    # disable --now: stopped (all at once, as before) and not started again at boot.
    assert words[:3] == ["disable", "--now", "--"]
    assert sorted(words[3:]) == sorted(f"morag-worker@{i}.service" for i in IDS)
    assert list(enabled.iterdir()) == []


def test_no_instance_is_enabled_when_the_host_reboots_and_a_failed_update_says_how_to_resume(
    tmp_path: Path,
) -> None:
    config, enabled, calls, env = worker_host(tmp_path)
    reboot_required = tmp_path / "reboot-required"
    reboot_required.touch()
    out = playbook(
        "--tags",
        "drain,reboot",
        # Their tasks tagged `always` (GPU detection, apt) have no business here.
        "--skip-tags",
        "nvidia_driver,morag_app,cuda_runtime,morag_worker",
        "-e",
        f"morag_worker_config_dir={config}",
        "-e",
        "morag_update_reboot=true",
        "-e",
        f"morag_update_reboot_required_file={reboot_required}",
        "-e",
        "ansible_become=false",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        env=env,
        rc=2,
    )
    # The reboot ran (and failed: Ansible will not reboot the control node) ...
    assert "would reboot the control node" in out.stdout, out.stdout[-3000:]
    # ... with every instance disabled: none starts the old app at boot. The rescue of the
    # failed update enabled nothing either.
    assert sorted(path.name for path in enabled.iterdir()) == []
    lines = calls.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["disable"], lines
    # The failed update says what state the host is in, and how to resume.
    message = " ".join(out.stdout.split())
    assert "stopped and disabled" in message, out.stdout[-3000:]
    assert "playbooks/rolling_update.yml -l localhost" in message, out.stdout[-3000:]
    assert "systemctl enable --now" in message, out.stdout[-3000:]


def test_the_reboot_comes_after_the_updates_and_before_any_worker_starts() -> None:
    listed = playbook("--list-tasks").stdout.splitlines()
    tasks = [line.strip() for line in listed if line.startswith("      ") and line.strip()]

    def index(predicate) -> list[int]:
        return [i for i, task in enumerate(tasks) if predicate(task)]

    drain = index(lambda t: t.startswith("Drain, stop and disable every worker instance"))
    reboot = index(lambda t: t.startswith("Reboot before the workers start again"))
    updates = index(lambda t: t.split(" : ")[0] in ("nvidia_driver", "morag_app", "cuda_runtime"))
    workers = index(lambda t: t.split(" : ")[0] == "morag_worker")
    started = index(lambda t: t.startswith("Make sure the worker instances run again"))
    assert len(drain) == len(reboot) == len(started) == 1 and updates and workers, tasks
    assert drain[0] < min(updates)
    assert max(updates) < reboot[0] < min(workers) <= max(workers) < started[0]
