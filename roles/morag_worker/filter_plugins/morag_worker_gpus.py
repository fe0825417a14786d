"""GPU worker instances of the morag_worker role, as pure Ansible filters.

One systemd instance (morag-worker@<id>) per GPU, bound by GPU UUID and ordered by PCI bus id,
so that a worker keeps its GPU when nvidia-smi's enumeration changes. With MIG, one instance
per MIG device of a GPU in MIG mode plus one per GPU not in MIG mode: the "mixed" strategy
NVIDIA DeepOps uses by default (NVIDIA/deepops docs/k8s-cluster/nvidia-mig.md,
config.example/group_vars/k8s_cluster.yml ``k8s_gpu_mig_strategy: "mixed"``, after the
NVIDIA k8s-device-plugin, where each MIG device is its own schedulable unit and whole GPUs
stay whole). CUDA selects a MIG device only by its MIG UUID in CUDA_VISIBLE_DEVICES (NVIDIA
MIG user guide, "CUDA Device Enumeration").

The filters never do I/O and raise AnsibleFilterError only on malformed input.
"""

from __future__ import annotations

import csv
import re
import shlex

try:  # Ansible is present when the role runs; the unit tests load this file directly.
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - exercised only without ansible-core installed

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        """Stand-in with the same name when ansible-core is not importable."""


GPU_QUEUE = "gpu-tasks"
CUDA_DEVICE_ORDER = "PCI_BUS_ID"
SCALE_DOWN_VARIABLE = "morag_worker_allow_scale_down"
MIG_VARIABLE = "morag_worker_mig"

_SMI_FIELDS = ("index", "uuid", "pci.bus_id", "name", "memory.total", "mig.mode.current")
_GPU_LINE = re.compile(r"^GPU (?P<index>[0-9]+): (?P<name>.*?) \(UUID: (?P<uuid>GPU-[^)\s]+)\)\s*$")
# "  MIG 1g.10gb     Device  0: (UUID: MIG-a686709d-...)" (R470 and newer) and the older
# "  MIG 3g.20gb Device 0: (UUID: MIG-GPU-c66f2b7d-.../1/0)" (R450/R460).
_MIG_LINE = re.compile(
    r"^MIG (?P<profile>\S+)\s+Device\s+(?P<device>[0-9]+): \(UUID: (?P<uuid>MIG-[^)\s]+)\)\s*$"
)
_BUS_ID = re.compile(
    r"^(?P<domain>[0-9A-Fa-f]{4,8}):(?P<bus>[0-9A-Fa-f]{2}):(?P<dev>[0-9A-Fa-f]{2})\.(?P<fn>[0-7])$"
)
# systemd unit instance names: letters, digits, ":_.\-" (systemd.unit(5), unit name escaping).
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9:_.\\-]+$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _bus_key(bus_id: str) -> tuple:
    match = _BUS_ID.match(bus_id)
    if match is None:
        return (1, bus_id)
    return (
        0,
        int(match.group("domain"), 16),
        int(match.group("bus"), 16),
        int(match.group("dev"), 16),
        int(match.group("fn")),
    )


def _na(value: str) -> bool:
    return value in ("[N/A]", "N/A", "[Not Supported]", "")


