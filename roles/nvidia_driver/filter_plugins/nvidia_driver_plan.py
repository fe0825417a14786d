"""Decisions of the nvidia_driver role, as pure Ansible filters.

No GPU, kernel module or Ubuntu archive is reachable where this role is developed, so every
decision the role takes about GPUs, packages, kernels and holds lives here, in pure functions
that are unit-tested against captured facts (tests/unit/test_nvidia_driver_plan.py).

The filters never do I/O. They raise AnsibleFilterError only on malformed input (a wrong type,
a line that is not lspci output); a combination that cannot work (Blackwell with proprietary
modules, a branch Debian does not ship, ...) is returned in ``errors`` as a sentence that
names the variable to change.

Sources (cited again where used):

[NV-GUIDE]   NVIDIA Driver Installation Guide, https://docs.nvidia.com/datacenter/tesla/
             driver-installation-guide/ : "Kernel Modules" (open modules are the default from
             the 560 series; Maxwell, Pascal and Volta need the proprietary flavour; open modules
             support Turing and newer only), "Ubuntu"/"Debian" chapters (network repository,
             "apt install nvidia-driver-pinning-<branch>" or "-<version>" before the driver,
             compute-only installs: Ubuntu "libnvidia-compute nvidia-dkms-open" /
             "libnvidia-compute nvidia-dkms", Debian "nvidia-driver-cuda nvidia-kernel-open-dkms"
             / "nvidia-driver-cuda nvidia-kernel-dkms"; "Starting with branch 590, branch
             designation was removed from Ubuntu package names"), "Version locking".
[NV-FM]      NVIDIA Fabric Manager User Guide, https://docs.nvidia.com/datacenter/tesla/
             fabric-manager-user-guide/ : NVSwitch systems need Fabric Manager at exactly the
             driver's version, else CUDA fails with error 802 "system not yet initialized";
             HGX B200/B100 (fourth-generation NVSwitch) additionally need the NVLink Subnet
             Manager (NVLSM) and their NVSwitches are reached through ConnectX-7 bridge
             functions, not as NVIDIA [0680] PCI devices.
[UBU-DRV]    canonical/ubuntu-drivers-common, UbuntuDrivers/detect.py
             get_linux_modules_metapackage() and UbuntuDrivers/kerneldetection.py: the
             precompiled-module metapackage is linux-modules-nvidia-<branch>-<flavour> where the
             flavour is taken from the installed linux-image-<flavour> META package, and the
             ABI package is linux-modules-nvidia-<branch>-<kernel version>.
[UBU-PKG]    packages.ubuntu.com (jammy/noble): linux-modules-nvidia-580-server-open-
             generic-hwe-24.04 ("Extra drivers for nvidia-580-server-open for the generic-hwe-24.04
             flavour"), linux-modules-nvidia-580-server-open-{aws,azure,gcp,generic,lowlatency,
             oracle,nvidia}, nvidia-headless-no-dkms-*, nvidia-dkms-580-server-open (source
             nvidia-graphics-drivers-580-server), nvidia-fabricmanager-580 and libnvidia-nscq-580
             in multiverse (both depend on nvidia-kernel-common-580-server-<exact version>).
[DEB-PKG]    Debian archive (apt-cache on bookworm and trixie, main contrib non-free
             non-free-firmware): bookworm nvidia-graphics-drivers 535.x (nvidia-kernel-dkms,
             nvidia-smi, libcuda1 at 535.309.01 from bookworm-security) but the open module
             nvidia-open-kernel-dkms only at 535.261.03 (bookworm/contrib); trixie 550.163.01
             for both; no Fabric Manager package in Debian. Debian wiki NvidiaGraphicsDrivers:
             https://wiki.debian.org/NvidiaGraphicsDrivers
[PCI-IDS]    The PCI ID repository, https://github.com/pciutils/pciids pci.ids (commit c1c12547,
             2026-08-22), vendor 10de.
"""

from __future__ import annotations

import re

try:  # Ansible is present when the role runs; the unit tests load this file directly.
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - exercised only without ansible-core installed

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        """Stand-in with the same name when ansible-core is not importable."""


DEFAULT_BRANCH = "580"

# The one driver branch Debian's own archive carries per release [DEB-PKG].
DEBIAN_ARCHIVE_BRANCH = {"12": "535", "13": "550"}

SUPPORTED = {"Ubuntu": ("22", "24"), "Debian": ("12", "13")}
SUPPORTED_ARCHITECTURES = ("x86_64", "aarch64")

# GPU architecture by PCI device id (vendor 10de). The ranges are the spans of the VGA/3D
# controller entries of each chip family (codename prefixes GK, GM, GP, GV, TU, GA, AD, GH, GB)
# in the PCI ID repository [PCI-IDS]; audio/USB functions and NVSwitches inside the spans are
# not VGA/3D controllers and never reach this table. Device ids outside every range (Fermi,
# Rubin "GR1xx" at 0x3000-0x30ff, anything newer) are "unknown".
# Cross-check with NVIDIA's "Supported NVIDIA GPU Products" appendix of the driver README
# (https://download.nvidia.com/XFree86/Linux-x86_64/<version>/README/supportedchips.html).
ARCH_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0FA0, 0x103F, "kepler"),  # GK107/GK106/GK110/GK180/GK210 (0fc0-0fff, 1001-103f)
    (0x1180, 0x11FF, "kepler"),  # GK104/GK106
    (0x1280, 0x133F, "kepler"),  # GK208 (12xx), GK110 [Q12U-1] 130b
    (0x1340, 0x143F, "maxwell"),  # GM107/GM108/GM204/GM206
    (0x15C0, 0x15FF, "pascal"),  # GP100 (Tesla P100: 15f7, 15f8, 15f9)
    (0x1610, 0x167F, "maxwell"),  # GM204 (mobile/Quadro)
    (0x1720, 0x173F, "pascal"),  # GP100
    (0x1740, 0x17FF, "maxwell"),  # GM107/GM108/GM200
    (0x1B00, 0x1D7F, "pascal"),  # GP102/GP104/GP106/GP107/GP108 (Tesla P40 1b38, P4 1bb3)
    (0x1D80, 0x1DFF, "volta"),  # GV100 (V100 SXM2 1db1, PCIe 1db4, V100S 1df6)
    (0x1E00, 0x1FFF, "turing"),  # TU102/TU104/TU106/TU117 (Tesla T4 1eb8)
    (0x2080, 0x20FF, "ampere"),  # GA100 (A100 SXM4 20b0/20b2, A100 PCIe 20f1/20b5, A30 20b7)
    (0x2180, 0x21FF, "turing"),  # TU116
    (0x2200, 0x223F, "ampere"),  # GA102 (A40 2235, A10 2236, A10G 2237)
    (0x2300, 0x23FF, "hopper"),  # GH100 (H100 SXM5 2330, PCIe 2331, H200 2335, GH200 2342)
    (0x2400, 0x25FF, "ampere"),  # GA103/GA104/GA106/GA107 (A2/A16 25b6)
    (0x2680, 0x28FF, "ada"),  # AD102/AD103/AD104/AD106/AD107 (L40S 26b9, L4 27b8)
    (0x2900, 0x2FFF, "blackwell"),  # GB100/GB102/GB202/GB203/GB205/GB206/GB207 (B200 2901)
    (0x3180, 0x33FF, "blackwell"),  # GB110/GB112/GB120 (B300 SXM6 AC 3182, GB300 31c2)
)

OPEN_CAPABLE = ("turing", "ampere", "ada", "hopper", "blackwell")
PRE_TURING = ("maxwell", "pascal", "volta")

# NVSwitch chips that enumerate on the host as NVIDIA "Bridge [0680]" devices [PCI-IDS]:
# 1af1 GA100 [A100 NVSwitch], 22a3 GH100 [H100 NVSwitch]. An NVIDIA [0680] device that is not
# an NVSwitch exists too (nForce MCP51/MCP61 Ethernet, 10de:0269 / 10de:03ef).
NVSWITCH_DEVICE_IDS = {"1af1": "A100 NVSwitch", "22a3": "H100 NVSwitch"}

# Baseboard GPUs of HGX B100/B200/B300 (NVLink 5, fourth-generation NVSwitch): the switches
# are reached through ConnectX-7 bridge functions, so lspci shows no 10de [0680] device, yet
# Fabric Manager and NVLSM are required [NV-FM]. Ids from [PCI-IDS]: 2901 GB100 [B200],
# 29bc GB102 [B100], 3182 GB110 [B300 SXM6 AC]. (2941 "HGX GB200" is an NVL72 compute tray:
# its NVSwitches and Fabric Manager live in the switch trays, not on the host.)
NVLINK5_HGX_DEVICE_IDS = {"2901": "B200", "29bc": "B100", "3182": "B300"}

GPU_CLASSES = ("0300", "0302")  # VGA compatible controller, 3D controller
NVSWITCH_CLASS = "0680"  # Bridge: other
NVIDIA_VENDOR = "10de"

