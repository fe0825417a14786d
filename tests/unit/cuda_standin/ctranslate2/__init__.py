"""A stand-in for CTranslate2's CUDA side, for the CUDA check's child process (no GPU here).

Put its parent directory first on the child's PYTHONPATH. It loads the real ctranslate2 from
the rest of the path and replaces only what touches CUDA, as ``STANDIN_CUDA`` says:

- ``ok`` (default): the CUDA calls run on the CPU (the real spec, model and forward pass), with
  ``STANDIN_CUDA_TYPES`` (comma-separated) as the GPU's compute types;
- ``<step>:<text>``: raise ``RuntimeError(<text>)`` at that step (``init``: the device's
  properties, as ``get_supported_compute_types("cuda")`` does; ``memory``: a copy to the GPU;
  ``compute``: the encoder's forward pass, where cuBLAS is loaded and used); ``import:<text>``
  raises ImportError; the texts are CTranslate2's own (see tests/unit/test_cuda_check.py);
- ``hang:<step>``: sleep there for an hour; ``signal:<step>``: die by SIGSEGV there.
"""

from __future__ import annotations

import importlib
import os
import resource
import signal
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ACTION, _, _ARGUMENT = os.environ.get("STANDIN_CUDA", "ok").partition(":")
_TYPES = os.environ.get("STANDIN_CUDA_TYPES", "float32,float16,int8,int8_float16")

if _ACTION == "import":
    raise ImportError(_ARGUMENT)


def _at(step: str) -> None:
    if _ACTION == "hang" and step == _ARGUMENT:
        time.sleep(3600)
    if _ACTION == "signal" and step == _ARGUMENT:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        os.kill(os.getpid(), signal.SIGSEGV)
    if step == _ACTION:
        raise RuntimeError(_ARGUMENT)


# The real package: this directory off the path, this module out of sys.modules.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
del sys.modules[__name__]
_real: Any = importlib.import_module("ctranslate2")
_RealStorageView = _real.StorageView
_RealEncoder = _real.Encoder
_real_compute_types = _real.get_supported_compute_types


def get_cuda_device_count() -> int:
    # The real one returns 0 when CUDA fails to initialise (it swallows the error).
    return 0 if _ACTION == "init" else 1


def get_supported_compute_types(device: str, device_index: int = 0) -> set[str]:
    if device != "cuda":
        return _real_compute_types(device, device_index)
    _at("init")
    return set(_TYPES.split(","))


class _OnGpu:
    def __init__(self, view: Any) -> None:
        self._view = view

    def to_device(self, device: Any) -> Any:
        return self if device == _real.Device.cuda else self._view


class _Host:
    def __init__(self, view: Any) -> None:
        self._view = view

    def to_device(self, device: Any) -> Any:
        if device == _real.Device.cuda:
            _at("memory")
            return _OnGpu(self._view)
        return self._view


class StorageView:
    @staticmethod
    def from_array(array: Any) -> _Host:
        return _Host(_RealStorageView.from_array(array))


class Encoder:
    def __init__(self, path: str, device: str = "cpu", compute_type: str = "default", **kw: Any):
        self.on_gpu = device == "cuda"
        # The CPU has no float16: the GPU's compute type is recorded, float32 computes.
        self.compute_type = compute_type
        cpu_type = "float32" if self.on_gpu else compute_type
        self._real = _RealEncoder(path, device="cpu", compute_type=cpu_type, **kw)

    def forward_batch(self, *args: Any, **kwargs: Any) -> Any:
        if self.on_gpu:
            _at("compute")
        return self._real.forward_batch(*args, **kwargs)


_real.get_cuda_device_count = get_cuda_device_count
_real.get_supported_compute_types = get_supported_compute_types
_real.StorageView = StorageView
_real.Encoder = Encoder
sys.modules[__name__] = _real  # what `import ctranslate2` hands back