def parse_smi(query_csv: str, list_output: str = "") -> list:
    """GPUs from nvidia-smi, sorted by PCI bus id.

    ``query_csv``: ``nvidia-smi --query-gpu=index,uuid,pci.bus_id,name,memory.total,
    mig.mode.current --format=csv,noheader,nounits``. ``list_output``: ``nvidia-smi -L``
    (may be empty), whose MIG lines are attached to their GPU as ``mig_devices``.
    Returns [{"index", "uuid", "pci_bus_id", "name", "memory_mb", "mig_mode", "mig_devices"}];
    memory_mb is None where nvidia-smi reports [N/A].
    """
    if query_csv is None:
        query_csv = ""
    if list_output is None:
        list_output = ""
    if not isinstance(query_csv, str) or not isinstance(list_output, str):
        raise AnsibleFilterError("morag_worker_parse_smi expects the text output of nvidia-smi")
    gpus = []
    seen = set()
    rows = [line for line in query_csv.splitlines() if line.strip()]
    for row in csv.reader(rows, skipinitialspace=True):
        if len(row) != len(_SMI_FIELDS):
            raise AnsibleFilterError(
                f"morag_worker_parse_smi: expected {len(_SMI_FIELDS)} fields "
                f"({','.join(_SMI_FIELDS)}), got {len(row)}: {', '.join(row)!r}"
            )
        index, uuid, bus_id, name, memory, mig_mode = (field.strip() for field in row)
        if not index.isdigit() or not uuid.startswith("GPU-") or _BUS_ID.match(bus_id) is None:
            raise AnsibleFilterError(
                f"morag_worker_parse_smi: not a GPU row (index, GPU-uuid, PCI bus id): {row!r}"
            )
        if uuid in seen:
            raise AnsibleFilterError(f"morag_worker_parse_smi: GPU {uuid} listed twice")
        seen.add(uuid)
        if _na(memory):
            memory_mb = None
        else:
            parts = memory.split()
            try:
                if (len(parts) == 2 and parts[1] != "MiB") or len(parts) > 2:
                    raise ValueError(memory)
                memory_mb = int(float(parts[0]))
            except ValueError as exc:
                raise AnsibleFilterError(
                    "morag_worker_parse_smi: memory.total must be MiB without units, "
                    f"got {memory!r}"
                ) from exc
        gpus.append(
            {
                "index": int(index),
                "uuid": uuid,
                "pci_bus_id": bus_id,
                "name": name,
                "memory_mb": memory_mb,
                "mig_mode": mig_mode if mig_mode in ("Enabled", "Disabled") else "[N/A]",
                "mig_devices": [],
            }
        )
    by_uuid = {gpu["uuid"]: gpu for gpu in gpus}
    current = None
    for number, raw in enumerate(list_output.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("No devices"):
            continue
        gpu_match = _GPU_LINE.match(line)
        if gpu_match:
            current = by_uuid.get(gpu_match.group("uuid"))
            continue
        mig_match = _MIG_LINE.match(line)
        if mig_match:
            if current is None:
                continue  # a MIG device of a GPU the query did not list
            current["mig_devices"].append(
                {
                    "uuid": mig_match.group("uuid"),
                    "profile": mig_match.group("profile"),
                    "device": int(mig_match.group("device")),
                }
            )
            continue
        raise AnsibleFilterError(
            f"morag_worker_parse_smi: line {number} of nvidia-smi -L is neither a GPU nor a MIG "
            f"device: {line!r}"
        )
    for gpu in gpus:
        gpu["mig_devices"].sort(key=lambda device: device["device"])
    gpus.sort(key=lambda gpu: _bus_key(gpu["pci_bus_id"]))
    return gpus


def _check_str_list(name: str, value) -> list:
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise AnsibleFilterError(f"{name} must be a list of strings, got {value!r}")
    return list(value)


def _as_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise AnsibleFilterError(f"{name} must be a number, got {value!r}")
    try:
        number = int(str(value).strip())
    except ValueError as exc:
        raise AnsibleFilterError(f"{name} must be a number, got {value!r}") from exc
    if number < minimum:
        raise AnsibleFilterError(f"{name} must be at least {minimum}, got {number}")
    return number


def _instance(
    instance_id: str,
    name: str,
    queues: list,
    concurrency: int,
    device: str,
    visible: str,
    gpu_uuid: str,
    bus_id: str,
    bound_by: str,
) -> dict:
    if not _INSTANCE_ID.match(instance_id):
        raise AnsibleFilterError(f"not a valid systemd instance name: {instance_id!r}")
    return {
        "id": instance_id,
        "name": name,
        "queues": list(queues),
        "concurrency": concurrency,
        "cuda_visible_devices": visible,
        "cuda_device_order": CUDA_DEVICE_ORDER,
        "device": device,
        "gpu_uuid": gpu_uuid,
        "pci_bus_id": bus_id,
        "bound_by": bound_by,
    }


def _check_gpus(gpus) -> list:
    if gpus is None:
        return []
    if not isinstance(gpus, (list, tuple)):
        raise AnsibleFilterError(
            "morag_worker_gpu_instances expects the list from morag_worker_parse_smi"
        )
    for gpu in gpus:
        if (
            not isinstance(gpu, dict)
            or not isinstance(gpu.get("uuid"), str)
            or not isinstance(gpu.get("pci_bus_id"), str)
            or not isinstance(gpu.get("mig_devices", []), list)
        ):
            raise AnsibleFilterError(
                f"morag_worker_gpu_instances: not a GPU from morag_worker_parse_smi: {gpu!r}"
            )
    return sorted(gpus, key=lambda gpu: _bus_key(gpu["pci_bus_id"]))


def gpu_instances(
    gpus: list,
    hostname: str,
    queues: list,
    concurrency,
    device: str,
    mig=False,
    fallback_count=0,
) -> list:
    """One worker instance per GPU (per MIG device with ``mig``), ids "0".."N-1" in PCI order.

    Each instance is bound by UUID (``bound_by: "uuid"``): CUDA_VISIBLE_DEVICES is the GPU's or
    MIG device's UUID and CUDA_DEVICE_ORDER is PCI_BUS_ID. With ``mig`` a GPU in MIG mode gives
    one instance per MIG device ("0-mig0", name "gpu0-mig0@HOST"), a GPU not in MIG mode one
    instance. Without GPUs from nvidia-smi but ``fallback_count`` > 0 (lspci saw GPUs, the driver
    does not answer yet, e.g. a reboot is pending) there are ``fallback_count`` instances bound by
    PCI order index (``bound_by: "index"``, CUDA_VISIBLE_DEVICES "0".."N-1").
    """
    gpus = _check_gpus(gpus)
    if not isinstance(hostname, str) or not hostname.strip():
        raise AnsibleFilterError("morag_worker_gpu_instances: hostname must be a non-empty string")
    queues = _check_str_list("morag_worker_gpu_instances: queues", queues)
    if not queues:
        raise AnsibleFilterError("morag_worker_gpu_instances: queues must not be empty")
    concurrency = _as_int("morag_worker_gpu_instances: concurrency", concurrency, 1)
    fallback_count = _as_int("morag_worker_gpu_instances: fallback_count", fallback_count or 0, 0)
    if device is None:
        device = ""
    if not isinstance(device, str):
        raise AnsibleFilterError("morag_worker_gpu_instances: device must be a string")
    mig = _bool(mig)
    host = hostname.strip()
    instances = []
    if not gpus:
        for position in range(fallback_count):
            instances.append(
                _instance(
                    str(position),
                    f"gpu{position}@{host}",
                    queues,
                    concurrency,
                    device,
                    str(position),
                    "",
                    "",
                    "index",
                )
            )
        return instances
    for position, gpu in enumerate(gpus):
        mig_devices = gpu.get("mig_devices") or []
        if mig and gpu.get("mig_mode") == "Enabled":
            for number, mig_device in enumerate(sorted(mig_devices, key=lambda d: d["device"])):
                instances.append(
                    _instance(
                        f"{position}-mig{number}",
                        f"gpu{position}-mig{number}@{host}",
                        queues,
                        concurrency,
                        device,
                        mig_device["uuid"],
                        gpu["uuid"],
                        gpu["pci_bus_id"],
                        "uuid",
                    )
                )
            continue
        instances.append(
            _instance(
                str(position),
                f"gpu{position}@{host}",
                queues,
                concurrency,
                device,
                gpu["uuid"],
                gpu["uuid"],
                gpu["pci_bus_id"],
                "uuid",
            )
        )
    return instances


def gpu_problems(gpus: list, mig=False) -> list:
    """Sentences about GPUs no worker can use as configured (for the role to warn or fail)."""
    gpus = _check_gpus(gpus)
    mig = _bool(mig)
    problems = []
    for position, gpu in enumerate(gpus):
        label = f"GPU {position} ({gpu['uuid']}, PCI {gpu['pci_bus_id']})"
        if gpu.get("mig_mode") != "Enabled":
            continue
        if not mig:
            problems.append(
                f"{label} is in MIG mode, and CUDA cannot use a MIG-mode GPU as a whole: its "
                f"worker sees no device. Set {MIG_VARIABLE}: true (one worker per MIG device) "
                f"or disable MIG (nvidia-smi -i {gpu.get('index', position)} -mig 0, then "
                "reset the GPU)."
            )
        elif not gpu.get("mig_devices"):
            problems.append(
                f"{label} is in MIG mode without MIG devices, so it gets no worker. Create them "
                "(nvidia-smi mig -cgi <profiles> -C) or disable MIG."
            )
    return problems


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    lowered = str(value).strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0", ""):
        return False
    raise AnsibleFilterError(f"expected a boolean, got {value!r}")


def _unquote(value: str, number: int) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out = []
        escaped = False
        for char in inner:
            if escaped:
                out.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                raise AnsibleFilterError(
                    f"morag_worker_parse_env: unescaped quote on line {number}"
                )
            else:
                out.append(char)
        if escaped:
            raise AnsibleFilterError(f"morag_worker_parse_env: dangling backslash on line {number}")
        return "".join(out)
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1]
    if value[:1] in ('"', "'"):
        raise AnsibleFilterError(f"morag_worker_parse_env: unterminated quote on line {number}")
    return value