_LSPCI_LINE = re.compile(
    r"^(?P<slot>(?:[0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+"
    r"(?P<classname>[^\[]*?)\s*\[(?P<class>[0-9a-fA-F]{4})\]:\s*(?P<rest>.*)$"
)
_PCI_ID = re.compile(r"\[(?P<vendor>[0-9a-fA-F]{4}):(?P<device>[0-9a-fA-F]{4})\]")
_BRANCH = re.compile(r"^[0-9]{3,4}$")
_VERSION = re.compile(r"^(?:[0-9]+:)?[0-9]{3,4}\.[0-9]+(?:\.[0-9]+)?(?:-[0-9A-Za-z.+~]+)?$")
_UBUNTU_KERNEL = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+-[0-9]+-[a-z0-9][a-z0-9-]*$")
# Kernel flavours Canonical builds NVIDIA precompiled modules for [UBU-PKG]; "-hwe-XX.YY" and
# "-edge" variants of these follow the same scheme.
_UBUNTU_MODULE_FLAVOURS = (
    "generic",
    "generic-64k",
    "lowlatency",
    "lowlatency-64k",
    "aws",
    "azure",
    "gcp",
    "gke",
    "oracle",
    "ibm",
    "nvidia",
    "nvidia-64k",
    "nvidia-lowlatency",
)
# nvidia.ko: NVIDIA's DKMS packages and Canonical's precompiled modules; nvidia-current.ko:
# Debian's own archive packages (nvidia-kernel-dkms / nvidia-open-kernel-dkms build
# nvidia-current.ko, nvidia-current-uvm.ko, ... under /lib/modules/<kernel>/updates/dkms/ and
# alias them to "nvidia" in /etc/modprobe.d) [DEB-PKG].
_MODULE_PATH = re.compile(
    r"^(?:/usr)?/lib/modules/(?P<kernel>[^/]+)/(?:.+/)?nvidia(?:-current)?\.ko"
    r"(?:\.(?:xz|zst|gz))?$"
)
# Basename patterns for ansible.builtin.find that cover _MODULE_PATH (configure.yml).
MODULE_FILE_PATTERNS = ("nvidia.ko*", "nvidia-current.ko*")
_VERSIONED_IMAGE = re.compile(r"^linux-image-(?:unsigned-)?[0-9]+\.[0-9]+\.[0-9]+")


# ---------------------------------------------------------------------------------------------
# lspci


def gpu_architecture(device_id: str) -> str:
    """Architecture of an NVIDIA GPU from its PCI device id ("2330" -> "hopper")."""
    if not isinstance(device_id, str) or not re.fullmatch(r"[0-9a-fA-F]{4}", device_id):
        raise AnsibleFilterError(
            f"nvidia_driver_gpu_architecture expects a 4-digit hex PCI device id, got {device_id!r}"
        )
    value = int(device_id, 16)
    for low, high, name in ARCH_RANGES:
        if low <= value <= high:
            return name
    return "unknown"


def _full_slot(slot: str) -> str:
    slot = slot.lower()
    if slot.count(":") == 1:  # lspci without -D: domain 0000 (lspci prints it only with -D)
        return "0000:" + slot
    return slot


def parse_lspci(stdout: str) -> dict:
    """NVIDIA GPUs and NVSwitches from ``lspci -Dnn`` (``lspci -nn`` works too).

    Detail lines of ``lspci -nnk``/``-vnn`` (indented) are skipped. GPUs are vendor 10de with
    class 0300 (VGA) or 0302 (3D controller); NVSwitches are vendor 10de with class 0680 and a
    known NVSwitch device id or "NVSwitch" in the name. NVIDIA audio (0403), USB (0c03),
    USB-C UCSI (0c80) functions and any other device are ignored. Sorted by PCI slot.
    """
    if stdout is None:
        stdout = ""
    if not isinstance(stdout, str):
        raise AnsibleFilterError(
            "nvidia_driver_parse_lspci expects the text output of lspci -Dnn, "
            f"got {type(stdout).__name__}"
        )
    gpus: list[dict] = []
    nvswitches: list[dict] = []
    for number, line in enumerate(stdout.splitlines(), start=1):
        if not line.strip() or line[:1] in (" ", "\t"):
            continue
        match = _LSPCI_LINE.match(line.rstrip())
        if match is None:
            raise AnsibleFilterError(
                f"nvidia_driver_parse_lspci: line {number} is not `lspci -Dnn` output "
                f"(no '<slot> <class> [xxxx]: ...'): {line.strip()!r}"
            )
        rest = match.group("rest")
        ids = list(_PCI_ID.finditer(rest))
        if not ids:
            raise AnsibleFilterError(
                f"nvidia_driver_parse_lspci: line {number} has no [vendor:device] id "
                f"(run lspci with -nn): {line.strip()!r}"
            )
        pci_id = ids[-1]
        vendor = pci_id.group("vendor").lower()
        device = pci_id.group("device").lower()
        if vendor != NVIDIA_VENDOR:
            continue
        name = rest[: pci_id.start()].strip()
        device_class = match.group("class").lower()
        slot = _full_slot(match.group("slot"))
        if device_class in GPU_CLASSES:
            gpus.append(
                {
                    "pci_slot": slot,
                    "name": name,
                    "device_id": device,
                    "architecture": gpu_architecture(device),
                }
            )
        elif device_class == NVSWITCH_CLASS and (
            device in NVSWITCH_DEVICE_IDS or "nvswitch" in name.lower()
        ):
            nvswitches.append({"pci_slot": slot, "name": name, "device_id": device})
    gpus.sort(key=lambda item: item["pci_slot"])
    nvswitches.sort(key=lambda item: item["pci_slot"])
    return {"gpus": gpus, "nvswitches": nvswitches}


def nvlink5_hgx_gpus(gpus: list) -> list:
    """The GPUs of an HGX B100/B200/B300 baseboard (NVSwitches invisible to lspci)."""
    return [gpu for gpu in _check_gpus(gpus) if gpu["device_id"] in NVLINK5_HGX_DEVICE_IDS]


def fabricmanager_required(parsed: dict) -> bool:
    """Whether the host needs Fabric Manager, from ``nvidia_driver_parse_lspci`` output.

    True with any NVSwitch on the PCI bus (HGX/DGX A100, H100, H200), or with two or more
    HGX B100/B200/B300 baseboard GPUs, whose fourth-generation NVSwitches lspci cannot see
    [NV-FM]. The role's "auto" setting should use this rather than counting NVSwitches only.
    """
    if not isinstance(parsed, dict) or "gpus" not in parsed or "nvswitches" not in parsed:
        raise AnsibleFilterError(
            "nvidia_driver_fabricmanager_required expects the output of nvidia_driver_parse_lspci"
        )
    if not isinstance(parsed["nvswitches"], list):
        raise AnsibleFilterError("nvidia_driver_fabricmanager_required: nvswitches must be a list")
    return len(parsed["nvswitches"]) > 0 or len(nvlink5_hgx_gpus(parsed["gpus"])) >= 2


# ---------------------------------------------------------------------------------------------
# Kernels and their modules


def kernel_meta_packages(package_names, distribution: str) -> list:
    """The linux-image META packages among installed package names.

    ``package_names`` is a list of names or the ``ansible_facts.packages`` dict. A meta package
    follows the newest kernel of its flavour: linux-image-generic, linux-image-generic-hwe-22.04,
    linux-image-virtual, linux-image-aws (Ubuntu); linux-image-amd64, linux-image-cloud-amd64,
    linux-image-rt-amd64, linux-image-6.12-amd64 (Debian 12's 6.12 series). Versioned kernel
    packages (linux-image-5.15.0-100-generic, linux-image-6.1.0-18-amd64,
    linux-image-6.12.38+deb13-amd64, linux-image-unsigned-...) are not meta packages, nor are
    -dbg/-dbgsym, linux-image-extra-* and linux-image-amd64-signed-template.
    """
    if distribution not in SUPPORTED:
        raise AnsibleFilterError(
            f"nvidia_driver_kernel_meta_packages: distribution must be one of "
            f"{sorted(SUPPORTED)}, got {distribution!r}"
        )
    if isinstance(package_names, dict):
        names = list(package_names.keys())
    elif isinstance(package_names, (list, tuple)):
        names = list(package_names)
    else:
        raise AnsibleFilterError(
            "nvidia_driver_kernel_meta_packages expects a list of package names or "
            f"ansible_facts.packages, got {type(package_names).__name__}"
        )
    found = set()
    for name in names:
        if not isinstance(name, str):
            raise AnsibleFilterError(
                f"nvidia_driver_kernel_meta_packages: package names must be strings, got {name!r}"
            )
        if not name.startswith("linux-image-") or _VERSIONED_IMAGE.match(name):
            continue
        if name.startswith(("linux-image-extra-", "linux-image-unsigned-")):
            continue
        if name.endswith(("-dbg", "-dbgsym", "-signed-template")):
            continue
        found.add(name)
    return sorted(found)


def _meta_suffix(meta: str) -> str:
    return meta[len("linux-image-") :]


