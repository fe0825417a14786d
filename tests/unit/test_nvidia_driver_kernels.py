"""nvidia_driver: kernels, module packages, Secure Boot and unsupported hosts (issue 17).

- Ubuntu with Canonical's signed modules: the userspace is held, and every per-kernel module
  package depends on nvidia-kernel-common at exactly the driver version it was built for. Once
  the archive moves the branch, a new kernel's module needs the new driver: the role holds the
  module meta package and the kernel meta packages with the userspace (kernel_hold), so apt
  upgrade / unattended-upgrades change nothing instead of installing a kernel without a module.
  A small model of apt's upgrade over held packages checks that against the alternatives.
- Per-kernel packages are asked for only where the archive has them (apt-cache show, parsed
  by nvidia_driver_parse_apt_show); Ubuntu falls back to DKMS where Canonical has no module of
  the driver's version; a kernel left without a module is named with the fix.
- Debian's archive module is nvidia-current.ko; Secure Boot is read from the EFI variable;
  Rocky/RHEL hosts are refused before any package task.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "gpu"
ROLE = ROOT / "roles" / "nvidia_driver"
PLUGIN = ROLE / "filter_plugins" / "nvidia_driver_plan.py"


def _load_plugin():
    spec = importlib.util.spec_from_file_location("nvidia_driver_plan_kernels", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nd = _load_plugin()

V1 = "580.95.05"  # the driver the host installed and holds
V2 = "580.105.08"  # the archive's next update of branch 580
VARIANT = "580-server-open"


def text(name: str) -> str:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("#")) + "\n"


def facts(profile: str, **overrides) -> dict:
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
        "gpus": nd.parse_lspci(text("lspci-l40s-pcie.txt"))["gpus"],
        "nvswitch_count": 0,
    }
    result.update(overrides)
    return result


def release(driver: str, profile: str) -> str:
    return f"{driver}-0ubuntu0.{'22.04' if '2204' in profile else '24.04'}.1"


def stanza(name: str, version: str, depends: str = "") -> str:
    return (
        f"Package: {name}\nVersion: {version}\n"
        + (f"Depends: {depends}\n" if depends else "")
        + "Description: x\n"
    )


def common_dep(driver: str) -> str:
    return (
        f"nvidia-kernel-common-580-server (<= {driver}-1), "
        f"nvidia-kernel-common-580-server (>= {driver})"
    )


def abi_build(number: int) -> str:
    return f"+{number}"


def ubuntu_archive(
    profile: str,
    builds: dict,
    metas: dict,
    drivers: tuple = (V2, V1),
    dkms: tuple = (V2,),
    headers: tuple = (),
) -> str:
    """`apt-cache show` text of an Ubuntu archive: ``builds`` maps a kernel to the drivers
    Canonical built its module package for (newest first), ``metas`` a flavour to
    (kernel, driver) pairs of its module meta package (newest first)."""
    out = []
    for driver in drivers:
        out.append(stanza("nvidia-kernel-common-580-server", release(driver, profile)))
    for driver in dkms:
        out.append(
            stanza(
                f"nvidia-dkms-{VARIANT}",
                release(driver, profile),
                f"dkms, nvidia-kernel-common-580-server (= {release(driver, profile)})",
            )
        )
    for flavour, entries in metas.items():
        for number, (kernel, driver) in enumerate(entries):
            out.append(
                stanza(
                    f"linux-modules-nvidia-{VARIANT}-{flavour}",
                    f"{kernel.rsplit('-', 1)[0]}.{len(entries) - number}+1",
                    f"linux-modules-nvidia-{VARIANT}-{kernel}, {common_dep(driver)}",
                )
            )
    for kernel, drivers_built in builds.items():
        for number, driver in enumerate(drivers_built):
            build = f"{kernel.rsplit('-', 1)[0]}.1{abi_build(len(drivers_built) - number)}"
            out.append(
                stanza(
                    f"linux-modules-nvidia-{VARIANT}-{kernel}",
                    build,
                    f"linux-image-{kernel} | linux-image-unsigned-{kernel}, "
                    f"linux-signatures-nvidia-{kernel} (= {build}), "
                    f"linux-objects-nvidia-{VARIANT}-{kernel} (= {build}), {common_dep(driver)}",
                )
            )
    for kernel in headers:
        out.append(stanza(f"linux-headers-{kernel}", kernel.rsplit("-", 1)[0] + ".1"))
    return "\n".join(out)


def plan_with_archive(profile: str, archive: str, **overrides) -> dict:
    first = nd.plan(facts(profile, **overrides))
    assert first["errors"] == []
    return nd.plan(facts(profile, apt_versions=nd.parse_apt_show(archive), **overrides))


# ---------------------------------------------------------------------------------------------
# apt-cache show


def test_parse_apt_show_reads_versions_and_the_driver_they_belong_to() -> None:
    parsed = nd.parse_apt_show(text("apt-show-noble-580-server-open.txt"))
    assert parsed["nvidia-kernel-common-580-server"] == [
        {"version": "580.105.08-0ubuntu0.24.04.1", "driver_version": V2},
        {"version": "580.95.05-0ubuntu0.24.04.2", "driver_version": V1},
    ]
    # The meta package's dependency is folded over two lines; versions keep apt's order.
    assert parsed[f"linux-modules-nvidia-{VARIANT}-generic"] == [
        {"version": "6.8.0-90.91+1", "driver_version": V2},
        {"version": "6.8.0-88.89+1", "driver_version": V1},
    ]
    # The archive's record and the installed one (dpkg status) of one version count once.
    assert parsed[f"linux-modules-nvidia-{VARIANT}-6.8.0-88-generic"] == [
        {"version": "6.8.0-88.89+1", "driver_version": V1}
    ]
    assert parsed["linux-headers-6.8.0-90-generic"] == [
        {"version": "6.8.0-90.91", "driver_version": ""}
    ]
    assert parsed[f"nvidia-dkms-{VARIANT}"][0]["driver_version"] == V2
    # Not in the archive: absent (apt-cache show prints nothing for it).
    assert "linux-headers-6.8.0-88-generic" not in parsed


@pytest.mark.parametrize("empty", ["", None, "N: Unable to locate package x\n"])
def test_parse_apt_show_of_nothing(empty) -> None:
    assert nd.parse_apt_show(empty) == {}


def test_parse_apt_show_refuses_other_input() -> None:
    with pytest.raises(nd.AnsibleFilterError):
        nd.parse_apt_show(["Package: x"])


# ---------------------------------------------------------------------------------------------
# Item 3: the held userspace and Canonical's per-kernel module packages

UBUNTU_PROFILES = {
    # profile: (module meta flavours, kernel meta suffixes)
    "ubuntu2204-ga": (["generic"], ["generic"]),
    "ubuntu2204-hwe": (["generic-hwe-22.04"], ["generic-hwe-22.04"]),
    "ubuntu2204-virtual": (["generic"], ["virtual"]),
    "ubuntu2404": (["generic"], ["generic"]),
    "ubuntu2404-aws": (["aws"], ["aws"]),
    "ubuntu2404-arm64": (["generic-64k"], ["generic-64k"]),
}


@pytest.mark.parametrize("profile", sorted(UBUNTU_PROFILES))
def test_the_module_and_kernel_meta_packages_are_held_with_the_userspace(profile: str) -> None:
    flavours, suffixes = UBUNTU_PROFILES[profile]
    result = nd.plan(facts(profile))
    assert result["errors"] == []
    expected = [f"linux-modules-nvidia-{VARIANT}-{flavour}" for flavour in flavours]
    for suffix in suffixes:
        expected += [f"linux-image-{suffix}", f"linux-{suffix}", f"linux-headers-{suffix}"]
    assert result["kernel_hold"] == expected
    # The userspace hold is unchanged; per-kernel module packages are never held.
    assert result["hold"] == [f"nvidia-headless-no-dkms-{VARIANT}", "nvidia-utils-580-server"]
    assert not any("-6." in name or "-5." in name for name in result["kernel_hold"])


@pytest.mark.parametrize(
    "overrides",
    [{"ubuntu_signed_modules": False}, {"source": "cuda_repo"}, {"container_mode": True}],
)
def test_dkms_and_container_plans_hold_no_kernel_packages(overrides: dict) -> None:
    # DKMS builds the held driver for a new kernel from its headers: kernels stay free.
    assert nd.plan(facts("ubuntu2404", **overrides))["kernel_hold"] == []
    assert nd.plan(facts("debian12"))["kernel_hold"] == []


def test_held_userspace_and_a_newly_installed_kernel_built_for_the_next_driver() -> None:
    # The host holds V1; the archive moved to V2; kernel 6.8.0-90 came in (before the role
    # held the kernel meta package) and Canonical built its module for V2 only.
    archive = text("apt-show-noble-580-server-open.txt")
    result = plan_with_archive(
        "ubuntu2404",
        archive,
        installed_kernels=["6.8.0-88-generic", "6.8.0-90-generic"],
        installed_versions={"nvidia-kernel-common-580-server": f"{V1}-0ubuntu0.24.04.2"},
    )
    assert result["errors"] == []
    assert result["driver_target_version"] == V1
    # The module meta package: the build of the held driver, not the newest (which needs V2).
    assert f"linux-modules-nvidia-{VARIANT}-generic=6.8.0-88.89+1" in result["packages"]
    assert result["kernel_module_packages"] == {
        "6.8.0-88-generic": f"linux-modules-nvidia-{VARIANT}-6.8.0-88-generic"
    }
    assert not any("6.8.0-90-generic" in p for p in result["packages"] if "modules" in p)
    # No V1 DKMS package left in the archive: 6.8.0-90 is named, with the fix.
    assert [k["kernel"] for k in result["kernels_without_module"]] == ["6.8.0-90-generic"]
    warning = next(w for w in result["warnings"] if "boot without an NVIDIA module" in w)
    assert "6.8.0-90-generic" in warning
    assert "exists only for driver 580.105.08, not 580.95.05" in warning
    assert "nvidia_driver_upgrade: true" in warning
    assert "apt purge linux-image-6.8.0-90-generic" in warning


def test_held_userspace_new_kernel_gets_a_dkms_build_of_the_held_driver() -> None:
    archive = ubuntu_archive(
        "ubuntu2404",
        builds={"6.8.0-88-generic": [V1], "6.8.0-90-generic": [V2]},
        metas={"generic": [("6.8.0-90-generic", V2), ("6.8.0-88-generic", V1)]},
        dkms=(V2, V1),
        headers=("6.8.0-90-generic",),
    )
    result = plan_with_archive(
        "ubuntu2404",
        archive,
        installed_kernels=["6.8.0-88-generic", "6.8.0-90-generic"],
        installed_versions={"nvidia-kernel-common-580-server": release(V1, "ubuntu2404")},
    )
    assert result["dkms_fallback_kernels"] == ["6.8.0-90-generic"]
    assert f"nvidia-dkms-{VARIANT}={release(V1, 'ubuntu2404')}" in result["packages"]
    assert "linux-headers-6.8.0-90-generic" in result["packages"]
    assert f"nvidia-dkms-{VARIANT}" in result["hold"]  # the DKMS source matches the userspace
    assert result["kernels_without_module"] == []
    assert any("MOK" in w for w in result["warnings"])


@pytest.mark.parametrize("profile", sorted(UBUNTU_PROFILES))
def test_the_archives_next_branch_update_with_upgrade_moves_driver_and_kernels(
    profile: str,
) -> None:
    flavours, _ = UBUNTU_PROFILES[profile]
    base = facts(profile)
    old, new = base["installed_kernels"][0], "9.9.0-1-" + flavours[0].split("-hwe")[0]
    archive = ubuntu_archive(
        profile,
        builds={kernel: [V2, V1] for kernel in base["installed_kernels"]} | {new: [V2]},
        metas={flavour: [(new, V2), (old, V1)] for flavour in flavours},
        dkms=(V2,),
    )
    installed = {"nvidia-kernel-common-580-server": release(V1, profile)}
    held = plan_with_archive(profile, archive, installed_versions=installed)
    upgrade = plan_with_archive(profile, archive, installed_versions=installed, upgrade=True)
    # Held: every installed kernel keeps the build of the held driver (not apt's newest).
    assert held["driver_target_version"] == V1
    for kernel in base["installed_kernels"]:
        assert held["kernel_module_packages"][kernel].endswith("+1")
    assert all(f"-{flavour}=" in " ".join(held["packages"]) for flavour in flavours)
    # Upgrade: the newest driver, the module meta package at its newest (its dependency brings
    # the new kernel together with its module), every installed kernel rebuilt for V2.
    assert upgrade["driver_target_version"] == V2
    for flavour in flavours:
        assert f"linux-modules-nvidia-{VARIANT}-{flavour}" in upgrade["packages"]
    for kernel in base["installed_kernels"]:
        assert (
            upgrade["kernel_module_packages"][kernel] == f"linux-modules-nvidia-{VARIANT}-{kernel}"
        )
    assert upgrade["kernels_without_module"] == held["kernels_without_module"] == []


def test_an_exact_pin_takes_the_module_build_of_that_version() -> None:
    archive = ubuntu_archive(
        "ubuntu2404",
        builds={"6.8.0-88-generic": [V2, V1]},
        metas={"generic": [("6.8.0-88-generic", V2), ("6.8.0-88-generic", V1)]},
    )
    result = plan_with_archive("ubuntu2404", archive, version=V1)
    assert result["kernel_module_packages"] == {
        "6.8.0-88-generic": f"linux-modules-nvidia-{VARIANT}-6.8.0-88-generic=6.8.0-88.1+1"
    }


# A small model of what apt upgrade / unattended-upgrades do on such a host: a package whose
# newer version is available is upgraded (pulling new packages its dependencies name) unless
# it is held or the result would break the dependencies of something installed; otherwise it
# is kept back. After that the host reboots into its newest kernel.


def _archive_model(flavour: str, kernel_meta: str) -> dict:
    """Versions: driver 1 -> 2; kernel ABI 88 -> 90 (built for driver 2 only)."""
    k88, k90 = f"6.8.0-88-{flavour}", f"6.8.0-90-{flavour}"
    mod = f"linux-modules-nvidia-{VARIANT}"
    suffix = kernel_meta.removeprefix("linux-image-")

    def pkgs(version: int, kernel: str, driver: int) -> dict:
        return {
            kernel_meta: (version, [(f"linux-image-{kernel}", None)]),
            f"linux-{suffix}": (version, [(kernel_meta, version)]),
            f"{mod}-{ubuntu_flavour(kernel_meta)}": (
                version,
                [(f"{mod}-{kernel}", None), ("nvidia-kernel-common-580-server", driver)],
            ),
            f"{mod}-{kernel}": (
                driver,
                [(f"linux-image-{kernel}", None), ("nvidia-kernel-common-580-server", driver)],
            ),
            f"linux-image-{kernel}": (1, []),
            f"nvidia-headless-no-dkms-{VARIANT}": (
                driver,
                [("nvidia-kernel-common-580-server", driver)],
            ),
            "nvidia-kernel-common-580-server": (driver, []),
        }

    return {
        "installed": pkgs(1, k88, 1),
        "archive": pkgs(2, k90, 2)
        | {
            f"{mod}-{k88}": (
                1,
                [(f"linux-image-{k88}", None), ("nvidia-kernel-common-580-server", 1)],
            ),
            f"linux-image-{k88}": (1, []),
        },
        "mod": mod,
    }


def ubuntu_flavour(kernel_meta: str) -> str:
    return nd.ubuntu_module_flavour(kernel_meta)


def _apt_upgrade(installed: dict, archive: dict, held: set, pinned: dict) -> dict:
    state = dict(installed)

    def satisfied(state: dict) -> bool:
        for _name, (_version, deps) in state.items():
            for dep, version in deps:
                if dep not in state or (version is not None and state[dep][0] != version):
                    return False
        return True

    def with_deps(state: dict, name: str) -> dict | None:
        """``name`` upgraded, with what its dependencies need installed or upgraded."""
        new = dict(state)
        new[name] = archive[name]
        todo = list(archive[name][1])
        while todo:
            dep, want = todo.pop()
            if dep in new and (want is None or new[dep][0] == want):
                continue
            if dep in held and dep in state:
                return None  # a held package does not move
            if dep not in archive or (want is not None and archive[dep][0] != want):
                return None
            if dep in pinned and archive[dep][0] != pinned[dep]:
                return None  # apt preferences keep the pinned version
            new[dep] = archive[dep]
            todo += archive[dep][1]
        return new

    changed = True
    while changed:
        changed = False
        for name in sorted(state):
            if name in held or name not in archive or archive[name][0] <= state[name][0]:
                continue
            if name in pinned:
                continue
            candidate = with_deps(state, name)
            if candidate is not None and satisfied(candidate) and candidate != state:
                state = candidate
                changed = True
    return state


def _boots_with_module(state: dict, mod: str) -> bool:
    kernels = sorted(
        name.removeprefix("linux-image-") for name in state if name.startswith("linux-image-6.")
    )
    newest = kernels[-1]
    return f"{mod}-{newest}" in state and satisfied_module(state, f"{mod}-{newest}")


def satisfied_module(state: dict, name: str) -> bool:
    return all(dep in state and (v is None or state[dep][0] == v) for dep, v in state[name][1])


@pytest.mark.parametrize("profile", sorted(UBUNTU_PROFILES))
@pytest.mark.parametrize(
    ("strategy", "boots_with_gpu"),
    [
        ("role", True),  # userspace + module meta + kernel meta packages held (kernel_hold)
        ("userspace only", False),  # the role before issue 17
        ("userspace and module meta", False),
        ("apt preferences pin of the driver version, nothing held", False),
    ],
)
def test_unattended_upgrades_after_the_archives_next_update(
    profile: str, strategy: str, boots_with_gpu: bool
) -> None:
    result = nd.plan(facts(profile))
    kernel_meta = facts(profile)["kernel_meta_packages"][0]
    flavour = nd.ubuntu_module_flavour(kernel_meta)
    flavour = "generic" if flavour.startswith("generic") else flavour
    model = _archive_model(flavour, kernel_meta)
    userspace = set(result["hold"]) | {"nvidia-kernel-common-580-server"}
    held = {
        "role": userspace | set(result["kernel_hold"]),
        "userspace only": userspace,
        "userspace and module meta": userspace
        | {n for n in result["kernel_hold"] if n.startswith("linux-modules-nvidia-")},
        "apt preferences pin of the driver version, nothing held": set(),
    }[strategy]
    pinned = (
        {"nvidia-kernel-common-580-server": 1, f"nvidia-headless-no-dkms-{VARIANT}": 1}
        if strategy.startswith("apt preferences")
        else {}
    )
    after = _apt_upgrade(model["installed"], model["archive"], held, pinned)
    assert _boots_with_module(after, model["mod"]) is boots_with_gpu, sorted(after)
    if strategy == "role":
        assert after == model["installed"]  # nothing changes


# ---------------------------------------------------------------------------------------------
# Item 4: ask only for packages the archive has


def test_ubuntu_probe_packages() -> None:
    result = nd.plan(facts("ubuntu2204-hwe"))
    assert result["probe_packages"] == [
        "nvidia-kernel-common-580-server",
        f"nvidia-dkms-{VARIANT}",
        f"linux-modules-nvidia-{VARIANT}-generic-hwe-22.04",
        f"linux-modules-nvidia-{VARIANT}-6.8.0-85-generic",
        f"linux-modules-nvidia-{VARIANT}-6.8.0-87-generic",
        "linux-headers-6.8.0-85-generic",
        "linux-headers-6.8.0-87-generic",
    ]


def test_debian_probe_packages() -> None:
    assert nd.plan(facts("debian12"))["probe_packages"] == [
        "linux-headers-amd64",
        "linux-headers-6.1.0-55-amd64",
        "linux-headers-6.1.0-56-amd64",
    ]


def test_ubuntu_old_kernel_without_a_580_module_falls_back_to_dkms() -> None:
    # Canonical never built 580 for the older 5.15.0-152 kernel.
    archive = ubuntu_archive(
        "ubuntu2204-ga",
        builds={"5.15.0-153-generic": [V2]},
        metas={"generic": [("5.15.0-153-generic", V2)]},
        drivers=(V2,),
        dkms=(V2,),
        headers=("5.15.0-152-generic",),
    )
    result = plan_with_archive("ubuntu2204-ga", archive)
    assert result["errors"] == []
    assert result["packages"] == [
        f"nvidia-headless-no-dkms-{VARIANT}",
        "nvidia-utils-580-server",
        f"linux-modules-nvidia-{VARIANT}-generic",
        f"linux-modules-nvidia-{VARIANT}-5.15.0-153-generic",
        f"nvidia-dkms-{VARIANT}",
        "linux-headers-5.15.0-152-generic",
    ]
    assert result["dkms_fallback_kernels"] == ["5.15.0-152-generic"]
    assert result["kernel_header_packages"] == {
        "5.15.0-152-generic": "linux-headers-5.15.0-152-generic"
    }
    assert result["kernels_without_module"] == []


def test_ubuntu_kernel_without_module_or_headers_is_named_with_the_fix() -> None:
    archive = ubuntu_archive(
        "ubuntu2204-ga",
        builds={"5.15.0-153-generic": [V2]},
        metas={"generic": [("5.15.0-153-generic", V2)]},
        drivers=(V2,),
    )
    result = plan_with_archive("ubuntu2204-ga", archive)
    assert result["errors"] == []
    assert not any("5.15.0-152" in package for package in result["packages"])
    assert result["kernels_without_module"] == [
        {
            "kernel": "5.15.0-152-generic",
            "reason": f"linux-modules-nvidia-{VARIANT}-5.15.0-152-generic is not in the archive; "
            "no DKMS build either (linux-headers-5.15.0-152-generic is not in the archive)",
            "fix": "boot another kernel and remove this one (apt purge "
            "linux-image-5.15.0-152-generic), or run the role with nvidia_driver_upgrade: true "
            "(driver, module and kernel meta packages move together to the archive's newest) "
            "and reboot",
        }
    ]
    assert any(
        "5.15.0-152-generic" in w and "apt purge linux-image-5.15.0-152-generic" in w
        for w in result["warnings"]
    )


def _debian_archive(*headers: str) -> str:
    return "\n".join(stanza(name, "1") for name in headers)


def test_debian_superseded_headers_are_not_requested() -> None:
    # Debian keeps only the current kernel's headers: 6.1.0-55's are gone.
    archive = _debian_archive("linux-headers-amd64", "linux-headers-6.1.0-56-amd64")
    result = plan_with_archive("debian12", archive)
    assert result["errors"] == []
    assert "linux-headers-6.1.0-55-amd64" not in result["packages"]
    assert result["packages"][-2:] == ["linux-headers-amd64", "linux-headers-6.1.0-56-amd64"]
    assert [k["kernel"] for k in result["kernels_without_module"]] == ["6.1.0-55-amd64"]
    warning = next(w for w in result["warnings"] if "boot without an NVIDIA module" in w)
    assert "apt purge linux-image-6.1.0-55-amd64" in warning
    assert "snapshot.debian.org" in warning


def test_debian_headers_meta_package_missing_warns() -> None:
    archive = _debian_archive("linux-headers-6.1.0-55-amd64", "linux-headers-6.1.0-56-amd64")
    result = plan_with_archive("debian12", archive)
    assert "linux-headers-amd64" not in result["packages"]
    assert any("linux-headers-amd64 is not in the archive" in w for w in result["warnings"])


def test_without_archive_facts_every_package_is_assumed_to_exist() -> None:
    result = nd.plan(facts("debian12"))
    assert "linux-headers-6.1.0-55-amd64" in result["packages"]
    assert result["kernels_without_module"] == []


@pytest.mark.parametrize("broken", [["x"], {"a": "b"}, {"a": [{"no": "version"}]}])
def test_malformed_apt_versions_raise(broken) -> None:
    with pytest.raises(nd.AnsibleFilterError):
        nd.plan(facts("debian12", apt_versions=broken))


# ---------------------------------------------------------------------------------------------
# Item 8a: Debian's archive module is nvidia-current.ko


def test_debian_archive_module_name_counts() -> None:
    paths = [
        "/lib/modules/6.1.0-56-amd64/updates/dkms/nvidia-current.ko.xz",
        "/lib/modules/6.1.0-56-amd64/updates/dkms/nvidia-current-uvm.ko.xz",
        "/lib/modules/6.1.0-55-amd64/updates/dkms/nvidia-current-uvm.ko",
        "/lib/modules/6.1.0-55-amd64/updates/dkms/nvidia-current-modeset.ko",
    ]
    assert nd.kernels_missing_module(["6.1.0-55-amd64", "6.1.0-56-amd64"], paths) == [
        "6.1.0-55-amd64"
    ]


def test_the_all_kernels_check_finds_debians_module_name() -> None:
    tasks = yaml.safe_load((ROLE / "tasks" / "configure.yml").read_text(encoding="utf-8"))
    block = next(
        t
        for t in tasks
        if t.get("name") == "Check that every installed kernel has an nvidia module"
    )
    find = next(t for t in block["block"] if "ansible.builtin.find" in t)["ansible.builtin.find"]
    assert sorted(find["patterns"]) == sorted(nd.MODULE_FILE_PATTERNS)
    # Both names reach kernels_missing_module as paths it accepts.
    for pattern in find["patterns"]:
        name = pattern.replace("*", ".zst")
        assert nd.kernels_missing_module(["k"], [f"/lib/modules/k/updates/dkms/{name}"]) == []


# ---------------------------------------------------------------------------------------------
# Item 8b: Secure Boot from the EFI variable


def _var(value: int, attributes: bytes = b"\x06\x00\x00\x00") -> str:
    return base64.b64encode(attributes + bytes([value])).decode()


@pytest.mark.parametrize(
    ("probe", "state"),
    [
        ({"efi": True, "var_exists": True, "var_content": _var(1)}, "enabled"),
        ({"efi": True, "var_exists": True, "var_content": _var(0)}, "disabled"),
        ({"efi": True, "var_exists": True, "var_content": _var(1, b"\x16\x00\x00\x00")}, "enabled"),
        ({"efi": False}, "disabled"),  # legacy BIOS
        ({"efi": True, "var_exists": False}, "disabled"),  # firmware without Secure Boot
        ({"efi": True, "var_exists": True, "var_content": None, "var_error": "EACCES"}, "unknown"),
        (
            {"efi": True, "var_exists": True, "var_content": base64.b64encode(b"\x06").decode()},
            "unknown",
        ),
        ({"efi": True, "var_exists": True, "var_content": _var(7)}, "unknown"),
        ({"efi": True, "var_exists": True, "var_content": "%%%"}, "unknown"),
        # mokutil as a cross-check: it settles an unreadable variable, and "enabled" wins.
        (
            {
                "efi": True,
                "var_exists": True,
                "var_content": None,
                "mokutil": "SecureBoot disabled\n",
            },
            "disabled",
        ),
        (
            {
                "efi": True,
                "var_exists": True,
                "var_content": _var(0),
                "mokutil": "SecureBoot enabled\n",
            },
            "enabled",
        ),
        # A missing mokutil is no longer read as "disabled".
        ({"efi": True, "var_exists": True, "var_content": _var(1), "mokutil": None}, "enabled"),
    ],
)
def test_secure_boot_state(probe: dict, state: str) -> None:
    result = nd.secure_boot_state(probe)
    assert result["state"] == state
    assert result["enabled"] is (state == "enabled")
    if state == "unknown":
        assert "mokutil --sb-state" in result["detail"]
        assert "nvidia_driver_secure_boot_signed: true" in result["detail"]


def test_preflight_reads_the_efi_variable_and_fails_on_unknown() -> None:
    tasks = yaml.safe_load((ROLE / "tasks" / "preflight.yml").read_text(encoding="utf-8"))
    flat = json.dumps(tasks)
    role_vars = yaml.safe_load((ROLE / "vars" / "main.yml").read_text(encoding="utf-8"))
    assert role_vars["_nvidia_driver_secure_boot_efivar"] == nd.SECURE_BOOT_EFIVAR
    assert "_nvidia_driver_secure_boot_efivar" in flat
    assert "mokutil" in flat  # kept, as a cross-check only
    assert "nvidia_driver_secure_boot_state" in flat
    unknown = [
        t
        for t in tasks
        if "unknown" in json.dumps(t.get("when", "")) and "ansible.builtin.fail" in t
    ]
    assert unknown, "no task fails when the Secure Boot state is unknown"


# ---------------------------------------------------------------------------------------------
# Item 8c: unsupported distributions are refused before any package task


def rocky9() -> dict:
    return json.loads((DATA / "ansible-facts-rocky9.json").read_text(encoding="utf-8"))[
        "ansible_facts"
    ]


def test_rocky_9_is_refused_with_a_sentence() -> None:
    message = nd.platform_error(rocky9())
    assert "Rocky 9.4" in message
    assert "Debian 12/13 and Ubuntu 22.04/24.04" in message
    assert "dnf" in message


@pytest.mark.parametrize(
    ("overrides", "ok"),
    [
        (
            {
                "distribution": "Ubuntu",
                "distribution_version": "24.04",
                "distribution_major_version": "24",
                "os_family": "Debian",
            },
            True,
        ),
        (
            {
                "distribution": "Ubuntu",
                "distribution_version": "22.04",
                "distribution_major_version": "22",
                "os_family": "Debian",
            },
            True,
        ),
        (
            {
                "distribution": "Debian",
                "distribution_version": "12.12",
                "distribution_major_version": "12",
                "os_family": "Debian",
            },
            True,
        ),
        (
            {
                "distribution": "Debian",
                "distribution_version": "13.1",
                "distribution_major_version": "13",
                "os_family": "Debian",
            },
            True,
        ),
        (
            {
                "distribution": "Ubuntu",
                "distribution_version": "24.10",
                "distribution_major_version": "24",
                "os_family": "Debian",
            },
            False,
        ),
        (
            {
                "distribution": "Debian",
                "distribution_version": "11.11",
                "distribution_major_version": "11",
                "os_family": "Debian",
            },
            False,
        ),
        (
            {
                "distribution": "RedHat",
                "distribution_version": "9.4",
                "distribution_major_version": "9",
                "os_family": "RedHat",
            },
            False,
        ),
        (
            {
                "architecture": "ppc64le",
                "distribution": "Debian",
                "distribution_version": "12.1",
                "distribution_major_version": "12",
            },
            False,
        ),
    ],
)
def test_platform_error(overrides: dict, ok: bool) -> None:
    assert (nd.platform_error(rocky9() | overrides) == "") is ok


def test_the_platform_check_is_the_roles_first_task_and_comes_before_any_package_task() -> None:
    main = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text(encoding="utf-8"))
    assert main[0]["ansible.builtin.import_tasks"] == "detect.yml"
    detect = yaml.safe_load((ROLE / "tasks" / "detect.yml").read_text(encoding="utf-8"))
    first = detect[0]
    assert "ansible.builtin.assert" in first
    assert "nvidia_driver_platform_error" in json.dumps(first)
    package_tasks = [
        i
        for i, t in enumerate(detect)
        if {"ansible.builtin.apt", "ansible.builtin.package"} & set(t)
    ]
    assert package_tasks and min(package_tasks) > 0


ANSIBLE = shutil.which(
    "ansible-playbook", path=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
)


FAKE_FACTS_MODULE = """#!/usr/bin/python
from ansible.module_utils.basic import AnsibleModule

