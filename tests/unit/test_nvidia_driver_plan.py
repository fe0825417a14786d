"""The nvidia_driver role's decisions (roles/nvidia_driver/filter_plugins/nvidia_driver_plan.py).

No GPU, kernel module or Ubuntu archive is reachable here, so the role's decisions are pure
filters, tested over captured lspci output (tests/data/gpu/lspci-*.txt, each citing its source)
and fact sets of the supported distributions (tests/data/gpu/facts-*.json).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "gpu"
PLUGIN = ROOT / "roles" / "nvidia_driver" / "filter_plugins" / "nvidia_driver_plan.py"


def _load_plugin():
    spec = importlib.util.spec_from_file_location("nvidia_driver_plan", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nd = _load_plugin()
FilterError = nd.AnsibleFilterError


def text(name: str) -> str:
    """A data file without its provenance comment lines."""
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("#")) + "\n"


def lspci(name: str) -> dict:
    return nd.parse_lspci(text(name))


def facts(profile: str, lspci_file: str | None = None, **overrides) -> dict:
    """The facts the role passes to nvidia_driver_plan, for a profile and an lspci capture."""
    document = json.loads((DATA / f"facts-{profile}.json").read_text(encoding="utf-8"))
    base = dict(document["facts"])
    packages = base.pop("packages")
    result = {
        **base,
        "kernel_meta_packages": nd.kernel_meta_packages(packages, base["distribution"]),
        "source": nd.default_source(base["distribution"]),
        "branch": "580",
        "version": "",
        "kernel_modules": "open",
        "container_mode": False,
        "ubuntu_signed_modules": True,
        "gpus": [],
        "nvswitch_count": 0,
    }
    if lspci_file is not None:
        parsed = lspci(lspci_file)
        result["gpus"] = parsed["gpus"]
        result["nvswitch_count"] = len(parsed["nvswitches"])
    result.update(overrides)
    return result


def plan(profile: str, lspci_file: str | None = None, **overrides) -> dict:
    return nd.plan(facts(profile, lspci_file, **overrides))


def names(packages: list) -> list:
    return [package.split("=", 1)[0] for package in packages]


# ---------------------------------------------------------------------------------------------
# Test data provenance


@pytest.mark.parametrize(
    "path",
    sorted(p.name for p in DATA.iterdir() if p.name.startswith(("lspci-", "smi-l-"))),
)
def test_every_capture_names_its_source(path: str) -> None:
    first = (DATA / path).read_text(encoding="utf-8").splitlines()[0]
    assert re.match(
        r"^# (source: (https://\S+|captured on )|constructed from the PCI ID repository entr)",
        first,
    ), first


@pytest.mark.parametrize("path", sorted(p.name for p in DATA.glob("facts-*.json")))
def test_every_fact_set_says_what_it_is(path: str) -> None:
    document = json.loads((DATA / path).read_text(encoding="utf-8"))
    assert "constructed" in document["_comment"]
    assert set(document["facts"]) >= {"distribution", "kernel", "installed_kernels", "packages"}


# ---------------------------------------------------------------------------------------------
# lspci


LSPCI_CASES = [
    # file, GPU count, architectures, NVSwitch count, device ids
    ("lspci-t4-pcie.txt", 2, {"turing"}, 0, {"1eb8"}),
    ("lspci-a2-pcie.txt", 1, {"ampere"}, 0, {"25b6"}),
    ("lspci-rtx-a2000-with-audio.txt", 1, {"ampere"}, 0, {"2531"}),
    ("lspci-intel-igpu-rtx-a5000m.txt", 1, {"ampere"}, 0, {"24b6"}),
    ("lspci-l40s-pcie.txt", 2, {"ada"}, 0, {"26b9"}),
    ("lspci-h100-pcie.txt", 2, {"hopper"}, 0, {"2331"}),
    ("lspci-hgx-h100-nvswitch.txt", 8, {"hopper"}, 4, {"2330"}),
    ("lspci-hgx-a100-nvswitch.txt", 8, {"ampere"}, 6, {"20b2"}),
    ("lspci-hgx-b200.txt", 8, {"blackwell"}, 0, {"2901"}),
    ("lspci-rtx5090m-blackwell-vv.txt", 1, {"blackwell"}, 0, {"2c18"}),
    ("lspci-v100s-volta.txt", 2, {"volta"}, 0, {"1df6"}),
    ("lspci-nforce-ethernet-0680.txt", 1, {"unknown"}, 0, {"03d6"}),
    ("lspci-none-dev-vm.txt", 0, set(), 0, set()),
    ("lspci-aspeed-bmc-only.txt", 0, set(), 0, set()),
]


@pytest.mark.parametrize(("path", "count", "archs", "switches", "ids"), LSPCI_CASES)
def test_parse_lspci_counts_gpus_and_nvswitches(path, count, archs, switches, ids) -> None:
    parsed = lspci(path)
    assert len(parsed["gpus"]) == count
    assert {gpu["architecture"] for gpu in parsed["gpus"]} == archs
    assert {gpu["device_id"] for gpu in parsed["gpus"]} == ids
    assert len(parsed["nvswitches"]) == switches


def test_every_lspci_capture_is_covered() -> None:
    covered = {case[0] for case in LSPCI_CASES} | {"lspci-no-nn-l4x4.txt"}
    assert {p.name for p in DATA.glob("lspci-*.txt")} == covered


def test_parse_lspci_gpu_shape_and_slot_order() -> None:
    parsed = lspci("lspci-hgx-a100-nvswitch.txt")
    assert parsed["gpus"][0] == {
        "pci_slot": "0000:10:00.0",
        "name": "NVIDIA Corporation GA100 [A100 SXM4 80GB]",
        "device_id": "20b2",
        "architecture": "ampere",
    }
    slots = [gpu["pci_slot"] for gpu in parsed["gpus"]]
    assert slots == sorted(slots)
    # The NVSwitches sit between the GPUs in bus order; none of them is counted as a GPU.
    assert [sw["pci_slot"] for sw in parsed["nvswitches"]] == [
        f"0000:{bus}:00.0" for bus in ("54", "55", "56", "57", "58", "59")
    ]
    assert parsed["nvswitches"][0] == {
        "pci_slot": "0000:54:00.0",
        "name": "NVIDIA Corporation GA100 [A100 NVSwitch]",
        "device_id": "1af1",
    }


def test_parse_lspci_without_domain_gets_domain_0000() -> None:
    assert [gpu["pci_slot"] for gpu in lspci("lspci-t4-pcie.txt")["gpus"]] == [
        "0000:21:00.0",
        "0000:23:00.0",
    ]


def test_parse_lspci_ignores_the_bmc_vga_and_the_audio_function() -> None:
    hgx = lspci("lspci-hgx-h100-nvswitch.txt")
    assert all(gpu["device_id"] != "2000" for gpu in hgx["gpus"])  # ASPEED 1a03:2000
    a2000 = lspci("lspci-rtx-a2000-with-audio.txt")
    assert [gpu["pci_slot"] for gpu in a2000["gpus"]] == ["0000:06:10.0"]  # not 06:11.0 audio


def test_nvidia_bridge_that_is_not_an_nvswitch_is_not_counted() -> None:
    # nForce MCP61 Ethernet is NVIDIA class 0680 like an NVSwitch.
    assert lspci("lspci-nforce-ethernet-0680.txt")["nvswitches"] == []
    unknown = "0000:05:00.0 Bridge [0680]: NVIDIA Corporation Device [10de:2a1f] (rev a1)\n"
    assert nd.parse_lspci(unknown)["nvswitches"] == []
    named = "0000:05:00.0 Bridge [0680]: NVIDIA Corporation GX100 [X NVSwitch] [10de:2a1f]\n"
    assert len(nd.parse_lspci(named)["nvswitches"]) == 1


def test_parse_lspci_skips_indented_detail_lines() -> None:
    parsed = lspci("lspci-rtx5090m-blackwell-vv.txt")
    assert parsed["gpus"][0]["name"].endswith("[GeForce RTX 5090 Max-Q / Mobile]")


def test_parse_lspci_empty_output_is_no_gpu() -> None:
    assert nd.parse_lspci("") == {"gpus": [], "nvswitches": []}
    assert nd.parse_lspci(None) == {"gpus": [], "nvswitches": []}


@pytest.mark.parametrize(
    "bad",
    [
        text("lspci-no-nn-l4x4.txt"),  # plain lspci: no class codes, no ids
        "pcilib: Cannot open /sys/bus/pci/devices\n",
        "0000:00:02.0 VGA compatible controller [0300]: Intel Corporation UHD Graphics\n",
    ],
)
def test_parse_lspci_refuses_what_is_not_lspci_dnn(bad: str) -> None:
    with pytest.raises(FilterError):
        nd.parse_lspci(bad)


def test_parse_lspci_refuses_non_text() -> None:
    with pytest.raises(FilterError):
        nd.parse_lspci(["0000:00:00.0"])


@pytest.mark.parametrize(
    ("device_id", "architecture"),
    [
        ("102d", "kepler"),  # GK210GL [Tesla K80]
        ("13bb", "maxwell"),  # GM107GL [Quadro K620]
        ("17c2", "maxwell"),  # GM200 [GeForce GTX TITAN X]
        ("15f8", "pascal"),  # GP100GL [Tesla P100 PCIe 16GB]
        ("1b38", "pascal"),  # GP102GL [Tesla P40]
        ("1db4", "volta"),  # GV100GL [Tesla V100 PCIe 16GB]
        ("1df6", "volta"),  # GV100GL [Tesla V100S PCIe 32GB]
        ("1eb8", "turing"),  # TU104GL [Tesla T4]
        ("2184", "turing"),  # TU116 [GeForce GTX 1660]
        ("20b0", "ampere"),  # GA100 [A100 SXM4 40GB]
        ("20f1", "ampere"),  # GA100 [A100 PCIe 40GB]
        ("2236", "ampere"),  # GA102GL [A10]
        ("25b6", "ampere"),  # GA107GL [A2 / A16]
        ("26b9", "ada"),  # AD102GL [L40S]
        ("27b8", "ada"),  # AD104GL [L4]
        ("2330", "hopper"),  # GH100 [H100 SXM5 80GB]
        ("2331", "hopper"),  # GH100 [H100 PCIe]
        ("2335", "hopper"),  # GH100 [H200 SXM 141GB]
        ("2342", "hopper"),  # GH100 [GH200 120GB / 480GB]
        ("2901", "blackwell"),  # GB100 [B200]
        ("2b85", "blackwell"),  # GB202 [GeForce RTX 5090]
        ("2bb5", "blackwell"),  # GB202GL [RTX PRO 6000 Blackwell Server Edition]
        ("3182", "blackwell"),  # GB110 [B300 SXM6 AC]
        ("3021", "unknown"),  # GR100 (Rubin)
        ("06c0", "unknown"),  # GF100 (Fermi)
    ],
)
def test_gpu_architecture_by_device_id(device_id: str, architecture: str) -> None:
    assert nd.gpu_architecture(device_id) == architecture
    assert nd.gpu_architecture(device_id.upper()) == architecture


@pytest.mark.parametrize("bad", ["23300", "xyzw", "", 2330])
def test_gpu_architecture_refuses_malformed_ids(bad) -> None:
    with pytest.raises(FilterError):
        nd.gpu_architecture(bad)


def test_architecture_ranges_do_not_overlap() -> None:
    ranges = sorted(nd.ARCH_RANGES)
    for (_, high, _), (low, _, _) in itertools.pairwise(ranges):
        assert high < low


@pytest.mark.parametrize(
    ("path", "required"),
    [
        ("lspci-hgx-h100-nvswitch.txt", True),
        ("lspci-hgx-a100-nvswitch.txt", True),
        ("lspci-hgx-b200.txt", True),  # NVSwitches behind ConnectX-7, invisible to lspci
        ("lspci-h100-pcie.txt", False),
        ("lspci-l40s-pcie.txt", False),
        ("lspci-none-dev-vm.txt", False),
    ],
)
def test_fabricmanager_required(path: str, required: bool) -> None:
    assert nd.fabricmanager_required(lspci(path)) is required


def test_a_single_b200_needs_no_fabric_manager() -> None:
    parsed = lspci("lspci-hgx-b200.txt")
    parsed["gpus"] = parsed["gpus"][:1]
    assert nd.fabricmanager_required(parsed) is False


def test_fabricmanager_required_refuses_other_input() -> None:
    with pytest.raises(FilterError):
        nd.fabricmanager_required({"gpus": []})


# ---------------------------------------------------------------------------------------------
# Kernel meta packages and modules


@pytest.mark.parametrize(
    ("distribution", "installed", "expected"),
    [
        (
            "Ubuntu",
            ["linux-image-generic", "linux-image-5.15.0-153-generic", "linux-generic", "vim"],
            ["linux-image-generic"],
        ),
        (
            "Ubuntu",
            [
                "linux-image-generic-hwe-22.04",
                "linux-image-6.8.0-87-generic",
                "linux-image-unsigned-6.8.0-87-generic",
                "linux-image-extra-virtual",
            ],
            ["linux-image-generic-hwe-22.04"],
        ),
        (
            "Ubuntu",
            ["linux-image-virtual", "linux-image-aws"],
            ["linux-image-aws", "linux-image-virtual"],
        ),
        (
            "Debian",
            [
                "linux-image-amd64",
                "linux-image-6.1.0-18-amd64",
                "linux-image-6.1.0-18-amd64-dbg",
                "linux-image-amd64-signed-template",
            ],
            ["linux-image-amd64"],
        ),
        (
            "Debian",
            [
                "linux-image-6.12-amd64",
                "linux-image-6.12.117+deb12-amd64",
                "linux-image-cloud-amd64",
            ],
            ["linux-image-6.12-amd64", "linux-image-cloud-amd64"],
        ),
        ("Debian", ["linux-image-6.12.38+deb13-arm64", "linux-image-arm64"], ["linux-image-arm64"]),
        ("Debian", [], []),
    ],
)
def test_kernel_meta_packages(distribution, installed, expected) -> None:
    assert nd.kernel_meta_packages(installed, distribution) == expected


def test_kernel_meta_packages_takes_package_facts() -> None:
    package_facts = {
        "linux-image-amd64": [{"version": "6.1.158-1"}],
        "linux-image-6.1.0-41-amd64": [],
    }
    assert nd.kernel_meta_packages(package_facts, "Debian") == ["linux-image-amd64"]


@pytest.mark.parametrize(
    ("packages", "distribution"),
    [(["x"], "Fedora"), ("linux-image-amd64", "Debian"), ([1], "Debian")],
)
def test_kernel_meta_packages_refuses_malformed_input(packages, distribution) -> None:
    with pytest.raises(FilterError):
        nd.kernel_meta_packages(packages, distribution)


@pytest.mark.parametrize(
    ("meta", "flavour"),
    [
        ("linux-image-generic", "generic"),
        ("linux-image-generic-hwe-22.04", "generic-hwe-22.04"),
        ("linux-image-generic-hwe-24.04-edge", "generic-hwe-24.04-edge"),
        ("linux-image-virtual", "generic"),
        ("linux-image-virtual-hwe-22.04", "generic-hwe-22.04"),
        ("linux-image-aws", "aws"),
        ("linux-image-azure", "azure"),
        ("linux-image-gcp", "gcp"),
        ("linux-image-oracle", "oracle"),
        ("linux-image-lowlatency", "lowlatency"),
        ("linux-image-nvidia", "nvidia"),
        ("linux-image-generic-64k", "generic-64k"),
    ],
)
def test_ubuntu_module_flavour_follows_the_meta_package(meta: str, flavour: str) -> None:
    assert nd.ubuntu_module_flavour(meta) == flavour


KERNELS = ["6.8.0-85-generic", "6.8.0-87-generic"]


@pytest.mark.parametrize(
    ("paths", "missing"),
    [
        (
            [
                "/lib/modules/6.8.0-85-generic/updates/dkms/nvidia.ko.zst",
                "/lib/modules/6.8.0-87-generic/updates/dkms/nvidia.ko.zst",
            ],
            [],
        ),
        (
            [
                "/lib/modules/6.8.0-85-generic/kernel/nvidia-580srv/nvidia.ko",
                "/lib/modules/6.8.0-87-generic/kernel/nvidia-580srv-open/nvidia.ko",
            ],
            [],
        ),
        (
            [
                "/lib/modules/6.8.0-85-generic/updates/dkms/nvidia.ko.xz",
                "/lib/modules/6.8.0-87-generic/updates/dkms/nvidia-uvm.ko.xz",
                "/lib/modules/6.8.0-87-generic/updates/dkms/nvidia-drm.ko.xz",
                "/lib/modules/6.8.0-87-generic/updates/dkms/nvidia-modeset.ko.xz",
                "/lib/modules/6.8.0-87-generic/updates/dkms/nvidia-peermem.ko.xz",
            ],
            ["6.8.0-87-generic"],
        ),
        (["/usr/lib/modules/6.8.0-87-generic/updates/dkms/nvidia.ko"], ["6.8.0-85-generic"]),
        (["find: '/lib/modules/6.8.0-84-generic': No such file or directory", ""], KERNELS),
        ([], KERNELS),
    ],
)
def test_kernels_missing_module(paths: list, missing: list) -> None:
    assert nd.kernels_missing_module(KERNELS, paths) == missing


def test_kernels_missing_module_takes_find_stdout() -> None:
    stdout = "/lib/modules/6.1.0-56-amd64/updates/dkms/nvidia.ko.xz\n"
    assert nd.kernels_missing_module(["6.1.0-55-amd64", "6.1.0-56-amd64"], stdout) == [
        "6.1.0-55-amd64"
    ]


@pytest.mark.parametrize(
    ("kernels", "paths"), [("6.8.0-85-generic", []), ([1], []), (KERNELS, [None])]
)
def test_kernels_missing_module_refuses_malformed_input(kernels, paths) -> None:
    with pytest.raises(FilterError):
        nd.kernels_missing_module(kernels, paths)


# ---------------------------------------------------------------------------------------------
# Versions


@pytest.mark.parametrize(
    ("installed", "branch", "pin", "matches"),
    [
        ("580.95.05-1", "580", "", True),  # NVIDIA's repository
        ("580.95.05-0ubuntu0.22.04.1", "580", "", True),  # Ubuntu
        ("1:580.95.05-1", "580", "", True),  # epoch
        ("535.309.01-0+deb12u1", "535", "", True),  # Debian
        ("570.211.01-1", "580", "", False),
        ("5800.1-1", "580", "", False),
        ("", "580", "", False),  # not installed
        ("580.95.05-0ubuntu0.22.04.1", "580", "580.95.05", True),
        ("1:580.95.05-1", "580", "580.95.05", True),
        ("580.105.08-1", "580", "580.95.05", False),
        ("580.95.05-1", "580", "580.95.05-1", True),
        ("580.95.05-2", "580", "580.95.05-1", False),
        ("580.95.05-1", 580, "1:580.95.05", True),
    ],
)
def test_version_matches(installed, branch, pin, matches) -> None:
    assert nd.version_matches(installed, branch, pin) is matches


@pytest.mark.parametrize(
    ("installed", "branch", "pin"),
    [(580, "580", ""), ("580.1-1", "latest", ""), ("580.1-1", "580", 5)],
)
def test_version_matches_refuses_malformed_input(installed, branch, pin) -> None:
    with pytest.raises(FilterError):
        nd.version_matches(installed, branch, pin)


@pytest.mark.parametrize(
    ("version", "upstream"),
    [
        ("580.95.05-0ubuntu0.22.04.1", "580.95.05"),
        ("1:580.95.05-1", "580.95.05"),
        ("535.309.01-0+deb12u1", "535.309.01"),
        ("580.95.05", "580.95.05"),
    ],
)
def test_upstream_version(version: str, upstream: str) -> None:
    assert nd.upstream_version(version) == upstream


def test_pin_packages() -> None:
    assert nd.pin_packages(["a", "b=1*"], "580.95.05") == ["a=580.95.05*", "b=1*"]
    assert nd.pin_packages(["a"], "") == ["a"]
    with pytest.raises(FilterError):
        nd.pin_packages("a", "580.95.05")


@pytest.mark.parametrize(
    ("distribution", "source"), [("Ubuntu", "distribution"), ("Debian", "cuda_repo")]
)
def test_default_source(distribution: str, source: str) -> None:
    assert nd.default_source(distribution) == source


def test_default_source_refuses_other_distributions() -> None:
    with pytest.raises(FilterError):
        nd.default_source("Rocky")


# ---------------------------------------------------------------------------------------------
# The plan: Ubuntu, Canonical's archive


def test_ubuntu_2204_ga_signed_open() -> None:
    result = plan("ubuntu2204-ga", "lspci-t4-pcie.txt")
    assert result["errors"] == []
    assert result["packages"] == [
        "nvidia-headless-no-dkms-580-server-open",
        "nvidia-utils-580-server",
        "linux-modules-nvidia-580-server-open-generic",
        "linux-modules-nvidia-580-server-open-5.15.0-152-generic",
        "linux-modules-nvidia-580-server-open-5.15.0-153-generic",
    ]
    assert result["module_packages"] == result["packages"][2:]
    assert result["hold"] == ["nvidia-headless-no-dkms-580-server-open", "nvidia-utils-580-server"]
    assert result["module_check"] == {
        "module_name": "nvidia",
        "kernels": ["5.15.0-152-generic", "5.15.0-153-generic"],
    }
    assert result["persistenced_service"] == "nvidia-persistenced"
    assert result["fabricmanager"] is False
    assert result["fabricmanager_packages"] == []


def test_ubuntu_2204_hwe_follows_the_hwe_meta_package_not_uname() -> None:
    # The old role guessed the flavour "generic" from uname 6.8.0-87-generic: wrong on HWE.
    result = plan("ubuntu2204-hwe", "lspci-l40s-pcie.txt")
    assert result["errors"] == []
    assert "linux-modules-nvidia-580-server-open-generic-hwe-22.04" in result["packages"]
    assert "linux-modules-nvidia-580-server-open-generic" not in result["packages"]
    assert result["kernel_module_packages"] == {
        "6.8.0-85-generic": "linux-modules-nvidia-580-server-open-6.8.0-85-generic",
        "6.8.0-87-generic": "linux-modules-nvidia-580-server-open-6.8.0-87-generic",
    }


def test_ubuntu_virtual_meta_package_uses_the_generic_modules() -> None:
    result = plan("ubuntu2204-virtual", "lspci-a2-pcie.txt")
    assert "linux-modules-nvidia-580-server-open-generic" in result["module_packages"]
    assert not any("virtual" in package for package in result["packages"])


def test_ubuntu_2404_proprietary() -> None:
    result = plan("ubuntu2404", "lspci-v100s-volta.txt", kernel_modules="proprietary")
    assert result["errors"] == []
    assert result["packages"] == [
        "nvidia-headless-no-dkms-580-server",
        "nvidia-utils-580-server",
        "linux-modules-nvidia-580-server-generic",
        "linux-modules-nvidia-580-server-6.8.0-88-generic",
    ]
    assert any("last driver branch" in warning for warning in result["warnings"])


def test_ubuntu_aws_kernel() -> None:
    result = plan("ubuntu2404-aws", "lspci-l40s-pcie.txt")
    assert result["errors"] == []
    assert result["module_packages"] == [
        "linux-modules-nvidia-580-server-open-aws",
        "linux-modules-nvidia-580-server-open-6.8.0-1039-aws",
    ]


def test_ubuntu_arm64_64k_kernel() -> None:
    result = plan("ubuntu2404-arm64", "lspci-h100-pcie.txt")
    assert result["errors"] == []
    assert "linux-modules-nvidia-580-server-open-generic-64k" in result["module_packages"]
    assert result["warnings"] == []


def test_ubuntu_without_kernel_meta_package_warns() -> None:
    result = plan("ubuntu2404-no-meta", "lspci-t4-pcie.txt")
    assert result["errors"] == []
    assert result["module_packages"] == ["linux-modules-nvidia-580-server-open-6.8.0-88-generic"]
    assert any("meta package" in warning and "later" in warning for warning in result["warnings"])


def test_ubuntu_unknown_kernel_flavour_warns() -> None:
    result = plan("ubuntu2404", "lspci-t4-pcie.txt", kernel_meta_packages=["linux-image-kvm"])
    assert "linux-modules-nvidia-580-server-open-kvm" in result["module_packages"]
    assert any("nvidia_driver_ubuntu_signed_modules: false" in w for w in result["warnings"])


def test_ubuntu_signed_modules_for_a_non_ubuntu_kernel_warn() -> None:
    result = plan(
        "ubuntu2404",
        "lspci-t4-pcie.txt",
        kernel="6.12.9-custom",
        installed_kernels=["6.8.0-88-generic", "6.12.9-custom"],
    )
    assert any("6.12.9-custom" in w and "DKMS" in w for w in result["warnings"])


def test_ubuntu_dkms_when_signed_modules_are_off() -> None:
    result = plan("ubuntu2204-hwe", "lspci-l40s-pcie.txt", ubuntu_signed_modules=False)
    assert result["errors"] == []
    assert result["packages"] == [
        "nvidia-headless-no-dkms-580-server-open",
        "nvidia-utils-580-server",
        "nvidia-dkms-580-server-open",
        "linux-headers-generic-hwe-22.04",
        "linux-headers-6.8.0-85-generic",
        "linux-headers-6.8.0-87-generic",
    ]
    assert result["module_packages"] == ["nvidia-dkms-580-server-open"]
    assert result["header_packages"] == result["packages"][3:]
    # DKMS builds the held version for every new kernel: the DKMS package is held with the
    # userspace it must match; headers never are.
    assert "nvidia-dkms-580-server-open" in result["hold"]
    assert not any(package.startswith("linux-") for package in result["hold"])


def test_ubuntu_exact_version_pin() -> None:
    result = plan("ubuntu2204-ga", "lspci-t4-pcie.txt", version="580.95.05")
    assert result["errors"] == []
    assert result["packages"][:2] == [
        "nvidia-headless-no-dkms-580-server-open=580.95.05*",
        "nvidia-utils-580-server=580.95.05*",
    ]
    assert all("=" not in p for p in result["module_packages"])  # kernel-versioned: no pin
    assert all("=" not in p for p in result["hold"])
    assert any("precompiled modules" in w for w in result["warnings"])


# ---------------------------------------------------------------------------------------------
# The plan: NVIDIA's repository


def test_ubuntu_cuda_repo_580() -> None:
    result = plan("ubuntu2404", "lspci-hgx-b200.txt", source="cuda_repo")
    assert result["errors"] == []
    assert result["pinning_package"] == "nvidia-driver-pinning-580"
    assert result["packages"] == [
        "libnvidia-compute-580",
        "nvidia-utils-580",
        "nvidia-compute-utils-580",
        "nvidia-dkms-580-open",
        "linux-headers-generic",
        "linux-headers-6.8.0-88-generic",
    ]
    assert result["driver_version_package"] == "libnvidia-compute-580"


def test_ubuntu_cuda_repo_590_names_carry_no_branch() -> None:
    result = plan(
        "ubuntu2404",
        "lspci-t4-pcie.txt",
        source="cuda_repo",
        branch="590",
        kernel_modules="proprietary",
    )
    assert result["errors"] == []
    assert result["pinning_package"] == "nvidia-driver-pinning-590"
    assert names(result["packages"])[:4] == [
        "libnvidia-compute",
        "nvidia-utils",
        "nvidia-compute-utils",
        "nvidia-dkms",
    ]


def test_debian_12_default_source_is_nvidias_repository() -> None:
    result = plan("debian12", "lspci-l40s-pcie.txt")
    assert result["errors"] == []
    assert result["pinning_package"] == "nvidia-driver-pinning-580"
    assert result["packages"] == [
        "nvidia-driver-cuda",
        "nvidia-persistenced",
        "nvidia-kernel-open-dkms",
        "linux-headers-amd64",
        "linux-headers-6.1.0-55-amd64",
        "linux-headers-6.1.0-56-amd64",
    ]
    assert result["hold"] == ["nvidia-driver-cuda", "nvidia-kernel-open-dkms"]
    assert result["kernel_header_packages"] == {
        "6.1.0-55-amd64": "linux-headers-6.1.0-55-amd64",
        "6.1.0-56-amd64": "linux-headers-6.1.0-56-amd64",
    }


def test_debian_12_cloud_kernel_headers() -> None:
    result = plan("debian12-cloud", "lspci-t4-pcie.txt")
    assert result["header_packages"] == [
        "linux-headers-cloud-amd64",
        "linux-headers-6.1.0-56-cloud-amd64",
    ]


def test_debian_12_with_the_6_12_series_gets_both_header_metas() -> None:
    result = plan("debian12-bpo612", "lspci-t4-pcie.txt")
    assert result["header_packages"][:2] == ["linux-headers-6.12-amd64", "linux-headers-amd64"]
    assert "linux-headers-6.12.117+deb12-amd64" in result["header_packages"]


def test_debian_13_cuda_repo_proprietary_with_pin() -> None:
    result = plan(
        "debian13", "lspci-v100s-volta.txt", kernel_modules="proprietary", version="580.95.05"
    )
    assert result["errors"] == []
    assert result["pinning_package"] == "nvidia-driver-pinning-580.95.05"
    assert result["packages"][:3] == [
        "nvidia-driver-cuda=580.95.05*",
        "nvidia-persistenced",
        "nvidia-kernel-dkms=580.95.05*",
    ]
    assert "linux-headers-6.12.118+deb13-amd64" in result["packages"]


def test_cuda_repo_before_570_is_refused() -> None:
    result = plan("debian12", "lspci-t4-pcie.txt", branch="550")
    assert len(result["errors"]) == 1
    assert "nvidia_driver_branch" in result["errors"][0]
    assert result["packages"] == []


# ---------------------------------------------------------------------------------------------
# The plan: Debian's archive


def test_debian_13_archive_open_modules() -> None:
    result = plan("debian13", "lspci-l40s-pcie.txt", source="distribution", branch="550")
    assert result["errors"] == []
    assert result["packages"] == [
        "libcuda1",
        "nvidia-smi",
        "nvidia-persistenced",
        "firmware-misc-nonfree",
        "nvidia-open-kernel-dkms",
        "linux-headers-amd64",
        "linux-headers-6.12.117+deb13-amd64",
        "linux-headers-6.12.118+deb13-amd64",
    ]
    assert result["hold"] == ["libcuda1", "nvidia-smi", "nvidia-open-kernel-dkms"]
    assert result["driver_version_package"] == "libcuda1"
    assert result["pinning_package"] == ""


def test_debian_12_archive_proprietary() -> None:
    result = plan(
        "debian12",
        "lspci-t4-pcie.txt",
        source="distribution",
        branch="535",
        kernel_modules="proprietary",
    )
    assert result["errors"] == []
    assert "nvidia-kernel-dkms" in result["module_packages"]
    assert any("535" in note and "Blackwell" in note for note in result["notes"])


def test_debian_12_archive_open_modules_are_refused() -> None:
    result = plan("debian12", "lspci-t4-pcie.txt", source="distribution", branch="535")
    assert len(result["errors"]) == 1
    assert "nvidia_driver_kernel_modules: proprietary" in result["errors"][0]
    assert "nvidia_driver_source: cuda_repo" in result["errors"][0]


@pytest.mark.parametrize(("profile", "archive_branch"), [("debian12", "535"), ("debian13", "550")])
def test_debian_archive_has_one_branch(profile: str, archive_branch: str) -> None:
    result = plan(profile, "lspci-t4-pcie.txt", source="distribution", branch="580")
    assert len(result["errors"]) == 1
    assert "nvidia_driver_source: cuda_repo" in result["errors"][0]
    assert f"'{archive_branch}'" in result["errors"][0]


# ---------------------------------------------------------------------------------------------
# Container mode (the lab and molecule run Debian 12 and 13 with the archive's branch)


@pytest.mark.parametrize(
    ("profile", "branch"), [("debian12-container", "535"), ("debian13", "550")]
)
def test_container_mode_debian_archive(profile: str, branch: str) -> None:
    result = plan(
        profile,
        "lspci-hgx-h100-nvswitch.txt",
        source="distribution",
        branch=branch,
        container_mode=True,
    )
    assert result["errors"] == []
    assert result["packages"] == ["nvidia-smi", "libcuda1", "nvidia-persistenced"]
    assert result["module_packages"] == []
    assert result["header_packages"] == []
    assert result["fabricmanager"] is False
    assert result["fabricmanager_packages"] == []
    assert result["module_check"]["kernels"] == []
    assert result["hold"] == ["nvidia-smi", "libcuda1"]


def test_container_mode_without_gpus() -> None:
    result = plan(
        "debian12-container", None, source="distribution", branch="535", container_mode=True
    )
    assert result["errors"] == []
    assert result["packages"] == ["nvidia-smi", "libcuda1", "nvidia-persistenced"]


def test_container_mode_still_checks_the_archive_branch() -> None:
    result = plan(
        "debian12-container", None, source="distribution", branch="580", container_mode=True
    )
    assert any("nvidia_driver_source: cuda_repo" in e for e in result["errors"])


@pytest.mark.parametrize(
    ("source", "expected", "pinning"),
    [
        (
            "distribution",
            [
                "nvidia-utils-580-server",
                "libnvidia-compute-580-server",
                "nvidia-compute-utils-580-server",
            ],
            "",
        ),
        (
            "cuda_repo",
            ["nvidia-utils-580", "libnvidia-compute-580", "nvidia-compute-utils-580"],
            "nvidia-driver-pinning-580",
        ),
    ],
)
def test_container_mode_ubuntu(source: str, expected: list, pinning: str) -> None:
    result = plan("ubuntu2404", "lspci-v100s-volta.txt", source=source, container_mode=True)
    assert result["errors"] == []  # modules are not installed, so open/proprietary does not matter
    assert result["packages"] == expected
    assert result["pinning_package"] == pinning


# ---------------------------------------------------------------------------------------------
# GPU generations and kernel modules


@pytest.mark.parametrize(
    ("profile", "lspci_file", "overrides", "variable"),
    [
        ("ubuntu2404", "lspci-v100s-volta.txt", {}, "nvidia_driver_kernel_modules: proprietary"),
        (
            "ubuntu2404",
            "lspci-hgx-b200.txt",
            {"kernel_modules": "proprietary"},
            "nvidia_driver_kernel_modules: open",
        ),
        (
            "ubuntu2404",
            "lspci-rtx5090m-blackwell-vv.txt",
            {"branch": "550"},
            "nvidia_driver_branch: '580'",
        ),
        (
            "debian13",
            "lspci-hgx-b200.txt",
            {"source": "distribution", "branch": "550"},
            "nvidia_driver_source: cuda_repo",
        ),
        (
            "debian12",
            "lspci-v100s-volta.txt",
            {"kernel_modules": "proprietary", "branch": "590"},
            "nvidia_driver_branch: '580'",
        ),
    ],
)
def test_gpu_generation_errors_name_the_variable(profile, lspci_file, overrides, variable) -> None:
    result = plan(profile, lspci_file, **overrides)
    assert result["errors"], result["notes"]
    assert any(variable in error for error in result["errors"]), result["errors"]


@pytest.mark.parametrize(
    "lspci_file",
    [
        "lspci-t4-pcie.txt",
        "lspci-a2-pcie.txt",
        "lspci-l40s-pcie.txt",
        "lspci-h100-pcie.txt",
        "lspci-hgx-h100-nvswitch.txt",
        "lspci-hgx-a100-nvswitch.txt",
        "lspci-hgx-b200.txt",
        "lspci-rtx5090m-blackwell-vv.txt",
    ],
)
@pytest.mark.parametrize(
    "profile", ["ubuntu2204-ga", "ubuntu2204-hwe", "ubuntu2404", "debian12", "debian13"]
)
def test_turing_and_newer_work_with_the_defaults(profile: str, lspci_file: str) -> None:
    result = plan(profile, lspci_file)
    assert result["errors"] == []
    assert result["packages"]
    assert any(
        package.startswith(
            (
                "linux-modules-nvidia-580-server-open-",
                "nvidia-kernel-open-dkms",
                "nvidia-dkms-580-open",
            )
        )
        for package in result["module_packages"]
    )


def test_turing_to_hopper_may_use_proprietary_modules() -> None:
    result = plan("ubuntu2404", "lspci-hgx-h100-nvswitch.txt", kernel_modules="proprietary")
    assert result["errors"] == []
    assert "linux-modules-nvidia-580-server-generic" in result["module_packages"]


def test_kepler_is_refused() -> None:
    gpus = [
        {
            "pci_slot": "0000:04:00.0",
            "name": "GK210GL [Tesla K80]",
            "device_id": "102d",
            "architecture": "kepler",
        }
    ]
    result = nd.plan(facts("ubuntu2404", gpus=gpus, kernel_modules="proprietary"))
    assert any("Kepler" in error for error in result["errors"])


def test_pre_turing_and_blackwell_on_one_host_is_refused() -> None:
    gpus = lspci("lspci-v100s-volta.txt")["gpus"] + lspci("lspci-hgx-b200.txt")["gpus"][:1]
    result = nd.plan(facts("ubuntu2404", gpus=gpus))
    assert len(result["errors"]) == 1
    assert "Blackwell" in result["errors"][0] and "Maxwell" not in result["errors"][0]


def test_unknown_gpu_warns() -> None:
    result = plan("ubuntu2404", "lspci-nforce-ethernet-0680.txt")
    assert result["errors"] == []
    assert any("03d6" in warning or "GeForce 7025" in warning for warning in result["warnings"])


def test_gpu_architecture_is_computed_when_missing() -> None:
    gpus = [{"pci_slot": "0000:3b:00.0", "name": "V100", "device_id": "1db4"}]
    result = nd.plan(facts("ubuntu2404", gpus=gpus))
    assert any("nvidia_driver_kernel_modules: proprietary" in e for e in result["errors"])


# ---------------------------------------------------------------------------------------------
# Fabric Manager


def test_hgx_h100_ubuntu_archive_fabric_manager() -> None:
    result = plan("ubuntu2204-hwe", "lspci-hgx-h100-nvswitch.txt")
    assert result["errors"] == []
    assert result["fabricmanager"] is True
    assert result["fabricmanager_packages"] == ["nvidia-fabricmanager-580", "libnvidia-nscq-580"]
    assert result["fabricmanager_service"] == "nvidia-fabricmanager"
    assert any("802" in note for note in result["notes"])


def test_hgx_h100_fabric_manager_is_pinned_to_the_exact_driver_version() -> None:
    result = plan("ubuntu2404", "lspci-hgx-h100-nvswitch.txt", version="580.95.05")
    assert result["fabricmanager_packages"] == [
        "nvidia-fabricmanager-580=580.95.05*",
        "libnvidia-nscq-580=580.95.05*",
    ]


@pytest.mark.parametrize(
    ("branch", "expected"),
    [
        ("580", ["nvidia-fabricmanager-580", "libnvidia-nscq-580"]),
        ("590", ["nvidia-fabricmanager", "libnvidia-nscq"]),
    ],
)
def test_hgx_a100_nvidia_repository_fabric_manager(branch: str, expected: list) -> None:
    result = plan("debian12", "lspci-hgx-a100-nvswitch.txt", branch=branch)
    assert result["errors"] == []
    assert result["fabricmanager"] is True
    assert result["fabricmanager_packages"] == expected
    assert result["fabricmanager_unpinned_packages"] == []


def test_debian_archive_has_no_fabric_manager() -> None:
    result = plan("debian13", "lspci-hgx-a100-nvswitch.txt", source="distribution", branch="550")
    assert any(
        "Fabric Manager" in e and "nvidia_driver_source: cuda_repo" in e for e in result["errors"]
    )


@pytest.mark.parametrize(
    "lspci_file", ["lspci-h100-pcie.txt", "lspci-l40s-pcie.txt", "lspci-t4-pcie.txt"]
)
def test_pcie_cards_need_no_fabric_manager(lspci_file: str) -> None:
    result = plan("ubuntu2404", lspci_file)
    assert result["fabricmanager"] is False
    assert result["fabricmanager_packages"] == []
    assert not any("Fabric Manager" in w for w in result["warnings"])


def test_hgx_b200_without_fabric_manager_warns() -> None:
    result = plan("ubuntu2404", "lspci-hgx-b200.txt")
    assert result["fabricmanager"] is False
    assert any("nvidia_driver_fabricmanager: true" in w for w in result["warnings"])


def test_hgx_b200_fabric_manager_brings_nvlsm_from_nvidias_repository() -> None:
    result = plan("debian12", "lspci-hgx-b200.txt", nvswitch_count=1)
    assert result["fabricmanager"] is True
    assert result["fabricmanager_packages"] == ["nvidia-fabricmanager-580", "libnvidia-nscq-580"]
    assert result["fabricmanager_unpinned_packages"] == ["nvlsm"]


def test_hgx_b200_on_the_ubuntu_archive_warns_about_nvlsm() -> None:
    result = plan("ubuntu2404", "lspci-hgx-b200.txt", nvswitch_count=1)
    assert result["fabricmanager"] is True
    assert any("nvlsm" in w for w in result["warnings"])


# ---------------------------------------------------------------------------------------------
# Errors for values the sysadmin sets


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"source": "ppa"}, "nvidia_driver_source"),
        ({"branch": "latest"}, "nvidia_driver_branch"),
        ({"kernel_modules": "closed"}, "nvidia_driver_kernel_modules"),
        ({"version": "580.95.05; rm -rf /"}, "nvidia_driver_version"),
        (
            {"version": "570.211.01"},
            "nvidia_driver_version 570.211.01 is not in nvidia_driver_branch 580",
        ),
        ({"distribution_major_version": "20"}, "Ubuntu 22.04/24.04 and Debian 12/13"),
        ({"architecture": "ppc64le"}, "x86_64 and aarch64"),
    ],
)
def test_invalid_values_are_errors(overrides: dict, needle: str) -> None:
    result = plan("ubuntu2404", "lspci-t4-pcie.txt", **overrides)
    assert any(needle in error for error in result["errors"]), result["errors"]
    assert result["packages"] == []


def test_running_kernel_without_vmlinuz_warns() -> None:
    result = plan("debian12", "lspci-t4-pcie.txt", kernel="6.1.0-54-amd64")
    assert any("6.1.0-54-amd64" in w and "reboot" in w for w in result["warnings"])
    assert "linux-headers-6.1.0-54-amd64" not in result["packages"]


def test_no_installed_kernels_uses_the_running_one() -> None:
    result = plan("debian12", "lspci-t4-pcie.txt", installed_kernels=[])
    assert result["module_check"]["kernels"] == ["6.1.0-56-amd64"]


# ---------------------------------------------------------------------------------------------
# Invariants over the matrix


MATRIX = [
    (profile, lspci_file, overrides)
    for profile in (
        "ubuntu2204-ga",
        "ubuntu2204-hwe",
        "ubuntu2204-virtual",
        "ubuntu2404",
        "ubuntu2404-aws",
        "debian12",
        "debian12-cloud",
        "debian13",
    )
    for lspci_file in ("lspci-t4-pcie.txt", "lspci-hgx-h100-nvswitch.txt", "lspci-hgx-b200.txt")
    for overrides in (
        {},
        {"version": "580.95.05"},
        {"ubuntu_signed_modules": False},
        {"source": "cuda_repo"}
        if profile.startswith("ubuntu")
        else {"kernel_modules": "proprietary"},
    )
]


@pytest.mark.parametrize(("profile", "lspci_file", "overrides"), MATRIX)
def test_plan_invariants(profile: str, lspci_file: str, overrides: dict) -> None:
    plain = facts(profile, lspci_file, **overrides)
    before = copy.deepcopy(plain)
    result = nd.plan(plain)
    assert plain == before  # pure: the input is not changed
    assert nd.plan(plain) == result  # deterministic
    if result["errors"]:
        assert (result["packages"], result["hold"], result["fabricmanager"]) == ([], [], False)
        assert lspci_file == "lspci-hgx-b200.txt" and overrides == {"kernel_modules": "proprietary"}
        return
    package_names = names(result["packages"])
    assert len(package_names) == len(set(package_names))
    assert set(result["hold"]) <= set(package_names)
    assert set(names(result["module_packages"])) <= set(package_names)
    assert set(result["header_packages"]) <= set(package_names)
    for held in result["hold"]:
        assert "=" not in held
        assert not held.startswith(
            ("linux-modules-", "linux-headers-", "firmware-", "nvidia-driver-pinning")
        )
    assert result["driver_version_package"] == result["hold"][0]
    for package in result["packages"]:
        if "=" in package:
            assert package.endswith(f"={overrides['version']}*")
            assert not package.startswith(("linux-", "nvidia-persistenced", "firmware-"))
    # Every installed kernel gets a module: a per-kernel package or a DKMS build with headers,
    # or it is named (with the fix) in kernels_without_module.
    without = {item["kernel"] for item in result["kernels_without_module"]}
    for kernel in result["module_check"]["kernels"]:
        assert (
            kernel in result["kernel_module_packages"]
            or kernel in result["kernel_header_packages"]
            or kernel in without
        )
    # Held kernel-side packages only with Canonical's modules, and never a per-kernel one.
    if result["kernel_hold"]:
        assert profile.startswith("ubuntu")
        assert all(not re.search(r"-[0-9]+\.[0-9]+\.[0-9]+-", n) for n in result["kernel_hold"])
    assert result["fabricmanager"] is (lspci_file == "lspci-hgx-h100-nvswitch.txt")


# ---------------------------------------------------------------------------------------------
# Malformed facts


@pytest.mark.parametrize(
    "broken",
    [
        "not a dict",
        {"distribution": "Ubuntu"},
        {"gpus": "GH100"},
        {"installed_kernels": "6.8.0-88-generic"},
        {"installed_kernels": [6]},
        {"nvswitch_count": "four"},
        {"nvswitch_count": True},
        {"container_mode": "perhaps"},
        {"version": 580},
        {"gpus": [{"pci_slot": "0000:01:00.0"}]},
    ],
)
def test_malformed_facts_raise(broken) -> None:
    if isinstance(broken, dict) and broken != {"distribution": "Ubuntu"}:
        broken = facts("ubuntu2404", "lspci-t4-pcie.txt", **broken)
    with pytest.raises(FilterError):
        nd.plan(broken)


def test_string_booleans_from_templating_are_accepted() -> None:
    result = plan(
        "debian12-container",
        None,
        source="distribution",
        branch=535,
        container_mode="True",
        nvswitch_count="0",
    )
    assert result["errors"] == []
    assert result["packages"] == ["nvidia-smi", "libcuda1", "nvidia-persistenced"]


def test_filter_module_exports() -> None:
    assert set(nd.FilterModule().filters()) == {
        "nvidia_driver_parse_lspci",
        "nvidia_driver_gpu_architecture",
        "nvidia_driver_fabricmanager_required",
        "nvidia_driver_plan",
        "nvidia_driver_default_source",
        "nvidia_driver_version_matches",
        "nvidia_driver_upstream_version",
        "nvidia_driver_pin_packages",
        "nvidia_driver_kernels_missing_module",
        "nvidia_driver_kernel_meta_packages",
        "nvidia_driver_parse_apt_show",
        "nvidia_driver_secure_boot_state",
        "nvidia_driver_platform_error",
    }