def ubuntu_module_flavour(meta: str) -> str:
    """The linux-modules-nvidia flavour for an Ubuntu kernel meta package.

    ubuntu-drivers names the metapackage after the linux-image META package [UBU-DRV]:
    linux-image-generic -> generic, linux-image-generic-hwe-22.04 -> generic-hwe-22.04,
    linux-image-aws -> aws. linux-image-virtual is the exception: Canonical builds no
    "virtual" NVIDIA modules, and linux-image-virtual installs the same -generic kernel image
    as linux-image-generic (linux-image-virtual-hwe-22.04 likewise the generic HWE kernel), so
    its modules are the generic ones.
    """
    flavour = _meta_suffix(meta)
    if flavour == "virtual":
        return "generic"
    if flavour.startswith("virtual-"):
        return "generic-" + flavour[len("virtual-") :]
    return flavour


def _known_ubuntu_flavour(flavour: str) -> bool:
    base = flavour
    if base.endswith("-edge"):
        base = base[: -len("-edge")]
    base = re.sub(r"-hwe-[0-9]{2}\.[0-9]{2}$", "", base)
    return base in _UBUNTU_MODULE_FLAVOURS


def kernels_missing_module(installed_kernels: list, module_paths: list) -> list:
    """Installed kernels without an nvidia module, from ``find /lib/modules`` (the patterns
    MODULE_FILE_PATTERNS).

    Recognises DKMS builds (/lib/modules/<kver>/updates/dkms/nvidia.ko[.xz|.zst|.gz]), Debian's
    archive DKMS builds, named nvidia-current.ko (/lib/modules/<kver>/updates/dkms/
    nvidia-current.ko), and Ubuntu's precompiled modules
    (/lib/modules/<kver>/kernel/nvidia-580srv/nvidia.ko). Only the core module counts;
    nvidia[-current]-uvm, -drm, -modeset and -peermem do not.
    """
    if not isinstance(installed_kernels, (list, tuple)) or not all(
        isinstance(kernel, str) for kernel in installed_kernels
    ):
        raise AnsibleFilterError(
            "nvidia_driver_kernels_missing_module expects a list of kernel versions"
        )
    if isinstance(module_paths, str):
        module_paths = module_paths.splitlines()
    if not isinstance(module_paths, (list, tuple)) or not all(
        isinstance(path, str) for path in module_paths
    ):
        raise AnsibleFilterError(
            "nvidia_driver_kernels_missing_module expects the module paths as a list of strings"
        )
    with_module = set()
    for path in module_paths:
        match = _MODULE_PATH.match(path.strip())
        if match:
            with_module.add(match.group("kernel"))
    missing = []
    for kernel in installed_kernels:
        if kernel not in with_module and kernel not in missing:
            missing.append(kernel)
    return missing


# ---------------------------------------------------------------------------------------------
# Versions


def _strip_epoch(version: str) -> str:
    return re.sub(r"^[0-9]+:", "", version)


def upstream_version(version: str) -> str:
    """The driver version in a Debian package version.

    "580.95.05-0ubuntu0.22.04.1" -> "580.95.05", "1:580.95.05-1" -> "580.95.05",
    "535.309.01-0+deb12u1" -> "535.309.01", "580.95.05" -> "580.95.05".
    """
    if not isinstance(version, str):
        raise AnsibleFilterError(
            f"nvidia_driver_upstream_version expects a version string, got {type(version).__name__}"
        )
    version = _strip_epoch(version.strip())
    if "-" in version:
        version = version.rsplit("-", 1)[0]
    return version


def version_matches(installed_version: str, branch, pin: str = "") -> bool:
    """Whether an installed package version is the wanted driver.

    With ``pin`` (an exact version such as "580.95.05", or a full Debian version such as
    "580.95.05-1") the installed version must be exactly that driver; without it, any version
    of ``branch`` matches. Epochs ("1:") and Debian revisions ("-0ubuntu0.22.04.1", "-1",
    "-0+deb12u1") are ignored. An empty installed version (not installed) never matches.
    """
    if installed_version is None:
        installed_version = ""
    if not isinstance(installed_version, str):
        raise AnsibleFilterError(
            "nvidia_driver_version_matches expects the installed version as a string, "
            f"got {type(installed_version).__name__}"
        )
    branch = str(branch).strip() if isinstance(branch, (str, int)) else branch
    if not isinstance(branch, str) or not _BRANCH.match(branch):
        raise AnsibleFilterError(
            f"nvidia_driver_version_matches: branch must be a number such as '580', got {branch!r}"
        )
    if pin is None:
        pin = ""
    if not isinstance(pin, str):
        raise AnsibleFilterError(
            f"nvidia_driver_version_matches: pin must be a string, got {type(pin).__name__}"
        )
    installed = installed_version.strip()
    if not installed:
        return False
    upstream = upstream_version(installed)
    pin = _strip_epoch(pin.strip())
    if pin:
        if "-" in pin:
            return _strip_epoch(installed) == pin
        return upstream == pin
    return upstream.startswith(branch + ".")


def pin_packages(names: list, version: str) -> list:
    """Append "=VERSION*" (the form ansible.builtin.apt accepts) to each bare package name.

    Names that already carry "=..." are kept as they are; an empty version leaves all names bare.
    The trailing "*" matches every Debian revision of that driver version: "-1" (NVIDIA's
    repository), "-0ubuntu0.22.04.1" (Ubuntu), "-0+deb12u1" (Debian).
    """
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise AnsibleFilterError("nvidia_driver_pin_packages expects a list of package names")
    if version is None:
        version = ""
    if not isinstance(version, str):
        raise AnsibleFilterError("nvidia_driver_pin_packages expects the version as a string")
    version = version.strip()
    if not version:
        return list(names)
    return [name if "=" in name else f"{name}={version}*" for name in names]


_KERNEL_COMMON_DEP = re.compile(
    r"nvidia-kernel-common-[0-9a-z.+-]+\s*\(\s*(?P<op>>=|=|<=)\s*(?P<version>[^)\s]+)\s*\)"
)


def parse_apt_show(stdout) -> dict:
    """What the archive (and dpkg) offers, from ``apt-cache show NAME...``.

    Returns ``{name: [{"version": ..., "driver_version": ...}, ...]}`` with the versions in
    apt's order, newest first (apt-cache show prints every version of a package, the archive's
    and the installed one from /var/lib/dpkg/status). A name apt does not know, or knows only
    as a virtual package, prints nothing and is absent: nothing of it can be installed.

    ``driver_version`` is the NVIDIA driver a package belongs to: for Canonical's
    linux-modules-nvidia-* packages (per kernel and per flavour) the version of
    nvidia-kernel-common-<branch>[-server] they depend on ("(>= 580.95.05)", with
    "(<= 580.95.05-1)" next to it: Canonical's packages are built for one driver version)
    [UBU-DRV][UBU-PKG]; for NVIDIA's own packages (nvidia-*, libnvidia-*) their upstream version;
    "" for anything else (linux-headers-*, kernel meta packages).
    """
    if stdout is None:
        stdout = ""
    if not isinstance(stdout, str):
        raise AnsibleFilterError(
            f"nvidia_driver_parse_apt_show expects the text of apt-cache show, "
            f"got {type(stdout).__name__}"
        )
    result: dict[str, list] = {}
    for stanza in re.split(r"\n\s*\n", stdout.replace("\r\n", "\n")):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if not line.strip():
                continue
            if line[:1] in (" ", "\t"):
                if key:
                    fields[key] += " " + line.strip()
                continue
            if ":" not in line:
                continue
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        name, version = fields.get("Package", ""), fields.get("Version", "")
        if not name or not version:
            continue
        driver = ""
        if name.startswith(("nvidia-", "libnvidia-")):
            driver = upstream_version(version)
        else:
            found = {
                m.group("op"): m.group("version")
                for m in _KERNEL_COMMON_DEP.finditer(
                    fields.get("Depends", "") + ", " + fields.get("Pre-Depends", "")
                )
            }
            for op in (">=", "=", "<="):
                if op in found:
                    driver = upstream_version(found[op])
                    break
        entries = result.setdefault(name, [])
        if not any(entry["version"] == version for entry in entries):
            entries.append({"version": version, "driver_version": driver})
    return result


# The EFI global variable of the Secure Boot state: 4 bytes of attributes, then one byte,
# 1 = enforcing, 0 = off (UEFI specification, "Globally Defined Variables"; efivarfs).
SECURE_BOOT_EFIVAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-e0a9e50c8f8c"


