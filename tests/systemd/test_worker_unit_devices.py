"""The hardened worker unit opens the NVIDIA devices on systemd 247, 252 and 257 (issue 17).

ProtectClock=yes implies ``DeviceAllow=char-rtc r``; before systemd 252 (PR #25075) any
DeviceAllow= entry closed every other device, so a GPU worker on Debian 11 or Ubuntu 22.04 got
EPERM from /dev/nvidia*. The unit therefore sets DevicePolicy=closed and allows the NVIDIA
devices itself. Here the unit the morag_worker role renders (its own install task; a GPU host
and a CPU host) runs in systemd containers of Debian 11 (systemd 247), 12 (252) and 13 (257),
its ExecStart replaced by a probe (``morag_worker_venv`` points at a directory whose
``bin/morag`` opens device nodes made with mknod). No driver is loaded, so a node the unit's
device cgroup lets through answers ENXIO and one it denies answers EPERM.

/proc/devices of a container lists no NVIDIA group, so the ``char-nvidia*`` entries are
exercised by bind-mounting a copy with the groups added over /proc/devices (inside the
container: systemd, PID 1, resolves the groups in its mount namespace), once as drivers before
545 register them (``nvidia-frontend``) and once as later ones do (``nvidia``, ``nvidiactl``,
``nvidia-modeset``). A first run without it proves the path entries alone. Every node is
also opened outside the unit, where it must answer ENXIO: an EPERM in the unit is the unit's.

The host runs cgroup v1 (systemd writes devices.allow); hosts on cgroup v2 get the same
entries compiled into a BPF program by the same code. Run by ``molecule/run.py worker_unit``
(the molecule stage of ``make test``): needs docker, debootstrap and root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(__file__).with_name("render_worker_unit.yml")
ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)
SYSTEMD = {"11": 247, "12": 252, "13": 257}  # Debian release -> its systemd
PROBE_VENV = "/opt/morag-probe"  # morag_worker_venv of the rendered units
PROBE_OUT = "/var/lib/morag/probe.json"  # inside ReadWritePaths (morag_app_home)
UNIT = "morag-worker@0.service"
NV_MAJOR = 195  # NV_MAJOR_DEVICE_NUMBER: fixed; the others are dynamic, chosen below

OK = "allowed"  # open() got past the device cgroup: ENXIO or ENODEV (no driver), or success
DENIED = "EPERM"

pytestmark = pytest.mark.skipif(
    os.environ.get("MORAG_REQUIRE_DOCKER") != "1" and shutil.which("docker") is None,
    reason="needs docker (molecule/run.py worker_unit sets MORAG_REQUIRE_DOCKER=1)",
)


def free_majors(count: int) -> list[int]:
    """Character majors no driver of this kernel registered: the dynamic ones of nvidia-uvm,
    nvidia-caps and a device the worker must not open (nvidia-nvswitch here)."""
    used = set()
    section = None
    for line in Path("/proc/devices").read_text().splitlines():
        if line.endswith(":"):
            section = line
        elif line.strip() and section == "Character devices:":
            used.add(int(line.split()[0]))
    # Where Linux allocates dynamic majors: 234..254, then 511 down to 384.
    candidates = [m for m in [*range(511, 383, -1), *range(234, 255)] if m not in used]
    assert len(candidates) >= count and NV_MAJOR not in used, sorted(used)
    return candidates[:count]


UVM_MAJOR, CAPS_MAJOR, NVSWITCH_MAJOR = free_majors(3)

# node -> (major, minor). The role renders path entries for two GPUs (morag_worker_gpu_count).
NODES = {
    "/dev/nvidiactl": (NV_MAJOR, 255),
    "/dev/nvidia-modeset": (NV_MAJOR, 254),
    "/dev/nvidia0": (NV_MAJOR, 0),
    "/dev/nvidia1": (NV_MAJOR, 1),
    "/dev/nvidia2": (NV_MAJOR, 2),  # a GPU beyond the role's count: only the group covers it
    "/dev/nvidia-uvm": (UVM_MAJOR, 0),
    "/dev/nvidia-uvm-tools": (UVM_MAJOR, 1),
    "/dev/nvidia-caps/nvidia-cap1": (CAPS_MAJOR, 1),
    "/dev/nvidia-caps/nvidia-cap2": (CAPS_MAJOR, 2),
    "/dev/nvidia-nvswitch0": (NVSWITCH_MAJOR, 0),  # the worker must not open it
}
PSEUDO = ["/dev/null", "/dev/urandom"]  # DevicePolicy=closed keeps them
NVIDIA = [node for node in NODES if node != "/dev/nvidia-nvswitch0"]
BY_PATH = [
    "/dev/nvidiactl",
    "/dev/nvidia0",
    "/dev/nvidia1",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
]

# /proc/devices lines each driver generation registers (open-gpu-kernel-modules: nv-frontend.c
# until 545, then nv.c "nvidia" and "nvidiactl"; nvidia-modeset-linux.c; uvm.c; nv-caps.c),
# and the name of the copy bind-mounted over /proc/devices.
DEVICES_FILE = {"driver < 545": "proc-devices-r535", "driver >= 545": "proc-devices-r550"}
GROUPS = {
    "driver < 545": [
        f"{NV_MAJOR} nvidia-frontend",
        f"{UVM_MAJOR} nvidia-uvm",
        f"{CAPS_MAJOR} nvidia-caps",
        f"{NVSWITCH_MAJOR} nvidia-nvswitch",
    ],
    "driver >= 545": [
        f"{NV_MAJOR} nvidia",
        f"{NV_MAJOR} nvidiactl",
        f"{NV_MAJOR} nvidia-modeset",
        f"{UVM_MAJOR} nvidia-uvm",
        f"{CAPS_MAJOR} nvidia-caps",
        f"{NVSWITCH_MAJOR} nvidia-nvswitch",
    ],
}


def expect(allowed: list[str]) -> dict[str, str]:
    return {node: OK if node in allowed else DENIED for node in [*PSEUDO, *NODES]}


# (unit, /proc/devices) -> expected answer of every node.
CASES = {
    ("gpu", "no NVIDIA group"): expect([*PSEUDO, *BY_PATH]),
    ("gpu", "driver < 545"): expect([*PSEUDO, *NVIDIA]),
    ("gpu", "driver >= 545"): expect([*PSEUDO, *NVIDIA]),
    ("cpu", "driver >= 545"): expect(PSEUDO),
}

PROBE = f"""#!/usr/bin/python3
# Stands in for the morag command: opens each node of /etc/morag-probe/nodes read-write and
# records open()'s answer. As the unit's ExecStart ("morag worker ...") it writes {PROBE_OUT}
# and exits 78, which RestartPreventExitStatus= keeps systemd from restarting.
import errno, json, os, sys

