"""cuda_runtime with method none: an env file without LD_LIBRARY_PATH, nothing installed."""

import json


def test_env_file(host):
    f = host.file("/etc/morag/cuda.env")
    assert f.exists
    assert (f.user, f.group, f.mode) == ("root", "root", 0o644)
    assert "LD_LIBRARY_PATH" not in [
        line.split("=")[0] for line in f.content_string.splitlines() if not line.startswith("#")
    ]


def test_nothing_installed(host):
    assert not host.file("/etc/ld.so.conf.d/morag-cuda.conf").exists


def test_facts(host):
    with host.sudo():
        facts = json.loads(host.file("/root/cuda_runtime_facts.json").content_string)
    assert not facts["usable"]
    assert not facts["dirs"]


def test_skipped_on_a_host_without_a_gpu(host):
    """The second play: default method (wheels) and no GPU on the PCI bus: nothing at all."""
    assert not host.file("/root/no-gpu").exists
    assert not host.file("/opt/morag/venv").exists  # nor a failed pip run into a missing venv