def secure_boot_state(probe) -> dict:
    """The Secure Boot state from the EFI variable, with mokutil only as a cross-check.

    ``probe`` keys: ``efi`` (bool: /sys/firmware/efi exists), ``var_exists`` (bool: the
    SecureBoot variable exists), ``var_content`` (its content, base64 as ansible.builtin.slurp
    returns it, or None when it could not be read), ``var_error`` (the read error, if any),
    ``mokutil`` (stdout of ``mokutil --sb-state``, or None when mokutil is missing or was not
    run). Returns ``{"state": "enabled"|"disabled"|"unknown", "enabled": bool, "detail": str}``:
    no /sys/firmware/efi is a legacy BIOS boot (disabled); EFI without the variable is firmware
    without Secure Boot (disabled); a variable that cannot be read or decoded is "unknown", never
    "disabled", and the detail says what to do. mokutil reporting "SecureBoot enabled" wins over a
    decoded "disabled" (the safer answer).
    """
    import base64
    import binascii

    if not isinstance(probe, dict):
        raise AnsibleFilterError("nvidia_driver_secure_boot_state expects a dict")
    mokutil = probe.get("mokutil")
    mokutil_says = ""
    if isinstance(mokutil, str):
        if "SecureBoot enabled" in mokutil:
            mokutil_says = "enabled"
        elif "SecureBoot disabled" in mokutil:
            mokutil_says = "disabled"
    what_to_do = (
        "Check it on the host (`mokutil --sb-state`, or the firmware setup), then either set "
        "nvidia_driver_secure_boot_signed: true (modules signed with a key the firmware trusts) "
        "or, with Secure Boot really off, nvidia_driver_secure_boot_check: false."
    )

    def result(state: str, detail: str) -> dict:
        if state != "enabled" and mokutil_says == "enabled":
            return {
                "state": "enabled",
                "enabled": True,
                "detail": detail + " mokutil --sb-state reports 'SecureBoot enabled': taken as "
                "enabled.",
            }
        if state == "unknown" and mokutil_says == "disabled":
            return {
                "state": "disabled",
                "enabled": False,
                "detail": detail + " mokutil --sb-state reports 'SecureBoot disabled'.",
            }
        if state == "unknown":
            detail += " " + what_to_do
        return {"state": state, "enabled": state == "enabled", "detail": detail}

    if not probe.get("efi"):
        return result("disabled", "No /sys/firmware/efi: booted by a legacy BIOS, no Secure Boot.")
    if not probe.get("var_exists"):
        return result(
            "disabled",
            "EFI boot without the SecureBoot variable: the firmware has no Secure Boot.",
        )
    content = probe.get("var_content")
    if not isinstance(content, str) or not content:
        error = probe.get("var_error") or "no content"
        return result("unknown", f"{SECURE_BOOT_EFIVAR} could not be read ({error}).")
    try:
        raw = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        return result("unknown", f"{SECURE_BOOT_EFIVAR} is not base64 as slurp returns it.")
    if len(raw) != 5 or raw[4] not in (0, 1):
        return result(
            "unknown",
            f"{SECURE_BOOT_EFIVAR} holds {len(raw)} byte(s) ({raw.hex()}), not 4 bytes of "
            "attributes and a 0/1 value.",
        )
    if raw[4] == 1:
        return result("enabled", "EFI variable SecureBoot = 1: Secure Boot is enforcing.")
    return result("disabled", "EFI variable SecureBoot = 0: Secure Boot is off.")


def platform_error(host_facts) -> str:
    """An empty string where the role supports the host, else the sentence to fail with.

    Takes ansible_facts (distribution, distribution_version, distribution_major_version,
    os_family, architecture). Checked first, before any package task of the role: on Rocky or
    RHEL the role's first task would otherwise be an apt call that fails with an unrelated
    error.
    """
    if not isinstance(host_facts, dict):
        raise AnsibleFilterError("nvidia_driver_platform_error expects ansible_facts (a dict)")
    distribution = str(host_facts.get("distribution", "") or "")
    version = str(host_facts.get("distribution_version", "") or "")
    major = str(host_facts.get("distribution_major_version", "") or version.split(".")[0])
    family = str(host_facts.get("os_family", "") or "")
    architecture = str(host_facts.get("architecture", "") or "")
    where = f"{distribution or 'an unknown distribution'} {version or major}".strip()
    if distribution not in SUPPORTED or major not in SUPPORTED[distribution]:
        hint = ""
        if family == "RedHat" or distribution in ("Rocky", "RedHat", "AlmaLinux", "CentOS"):
            hint = (
                " On Rocky/RHEL install NVIDIA's driver from its dnf repository by hand "
                "(NVIDIA Driver Installation Guide, Red Hat chapter) and set "
                "morag_worker_mode for the host; this role manages apt hosts only."
            )
        return (
            f"nvidia_driver supports Debian 12/13 and Ubuntu 22.04/24.04; "
            f"this host runs {where} "
            f"(os_family {family or 'unknown'}). Install the driver by hand or leave this host "
            "out of the gpu_workers group." + hint
        )
    if distribution == "Ubuntu" and version not in ("22.04", "24.04"):
        return (
            f"nvidia_driver supports Ubuntu 22.04 and 24.04 (LTS); this host runs Ubuntu "
            f"{version}. Install the driver by hand or leave this host out of the gpu_workers "
            "group."
        )
    if architecture and architecture not in SUPPORTED_ARCHITECTURES:
        return f"nvidia_driver supports x86_64 and aarch64; this host is {architecture}."
    return ""


def default_source(distribution: str) -> str:
    """The role's default driver source for a distribution.

    Ubuntu: "distribution" - Canonical's archive carries the current server branches with
    Canonical-signed precompiled modules that load under Secure Boot [UBU-PKG]. Debian:
    "cuda_repo" - Debian's archive carries one old branch per release (12: 535, 13: 550), which
    cannot drive Blackwell and (535) ends its support in 2026 [DEB-PKG], so the long-term
    branch 580 comes from NVIDIA's repository [NV-GUIDE].
    """
    if distribution == "Debian":
        return "cuda_repo"
    if distribution == "Ubuntu":
        return "distribution"
    raise AnsibleFilterError(
        f"nvidia_driver_default_source: distribution must be Ubuntu or Debian, got {distribution!r}"
    )


# ---------------------------------------------------------------------------------------------
# The plan

_REQUIRED_KEYS = {
    "distribution": str,
    "distribution_major_version": (str, int),
    "architecture": str,
    "kernel": str,
    "installed_kernels": (list, tuple),
    "kernel_meta_packages": (list, tuple),
    "source": str,
    "branch": (str, int),
    "kernel_modules": str,
    "container_mode": (bool, str, int),
    "ubuntu_signed_modules": (bool, str, int),
    "gpus": (list, tuple),
    "nvswitch_count": (int, str),
}


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    lowered = str(value).strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0", ""):
        return False
    raise AnsibleFilterError(f"nvidia_driver_plan: {name} must be a boolean, got {value!r}")


def _check_gpus(gpus) -> list:
    if not isinstance(gpus, (list, tuple)):
        raise AnsibleFilterError(
            "nvidia_driver_plan: gpus must be a list (nvidia_driver_parse_lspci)"
        )
    checked = []
    for gpu in gpus:
        if not isinstance(gpu, dict) or not isinstance(gpu.get("device_id"), str):
            raise AnsibleFilterError(
                "nvidia_driver_plan: each GPU must be a dict from nvidia_driver_parse_lspci, "
                f"got {gpu!r}"
            )
        checked.append(
            {
                "pci_slot": str(gpu.get("pci_slot", "")),
                "name": str(gpu.get("name", "")),
                "device_id": gpu["device_id"].lower(),
                "architecture": gpu.get("architecture") or gpu_architecture(gpu["device_id"]),
            }
        )
    return checked


def _check_available(value):
    """apt_versions: None (not looked up: everything is assumed to exist) or parse_apt_show's."""
    if value is None or value == "":
        return None
    if not isinstance(value, dict):
        raise AnsibleFilterError(
            "nvidia_driver_plan: apt_versions must be the output of nvidia_driver_parse_apt_show"
        )
    checked = {}
    for name, versions in value.items():
        if not isinstance(versions, (list, tuple)) or not all(
            isinstance(v, dict) and isinstance(v.get("version"), str) for v in versions
        ):
            raise AnsibleFilterError(
                f"nvidia_driver_plan: apt_versions[{name!r}] must be a list of "
                "{version, driver_version}"
            )
        checked[name] = [
            {"version": v["version"], "driver_version": str(v.get("driver_version") or "")}
            for v in versions
        ]
    return checked


def _check_installed(value) -> dict:
    """installed_versions: ansible_facts.packages, or a dict of name -> version."""
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise AnsibleFilterError(
            "nvidia_driver_plan: installed_versions must be ansible_facts.packages or a dict"
        )
    installed = {}
    for name, entry in value.items():
        if isinstance(entry, str):
            installed[name] = entry
        elif isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], dict):
            installed[name] = str(entry[0].get("version", ""))
    return installed