module = AnsibleModule(argument_spec={"facts": {"type": "dict", "required": True}},
                       supports_check_mode=True)
module.exit_json(changed=False,
                 ansible_facts={"ansible_" + k: v for k, v in module.params["facts"].items()})
"""


@pytest.mark.skipif(ANSIBLE is None, reason="ansible-playbook not installed")
def test_the_role_refuses_rocky_9_before_any_package_task(tmp_path: Path) -> None:
    """The real role in check mode against localhost, which reports Rocky 9's facts (a tiny
    module returns them as setup would); the play must stop at the platform check."""
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "fake_facts.py").write_text(FAKE_FACTS_MODULE)
    (tmp_path / "hosts.yml").write_text(
        "all:\n  hosts:\n    rocky9:\n      ansible_connection: local\n"
        f"      ansible_python_interpreter: {sys.executable}\n"
    )
    (tmp_path / "play.yml").write_text(
        textwrap.dedent(
            f"""\
            - name: Facts of a Rocky 9 host
              hosts: rocky9
              gather_facts: false
              tasks:
                - name: Report Rocky 9's facts
                  fake_facts:
                    facts: {json.dumps(rocky9())}
            - name: The role
              hosts: rocky9
              gather_facts: false
              roles:
                - role: {ROLE}
            """
        )
    )
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(tmp_path / "none.cfg"),
        ANSIBLE_LIBRARY=str(tmp_path / "library"),
        ANSIBLE_STDOUT_CALLBACK="default",
        ANSIBLE_NOCOLOR="1",
    )
    run = subprocess.run(
        [ANSIBLE, "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "play.yml"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    assert "Rocky 9.4" in output, output
    assert "Debian 12/13 and Ubuntu 22.04/24.04" in output, output
    assert "pciutils" not in output, output  # no package task ran
    assert "failed=1" in output, output
