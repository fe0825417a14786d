"""Which CUDA libraries the pinned CTranslate2 loads: one table, and a check of the loaded ones.

Three readers use ``STACKS``:

- the worker at start-up (``morag.devices.detect_device``) loads each library of the row and
  asks it its version (``cublasGetProperty``, ``cudnnGetVersion``: no GPU, no CUDA context);
- the Ansible ``cuda_runtime`` role runs ``python -m morag.gpu_stack --json`` on the host to
  learn which wheels to install for the CTranslate2 in that virtualenv;
- ``tests/unit/test_gpu_stack.py``: the installed CTranslate2 must have a row, so bumping the
  pin without checking what the new build loads fails the tests.

How a row is established: the CUDA toolkit, cuDNN and ``WITH_CUDNN`` flag in CTranslate2's
wheel build script at each release tag (``python/tools/prepare_build_environment_linux.sh``),
its CHANGELOG, and for the pinned version the wheel itself (``strings``/``readelf`` of
``ctranslate2.libs/libctranslate2-*.so``: which sonames it names, which PTX it carries).
Only the Linux x86_64 wheels are built with CUDA; the aarch64 wheels are CPU-only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

Version = tuple[int, int, int]
# Loads a library (soname or path) and returns its version; OSError when it cannot be loaded.
VersionQuery = Callable[[str], Version]

CHANGELOG = "https://github.com/OpenNMT/CTranslate2/blob/master/CHANGELOG.md"
BUILD_SCRIPT = "https://github.com/OpenNMT/CTranslate2/blob/{tag}/python/tools/prepare_build_environment_linux.sh"


@dataclass(frozen=True)
class CudaLibrary:
    soname: str  # what CTranslate2 dlopens
    version: str  # what the wheel ships; major.minor must match at run time
    wheel: str  # the pip requirement that provides it
    wheel_subdir: str  # where that wheel puts it, relative to site-packages

    @property
    def major_minor(self) -> tuple[int, int]:
        major, minor, _ = parse_version(self.version)
        return major, minor


@dataclass(frozen=True)
class GpuStack:
    first: str  # first CTranslate2 version of the row
    before: str  # first version NOT covered: a newer release needs a new look at its build
    cuda_major: int
    cuda_build: str  # the CUDA toolkit the PyPI wheels were built with
    libraries: tuple[CudaLibrary, ...]
    min_driver_branch: int
    notes: str
    sources: tuple[str, ...]
    # platform.machine() values whose PyPI wheels are built with CUDA (aarch64's are CPU-only)
    cuda_machines: tuple[str, ...] = ("x86_64",)

    @property
    def range(self) -> str:
        return f">={self.first},<{self.before}"

    def covers(self, version: str) -> bool:
        return parse_version(self.first) <= parse_version(version) < parse_version(self.before)

    def as_dict(self, ctranslate2: str) -> dict[str, object]:
        return {
            "ctranslate2": ctranslate2,
            "ctranslate2_range": self.range,
            "cuda_major": self.cuda_major,
            "cuda_build": self.cuda_build,
            "wheels": [lib.wheel for lib in self.libraries],
            "libraries": {lib.soname: lib.version for lib in self.libraries},
            "wheel_library_subdirs": [lib.wheel_subdir for lib in self.libraries],
            "min_driver_branch": self.min_driver_branch,
            "cuda_machines": list(self.cuda_machines),
            "notes": self.notes,
            "sources": list(self.sources),
        }


# cuBLAS 12.8 is the first with Blackwell (sm_100/sm_120) kernels; it serves every CUDA 12
# build below (cuBLAS keeps backward compatibility within a major version).
CUBLAS_12 = CudaLibrary(
    "libcublas.so.12", "12.8.4", "nvidia-cublas-cu12==12.8.4.1", "nvidia/cublas/lib"
)
CUDNN_9 = CudaLibrary("libcudnn.so.9", "9.10.2", "nvidia-cudnn-cu12==9.10.2.21", "nvidia/cudnn/lib")
CUDNN_8 = CudaLibrary("libcudnn.so.8", "8.9.7", "nvidia-cudnn-cu12==8.9.7.29", "nvidia/cudnn/lib")

STACKS: tuple[GpuStack, ...] = (
    GpuStack(
        first="4.0.0",
        before="4.5.0",
        cuda_major=12,
        cuda_build="12.2",
        libraries=(CUBLAS_12, CUDNN_8),
        min_driver_branch=535,
        notes="cuDNN 8 (Conv1D); cuDNN 8 has no Blackwell support.",
        sources=(CHANGELOG + " (v4.0.0: CUDA 12)", BUILD_SCRIPT.format(tag="v4.4.0")),
    ),
    GpuStack(
        first="4.5.0",
        before="4.6.3",
        cuda_major=12,
        cuda_build="12.2 (4.5.0-4.6.0), 12.4 (4.6.1-4.6.2)",
        libraries=(CUBLAS_12, CUDNN_9),
        min_driver_branch=550,
        notes="cuDNN 9 (Conv1D) from 4.5.0; built against cuDNN 9.1.",
        sources=(
            CHANGELOG + " (v4.5.0: cuDNN 9; v4.6.1: CUDA 12.4)",
            BUILD_SCRIPT.format(tag="v4.6.2"),
        ),
    ),
    GpuStack(
        first="4.6.3",
        before="4.9.0",
        cuda_major=12,
        cuda_build="12.8",
        libraries=(CUBLAS_12,),
        min_driver_branch=570,
        notes=(
            "No cuDNN: Conv1D is plain CUDA since 4.6.3 (WITH_CUDNN=OFF). The wheel loads only "
            "libcublas.so.12 (and the driver's libcuda.so.1); the CUDA runtime is static. Its GPU "
            "code is SASS for sm_53..sm_86 plus sm_86 PTX of CUDA 12.8 (PTX ISA 8.7): Hopper and "
            "Blackwell run that PTX through the driver's JIT, which needs a 570+ driver and a "
            "writable CUDA_CACHE_PATH to avoid compiling again at every start."
        ),
        sources=(
            CHANGELOG + " (v4.6.3: CUDA 12.8, Conv1D without cuDNN, #1949)",
            BUILD_SCRIPT.format(tag="v4.8.1"),
            "ctranslate2 4.8.5 manylinux x86_64 wheel: strings/readelf of libctranslate2-*.so",
        ),
    ),
)


class UnknownStack(LookupError):
    """The table has no row for this CTranslate2 version."""


def parse_version(text: str) -> Version:
    """``"4.8.5"`` -> (4, 8, 5); a missing part is 0, a suffix (``.post1``, ``rc1``) is ignored."""
    numbers = [int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3]]
    if not numbers:
        raise ValueError(f"not a version: {text!r}")
    major, minor, patch = [*numbers, 0, 0][:3]
    return major, minor, patch


def installed_ctranslate2() -> str | None:
    """The CTranslate2 version in this environment (package metadata; nothing is imported)."""
    try:
        return metadata.version("ctranslate2")
    except metadata.PackageNotFoundError:
        return None


def stack_for(ctranslate2: str) -> GpuStack:
    for stack in STACKS:
        if stack.covers(ctranslate2):
            return stack
    known = ", ".join(s.range for s in STACKS)
    raise UnknownStack(
        f"the GPU stack table (morag.gpu_stack) has no row for ctranslate2 {ctranslate2} "
        f"(rows: {known}). Find which CUDA, cuBLAS and cuDNN that build loads (its release "
        "notes and python/tools/prepare_build_environment_linux.sh) and add a row to STACKS."
    )


# -- what is loaded -------------------------------------------------------------------------


def decode_cudnn_version(value: int) -> Version:
    """``cudnnGetVersion()``: major*10000+minor*100+patch from cuDNN 9, major*1000+... before."""
    if value >= 90000:
        return value // 10000, value % 10000 // 100, value % 100
    return value // 1000, value % 1000 // 100, value % 100


def _cublas_version(lib: ctypes.CDLL) -> Version:
    get_property = lib.cublasGetProperty  # (libraryPropertyType, int*) -> cublasStatus_t
    get_property.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_int))
    get_property.restype = ctypes.c_int
    parts = []
    for kind in (0, 1, 2):  # MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
        value = ctypes.c_int(-1)
        status = get_property(kind, ctypes.byref(value))
        if status != 0:
            raise OSError(f"cublasGetProperty({kind}) failed with status {status}")
        parts.append(value.value)
    return parts[0], parts[1], parts[2]


def _cudnn_version(lib: ctypes.CDLL) -> Version:
    get_version = lib.cudnnGetVersion
    get_version.argtypes = ()
    get_version.restype = ctypes.c_size_t
    return decode_cudnn_version(int(get_version()))


def query_library_version(library: str) -> Version:
    """Load ``library`` (a soname, or a path in tests) and ask it its version."""
    lib = ctypes.CDLL(library)  # OSError with the loader's message when it is not found
    name = os.path.basename(library)
    try:
        if name.startswith("libcublas."):
            return _cublas_version(lib)
        if name.startswith("libcudnn."):
            return _cudnn_version(lib)
    except AttributeError as exc:  # the symbol is missing: not the library it claims to be
        raise OSError(f"{name}: {exc}") from exc
    raise ValueError(f"no version query for {name}")


@dataclass(frozen=True)
class LibraryCheck:
    soname: str
    loaded: str | None  # "12.8.4"; None when it could not be loaded
    problem: str | None  # None when it is what the row needs

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_library(library: CudaLibrary, query: VersionQuery) -> LibraryCheck:
    try:
        version = query(library.soname)
    except OSError as exc:
        return LibraryCheck(library.soname, None, f"{library.soname} cannot be loaded: {exc}")
    loaded = ".".join(str(n) for n in version)
    if version[:2] != library.major_minor:
        needed = ".".join(str(n) for n in library.major_minor)
        return LibraryCheck(
            library.soname,
            loaded,
            f"{library.soname} is {loaded}, the app needs {needed} (see cuda_runtime)",
        )
    return LibraryCheck(library.soname, loaded, None)


def check_libraries(
    stack: GpuStack, query: VersionQuery = query_library_version
) -> list[LibraryCheck]:
    return [check_library(library, query) for library in stack.libraries]


# -- command line -----------------------------------------------------------------------------


def resolve(ctranslate2: str | None = None) -> tuple[str, GpuStack]:
    """The version asked for (default: the installed one) and its row; UnknownStack if none."""
    version = ctranslate2 or installed_ctranslate2()
    if version is None:
        raise UnknownStack(
            "ctranslate2 is not installed in this environment (the app's 'audio' extra): "
            "no CUDA libraries to choose"
        )
    return version, stack_for(version)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m morag.gpu_stack",
        description="The CUDA libraries (and pip wheels) the installed CTranslate2 needs.",
    )
    parser.add_argument("--json", action="store_true", help="print the row as JSON")
    parser.add_argument("--ctranslate2", help="another CTranslate2 version than the installed one")
    args = parser.parse_args(argv)
    try:
        version, stack = resolve(args.ctranslate2)
    except UnknownStack as exc:
        print(f"morag.gpu_stack: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stack.as_dict(version)))
        return 0
    print(
        f"ctranslate2 {version} (row {stack.range}): CUDA {stack.cuda_major}, "
        f"wheels built with CUDA {stack.cuda_build}, driver branch >= {stack.min_driver_branch}"
    )
    for lib in stack.libraries:
        print(f"  {lib.soname} {lib.version} from {lib.wheel} ({lib.wheel_subdir})")
    print(stack.notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