def _check_facts(facts) -> dict:
    if not isinstance(facts, dict):
        raise AnsibleFilterError(
            f"nvidia_driver_plan expects a dict of facts, got {type(facts).__name__}"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in facts]
    if missing:
        raise AnsibleFilterError(f"nvidia_driver_plan: missing facts {', '.join(missing)}")
    for key, types in _REQUIRED_KEYS.items():
        if not isinstance(facts[key], types) or (
            isinstance(facts[key], bool) and key in ("branch", "nvswitch_count")
        ):
            raise AnsibleFilterError(
                f"nvidia_driver_plan: {key} has the wrong type ({type(facts[key]).__name__})"
            )
    for key in ("installed_kernels", "kernel_meta_packages"):
        if not all(isinstance(item, str) for item in facts[key]):
            raise AnsibleFilterError(f"nvidia_driver_plan: {key} must be a list of strings")
    try:
        nvswitch_count = int(facts["nvswitch_count"])
    except ValueError as exc:
        raise AnsibleFilterError(
            f"nvidia_driver_plan: nvswitch_count must be a number, got {facts['nvswitch_count']!r}"
        ) from exc
    version = facts.get("version") or ""
    if not isinstance(version, str):
        raise AnsibleFilterError("nvidia_driver_plan: version must be a string")
    return {
        "available": _check_available(facts.get("apt_versions")),
        "installed": _check_installed(facts.get("installed_versions")),
        "upgrade": _as_bool("upgrade", facts.get("upgrade", False)),
        "distribution": facts["distribution"],
        "major": str(facts["distribution_major_version"]).split(".")[0],
        "architecture": facts["architecture"],
        "kernel": facts["kernel"].strip(),
        "installed_kernels": [k.strip() for k in facts["installed_kernels"] if k.strip()],
        "metas": sorted({m.strip() for m in facts["kernel_meta_packages"] if m.strip()}),
        "source": facts["source"].strip(),
        "branch": str(facts["branch"]).strip(),
        "version": version.strip(),
        "modules": facts["kernel_modules"].strip(),
        "container": _as_bool("container_mode", facts["container_mode"]),
        "signed": _as_bool("ubuntu_signed_modules", facts["ubuntu_signed_modules"]),
        "gpus": _check_gpus(facts["gpus"]),
        "nvswitch_count": nvswitch_count,
    }


def _empty_plan(kernels: list) -> dict:
    return {
        "packages": [],
        "module_packages": [],
        "header_packages": [],
        "kernel_module_packages": {},
        "kernel_header_packages": {},
        "hold": [],
        "driver_version_package": "",
        "pinning_package": "",
        "fabricmanager": False,
        "fabricmanager_packages": [],
        "fabricmanager_unpinned_packages": [],
        "persistenced_service": "nvidia-persistenced",
        "fabricmanager_service": "nvidia-fabricmanager",
        "module_check": {"module_name": "nvidia", "kernels": list(kernels)},
        "kernel_hold": [],
        "probe_packages": [],
        "driver_target_version": "",
        "dkms_fallback_kernels": [],
        "kernels_without_module": [],
        "errors": [],
        "warnings": [],
        "notes": [],
    }


def _describe(gpus: list) -> str:
    return ", ".join(f"{gpu['name'] or gpu['device_id']} ({gpu['pci_slot']})" for gpu in gpus)


def _gpu_checks(f: dict, branch: int, plan: dict) -> None:
    errors, warnings, notes = plan["errors"], plan["warnings"], plan["notes"]
    gpus = f["gpus"]
    by_arch: dict[str, list] = {}
    for gpu in gpus:
        by_arch.setdefault(gpu["architecture"], []).append(gpu)
    pre_turing = [gpu for gpu in gpus if gpu["architecture"] in PRE_TURING]
    blackwell = by_arch.get("blackwell", [])
    kepler = by_arch.get("kepler", [])
    unknown = by_arch.get("unknown", [])
    if kepler:
        errors.append(
            f"Kepler GPU(s) {_describe(kepler)}: no current NVIDIA driver branch supports Kepler "
            "(the last was 470). Remove the card or leave this host out of the GPU group."
        )
    if pre_turing and blackwell:
        errors.append(
            f"This host mixes pre-Turing GPU(s) {_describe(pre_turing)}, which need the "
            f"proprietary kernel modules, with Blackwell GPU(s) {_describe(blackwell)}, which need "
            "the open ones; one driver cannot serve both. Move one kind of card to another host."
        )
    elif pre_turing and f["modules"] == "open" and not f["container"]:
        errors.append(
            f"GPU(s) {_describe(pre_turing)} are Maxwell/Pascal/Volta: NVIDIA's open kernel "
            "modules support Turing and newer only. Set nvidia_driver_kernel_modules: proprietary."
        )
    if blackwell and f["modules"] == "proprietary" and not f["container"]:
        errors.append(
            f"Blackwell GPU(s) {_describe(blackwell)} work only with NVIDIA's open kernel modules. "
            "Set nvidia_driver_kernel_modules: open."
        )
    if blackwell and branch < 570:
        errors.append(
            f"Blackwell GPU(s) {_describe(blackwell)} need driver branch 570 or newer; "
            f"nvidia_driver_branch is {f['branch']}. Set nvidia_driver_branch: '{DEFAULT_BRANCH}'"
            + (
                " and nvidia_driver_source: cuda_repo (Debian's archive has no such branch)."
                if f["distribution"] == "Debian" and f["source"] == "distribution"
                else "."
            )
        )
    if pre_turing and branch > 580:
        errors.append(
            f"GPU(s) {_describe(pre_turing)} are Maxwell/Pascal/Volta, whose last driver branch is "
            f"580; branch {f['branch']} no longer drives them. Set nvidia_driver_branch: '580'."
        )
    elif pre_turing and branch == 580:
        warnings.append(
            f"GPU(s) {_describe(pre_turing)} are Maxwell/Pascal/Volta: 580 is the last driver "
            "branch that supports them, so this host cannot follow later branches."
        )
    if unknown:
        warnings.append(
            f"GPU(s) {_describe(unknown)} have PCI device ids this role does not know; they are "
            "assumed to be Turing or newer (open kernel modules)."
        )
    if gpus:
        counts: dict[str, int] = {}
        for gpu in gpus:
            key = f"{gpu['device_id']}={gpu['architecture']}"
            counts[key] = counts.get(key, 0) + 1
        notes.append(
            "GPU architectures (PCI device id ranges from the PCI ID repository): "
            + ", ".join(f"{key} x{count}" for key, count in counts.items())
            + "."
        )
    notes.append(
        f"Kernel modules: {f['modules']}. NVIDIA's open modules are the default since the 560 "
        "series and required by Blackwell; Maxwell, Pascal and Volta need the proprietary ones "
        "(NVIDIA driver installation guide, 'Kernel Modules')."
    )


def _versions(f: dict, name: str) -> list:
    return (f["available"] or {}).get(name, [])


def _available(f: dict, name: str) -> bool:
    """Whether apt can install ``name`` (always True when the archive was not looked up)."""
    return f["available"] is None or bool(_versions(f, name))


def _choose(f: dict, name: str, driver: str) -> tuple[str, str]:
    """The apt request for ``name`` built for driver ``driver`` ("" = any), or ("", why not).

    The newest version of that driver is taken: the bare name when it is apt's newest, else
    NAME=VERSION. Without archive facts the bare name (assumed to exist).
    """
    if f["available"] is None:
        return name, ""
    versions = _versions(f, name)
    if not versions:
        return "", f"{name} is not in the archive"
    matching = [
        v
        for v in versions
        if not driver or not v["driver_version"] or v["driver_version"] == driver
    ]
    if not matching:
        built = ", ".join(sorted({v["driver_version"] for v in versions}))
        return "", f"{name} exists only for driver {built}, not {driver}"
    chosen = matching[0]
    return (name if chosen is versions[0] else f"{name}={chosen['version']}"), ""


def _target_driver(f: dict, common: str) -> str:
    """The driver version the kernel side must match: the pin, else the installed (held)
    userspace unless upgrading, else the newest the archive offers ("" = not known yet)."""
    if f["version"]:
        return upstream_version(f["version"])
    if f["installed"].get(common) and not f["upgrade"]:
        return upstream_version(f["installed"][common])
    versions = _versions(f, common)
    return versions[0]["driver_version"] if versions else ""


def _without_module(plan: dict, kernel: str, reason: str, fix: str) -> None:
    plan["kernels_without_module"].append({"kernel": kernel, "reason": reason, "fix": fix})


def _ubuntu_kernel_metas(f: dict) -> list:
    """linux-image-X, linux-X and linux-headers-X of each installed linux-image meta package:
    held with the userspace (with Canonical's modules) so no new kernel comes without its
    module. The role holds the ones that are installed."""
    names = []
    for meta in f["metas"]:
        suffix = _meta_suffix(meta)
        names += [meta, f"linux-{suffix}", f"linux-headers-{suffix}"]
    return _unique(names)


def _ubuntu_distribution(f: dict, plan: dict, kernels: list) -> tuple[list, list, list, list]:
    """Userspace, module and header packages from Canonical's archive."""
    branch = f["branch"]
    open_suffix = "-open" if f["modules"] == "open" else ""
    flavour_variant = f"{branch}-server{open_suffix}"
    userspace = [f"nvidia-headless-no-dkms-{flavour_variant}", f"nvidia-utils-{branch}-server"]
    modules: list[str] = []
    headers: list[str] = []
    if f["signed"]:
        _ubuntu_signed(f, plan, kernels, flavour_variant, modules, headers)
    else:
        modules.append(f"nvidia-dkms-{flavour_variant}")
        headers = _ubuntu_headers(f, plan, kernels)
        plan["notes"].append(
            f"Ubuntu archive with DKMS (nvidia_driver_ubuntu_signed_modules: false): "
            f"nvidia-dkms-{flavour_variant} builds the module for every kernel whose headers are "
            "installed; the modules are unsigned (Secure Boot needs an enrolled MOK)."
        )
    plan["notes"].append(
        f"Userspace from the Ubuntu archive: nvidia-headless-no-dkms-{flavour_variant} (compute "
        f"libraries, nvidia-persistenced; no X) and nvidia-utils-{branch}-server (nvidia-smi), "
        "the server (ERD) branch that ubuntu-drivers installs with --gpgpu. Ubuntu has turned "
        "older -server branches into transitional packages for newer ones on some releases."
    )
    return userspace, modules, headers, []


