"""The GPU stack table (morag.gpu_stack) and the version checks of the loaded CUDA libraries.

The real cuBLAS and cuDNN cannot be loaded here (no GPU host, and the wheels are hundreds of
MB), so the ctypes calls run against a small C stand-in that exports the same two version
functions (tests/data/gpu/app-cuda-version-stub.c), compiled per test with the version wanted.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from morag import gpu_stack
from morag.gpu_stack import CUBLAS_12, CUDNN_9, STACKS, UnknownStack

ROOT = Path(__file__).resolve().parents[2]
STUB_SOURCE = ROOT / "tests" / "data" / "gpu" / "app-cuda-version-stub.c"
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")


def build_stub(directory: Path, soname: str, *, cublas: str = "", cudnn: int = 0) -> Path:
    """Compile the stand-in as ``directory/soname`` reporting the given version."""
    directory.mkdir(parents=True, exist_ok=True)
    defines = []
    if cublas:
        defines.append(f"-DCUBLAS_VERSION_PARTS={cublas.replace('.', ',')}")
    if cudnn:
        defines.append(f"-DCUDNN_VERSION_NUMBER={cudnn}")
    target = directory / soname
    subprocess.run(
        ["cc", "-shared", "-fPIC", *defines, "-o", str(target), str(STUB_SOURCE)], check=True
    )
    return target


# -- the table --------------------------------------------------------------------------------


def test_the_installed_ctranslate2_has_a_row() -> None:
    # Fails when app/pyproject.toml's ctranslate2 pin moves past the table: look at what the
    # new build loads (release notes, its build script, the wheel) and add a row.
    installed = metadata.version("ctranslate2")
    stack = gpu_stack.stack_for(installed)
    assert stack.covers(installed)


def test_the_pinned_ctranslate2_needs_cublas_12_8_and_no_cudnn() -> None:
    # 4.6.3+ wheels are built with CUDA 12.8 and WITH_CUDNN=OFF: libctranslate2 names
    # libcublas.so.12 and no cuDNN at all.
    stack = gpu_stack.stack_for("4.8.5")
    assert stack.cuda_major == 12
    assert [lib.soname for lib in stack.libraries] == ["libcublas.so.12"]
    assert stack.min_driver_branch >= 570


def test_rows_do_not_overlap_and_leave_no_gap() -> None:
    for earlier, later in itertools.pairwise(STACKS):
        assert earlier.before == later.first


@pytest.mark.parametrize(
    ("version", "cudnn"),
    [("4.0.0", "libcudnn.so.8"), ("4.4.0", "libcudnn.so.8"), ("4.5.0", "libcudnn.so.9"),
     ("4.6.2", "libcudnn.so.9"), ("4.6.3", None), ("4.8.5", None)],
)  # fmt: skip
def test_cudnn_by_release(version: str, cudnn: str | None) -> None:
    sonames = [lib.soname for lib in gpu_stack.stack_for(version).libraries]
    assert sonames[0] == "libcublas.so.12"
    assert (sonames[1] if len(sonames) > 1 else None) == cudnn


def test_every_wheel_carries_blackwell_cublas() -> None:
    for stack in STACKS:
        for lib in stack.libraries:
            if lib.soname.startswith("libcublas"):
                assert lib.major_minor >= (12, 8), stack.range


@pytest.mark.parametrize("version", ["3.24.0", "4.9.0", "5.0.0"])
def test_unknown_versions_are_refused(version: str) -> None:
    with pytest.raises(UnknownStack, match=f"no row for ctranslate2 {version}"):
        gpu_stack.stack_for(version)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("4.8.5", (4, 8, 5)), ("4.6", (4, 6, 0)), ("4.7.0.post1", (4, 7, 0)), ("4.9.0rc1", (4, 9, 0))],
)
def test_parse_version(text: str, parsed: tuple[int, int, int]) -> None:
    assert gpu_stack.parse_version(text) == parsed


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "morag.gpu_stack", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_json_for_ansible() -> None:
    out = run_module("--json")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["ctranslate2"] == metadata.version("ctranslate2")
    assert row["cuda_major"] == 12
    assert row["wheels"] == ["nvidia-cublas-cu12==12.8.4.1"]
    assert row["libraries"] == {"libcublas.so.12": "12.8.4"}
    assert row["wheel_library_subdirs"] == ["nvidia/cublas/lib"]
    assert row["min_driver_branch"] == 570


def test_json_for_an_older_release() -> None:
    row = json.loads(run_module("--json", "--ctranslate2", "4.5.0").stdout)
    assert row["wheels"] == ["nvidia-cublas-cu12==12.8.4.1", "nvidia-cudnn-cu12==9.10.2.21"]
    assert row["libraries"] == {"libcublas.so.12": "12.8.4", "libcudnn.so.9": "9.10.2"}
    assert row["wheel_library_subdirs"] == ["nvidia/cublas/lib", "nvidia/cudnn/lib"]


def test_unknown_version_exits_1_with_the_reason() -> None:
    out = run_module("--json", "--ctranslate2", "5.0.0")
    assert out.returncode == 1
    assert out.stdout == ""
    assert "no row for ctranslate2 5.0.0" in out.stderr


def test_the_cli_command_prints_the_same_row() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "morag.cli", "gpu-stack", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(run_module("--json").stdout)


# -- version decoding and comparison -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "version"),
    [(91002, (9, 10, 2)), (90100, (9, 1, 0)), (90000, (9, 0, 0)), (8907, (8, 9, 7)),
     (8600, (8, 6, 0))],
)  # fmt: skip
def test_decode_cudnn_version(value: int, version: tuple[int, int, int]) -> None:
    assert gpu_stack.decode_cudnn_version(value) == version


def test_same_major_minor_passes_whatever_the_patch() -> None:
    check = gpu_stack.check_library(CUBLAS_12, lambda _: (12, 8, 3))
    assert check.ok and check.loaded == "12.8.3"


@pytest.mark.parametrize("loaded", [(12, 1, 3), (12, 9, 1), (11, 8, 4)])
def test_other_major_or_minor_is_a_mismatch(loaded: tuple[int, int, int]) -> None:
    check = gpu_stack.check_library(CUBLAS_12, lambda _: loaded)
    shown = ".".join(map(str, loaded))
    assert check.problem == (f"libcublas.so.12 is {shown}, the app needs 12.8 (see cuda_runtime)")
    assert check.loaded == shown


def test_a_library_that_does_not_load() -> None:
    def missing(soname: str) -> tuple[int, int, int]:
        raise OSError(f"{soname}: cannot open shared object file: No such file or directory")

    check = gpu_stack.check_library(CUDNN_9, missing)
    assert check.loaded is None
    assert check.problem == (
        "libcudnn.so.9 cannot be loaded: libcudnn.so.9: cannot open shared object file: "
        "No such file or directory"
    )


def test_check_libraries_covers_the_row() -> None:
    stack = gpu_stack.stack_for("4.5.0")
    versions = {"libcublas.so.12": (12, 8, 4), "libcudnn.so.9": (9, 1, 0)}
    checks = gpu_stack.check_libraries(stack, versions.__getitem__)
    assert [(c.soname, c.loaded, c.ok) for c in checks] == [
        ("libcublas.so.12", "12.8.4", True),
        ("libcudnn.so.9", "9.1.0", False),
    ]


# -- the ctypes calls, against the compiled stand-in ---------------------------------------------


@needs_cc
def test_query_cublas_through_ctypes(tmp_path: Path) -> None:
    lib = build_stub(tmp_path, "libcublas.so.12", cublas="12.8.4")
    assert gpu_stack.query_library_version(str(lib)) == (12, 8, 4)


@needs_cc
def test_query_cudnn_through_ctypes(tmp_path: Path) -> None:
    lib = build_stub(tmp_path, "libcudnn.so.9", cudnn=91002)
    assert gpu_stack.query_library_version(str(lib)) == (9, 10, 2)


@needs_cc
def test_a_library_without_the_symbol_is_not_that_library(tmp_path: Path) -> None:
    lib = build_stub(tmp_path, "libcublas.so.12", cudnn=91002)  # no cublasGetProperty
    with pytest.raises(OSError, match="cublasGetProperty"):
        gpu_stack.query_library_version(str(lib))


def test_a_missing_library_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        gpu_stack.query_library_version(str(tmp_path / "libcublas.so.12"))