result = {{}}
for path in open("/etc/morag-probe/nodes").read().split():
    try:
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        result[path] = "ok"
    except OSError as exc:
        result[path] = errno.errorcode.get(exc.errno, str(exc.errno))
text = json.dumps(result)
if sys.argv[1:2] != ["worker"]:
    print(text)
    sys.exit(0)
with open("{PROBE_OUT}.tmp", "w") as out:
    out.write(text)
os.rename("{PROBE_OUT}.tmp", "{PROBE_OUT}")
sys.exit(78)
"""

# Stands in for the nvidia_driver role's nvidia-devices.service (whose real one is skipped in
# containers): the nodes exist before the worker starts, as on a GPU host.
DEVICES_UNIT = """[Unit]
Description=Stand-in for the NVIDIA device nodes (test)

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/nvidia-device-nodes
"""


def answer(errno_name: str) -> str:
    return OK if errno_name in ("ok", "ENXIO", "ENODEV") else errno_name


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {out.stdout}{out.stderr}")
    return out


@pytest.fixture(scope="module")
def images() -> None:
    # Cached by recipe hash: only what is missing is built (bullseye here, about a minute).
    subprocess.run([str(ROOT / "molecule" / "images" / "build.sh"), *SYSTEMD], check=True)


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The unit as the role installs it on a GPU host and on a CPU host."""
    assert ANSIBLE is not None, "ansible-playbook not installed: run `make venv`"
    out_dir = tmp_path_factory.mktemp("units")
    for mode in ("gpu", "cpu"):
        (out_dir / mode).mkdir()
    run = subprocess.run(
        [
            ANSIBLE,
            "-i",
            "localhost,",
            str(PLAYBOOK),
            "-e",
            f"unit_dir={out_dir}",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            # The handler would restart the instances: none on this controller.
            "-e",
            '{"_morag_worker_instances": []}',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {mode: (out_dir / mode / "morag-worker@.service").read_text() for mode in ("gpu", "cpu")}


def proc_devices(real: str, groups: list[str]) -> str:
    """/proc/devices with ``groups`` appended to its character section."""
    char, _, block = real.partition("\n\nBlock devices:")
    return "\n".join([char, *groups]) + "\n\nBlock devices:" + block


def stage(root: Path) -> None:
    """The files the container gets (docker cp): env files, probe, node script."""

    def put(path: str, text: str, mode: int = 0o644) -> None:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    put("/etc/systemd/system/nvidia-devices.service", DEVICES_UNIT)
    put("/etc/morag/morag.env", "MORAG_DEVICE=cuda\n")
    put(
        "/etc/morag/worker-0.env",
        "MORAG_WORKER_NAME=gpu0@unit-test\nMORAG_WORKER_QUEUE_ARGS=--queue gpu-tasks\n"
        "MORAG_WORKER_CONCURRENCY=1\n",
    )
    put(f"{PROBE_VENV}/bin/morag", PROBE, 0o755)
    put("/etc/morag-probe/nodes", "\n".join([*PSEUDO, *NODES]) + "\n")
    mknod = [f"mknod -m 666 {node} c {major} {minor}" for node, (major, minor) in NODES.items()]
    put(
        "/usr/local/sbin/nvidia-device-nodes",
        "#!/bin/sh\nset -eu\nmkdir -p /dev/nvidia-caps\n" + "\n".join(mknod) + "\n",
        0o755,
    )


class Container:
    def __init__(self, name: str) -> None:
        self.name = name

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return docker("exec", self.name, "sh", "-c", script, check=check)

    def install_unit(self, text: str, scratch: Path) -> None:
        """Install ``text`` as morag-worker@.service; systemd must parse it without a word."""
        scratch.write_text(text)
        docker("cp", str(scratch), f"{self.name}:/etc/systemd/system/morag-worker@.service")
        self.sh("systemctl daemon-reload")
        verify = self.sh(f"systemd-analyze verify {UNIT} 2>&1", check=False)
        assert verify.returncode == 0 and "morag-worker" not in verify.stdout, verify.stdout

    def state(self) -> dict[str, str]:
        out = self.sh(f"systemctl show -p ActiveState,Result,ExecMainStatus {UNIT}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def probe_unit(self, devices: str | None) -> dict[str, str]:
        """Start the worker unit with /proc/devices as given (None: the kernel's) and return
        what its probe's open() answered for every node."""
        self.sh("umount /proc/devices 2>/dev/null; true")
        if devices is not None:
            self.sh(f"mount --bind /etc/morag-probe/{devices} /proc/devices")
        self.sh(f"rm -f {PROBE_OUT}; systemctl reset-failed {UNIT} 2>/dev/null; true")
        self.sh(f"systemctl start {UNIT}")
        # The probe exits 78: the unit ends failed and is not restarted.
        state = wait_until(
            lambda: (s := self.state())["ActiveState"] in ("failed", "inactive") and s,
            timeout=60,
            what=f"{UNIT} to end",
        )
        logs = self.sh(f"journalctl -u {UNIT} -u nvidia-devices.service --no-pager", check=False)
        assert state["ExecMainStatus"] == "78", f"the probe did not finish: {state}\n{logs.stdout}"
        return json.loads(self.sh(f"cat {PROBE_OUT}").stdout)


@pytest.fixture
def container(request: pytest.FixtureRequest, images: None) -> Iterator[Container]:
    debian = request.param
    name = f"morag-unit-test-{debian}-{uuid.uuid4().hex[:8]}"
    rules = [
        f"c {NV_MAJOR}:* rwm",
        *(f"c {m}:* rwm" for m in (UVM_MAJOR, CAPS_MAJOR, NVSWITCH_MAJOR)),
    ]
    docker(
        "run", "-d", "--name", name, "--hostname", f"unit-test-{debian}", "--network", "none",
        "--cap-add", "SYS_ADMIN",
        "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
        "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "--tmpfs", "/run", "--tmpfs", "/run/lock",
        # The container itself lets the NVIDIA majors through: an EPERM is then the unit's.
        *(arg for rule in rules for arg in ("--device-cgroup-rule", rule)),
        f"morag-test/debian{debian}:latest", "/lib/systemd/systemd",
    )  # fmt: skip
    box = Container(name)
    try:
        wait_until(
            lambda: (
                box.sh("systemctl is-system-running", check=False).stdout.strip()
                in ("running", "degraded")
            ),
            timeout=120,
            what=f"systemd in {name} to finish booting",
            interval=0.5,
        )
        yield box
    finally:
        docker("rm", "-f", "-v", name, check=False)


@pytest.mark.parametrize("container", list(SYSTEMD), indirect=True, ids=lambda v: f"debian{v}")
def test_worker_unit_opens_the_nvidia_devices_and_nothing_else(
    container: Container, units: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    debian = request.node.callspec.params["container"]
    version = container.sh("systemctl --version").stdout.split()[1]
    assert int(version) == SYSTEMD[debian], f"Debian {debian} runs systemd {version}"

    real = container.sh("cat /proc/devices").stdout
    stage(tmp_path / "root")
    for label, groups in GROUPS.items():
        path = tmp_path / "root" / "etc" / "morag-probe" / DEVICES_FILE[label]
        path.write_text(proc_devices(real, groups))
    docker("cp", f"{tmp_path / 'root'}/.", f"{container.name}:/")
    container.sh(
        "useradd --system --user-group --home-dir /var/lib/morag --shell /usr/sbin/nologin morag"
        " && install -d -o morag -g morag /var/lib/morag"
    )

    results: dict[tuple[str, str], dict[str, str]] = {}
    installed = None
    for mode, devices in CASES:
        if mode != installed:
            # A CPU host's unit in place of a GPU host's: same name, same files.
            container.install_unit(units[mode], tmp_path / f"{mode}.service")
            installed = mode
        results[(mode, devices)] = container.probe_unit(DEVICES_FILE.get(devices))
        if (mode, devices) == ("gpu", "no NVIDIA group"):
            # Outside the unit (the container's own cgroup) every node must get past the
            # device cgroup: EPERM inside the unit is then the unit's doing.
            outside = json.loads(container.sh(f"{PROBE_VENV}/bin/morag").stdout)
            blocked = {node: got for node, got in outside.items() if answer(got) != OK}
            assert not blocked, f"the container itself denies {blocked}: check its device rules"

    table = [f"Debian {debian}, systemd {version}: open(O_RDWR) in {UNIT}"]
    wrong = []
    for (mode, devices), want in CASES.items():
        raw = results[(mode, devices)]
        table.append(f"  {mode} unit, /proc/devices {devices}:")
        for node, expected in want.items():
            got = answer(raw.get(node, "missing"))
            mark = "ok " if got == expected else "BAD"
            table.append(f"    {mark} {node:30} {raw.get(node)!s:8} (want {expected})")
            if got != expected:
                wrong.append((mode, devices, node))
    print("\n".join(table))
    assert not wrong, "\n".join(table)