def _ubuntu_signed(
    f: dict, plan: dict, kernels: list, flavour_variant: str, modules: list, headers: list
) -> None:
    """Canonical's signed precompiled modules, and what keeps them consistent with the held
    userspace.

    Each linux-modules-nvidia-<B>-server[-open]-<kernel> package (and its flavour meta package)
    depends on nvidia-kernel-common-<B>-server at exactly the driver version it was built for
    (">= V" and "<= V-1"), as do linux-objects-nvidia-<B>-server[-open]-<kernel> through it and
    linux-signatures-nvidia-<kernel> [UBU-PKG]. Once the archive moves the branch to a new
    version, every kernel published after that gets a module package that only the new
    userspace satisfies. With the userspace held, apt upgrade and unattended-upgrades would
    still install the new kernel (through linux-image-<flavour>) but keep its module back: the
    next reboot comes up without a GPU. So the kernel meta packages (linux-image-X, linux-X,
    linux-headers-X) and the module meta package are held with the userspace (kernel_hold):
    while held, no new kernel ABI arrives and nothing changes; nvidia_driver_upgrade: true
    moves driver, module meta and kernel meta packages together.
    """
    branch = f["branch"]
    common = f"nvidia-kernel-common-{branch}-server"
    dkms = f"nvidia-dkms-{flavour_variant}"
    target = _target_driver(f, common)
    plan["driver_target_version"] = target
    flavours = []
    for meta in f["metas"]:
        flavour = ubuntu_module_flavour(meta)
        if not _known_ubuntu_flavour(flavour):
            plan["warnings"].append(
                f"Canonical publishes no NVIDIA precompiled modules known to this role for the "
                f"kernel flavour '{flavour}' ({meta}); if apt cannot find "
                f"linux-modules-nvidia-{flavour_variant}-{flavour}, set "
                "nvidia_driver_ubuntu_signed_modules: false (DKMS)."
            )
        if flavour not in flavours:
            flavours.append(flavour)
    module_metas = [f"linux-modules-nvidia-{flavour_variant}-{flavour}" for flavour in flavours]
    abi_packages = {
        kernel: f"linux-modules-nvidia-{flavour_variant}-{kernel}" for kernel in kernels
    }
    plan["probe_packages"] = _unique(
        [common, dkms]
        + module_metas
        + list(abi_packages.values())
        + [f"linux-headers-{kernel}" for kernel in kernels]
    )
    plan["kernel_hold"] = _unique(module_metas + _ubuntu_kernel_metas(f))

    for meta in module_metas:
        spec, why = _choose(f, meta, target)
        if spec:
            modules.append(spec)
        else:
            plan["warnings"].append(
                f"{why}: it is not installed now, so kernels installed later get no module from "
                "it. The kernel meta packages stay held (no new kernel arrives); run the role "
                "with nvidia_driver_upgrade: true to move the driver and the kernels together."
            )

    missing: list[tuple[str, str]] = []
    for kernel in kernels:
        package = abi_packages[kernel]
        if not _UBUNTU_KERNEL.match(kernel):
            plan["warnings"].append(
                f"Kernel {kernel} is not an Ubuntu archive kernel, so Canonical has no "
                f"precompiled NVIDIA module ({package}) for it. Remove it, or set "
                "nvidia_driver_ubuntu_signed_modules: false to build the module with DKMS."
            )
        spec, why = _choose(f, package, target)
        if spec:
            plan["kernel_module_packages"][kernel] = spec
            modules.append(spec)
        else:
            missing.append((kernel, why))

    if missing:
        dkms_spec, dkms_why = _choose(f, dkms, target)
        for kernel, why in missing:
            header = f"linux-headers-{kernel}"
            if dkms_spec and _available(f, header):
                plan["dkms_fallback_kernels"].append(kernel)
                plan["kernel_header_packages"][kernel] = header
                headers.append(header)
            else:
                no_dkms = dkms_why if not dkms_spec else f"{header} is not in the archive"
                _without_module(
                    plan,
                    kernel,
                    f"{why}; no DKMS build either ({no_dkms})",
                    f"boot another kernel and remove this one (apt purge linux-image-{kernel}), "
                    "or run the role with nvidia_driver_upgrade: true (driver, module and kernel "
                    "meta packages move together to the archive's newest) and reboot",
                )
        if plan["dkms_fallback_kernels"]:
            modules.append(dkms_spec)
            plan["warnings"].append(
                "No precompiled module of driver "
                + (target or "(any)")
                + " for kernel(s) "
                + ", ".join(plan["dkms_fallback_kernels"])
                + f": {dkms} builds one with DKMS there (as ubuntu-drivers falls back to DKMS). "
                "DKMS modules are signed only with the DKMS MOK: under Secure Boot enrol it "
                "(mokutil --import /var/lib/shim-signed/mok/MOK.der, reboot, confirm) or boot a "
                "kernel that has Canonical's module."
            )
    if not f["metas"]:
        plan["warnings"].append(
            "No linux-image meta package (linux-image-generic, linux-image-generic-hwe-22.04, "
            "linux-image-aws, ...) is installed: kernels installed later will not get the "
            "NVIDIA module automatically. Install the meta package of this host's kernel."
        )
    plan["notes"].append(
        "Ubuntu archive with Canonical-signed precompiled modules (load under Secure Boot): "
        f"linux-modules-nvidia-{flavour_variant}-<flavour> follows the host's linux-image "
        "meta package(s) "
        + (", ".join(f["metas"]) if f["metas"] else "(none installed)")
        + " as ubuntu-drivers does (canonical/ubuntu-drivers-common UbuntuDrivers/detect.py "
        "get_linux_modules_metapackage); the per-kernel package "
        f"linux-modules-nvidia-{flavour_variant}-<kernel> gives each installed kernel "
        "(" + ", ".join(kernels) + ") its module now. The flavour comes from the meta "
        "package, not from uname: a 22.04 HWE kernel (6.8.0-xx-generic) belongs to "
        "generic-hwe-22.04, not generic. linux-image-virtual maps to the generic modules "
        "(same -generic kernel image)."
    )
    plan["notes"].append(
        "Canonical builds each kernel's module package for one driver version and makes it "
        f"depend on {common} at exactly that version. Held with the userspace (kernel_hold: "
        + ", ".join(plan["kernel_hold"])
        + "): the module meta package and the kernel meta packages, so that apt upgrade and "
        "unattended-upgrades cannot install a kernel whose module needs a newer driver than the "
        "held one (they keep it back instead: nothing changes). Per-kernel module packages are "
        "not held; a new build of them needs the new driver and is kept back by the held "
        "userspace. nvidia_driver_upgrade: true upgrades driver, module and kernel meta "
        "packages together."
    )
    plan["notes"].append(
        "Per-kernel packages exist only for kernel ABIs Canonical built this branch for; "
        "with the archive looked up (apt_versions) each kernel gets the build of driver "
        + (target or "(not known yet)")
        + ", else a DKMS build (nvidia-dkms + linux-headers-<kernel>), else it is named in "
        "kernels_without_module."
    )
    if f["version"]:
        plan["warnings"].append(
            f"nvidia_driver_version {f['version']} pins the userspace, but Canonical's "
            "precompiled modules of a kernel are built for the driver version current when "
            "that kernel was published; kernels without a module of that version get a DKMS "
            "build or none. Prefer no exact pin with signed modules, or set "
            "nvidia_driver_ubuntu_signed_modules: false."
        )


def _headers(f: dict, plan: dict, kernels: list, meta_examples: str) -> list:
    """linux-headers-<flavour> of each kernel meta package (so DKMS builds for kernels
    installed later) plus linux-headers-<kernel> for every installed kernel."""
    meta_headers = [f"linux-headers-{_meta_suffix(meta)}" for meta in f["metas"]]
    plan["probe_packages"] = _unique(
        plan["probe_packages"] + meta_headers + [f"linux-headers-{kernel}" for kernel in kernels]
    )
    headers = []
    for header in meta_headers:
        if _available(f, header):
            headers.append(header)
        else:
            plan["warnings"].append(
                f"{header} is not in the archive: kernels installed later get no headers, so "
                "DKMS cannot build the NVIDIA module for them. Install the headers meta package "
                "of this host's kernel flavour by hand."
            )
    for kernel in kernels:
        header = f"linux-headers-{kernel}"
        if _available(f, header):
            plan["kernel_header_packages"][kernel] = header
            headers.append(header)
        else:
            _without_module(
                plan,
                kernel,
                f"{header} is not in the archive any more (the archive keeps the headers of "
                "current kernels only), so DKMS cannot build the module for it",
                f"boot the newest kernel and remove this one (apt purge linux-image-{kernel}), "
                "or install its headers from an archive snapshot (snapshot.debian.org) and run "
                "the role again",
            )
    if not f["metas"]:
        plan["warnings"].append(
            f"No linux-image meta package ({meta_examples}) is installed, so no linux-headers "
            "meta package follows the kernel: DKMS cannot build the NVIDIA module for kernels "
            "installed later. Install the kernel meta package (and its linux-headers-<flavour>)."
        )
    plan["notes"].append(
        "DKMS headers: linux-headers-<flavour> of each linux-image meta package ("
        + (", ".join(f["metas"]) if f["metas"] else "none installed")
        + ") so later kernels get headers and a DKMS build, plus linux-headers-<kernel> for "
        "every installed kernel (" + ", ".join(kernels) + "). The archive keeps only current "
        "kernel ABIs: headers of an old, superseded kernel may no longer be downloadable "
        "(kernel_header_packages maps each kernel to its package)."
    )
    return headers


