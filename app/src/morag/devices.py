"""Which device this worker computes on, decided without initialising CUDA.

CUDA must not be initialised in the Celery parent before the pool forks, so detection asks
``nvidia-smi`` (a separate process) which GPUs exist, resolves ``CUDA_VISIBLE_DEVICES`` the
way CUDA does, and loads the CUDA libraries of ``morag.gpu_stack`` with ctypes to ask their
versions (no GPU, no context); the model itself loads lazily in the child.

``MORAG_DEVICE=auto`` falls back to CPU and says why; ``cuda`` raises ``DeviceUnavailable``
(the worker exits with ``EX_CONFIG``); ``cpu`` never looks. What passes here is then really
tried, in a child process, by ``morag.cuda_check`` (the worker's ``runtime.decide_device``).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from morag import gpu_stack

if TYPE_CHECKING:
    from morag.cuda_check import CudaCheck

EX_CONFIG = 78  # sysexits.h; the unit's RestartPreventExitStatus=78 stops the restart loop
TROUBLESHOOTING = 'docs/troubleshooting.md, "My GPU worker runs on CPU"'
SMI_QUERY = "--query-gpu=index,uuid,pci.bus_id,name,memory.total"
SMI_TIMEOUT = 20.0  # a GPU without persistence mode can take seconds to wake


class DeviceUnavailable(RuntimeError):
    """MORAG_DEVICE=cuda and CUDA cannot be used; ``str()`` is the whole message."""

    def __init__(self, message: str, problem: Problem | None = None) -> None:
        super().__init__(message)
        self.problem = problem  # the cause and what to check, for `morag gpu-check --json`


@dataclass(frozen=True)
class Gpu:
    index: int  # nvidia-smi's index (PCI bus order); a MIG device has its parent's
    uuid: str  # GPU-... or, for a MIG device, MIG-...
    pci_bus_id: str
    name: str
    memory_mb: int
    mig: bool = False
    parent_uuid: str | None = None  # a MIG device's GPU

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "pci_bus_id": self.pci_bus_id,
            "name": self.name,
            "memory_mb": self.memory_mb,
            "mig": self.mig,
            "parent_uuid": self.parent_uuid,
        }


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # "cpu" or "cuda"
    reason: str
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)
    libraries: Mapping[str, str] = field(default_factory=dict)  # soname -> loaded version
    # The real CUDA check (morag.cuda_check), run in a child process once this says cuda.
    cuda_check: CudaCheck | None = None

    def gpus_as_dicts(self) -> list[dict[str, object]]:
        return [g.as_dict() for g in self.gpus]


@dataclass(frozen=True)
class Problem:
    """Why CUDA cannot be used (short, for the heartbeat) and what to check (for people)."""

    reason: str
    check: str


# -- nvidia-smi output ----------------------------------------------------------------------


def _mebibytes(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:  # "[N/A]", "[Not Supported]"
        return 0


def parse_query_gpu(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=index,uuid,pci.bus_id,name,memory.total
    --format=csv,noheader,nounits``; lines that are not GPUs are skipped."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5 or not parts[0].isdigit() or not parts[1].startswith("GPU-"):
            continue
        name = ", ".join(parts[3:-1])  # a name with a comma would otherwise shift the columns
        gpus.append(Gpu(int(parts[0]), parts[1], parts[2], name, _mebibytes(parts[-1])))
    return gpus


_LIST_GPU = re.compile(r"^GPU (\d+): (.+) \(UUID: (GPU-[^)\s]+)\)\s*$")
_LIST_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[^)\s]+)\)\s*$")


def parse_mig_devices(list_text: str, gpus: Sequence[Gpu] = ()) -> list[Gpu]:
    """MIG devices from ``nvidia-smi -L``, each under its ``GPU n: ... (UUID: GPU-...)`` line.

    ``-L`` gives no memory or bus id: the bus id is the parent's (from ``gpus``), the memory
    the profile's nominal size (``3g.40gb`` -> 40 GiB)."""
    by_uuid = {g.uuid: g for g in gpus}
    parent: tuple[int, str, str] | None = None
    devices = []
    for line in list_text.splitlines():
        if m := _LIST_GPU.match(line):
            parent = (int(m.group(1)), m.group(2).strip(), m.group(3))
        elif (m := _LIST_MIG.match(line)) and parent is not None:
            index, name, uuid = parent
            profile = m.group(1)
            size = re.search(r"\.(\d+)gb$", profile)
            known = by_uuid.get(uuid)
            devices.append(
                Gpu(
                    index=index,
                    uuid=m.group(3),
                    pci_bus_id=known.pci_bus_id if known else "",
                    name=f"{name} MIG {profile}",
                    memory_mb=int(size.group(1)) * 1024 if size else 0,
                    mig=True,
                    parent_uuid=uuid,
                )
            )
    return devices