def _queues(args: str) -> list:
    try:
        tokens = shlex.split(args)
    except ValueError as exc:
        raise AnsibleFilterError(
            f"morag_worker_parse_env: cannot split MORAG_WORKER_QUEUE_ARGS {args!r}"
        ) from exc
    queues: list = []
    position = 0
    while position < len(tokens):
        token = tokens[position]
        if token in ("--queue", "-Q", "--queues"):
            if position + 1 >= len(tokens):
                raise AnsibleFilterError(
                    f"morag_worker_parse_env: {token} without a queue in {args!r}"
                )
            value = tokens[position + 1]
            position += 2
        elif token.startswith(("--queue=", "--queues=")):
            value = token.split("=", 1)[1]
            position += 1
        else:
            raise AnsibleFilterError(
                f"morag_worker_parse_env: unexpected {token!r} in MORAG_WORKER_QUEUE_ARGS {args!r}"
            )
        for queue in value.split(","):
            if queue and queue not in queues:
                queues.append(queue)
    return queues


def parse_env(text: str, instance_id: str = "") -> dict:
    """One /etc/morag/worker-<id>.env (templates/worker.env.j2) as a dict.

    Returns {"id", "name", "queues", "concurrency", "cuda_visible_devices",
    "cuda_device_order", "device", "env"}: ``queues`` from MORAG_WORKER_QUEUE_ARGS
    ("--queue a --queue b"; also '...' or "..." quoted, "--queue=a" and "-Q a,b"),
    ``concurrency`` an int or None, ``env`` every variable. Comments and blank lines are
    skipped; double-quoted values are unescaped the way the template escapes them.
    """
    if not isinstance(text, str):
        raise AnsibleFilterError(
            f"morag_worker_parse_env expects the file's text, got {type(text).__name__}"
        )
    if instance_id is None:
        instance_id = ""
    if not isinstance(instance_id, str):
        raise AnsibleFilterError("morag_worker_parse_env: instance_id must be a string")
    env: dict = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        if "=" not in line:
            raise AnsibleFilterError(
                f"morag_worker_parse_env: line {number} is not KEY=value: {raw!r}"
            )
        key, value = line.split("=", 1)
        key = key.strip()
        if not _ENV_KEY.match(key):
            raise AnsibleFilterError(
                f"morag_worker_parse_env: bad variable name on line {number}: {key!r}"
            )
        env[key] = _unquote(value, number)
    concurrency = env.get("MORAG_WORKER_CONCURRENCY", "")
    try:
        concurrency_value = int(concurrency) if concurrency.strip() else None
    except ValueError as exc:
        raise AnsibleFilterError(
            "morag_worker_parse_env: MORAG_WORKER_CONCURRENCY must be a number, "
            f"got {concurrency!r}"
        ) from exc
    return {
        "id": instance_id,
        "name": env.get("MORAG_WORKER_NAME", ""),
        "queues": _queues(env.get("MORAG_WORKER_QUEUE_ARGS", "")),
        "concurrency": concurrency_value,
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES", ""),
        "cuda_device_order": env.get("CUDA_DEVICE_ORDER", ""),
        "device": env.get("MORAG_DEVICE", ""),
        "env": env,
    }