def _ubuntu_headers(f: dict, plan: dict, kernels: list) -> list:
    return _headers(f, plan, kernels, "linux-image-generic, linux-image-generic-hwe-22.04, ...")


def _debian_headers(f: dict, plan: dict, kernels: list) -> list:
    return _headers(
        f, plan, kernels, "linux-image-amd64, linux-image-cloud-amd64, linux-image-arm64, ..."
    )


def _debian_distribution(f: dict, plan: dict, kernels: list) -> tuple[list, list, list, list]:
    archive_branch = DEBIAN_ARCHIVE_BRANCH.get(f["major"], "")
    if f["modules"] == "open":
        module = "nvidia-open-kernel-dkms"
        if f["major"] == "12":
            plan["errors"].append(
                "Debian 12's archive carries the open kernel module (nvidia-open-kernel-dkms, "
                "contrib) at 535.261.03 while the driver libraries get security updates "
                "(535.309.01 in bookworm-security, archive state of November 2026): module and "
                "libraries would not match. Set "
                "nvidia_driver_kernel_modules: proprietary, or nvidia_driver_source: cuda_repo."
            )
    else:
        module = "nvidia-kernel-dkms"
    userspace = ["libcuda1", "nvidia-smi", "nvidia-persistenced", "firmware-misc-nonfree"]
    headers = _debian_headers(f, plan, kernels)
    plan["notes"].append(
        f"Debian {f['major']} archive (non-free/contrib), branch {archive_branch}: {module} "
        "(DKMS) with the headless compute userspace libcuda1, nvidia-smi and "
        "nvidia-persistenced instead of the nvidia-driver metapackage, which pulls the X "
        "server driver; firmware-misc-nonfree as before (firmware-nvidia-gsp comes with the "
        "DKMS package). Debian wiki NvidiaGraphicsDrivers; package names from the archive."
    )
    return userspace, [module], headers, ["nvidia-persistenced", "firmware-misc-nonfree"]


def _cuda_repo(f: dict, plan: dict, kernels: list) -> tuple[list, list, list, list]:
    branch = f["branch"]
    number = int(branch)
    open_modules = f["modules"] == "open"
    plan["pinning_package"] = f"nvidia-driver-pinning-{upstream_version(f['version']) or branch}"
    if f["distribution"] == "Debian":
        module = "nvidia-kernel-open-dkms" if open_modules else "nvidia-kernel-dkms"
        userspace = ["nvidia-driver-cuda", "nvidia-persistenced"]
        headers = _debian_headers(f, plan, kernels)
        plan["notes"].append(
            "NVIDIA's Debian repository, compute-only install as the driver installation guide "
            f"gives it: nvidia-driver-cuda + {module} (NVIDIA's names; Debian's own archive calls "
            "the open module nvidia-open-kernel-dkms), plus nvidia-persistenced."
        )
        unpinned = ["nvidia-persistenced"]
    else:
        suffix = f"-{branch}" if number < 590 else ""
        module = f"nvidia-dkms{suffix}-open" if open_modules else f"nvidia-dkms{suffix}"
        userspace = [
            f"libnvidia-compute{suffix}",
            f"nvidia-utils{suffix}",
            f"nvidia-compute-utils{suffix}",
        ]
        headers = _ubuntu_headers(f, plan, kernels)
        plan["notes"].append(
            "NVIDIA's Ubuntu repository, compute-only install as the driver installation guide "
            f"gives it: libnvidia-compute{suffix} + {module}, plus nvidia-utils{suffix} "
            f"(nvidia-smi) and nvidia-compute-utils{suffix} (nvidia-persistenced). "
            + (
                "Branches before 590 carry the branch in the package names."
                if number < 590
                else "From branch 590 the package names carry no branch; the pinning package "
                "selects it."
            )
        )
        unpinned = []
    plan["notes"].append(
        f"pinning_package {plan['pinning_package']} (NVIDIA's version-locking package, an apt "
        "preferences file) must be installed in its own apt run before the packages (a pin "
        "installed in the same transaction does not steer that transaction); it keeps apt on "
        + (f"version {f['version']}" if f["version"] else f"branch {branch}")
        + "; only one nvidia-driver-pinning-* can be installed, so a new one replaces the old. "
        "DKMS builds the module for every kernel with headers; modules are unsigned (Secure "
        "Boot needs an enrolled MOK)."
    )
    return userspace, [module], headers, unpinned


def _container(f: dict, plan: dict) -> tuple[list, list]:
    branch = f["branch"]
    if f["distribution"] == "Debian":
        packages = ["nvidia-smi", "libcuda1", "nvidia-persistenced"]
        unpinned = ["nvidia-persistenced"]
    elif f["source"] == "distribution":
        packages = [
            f"nvidia-utils-{branch}-server",
            f"libnvidia-compute-{branch}-server",
            f"nvidia-compute-utils-{branch}-server",
        ]
        unpinned = []
    else:
        suffix = f"-{branch}" if int(branch) < 590 else ""
        packages = [
            f"nvidia-utils{suffix}",
            f"libnvidia-compute{suffix}",
            f"nvidia-compute-utils{suffix}",
        ]
        unpinned = []
    if f["source"] == "cuda_repo":
        plan["pinning_package"] = (
            f"nvidia-driver-pinning-{upstream_version(f['version']) or branch}"
        )
    plan["notes"].append(
        "Container mode: userspace only (" + ", ".join(packages) + "); no kernel module, "
        "no DKMS, no headers, no Fabric Manager. With --no-install-recommends these install "
        "without DKMS (checked on Debian 12 with the archive's 535 driver); nvidia-smi then "
        "fails with 'Failed to initialize NVML' where there is no GPU."
    )
    return packages, unpinned


def _fabricmanager(f: dict, plan: dict) -> None:
    hgx5 = nvlink5_hgx_gpus(f["gpus"])
    wanted = f["nvswitch_count"] > 0
    if f["container"]:
        if wanted:
            plan["notes"].append("Container mode: Fabric Manager is not installed.")
        return
    if not wanted:
        if len(hgx5) >= 2:
            plan["warnings"].append(
                f"GPU(s) {_describe(hgx5)} sit on an HGX B100/B200/B300 baseboard: its NVSwitches "
                "are reached through ConnectX-7 bridges and do not show in lspci, but Fabric "
                "Manager and NVLSM are required, or CUDA fails with error 802. Set "
                "nvidia_driver_fabricmanager: true."
            )
        return
    branch = f["branch"]
    if f["distribution"] == "Debian" and f["source"] == "distribution":
        plan["errors"].append(
            "This host has NVSwitches and needs NVIDIA Fabric Manager, which Debian's archive "
            "does not carry. Set nvidia_driver_source: cuda_repo (NVIDIA's repository)."
        )
        return
    if f["source"] == "distribution":
        names = [f"nvidia-fabricmanager-{branch}", f"libnvidia-nscq-{branch}"]
        origin = "Ubuntu archive (multiverse; the component must be enabled)"
    else:
        suffix = f"-{branch}" if int(branch) < 590 else ""
        names = [f"nvidia-fabricmanager{suffix}", f"libnvidia-nscq{suffix}"]
        origin = "NVIDIA's repository"
    plan["fabricmanager"] = True
    plan["fabricmanager_packages"] = pin_packages(names, f["version"])
    if hgx5:
        if f["source"] == "cuda_repo":
            plan["fabricmanager_unpinned_packages"] = ["nvlsm"]
        else:
            plan["warnings"].append(
                f"HGX B100/B200/B300 GPU(s) {_describe(hgx5)} need the NVLink Subnet Manager "
                "(package nvlsm from NVIDIA's repository) next to Fabric Manager; the Ubuntu "
                "archive is not known to carry it. Add it with nvidia_driver_extra_packages or "
                "set nvidia_driver_source: cuda_repo."
            )
    plan["notes"].append(
        f"Fabric Manager from the {origin}: {', '.join(names)} (NSCQ is the NVSwitch "
        "configuration and query library of HGX boards). It must be exactly the driver's "
        "version or CUDA fails with error 802 'system not yet initialized' (Fabric Manager user "
        "guide): "
        + (
            f"pinned to {f['version']} here."
            if f["version"]
            else "without nvidia_driver_version the role installs it after the driver, pinned "
            "to the installed driver's version (the version of driver_version_package, via "
            "nvidia_driver_upstream_version and nvidia_driver_pin_packages)."
        )
        + (
            " NVLSM (nvlsm) is needed on NVLink 5 HGX boards and is versioned on its own."
            if hgx5
            else ""
        )
    )


