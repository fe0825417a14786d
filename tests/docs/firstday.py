"""The documented first day, executed: README.md "Real hosts", then docs/setup-gpu-worker.md.

    python tests/docs/firstday.py run     fresh containers, the docs' steps, jobs; leaves them up
    python tests/docs/firstday.py down    remove containers, network and volume
    python tests/docs/firstday.py steps   print the steps the docs give, in order (no docker)

A sysadmin's path, step by step, as the docs mark it (`<!-- docs-test: KIND [PATH] -->`
right before a fenced block):

    run              the shell block, as written, on the controller (bash, in a copy of this
                     repository; exported variables carry over to the next blocks)
    write PATH       PATH gets the block's content
    set PATH         each top-level `key: value` of the block replaces that line in PATH
    add-hosts PATH   the block's hosts are added to their groups in the inventory PATH

The only changes to what the docs say: the example's names and addresses become the
containers' (NAMES below), each host gets tests/docs/container-overlay.yml (the container
connection and what a container cannot do), and HOME is a fresh directory (the vault
password file lands there). The fleet's shape: a server, a GPU host and a CPU-worker host,
then a second GPU host added with `site.yml -l HOST` alone. Once the fleet runs its jobs,
a second `site.yml` through ansible-runner must change nothing (morag_fleet.idempotence):
adding a host changed nothing a later run would have to catch up on. The molecule scenario
`firstday` runs `run` then `down`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = [(ROOT / "README.md", "## Real hosts"), (ROOT / "docs" / "setup-gpu-worker.md", None)]
OVERLAY = Path(__file__).with_name("container-overlay.yml")
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
IMAGE = "morag-test/debian12:latest"
NETWORK = "morag-docs"
VOLUME = "morag-docs-shared"
SERVER = "morag-docs-server"
GPU = ["morag-docs-gpu1", "morag-docs-gpu2"]
CPU = "morag-docs-cpu1"
WORKERS = [*GPU, CPU]
CONTAINERS = [SERVER, *WORKERS]
# The example's hosts -> the containers that play them.
NAMES = {
    "morag.example.com": SERVER,
    "gpu-01.example.com": GPU[0],
    "gpu-03.example.com": GPU[1],
    "cpu-01.example.com": CPU,
}
# The example's addresses -> the containers' (filled in once they exist).
ADDRESSES = {"10.0.0.5": SERVER, "10.0.0.21": GPU[0], "10.0.0.23": GPU[1], "10.0.0.31": CPU}
# The repository parts a sysadmin's checkout has (the docs run in a copy of them).
CHECKOUT = ["ansible.cfg", "site.yml", "requirements.yml", "playbooks", "roles", "tools"]
SENTENCE = "Please send the report to the office before Friday."
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(\S+)(?:\s+(\S+))?\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


def log(msg: str) -> None:
    print(f"[firstday {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Step:
    kind: str
    path: str | None
    body: str
    where: str


def steps_of(doc: Path, section: str | None) -> list[Step]:
    """The marked blocks of a document (of one `## ` section when given), in order."""
    lines = doc.read_text().splitlines()
    if section is not None:
        start = lines.index(section)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        offset, lines = start, lines[start:end]
    else:
        offset = 0
    out: list[Step] = []
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if not m:
            i += 1
            continue
        where = f"{doc.relative_to(ROOT)}:{offset + i + 1}"
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None:
            raise SystemExit(f"{where}: a docs-test marker must be followed by a fenced block")
        indent = len(fence.group(1))
        body: list[str] = []
        j = i + 2
        while j < len(lines) and not FENCE.match(lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        out.append(Step(m.group(1), m.group(2), "\n".join(body) + "\n", where))
        i = j + 1
    return out


def all_steps() -> list[Step]:
    steps = [s for doc, section in DOCS for s in steps_of(doc, section)]
    kinds = {s.kind for s in steps}
    unknown = kinds - {"run", "write", "set", "add-hosts"}
    if unknown:
        raise SystemExit(f"unknown docs-test kinds: {sorted(unknown)}")
    return steps


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], check=check, text=True, capture_output=True)


def down() -> None:
    for name in CONTAINERS:
        if docker("inspect", name, check=False).returncode == 0:
            docker("rm", "-f", "-v", name)
            log(f"removed {name}")
    docker("network", "rm", NETWORK, check=False)
    docker("volume", "rm", "-f", VOLUME, check=False)


def create() -> dict[str, str]:
    """Fresh containers (any old ones removed) on their own network; name -> IP address."""
    down()
    docker("network", "create", NETWORK)
    docker("volume", "create", VOLUME)
    for name in CONTAINERS:
        args = [
            "run", "-d", "--name", name, "--hostname", name, "--network", NETWORK,
            "--cap-add", "SYS_ADMIN",
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
            "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "--tmpfs", "/run", "--tmpfs", "/run/lock", "--stop-signal", "SIGRTMIN+3",
            "--label", "morag-docs=1",
            # The wheelhouse at the path the role copies it to (identical files: no copy).
            "-v", f"{WHEELHOUSE}:/opt/morag/wheelhouse:ro",
        ]  # fmt: skip
        if name == SERVER:
            # Ganesha serves from a real filesystem and opens files by handle.
            args += ["--cap-add", "DAC_READ_SEARCH", "-v", f"{VOLUME}:/var/lib/morag/shared"]
        docker(*args, IMAGE)
    addresses = {}
    for name in CONTAINERS:
        deadline = time.monotonic() + 60
        while True:
            state = docker("exec", name, "systemctl", "is-system-running", check=False)
            if state.stdout.strip() in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: systemd did not come up")
            time.sleep(0.5)
        fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        addresses[name] = docker("inspect", "-f", fmt, name).stdout.strip()
    return addresses


def substitute(text: str, addresses: dict[str, str]) -> str:
    for example, name in NAMES.items():
        text = text.replace(example, name)
    for example, name in ADDRESSES.items():
        text = re.sub(rf"\b{re.escape(example)}\b", addresses[name], text)
    return text


class User:
    """Follows the steps in a copy of the repository with a HOME of its own."""

    def __init__(self, work: Path, addresses: dict[str, str], source: Path = ROOT) -> None:
        self.work = work
        self.addresses = addresses
        self.home = work / "home"
        self.repo = work / "morag"
        self.envfile = work / "env.sh"
        self.home.mkdir()
        self.repo.mkdir()
        for part in [*CHECKOUT, "inventory/example"]:
            src, dst = source / part, self.repo / part
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".*"))
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        self.overlay = yaml.safe_load(OVERLAY.read_text())
        self.envfile.write_text("")
        self.talk()

    def talk(self) -> None:
        """The sysadmin's recording (talk.mp3, as the docs name it)."""
        wav = self.work / "talk.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True)
        subprocess.run(
            ["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), str(self.repo / "talk.mp3")],
            check=True,
        )

    def env(self) -> dict[str, str]:
        # A sysadmin's shell: none of the ANSIBLE_*/MOLECULE_* settings of a molecule run
        # (its ANSIBLE_CONFIG would replace the repository's ansible.cfg and its vault setup).
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MOLECULE_"))}
        return dict(
            base,
            HOME=str(self.home),
            PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
            ANSIBLE_FORCE_COLOR="0",
            NO_COLOR="1",
            PY_COLORS="0",
        )

    def do(self, step: Step) -> None:
        body = substitute(step.body, self.addresses)
        log(f"{step.where}: {step.kind} {step.path or ''}")
        if step.kind == "run":
            script = (
                f"set -euo pipefail\nsource {self.envfile}\n{body}\nexport -p > {self.envfile}\n"
            )
            print(body, end="", flush=True)
            subprocess.run(["bash", "-c", script], cwd=self.repo, env=self.env(), check=True)
            return
        assert step.path, step
        path = self.repo / step.path
        if step.kind == "write":
            path.write_text("---\n" + body)
        elif step.kind == "set":
            text = path.read_text()
            for key, value in yaml.safe_load(body).items():
                line = f"{key}: {yaml.safe_dump(value, default_flow_style=True).strip()}"
                line = line.removesuffix("\n...").strip()
                text, n = re.subn(rf"(?m)^{re.escape(key)}:.*$", line, text)
                if n != 1:
                    raise SystemExit(f"{step.where}: {key} is not a line of {step.path}")
            path.write_text(text)
        elif step.kind == "add-hosts":
            inventory = yaml.safe_load(path.read_text())
            for group, spec in yaml.safe_load(body).items():
                target = find_group(inventory, group)
                if target is None:
                    raise SystemExit(f"{step.where}: no group {group} in {step.path}")
                if not isinstance(target.get("hosts"), dict):
                    target["hosts"] = {}
                target["hosts"].update(spec["hosts"])
            path.write_text("---\n" + yaml.safe_dump(inventory, sort_keys=False))
        if path.name == "hosts.yml":
            self.connect(path)

    def connect(self, hosts_file: Path) -> None:
        """host_vars/HOST.yml with the container overlay for every host of the inventory."""
        inventory = yaml.safe_load(hosts_file.read_text())
        for group in ("server", "gpu_workers", "cpu_workers"):
            spec = find_group(inventory, group) or {}
            for host in spec.get("hosts") or {}:
                if host not in CONTAINERS:
                    raise SystemExit(f"{host}: not one of the containers {CONTAINERS}")
                values = {
                    **self.overlay["all"],
                    **self.overlay.get(group, {}),
                    "ansible_host": host,  # the docker connection's container name
                    "morag_app_wheelhouse_dir": str(WHEELHOUSE),
                }
                out = hosts_file.parent / "host_vars" / f"{host}.yml"
                out.parent.mkdir(exist_ok=True)
                out.write_text("---\n" + yaml.safe_dump(values, sort_keys=False))


def find_group(tree: dict, name: str) -> dict | None:
    for key, value in (tree or {}).items():
        if not isinstance(value, dict):
            continue
        if key == name:
            return value
        found = find_group(value.get("children") or {}, name)
        if found is not None:
            return found
    return None


def api_key(user: User) -> str:
    out = subprocess.run(
        ["ansible-vault", "view", "inventory/mysite/group_vars/all/vault.yml"],
        cwd=user.repo, env=user.env(), check=True, capture_output=True, text=True,
    )  # fmt: skip
    return yaml.safe_load(out.stdout)["vault_morag_api_keys"][0]


def wait_job(c: httpx.Client, task_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        resp = c.get(f"/api/v1/status/{task_id}", params={"wait": 30})
        assert resp.status_code == 200, resp.text
        job = resp.json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job


def consumers(c: httpx.Client, queue: str) -> set[str]:
    """The hosts with a live worker consuming QUEUE, as the API lists them."""
    found = c.get("/api/v1/workers").json()
    found = found["workers"] if isinstance(found, dict) else found
    return {
        w["name"].split("@", 1)[1]
        for w in found
        if queue in w.get("consuming", w.get("queues", []))
    }


def submit(c: httpx.Client, user: User, gpu: bool) -> str:
    with open(user.repo / "talk.mp3", "rb") as f:
        resp = c.post(
            "/api/v1/ingest/file",
            files={"file": ("talk.mp3", f, "audio/mpeg")},
            data={"gpu": "true" if gpu else "false"},
        )
    assert resp.status_code == 202, resp.text
    return resp.json()["task_id"]


def check_fleet(user: User, jobs: int) -> None:
    """Both GPU hosts consume gpu-tasks and the CPU-worker host celery, the export lets every
    worker host in, and every job succeeds (gpu=true and gpu=false)."""
    conf = docker("exec", SERVER, "cat", "/etc/ganesha/ganesha.conf").stdout
    for name in WORKERS:
        assert f"Clients = {name};" in conf, f"{name} is not in the server's export:\n{conf}"
    # The API serves HTTPS off loopback, verified with the morag_api role's CA.
    url = f"https://{user.addresses[SERVER]}:8000"
    ca = user.repo / "inventory" / "mysite" / ".secrets" / "api-tls" / "ca.crt"
    verify = ssl.create_default_context(cafile=str(ca))
    headers = {"X-API-Key": api_key(user)}
    with httpx.Client(base_url=url, headers=headers, timeout=30, verify=verify) as c:
        deadline = time.monotonic() + 120
        while True:
            gpu, cpu = consumers(c, "gpu-tasks"), consumers(c, "celery")
            if set(GPU) <= gpu and CPU in cpu:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"consuming gpu-tasks: {sorted(gpu)}; celery: {sorted(cpu)}")
            time.sleep(1)
        # A GPU host never quietly serves the CPU queue instead (issue 22 item 1).
        assert not set(GPU) & cpu, f"GPU hosts consuming celery: {sorted(set(GPU) & cpu)}"
        for gpu_flag in (True, False):
            ids = [submit(c, user, gpu_flag) for _ in range(jobs)]
            ran_on = set()
            for task_id in ids:
                job = wait_job(c, task_id)
                assert job["status"] == "succeeded", job
                assert "report" in job["result"]["content"].lower(), job["result"]["content"]
                ran_on.add(job["attempts"][-1]["worker"])
            log(f"{jobs} gpu={str(gpu_flag).lower()} jobs succeeded, on {sorted(ran_on)}")
    # The server's services run as users of their own (docs/security.md, "OS users"): the
    # API as morag-api (and the store worker, where the server runs one, as morag-store),
    # and the workers' user reads none of their secrets.
    units = [("morag-api", "morag-api")]
    secrets = ["api.env", "redis-api.env"]
    has_store = docker("exec", SERVER, "test", "-e", "/etc/morag/worker-store.env", check=False)
    if has_store.returncode == 0:
        units.append(("morag-worker@store", "morag-store"))
        secrets += ["redis-store.env", "worker-store.env"]
    for unit, user_name in units:
        pid = docker("exec", SERVER, "systemctl", "show", "-p", "MainPID", "--value", unit).stdout
        owner = docker("exec", SERVER, "ps", "-o", "user=", "-p", pid.strip()).stdout.strip()
        assert owner == user_name, f"{unit} runs as {owner!r}, not {user_name}"
    for secret in secrets:
        path = f"/etc/morag/{secret}"
        assert docker("exec", SERVER, "test", "-s", path, check=False).returncode == 0, path
        read = docker("exec", SERVER, "runuser", "-u", "morag", "--", "cat", path, check=False)
        assert read.returncode != 0, f"the workers' user read {path}"
    log(f"server services run as {[u for _, u in units]}; morag reads none of {secrets}")


def playbook(user: User, *args: str) -> subprocess.CompletedProcess:
    cmd = ["ansible-playbook", "-i", "inventory/mysite/hosts.yml", "site.yml", *args]
    out = subprocess.run(
        cmd, cwd=user.repo, env=user.env(), capture_output=True, text=True, check=False
    )
    log(f"{' '.join(cmd)}: rc={out.returncode}")
    return out


def idempotence(user: User) -> None:
    """site.yml once more over the whole fleet, through ansible-runner
    (morag_fleet.idempotence, the lab's check): fails naming each host that changed and its
    changed tasks, read from the runner's stats and events. In the sysadmin's shell: the
    copy's ansible.cfg and vault password, none of a molecule run's ANSIBLE_* settings."""
    started = time.monotonic()
    cmd = [sys.executable, "-m", "morag_fleet.idempotence", "-i", "inventory/mysite/hosts.yml"]
    out = subprocess.run(
        [*cmd, "site.yml"],
        cwd=user.repo,
        env=user.env(),
        capture_output=True,
        text=True,
        check=False,
    )
    log(f"second site.yml in {time.monotonic() - started:.0f}s (rc={out.returncode})")
    if out.returncode != 0:
        raise SystemExit(f"{out.stdout}{out.stderr[-4000:]}")
    log(out.stdout.strip())


def installed(container: str, package: str) -> bool:
    out = docker("exec", container, "dpkg-query", "-W", "-f=${Status}", package, check=False)
    return out.returncode == 0 and "install ok installed" in out.stdout


def switch_nfs(user: User) -> None:
    """After the docs: the server fails (kernel NFS cannot run in a container) and the run
    goes on with the workers, then fails with the cause; switching back removes the kernel
    server and Ganesha serves again. Tags keep it short: only the NFS roles run."""
    failing = playbook(
        user, "--tags", "nfs_server,nfs_client", "-e", "nfs_server_implementation=kernel"
    )
    text = failing.stdout + failing.stderr
    assert failing.returncode != 0, text
    assert "did not start" in text, text[-4000:]
    assert "is a container" in text or "nfsd kernel module" in text, text[-4000:]
    assert "nfs_server_implementation: ganesha" in text, text[-4000:]
    assert "PLAY [Provision the MoRAG GPU workers]" in text, text[-4000:]
    assert "PLAY [Provision the MoRAG CPU workers]" in text, text[-4000:]
    for name in WORKERS:  # the worker hosts were provisioned despite the server's failure
        assert re.search(rf"{name}\s*:.*failed=0", text), text[-2000:]
    assert re.search(rf"{SERVER}\s*:.*failed=1", text), text[-2000:]
    assert not installed(SERVER, "nfs-ganesha"), "Ganesha left installed next to the kernel server"
    log("kernel NFS in a container: the run went on with the worker hosts and named the cause")
    back = playbook(user, "--tags", "nfs_server,nfs_client")
    assert back.returncode == 0, (back.stdout + back.stderr)[-4000:]
    assert not installed(SERVER, "nfs-kernel-server"), "kernel server left installed"
    active = docker("exec", SERVER, "systemctl", "is-active", "nfs-ganesha", check=False)
    assert active.stdout.strip() == "active", active.stdout
    statd = docker("exec", SERVER, "systemctl", "is-active", "rpc-statd", check=False)
    assert statd.stdout.strip() != "active", "rpc-statd of the kernel server still runs"
    log("back to Ganesha: nfs-kernel-server removed, nfs-ganesha active, no stray rpc-statd")


def run(jobs: int, switch: bool, source: Path = ROOT, idempotent: bool = True) -> int:
    steps = all_steps()
    if not WHEELHOUSE.is_dir():
        raise SystemExit(f"no wheelhouse in {WHEELHOUSE}: molecule/images/wheelhouse.sh")
    t0 = time.monotonic()
    addresses = create()
    log(f"{len(CONTAINERS)} fresh containers in {time.monotonic() - t0:.0f}s: {addresses}")
    with tempfile.TemporaryDirectory(prefix="morag-firstday-") as tmp:
        user = User(Path(tmp), addresses, source)
        started = time.monotonic()
        first_job: float | None = None
        for step in steps:
            t = time.monotonic()
            user.do(step)
            log(f"   done in {time.monotonic() - t:.0f}s")
            if first_job is None and step.kind == "run" and "morag submit" in step.body:
                first_job = time.monotonic() - started
                log(f"empty inventory -> first successful job: {first_job:.0f}s")
        check_fleet(user, jobs)
        log(
            f"docs path done in {time.monotonic() - started:.0f}s "
            f"(first successful job after {first_job or 0:.0f}s; containers {started - t0:.0f}s)"
        )
        if idempotent:
            idempotence(user)
        if switch:
            t = time.monotonic()
            switch_nfs(user)
            log(f"NFS implementation switch and server-failure checks: {time.monotonic() - t:.0f}s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["run", "down", "steps"])
    parser.add_argument(
        "--jobs", type=int, default=4, help="gpu=true and gpu=false jobs each, at the end"
    )
    parser.add_argument(
        "--source", type=Path, default=ROOT, help="the checkout to copy (default: this one)"
    )
    parser.add_argument(
        "--no-switch", action="store_true", help="skip the NFS switch / server-failure checks"
    )
    parser.add_argument(
        "--no-idempotence",
        action="store_true",
        help="skip the second site.yml that must change nothing",
    )
    args = parser.parse_args()
    if args.command == "steps":
        for step in all_steps():
            print(f"--- {step.where}: {step.kind} {step.path or ''}\n{step.body}", end="")
        return 0
    if args.command == "down":
        down()
        return 0
    return run(args.jobs, not args.no_switch, args.source.resolve(), not args.no_idempotence)


if __name__ == "__main__":
    sys.exit(main())
