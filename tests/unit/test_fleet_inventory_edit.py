"""`morag-fleet add`'s inventory edit: a ruamel.yaml round trip of hosts.yml that keeps the
sysadmin's comments and order, refuses duplicates and bad addresses, creates the group."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from morag_fleet.inventory import InventoryError, add_host, read_hosts

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventory/example/hosts.yml"
LAB = REPO / "inventory/lab/hosts.yml"


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    path = tmp_path / "hosts.yml"
    shutil.copy(EXAMPLE, path)
    return path


def test_a_gpu_host_is_added_after_the_others_and_nothing_else_changes(hosts_file: Path) -> None:
    before = hosts_file.read_text()
    assert add_host(hosts_file, "gpu", "gpu-03.example.com", "10.0.0.23") == "gpu_workers"
    last = "        gpu-02.example.com:\n          ansible_host: 10.0.0.22\n"
    new = "        gpu-03.example.com:\n          ansible_host: 10.0.0.23\n"
    assert before.count(last) == 1
    # Every comment, the order, the `---`: the file is the old one plus the two new lines.
    assert hosts_file.read_text() == before.replace(last, last + new)
    hosts = {h.name: h for h in read_hosts(hosts_file)}
    assert hosts["gpu-03.example.com"].kind == "gpu"
    assert hosts["gpu-03.example.com"].vars["ansible_host"] == "10.0.0.23"


def test_a_cpu_host_goes_under_cpu_workers(hosts_file: Path) -> None:
    add_host(hosts_file, "cpu", "cpu-02.example.com", "2001:db8::32")
    text = hosts_file.read_text()
    assert text.endswith(
        "        cpu-01.example.com:\n          ansible_host: 10.0.0.31\n"
        "        cpu-02.example.com:\n          ansible_host: 2001:db8::32\n"
    )
    assert {h.name: h.kind for h in read_hosts(hosts_file)}["cpu-02.example.com"] == "cpu"


@pytest.mark.parametrize(
    ("host", "address", "says"),
    [
        ("gpu-01.example.com", "10.0.0.99", "gpu-01.example.com is already in"),
        ("morag.example.com", "10.0.0.99", "group server"),
        ("gpu-09.example.com", "10.0.0.21", "address 10.0.0.21 is already gpu-01.example.com's"),
        ("gpu-09.example.com", "10.0.0.300", "bad address '10.0.0.300'"),
        ("gpu-09.example.com", "not an address", "bad address 'not an address'"),
        ("gpu-09.example.com", "", "bad address ''"),
        ("gpu 09", "10.0.0.29", "bad host name 'gpu 09'"),
    ],
)
def test_refusals_say_why_and_leave_the_file_alone(
    hosts_file: Path, host: str, address: str, says: str
) -> None:
    before = hosts_file.read_text()
    with pytest.raises(InventoryError, match=None) as refused:
        add_host(hosts_file, "gpu", host, address)
    assert says in str(refused.value)
    assert hosts_file.read_text() == before


def test_a_duplicate_names_the_command_that_provisions_it_again(hosts_file: Path) -> None:
    with pytest.raises(InventoryError) as refused:
        add_host(hosts_file, "cpu", "gpu-02.example.com", "10.0.0.40")
    assert f"ansible-playbook -i {hosts_file} site.yml -l gpu-02.example.com" in str(refused.value)


def test_a_missing_group_is_created_beside_the_others(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    original = (
        "---\n"
        "# Only a server so far.\n"
        "morag:\n"
        "  vars:\n"
        "    ansible_user: ansible  # the login account\n"
        "  children:\n"
        "    server:\n"
        "      hosts:\n"
        "        morag.example.com:\n"
        "          ansible_host: 10.0.0.5\n"
    )
    path.write_text(original)
    assert add_host(path, "gpu", "gpu-01.example.com", "10.0.0.21") == "gpu_workers"
    assert path.read_text() == original + (
        "    gpu_workers:\n"
        "      hosts:\n"
        "        gpu-01.example.com:\n"
        "          ansible_host: 10.0.0.21\n"
    )
    hosts = {h.name: h for h in read_hosts(path)}
    assert hosts["gpu-01.example.com"].groups == ("gpu_workers", "morag")


def test_an_empty_group_gets_its_first_host(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    path.write_text(
        "---\nmorag:\n  children:\n    server:\n      hosts:\n        s1:\n"
        "    cpu_workers:\n    # GPU hosts come later.\n    gpu_workers:\n"
    )
    add_host(path, "cpu", "c1", "10.1.0.1")
    hosts = {h.name: h.kind for h in read_hosts(path)}
    assert hosts == {"s1": None, "c1": "cpu"}
    assert "# GPU hosts come later." in path.read_text()


def test_the_lab_inventory_with_bare_host_names(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    shutil.copy(LAB, path)
    before = path.read_text()
    add_host(path, "gpu", "morag-lab-gpu3", "172.30.0.13")
    after = path.read_text()
    assert after == before.replace(
        "        morag-lab-gpu2:\n",
        "        morag-lab-gpu2:\n        morag-lab-gpu3:\n          ansible_host: 172.30.0.13\n",
    )
    with pytest.raises(InventoryError, match="morag-lab-gpu1 is already in"):
        add_host(path, "cpu", "morag-lab-gpu1", "172.30.0.11")


def test_the_file_keeps_its_mode(hosts_file: Path) -> None:
    hosts_file.chmod(0o640)
    add_host(hosts_file, "gpu", "gpu-03.example.com", "10.0.0.23")
    assert hosts_file.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in hosts_file.parent.iterdir()] == ["hosts.yml"]  # no temp file left