def _natural(instance_id: str) -> list:
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"([0-9]+)", instance_id)
        if part
    ]


def _gpu_ids(name: str, instances) -> list:
    if not isinstance(instances, (list, tuple)):
        raise AnsibleFilterError(f"morag_worker_scale_check: {name} must be a list of instances")
    ids = []
    for instance in instances:
        if (
            not isinstance(instance, dict)
            or not isinstance(instance.get("id"), str)
            or not isinstance(instance.get("queues"), (list, tuple))
        ):
            raise AnsibleFilterError(
                f"morag_worker_scale_check: each {name} instance needs an 'id' and a 'queues' "
                f"list: {instance!r}"
            )
        if GPU_QUEUE in instance["queues"] and instance["id"] not in ids:
            ids.append(instance["id"])
    return sorted(ids, key=_natural)


def scale_check(existing: list, wanted: list, allow_scale_down, detail: str = "") -> dict:
    """Refuse to scale a host's GPU workers down unless morag_worker_allow_scale_down.

    GPU instances are those consuming the gpu-tasks queue. Scaling down is having fewer of them
    than the host runs now (GPU workers replaced by a CPU one included). ``detail`` (e.g.
    "nvidia-smi: Failed to initialize NVML") is quoted in the message. Returns
    {"ok", "removed" (GPU instance ids that would disappear), "message"}.
    """
    existing_ids = _gpu_ids("existing", existing)
    wanted_ids = _gpu_ids("wanted", wanted)
    allow = _bool(allow_scale_down)
    if detail is None:
        detail = ""
    if not isinstance(detail, str):
        raise AnsibleFilterError("morag_worker_scale_check: detail must be a string")
    removed = [instance_id for instance_id in existing_ids if instance_id not in wanted_ids]
    scale_down = len(wanted_ids) < len(existing_ids)
    detected = f"detected {len(wanted_ids)} GPU{'s' if len(wanted_ids) != 1 else ''}"
    if detail.strip():
        detected += f" ({detail.strip()})"
    configured = (
        f"{len(existing_ids)} GPU worker{'s are' if len(existing_ids) != 1 else ' is'} configured "
        f"({', '.join(existing_ids)})"
    )
    if scale_down and not allow:
        message = (
            f"Refusing to scale the GPU workers down: {detected}, {configured}; this run would "
            f"remove {', '.join(removed) or 'GPU workers'}. A GPU that the driver does not see "
            f"(reboot pending, driver broken, GPU fallen off the bus) looks the same as a GPU that "
            f"is gone. Fix the driver, or set {SCALE_DOWN_VARIABLE}: true to scale down."
        )
        return {"ok": False, "removed": removed, "message": message}
    if scale_down:
        message = (
            f"Scaling the GPU workers down ({SCALE_DOWN_VARIABLE} is true): {detected}, "
            f"{configured}; removing {', '.join(removed)}."
        )
    elif removed:
        message = f"GPU workers {', '.join(removed)} are replaced ({detected}, {configured})."
    else:
        message = ""
    return {"ok": True, "removed": removed, "message": message}


class FilterModule:
    """Ansible filters of the morag_worker role."""

    def filters(self) -> dict:
        return {
            "morag_worker_parse_smi": parse_smi,
            "morag_worker_gpu_instances": gpu_instances,
            "morag_worker_gpu_problems": gpu_problems,
            "morag_worker_parse_env": parse_env,
            "morag_worker_scale_check": scale_check,
        }