# -- CUDA_VISIBLE_DEVICES -------------------------------------------------------------------


def _match(entry: str, gpus: Sequence[Gpu], migs: Sequence[Gpu]) -> tuple[Gpu | None, str]:
    """The device one CUDA_VISIBLE_DEVICES entry names, or None and why not."""
    if re.fullmatch(r"-?\d+", entry):
        index = int(entry)
        hit = next((g for g in gpus if g.index == index), None)
        return hit, "" if hit else f"is not a GPU index here (nvidia-smi lists {len(gpus)})"
    if entry[:4].upper() in ("GPU-", "MIG-"):
        pool = gpus if entry[:4].upper() == "GPU-" else migs
        # CUDA accepts any prefix that names exactly one device.
        hits = [g for g in pool if g.uuid.lower().startswith(entry.lower())]
        if len(hits) == 1:
            return hits[0], ""
        if hits:
            return None, f"is a prefix of several UUIDs ({', '.join(g.uuid for g in hits)})"
        return None, "matches no UUID that nvidia-smi lists"
    return None, "is neither a GPU index, a GPU-<uuid> nor a MIG-<uuid>"


def select_visible(
    gpus: Sequence[Gpu], migs: Sequence[Gpu], visible: str | None
) -> tuple[list[Gpu], str]:
    """The devices a CUDA_VISIBLE_DEVICES value leaves visible, in its order, and a note.

    As CUDA: unset means every GPU, empty means none, and the first entry that names no
    device ends the list (the entries after it are ignored too)."""
    if visible is None:
        return list(gpus), ""
    if not visible.strip():
        return [], "CUDA_VISIBLE_DEVICES is empty"
    chosen: list[Gpu] = []
    for entry in (e.strip() for e in visible.split(",")):
        device, why = _match(entry, gpus, migs)
        if device is None:
            return chosen, f"CUDA_VISIBLE_DEVICES entry {entry!r} {why}; CUDA stops there"
        if device not in chosen:
            chosen.append(device)
    return chosen, ""


def _order_note(gpus: Sequence[Gpu], visible: str | None, order: str | None) -> str:
    # Integer indexes follow CUDA_DEVICE_ORDER; its default (FASTEST_FIRST) differs from
    # nvidia-smi's PCI order only when the GPUs differ, so only then is a number ambiguous.
    numbers = visible is not None and any(
        re.fullmatch(r"-?\d+", e.strip()) for e in visible.split(",")
    )
    if numbers and order != "PCI_BUS_ID" and len({g.name for g in gpus}) > 1:
        return (
            "integer CUDA_VISIBLE_DEVICES entries were read in nvidia-smi's order; "
            "set CUDA_DEVICE_ORDER=PCI_BUS_ID or use GPU UUIDs"
        )
    return ""


# -- running nvidia-smi ---------------------------------------------------------------------

_DRIVER_CHECK = (
    "the NVIDIA driver: `nvidia-smi` must list the GPU (driver installed by the nvidia_driver "
    "role, kernel module loaded, reboot after an install or upgrade; `dmesg | grep -i nvrm`)"
)


