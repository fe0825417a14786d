"""site.yml's first play refuses inventories that cannot be meant for real hosts (the
example itself, a copy still listing the example's hosts, a copy without a vault) and
accepts a copy edited as README.md "Real hosts" says, with a vault from tools/new-vault.sh.
Runs the real ansible-playbook and tools/new-vault.sh; the checks need no host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def env(home: Path) -> dict[str, str]:
    return dict(os.environ, HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}", NO_COLOR="1")


def preflight(inventory: Path, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), "playbooks/preflight.yml"],
        cwd=ROOT, env=env(home), capture_output=True, text=True, check=False,
    )  # fmt: skip


def copy_example(tmp_path: Path) -> Path:
    inventory = tmp_path / "inventory" / "mysite"
    shutil.copytree(ROOT / "inventory" / "example", inventory)
    return inventory


def new_vault(inventory: Path, home: Path) -> None:
    made = subprocess.run(
        [str(ROOT / "tools" / "new-vault.sh"), str(inventory)],
        cwd=ROOT, env=env(home), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr


def rename_hosts(inventory: Path) -> None:
    hosts = inventory / "hosts.yml"
    hosts.write_text(hosts.read_text().replace(".example.com", ".site.internal"))
    (inventory / "host_vars" / "gpu-02.example.com.yml").unlink()


def test_the_example_itself_is_refused(tmp_path: Path) -> None:
    out = preflight(ROOT / "inventory" / "example" / "hosts.yml", tmp_path)
    assert out.returncode != 0
    assert "is the example inventory" in out.stdout + out.stderr


def test_a_copy_with_the_example_hosts_is_refused(tmp_path: Path) -> None:
    out = preflight(copy_example(tmp_path) / "hosts.yml", tmp_path)
    assert out.returncode != 0
    assert "still lists the example's hosts" in out.stdout + out.stderr


def test_a_copy_without_a_vault_is_refused(tmp_path: Path) -> None:
    inventory = copy_example(tmp_path)
    rename_hosts(inventory)
    out = preflight(inventory / "hosts.yml", tmp_path)
    assert out.returncode != 0
    assert "tools/new-vault.sh" in out.stdout + out.stderr


def test_an_edited_copy_with_a_new_vault_passes(tmp_path: Path) -> None:
    inventory = copy_example(tmp_path)
    rename_hosts(inventory)
    new_vault(inventory, tmp_path)
    vault = inventory / "group_vars" / "all" / "vault.yml"
    assert vault.read_text().startswith("$ANSIBLE_VAULT;1.1;AES256")
    assert (tmp_path / ".morag-vault-pass").stat().st_mode & 0o077 == 0
    # A second run refuses to replace the secrets.
    again = subprocess.run(
        [str(ROOT / "tools" / "new-vault.sh"), str(inventory)],
        cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert again.returncode != 0 and "exists" in again.stderr
    out = preflight(inventory / "hosts.yml", tmp_path)
    assert out.returncode == 0, out.stdout[-3000:]


def test_workers_and_redis_must_agree_on_where_records_are_written(tmp_path: Path) -> None:
    inventory = copy_example(tmp_path)
    rename_hosts(inventory)
    new_vault(inventory, tmp_path)
    main = inventory / "group_vars" / "all" / "main.yml"
    text = main.read_text()
    assert "redis_worker_job_writes: api\n" in text
    main.write_text(
        text.replace("redis_worker_job_writes: api\n", "redis_worker_job_writes: redis\n")
    )
    out = preflight(inventory / "hosts.yml", tmp_path)
    assert out.returncode != 0
    assert "redis_worker_job_writes (redis) differ" in out.stdout + out.stderr, out.stdout[-2000:]