def plan(facts: dict) -> dict:
    """The packages, holds and Fabric Manager decision for one host. See module docstring.

    Output keys: packages, module_packages, header_packages, kernel_module_packages,
    kernel_header_packages, hold, kernel_hold, driver_version_package, pinning_package,
    fabricmanager, fabricmanager_packages, fabricmanager_unpinned_packages,
    persistenced_service, fabricmanager_service, module_check, probe_packages,
    driver_target_version, dkms_fallback_kernels, kernels_without_module, errors, warnings,
    notes.

    Optional facts: apt_versions (nvidia_driver_parse_apt_show of ``apt-cache show`` of the
    previous plan's probe_packages; without it every package is assumed to exist),
    installed_versions (ansible_facts.packages), upgrade (nvidia_driver_upgrade).
    """
    f = _check_facts(facts)
    kernels = []
    for kernel in f["installed_kernels"] or [f["kernel"]]:
        if kernel not in kernels:
            kernels.append(kernel)
    result = _empty_plan([] if f["container"] else kernels)
    errors, warnings, notes = result["errors"], result["warnings"], result["notes"]

    # Values the sysadmin sets: wrong ones are errors naming the variable.
    if f["distribution"] not in SUPPORTED or f["major"] not in SUPPORTED[f["distribution"]]:
        errors.append(
            f"nvidia_driver supports Ubuntu 22.04/24.04 and Debian 12/13; this host runs "
            f"{f['distribution']} {f['major']}. Install the driver by hand or leave this host out "
            "of the GPU group."
        )
    if f["architecture"] not in SUPPORTED_ARCHITECTURES:
        errors.append(
            f"nvidia_driver supports x86_64 and aarch64; this host is {f['architecture']}."
        )
    if f["source"] not in ("distribution", "cuda_repo"):
        errors.append(
            f"nvidia_driver_source must be 'distribution' or 'cuda_repo', got '{f['source']}'."
        )
    if not _BRANCH.match(f["branch"]):
        errors.append(
            f"nvidia_driver_branch must be a driver branch number such as '{DEFAULT_BRANCH}', "
            f"got '{f['branch']}'."
        )
    if f["modules"] not in ("open", "proprietary"):
        errors.append(
            f"nvidia_driver_kernel_modules must be 'open' or 'proprietary', got '{f['modules']}'."
        )
    if f["version"]:
        if not _VERSION.match(f["version"]):
            errors.append(
                f"nvidia_driver_version must be an exact driver version such as '580.95.05', "
                f"got '{f['version']}'."
            )
        elif _BRANCH.match(f["branch"]) and not upstream_version(f["version"]).startswith(
            f["branch"] + "."
        ):
            errors.append(
                f"nvidia_driver_version {f['version']} is not in nvidia_driver_branch "
                f"{f['branch']}: set both to the same branch."
            )
    if errors:
        return result

    branch = int(f["branch"])
    _gpu_checks(f, branch, result)
    if f["architecture"] == "aarch64":
        notes.append(
            "aarch64: NVIDIA's repository is the 'sbsa' one; Canonical builds arm64 modules for "
            "the generic and generic-64k flavours. This path is not exercised by the role's tests "
            "on hardware."
        )
    if branch != int(DEFAULT_BRANCH):
        notes.append(
            f"Branch {f['branch']} instead of {DEFAULT_BRANCH}, the current long-term production "
            "branch (535 reaches end of life in 2026 and cannot drive Blackwell)."
        )

    debian_distribution = f["distribution"] == "Debian" and f["source"] == "distribution"
    if debian_distribution:
        archive_branch = DEBIAN_ARCHIVE_BRANCH[f["major"]]
        if f["branch"] != archive_branch:
            errors.append(
                f"Debian {f['major']}'s archive carries only driver branch {archive_branch}; "
                f"nvidia_driver_branch is {f['branch']}. Set nvidia_driver_source: cuda_repo "
                f"(NVIDIA's repository, the role's default on Debian) or nvidia_driver_branch: "
                f"'{archive_branch}'."
            )
            return result
        notes.append(
            "Source: Debian's archive was chosen explicitly (the role's default on Debian is "
            "cuda_repo because the archive has one old branch per release: 12 -> 535, 13 -> 550)."
        )
    if f["source"] == "cuda_repo" and branch < 570:
        errors.append(
            f"NVIDIA's repository selects a branch with its nvidia-driver-pinning-<branch> "
            f"packages, which start with branch 570; nvidia_driver_branch is {f['branch']}. Set "
            f"nvidia_driver_branch: '{DEFAULT_BRANCH}'"
            + (
                f", or nvidia_driver_source: distribution with branch "
                f"'{DEBIAN_ARCHIVE_BRANCH[f['major']]}'."
                if f["distribution"] == "Debian"
                else "."
            )
        )
        return result

    if f["container"]:
        packages, unpinned = _container(f, result)
        modules: list = []
        headers: list = []
    elif f["source"] == "cuda_repo":
        packages, modules, headers, unpinned = _cuda_repo(f, result, kernels)
    elif f["distribution"] == "Ubuntu":
        packages, modules, headers, unpinned = _ubuntu_distribution(f, result, kernels)
    else:
        packages, modules, headers, unpinned = _debian_distribution(f, result, kernels)

    if result["kernels_without_module"]:
        warnings.append(
            "These installed kernels will boot without an NVIDIA module (GPU workers fail there): "
            + "; ".join(
                f"{item['kernel']}: {item['reason']}. Fix: {item['fix']}"
                for item in result["kernels_without_module"]
            )
            + "."
        )

    if not f["container"] and f["kernel"] not in kernels:
        warnings.append(
            f"The running kernel {f['kernel']} has no /boot/vmlinuz-{f['kernel']} (removed?); "
            "the module is installed for the installed kernels only, so reboot into one of "
            "them: " + ", ".join(kernels) + "."
        )

    # Kernel-versioned packages (Canonical's linux-modules-nvidia-*) are never held or pinned;
    # a DKMS source package is driver-versioned and is held with the userspace it must match.
    kernel_versioned = [m for m in modules if m.startswith("linux-modules-nvidia-")]
    driver_packages = [p for p in packages if p not in unpinned]
    dkms_packages = [m for m in modules if m not in kernel_versioned]
    pinned_driver = pin_packages(driver_packages + dkms_packages, f["version"])
    pinned_map = dict(zip(driver_packages + dkms_packages, pinned_driver, strict=True))
    dkms_packages = [m.split("=", 1)[0] for m in dkms_packages]

    ordered = [pinned_map.get(p, p) for p in packages]
    ordered += [pinned_map.get(m, m) for m in modules]
    ordered += headers
    result["packages"] = _unique(ordered)
    result["module_packages"] = _unique(modules)
    result["header_packages"] = _unique(headers)
    result["hold"] = _unique(
        [p for p in driver_packages if p != "firmware-misc-nonfree"] + dkms_packages
    )
    result["driver_version_package"] = result["hold"][0] if result["hold"] else ""
    if f["version"]:
        notes.append(
            f"nvidia_driver_version {f['version']}: driver packages are requested as "
            f"NAME={f['version']}* so that a new pin within the branch really upgrades (or "
            "downgrades) them; held packages are released by the role for that change."
        )
    notes.append(
        "Holds (dpkg) keep apt upgrade from moving the userspace away from the loaded module: "
        + (", ".join(result["hold"]) or "none")
        + (
            "; with Canonical's modules also the module and kernel meta packages "
            + ", ".join(result["kernel_hold"])
            if result["kernel_hold"]
            else ""
        )
        + ". Per-kernel linux-modules-nvidia-* and linux-headers-* are never held."
    )

    _fabricmanager(f, result)
    if errors:
        # Nothing of a plan that cannot work is to be installed or held.
        for key in (
            "packages",
            "module_packages",
            "header_packages",
            "hold",
            "fabricmanager_packages",
            "fabricmanager_unpinned_packages",
            "kernel_hold",
            "probe_packages",
            "dkms_fallback_kernels",
            "kernels_without_module",
        ):
            result[key] = []
        for key in ("kernel_module_packages", "kernel_header_packages"):
            result[key] = {}
        result["fabricmanager"] = False
        result["driver_version_package"] = ""
        result["pinning_package"] = ""
    return result


def _unique(items: list) -> list:
    out: list = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


class FilterModule:
    """Ansible filters of the nvidia_driver role."""

    def filters(self) -> dict:
        return {
            "nvidia_driver_parse_lspci": parse_lspci,
            "nvidia_driver_gpu_architecture": gpu_architecture,
            "nvidia_driver_fabricmanager_required": fabricmanager_required,
            "nvidia_driver_plan": plan,
            "nvidia_driver_default_source": default_source,
            "nvidia_driver_version_matches": version_matches,
            "nvidia_driver_upstream_version": upstream_version,
            "nvidia_driver_pin_packages": pin_packages,
            "nvidia_driver_kernels_missing_module": kernels_missing_module,
            "nvidia_driver_kernel_meta_packages": kernel_meta_packages,
            "nvidia_driver_parse_apt_show": parse_apt_show,
            "nvidia_driver_secure_boot_state": secure_boot_state,
            "nvidia_driver_platform_error": platform_error,
        }