def run_smi(args: list[str]) -> tuple[str | None, Problem | None]:
    if shutil.which("nvidia-smi") is None:
        return None, Problem(
            "nvidia-smi not found (no NVIDIA driver on this host, or not on PATH)", _DRIVER_CHECK
        )
    try:
        out = subprocess.run(
            ["nvidia-smi", *args],
            capture_output=True,
            text=True,
            timeout=SMI_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, Problem(f"nvidia-smi did not answer in {SMI_TIMEOUT:.0f}s", _DRIVER_CHECK)
    except OSError as exc:
        return None, Problem(f"nvidia-smi could not run: {exc}", _DRIVER_CHECK)
    if out.returncode != 0:
        said = " ".join((out.stdout + out.stderr).split())[:400] or "no output"
        return None, Problem(f"nvidia-smi failed (exit {out.returncode}): {said}", _DRIVER_CHECK)
    return out.stdout, None


def visible_gpus(environ: Mapping[str, str]) -> tuple[list[Gpu], str, Problem | None]:
    """The devices CUDA will see in this process, a note, or the problem that leaves none."""
    text, problem = run_smi([SMI_QUERY, "--format=csv,noheader,nounits"])
    if problem:
        return [], "", problem
    gpus = parse_query_gpu(text or "")
    if not gpus:
        return [], "", Problem("nvidia-smi lists no GPU", _DRIVER_CHECK)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    migs: list[Gpu] = []
    if visible and "MIG-" in visible.upper():
        listing, problem = run_smi(["-L"])
        if problem:
            return [], "", problem
        migs = parse_mig_devices(listing or "", gpus)
    chosen, note = select_visible(gpus, migs, visible)
    note = "; ".join(
        n for n in (note, _order_note(gpus, visible, environ.get("CUDA_DEVICE_ORDER"))) if n
    )
    if not chosen:
        present = ", ".join([f"{g.index} {g.uuid}" for g in gpus] + [m.uuid for m in migs])
        problem = Problem(
            f"no GPU visible for CUDA_VISIBLE_DEVICES={visible!r}: {note} (present: {present})",
            "CUDA_VISIBLE_DEVICES in this worker's environment (the morag_worker role's env "
            "file) against `nvidia-smi -L`",
        )
        return [], note, problem
    return chosen, note, None


# -- the decision ---------------------------------------------------------------------------

_LIBRARY_CHECK = (
    "the CUDA libraries: LD_LIBRARY_PATH from /etc/morag/cuda.env and the cuda_runtime role, "
    "which installs what `python -m morag.gpu_stack --json` lists"
)


def check_cuda_libraries(
    query: gpu_stack.VersionQuery,
) -> tuple[dict[str, str], str, Problem | None]:
    """Loaded library versions, a note, or the problem: what the installed CTranslate2 needs."""
    version = gpu_stack.installed_ctranslate2()
    if version is None:
        return {}, "ctranslate2 not installed: no CUDA library to check", None
    try:
        stack = gpu_stack.stack_for(version)
    except gpu_stack.UnknownStack as exc:
        return {}, "", Problem(str(exc), "app/src/morag/gpu_stack.py")
    if platform.machine() not in stack.cuda_machines:
        return (
            {},
            "",
            Problem(
                f"the ctranslate2 {version} wheels for {platform.machine()} are built without CUDA "
                f"(with CUDA: {', '.join(stack.cuda_machines)})",
                "whether this host needs a CTranslate2 built from source with CUDA",
            ),
        )
    checks = gpu_stack.check_libraries(stack, query)
    loaded = {c.soname: c.loaded for c in checks if c.loaded}
    problems = [c.problem for c in checks if c.problem]
    if problems:
        return loaded, "", Problem("; ".join(problems), _LIBRARY_CHECK)
    return loaded, "", None


def unavailable_message(problem: Problem) -> str:
    return (
        f"MORAG_DEVICE=cuda but this worker cannot use CUDA: {problem.reason}. "
        f"Check {problem.check}. See {TROUBLESHOOTING}. "
        "MORAG_DEVICE=auto would run on CPU instead."
    )


def detect_device(
    requested: str,
    *,
    environ: Mapping[str, str] | None = None,
    query: gpu_stack.VersionQuery | None = None,
) -> DeviceInfo:
    """Resolve MORAG_DEVICE (auto|cpu|cuda) to what this worker really uses.

    Raises DeviceUnavailable for ``cuda`` when CUDA cannot be used; ``auto`` then says cpu."""
    if requested == "cpu":
        return DeviceInfo("cpu", "MORAG_DEVICE=cpu")
    env = os.environ if environ is None else environ
    gpus, note, problem = visible_gpus(env)
    libraries: dict[str, str] = {}
    if problem is None:
        libraries, lib_note, problem = check_cuda_libraries(
            query or gpu_stack.query_library_version
        )
        note = "; ".join(n for n in (note, lib_note) if n)
    if problem is not None:
        if requested == "cuda":
            raise DeviceUnavailable(unavailable_message(problem), problem)
        return DeviceInfo("cpu", f"no usable GPU: {problem.reason}", tuple(gpus), libraries)
    names = ", ".join(f"{g.uuid} {g.name}" for g in gpus)
    reason = f"{len(gpus)} GPU(s) visible: {names}" + (f" ({note})" if note else "")
    return DeviceInfo("cuda", reason, tuple(gpus), libraries)
