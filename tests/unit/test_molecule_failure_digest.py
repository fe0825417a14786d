"""molecule/run.py keeps the lines of a failed scenario's log that say why (CI shows only the
end of `make test`'s output): checked on a real ansible-playbook failure, in the format
ansible.cfg sets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.unit.test_molecule_scenarios import runner

ROOT = Path(__file__).resolve().parents[2]

PLAY = """
- name: A scenario's step that fails the way the lab scripts do
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Run a step that reports a problem and fails
      ansible.builtin.command:
        argv: [sh, -c, "echo 'all checks passed'; echo 'PROBLEM: job 7: failed'; exit 1"]
      changed_when: false
"""


def test_a_failed_scenario_names_its_reason_after_the_table(tmp_path: Path, monkeypatch) -> None:
    run = runner()
    monkeypatch.setattr(run, "DIGEST", tmp_path / "failures.txt")
    play = tmp_path / "play.yml"
    play.write_text(PLAY)
    log = tmp_path / "scenario.log"
    bin_dir = Path(sys.executable).parent
    cmd = [
        str(bin_dir / "ansible-playbook"),
        "-i",
        "localhost,",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        str(play),
    ]
    monkeypatch.setenv("ANSIBLE_CONFIG", str(ROOT / "ansible.cfg"))
    assert not run.run(cmd, log)
    digest = run.DIGEST.read_text()
    assert "scenario failed" in digest
    assert "fatal: [localhost]: FAILED!" in digest
    assert "PROBLEM: job 7: failed" in digest
    assert "all checks passed" not in digest  # only the lines that say why


def test_retries_under_way_are_not_reasons(tmp_path: Path) -> None:
    log = tmp_path / "scenario.log"
    log.write_text(
        "FAILED - RETRYING: [h]: Wait for the primary (59 retries left).\n"
        "CRITICAL 'molecule/default/molecule.yml' glob failed.  Exiting.\n"
        "ok: [h]\n"
    )
    assert runner().why(log) == []


def test_make_test_shows_no_reason_left_from_an_earlier_run() -> None:
    # tests/stages.py empties the digest at its start (and prints it after its table).
    digest = runner().DIGEST
    digest.parent.mkdir(parents=True, exist_ok=True)
    digest.write_text("site failed (log: an earlier run)\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "stages.py"), "no-such-stage"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0
    assert "an earlier run" not in out.stdout
    assert not digest.exists()


ASSERT_PLAY = """
- name: A role's preflight that refuses the host
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Assert that the distribution is supported
      ansible.builtin.assert:
        that: [false]
        fail_msg: "this host runs Fedora 40: use Debian 12"
"""


def test_a_failed_assert_shows_its_message(tmp_path: Path, monkeypatch) -> None:
    """Ansible 2.19 writes an assert's fail_msg on its `[ERROR]: Task failed:` line (the
    `fatal:` line holds only `FAILED! =>`): that line is kept."""
    run = runner()
    monkeypatch.setattr(run, "DIGEST", tmp_path / "failures.txt")
    play = tmp_path / "play.yml"
    play.write_text(ASSERT_PLAY)
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "ansible-playbook"), "-i", "localhost,", "-e"]
    cmd += [f"ansible_python_interpreter={sys.executable}", str(play)]
    monkeypatch.setenv("ANSIBLE_CONFIG", str(ROOT / "ansible.cfg"))
    assert not run.run(cmd, tmp_path / "scenario.log")
    assert "this host runs Fedora 40: use Debian 12" in run.DIGEST.read_text()
