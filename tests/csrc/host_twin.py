"""The CPU builds ("host twins") of the CUDA kernels' per-thread programs, shared by
tests/test_csrc_hilo.py and tests/test_csrc_window.py.

``tests/csrc/<name>_host.cpp`` is compiled with the host C++ compiler (no CUDA include path:
the per-thread programs need no CUDA header) into a shared library loaded with ctypes. Those
builds check the alignment of every vector access and shared-memory region (see
csrc/common/numeric.h); a launch that would fault with cudaErrorMisalignedAddress on a GPU
returns ``STATUS["misaligned"]``.

Also here: csrc/common.h's tensor descriptor and status codes, and the stand-in for vitkern._C
used by the op-layer tests.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: csrc/common.h ``vitkern_status_code``
STATUS = {"success": 0, "invalid": 1, "dtype": 2, "shape": 3, "misaligned": 4}


class VkTensor(ctypes.Structure):
    """csrc/common.h ``vitkern_tensor``."""
    _fields_ = [("data", ctypes.c_void_p), ("sizes", ctypes.c_int64 * 4),
                ("strides", ctypes.c_int64 * 4), ("dtype", ctypes.c_int32)]


def desc(t: torch.Tensor) -> VkTensor:
    """Descriptor of ``t``, left-padded to 4-D (size 1, stride 0) like the bindings do."""
    pad = 4 - t.dim()
    shape, stride = [1] * pad + list(t.shape), [0] * pad + list(t.stride())
    return VkTensor(t.data_ptr(), (ctypes.c_int64 * 4)(*shape), (ctypes.c_int64 * 4)(*stride),
                    DTYPE_CODE.get(t.dtype, 7))


def call(fn, *args):
    """``fn(*args, why, 256)`` -> (status, why)."""
    why = ctypes.create_string_buffer(256)
    status = fn(*args, why, 256)
    return status, why.value.decode()


def _cxx():
    env = os.environ.get("CXX")
    if env:
        return env.split()
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return [shutil.which(name)]
    return None


def build(tmp_path_factory, source: str, defines=()) -> ctypes.CDLL:
    """Compile ``tests/csrc/<source>`` (with ``-D`` ``defines``) and load it; skip without a host
    C++ compiler. -Werror -Wall -Wextra: the kernel headers must be clean host C++ too."""
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    lib = tmp_path_factory.mktemp("vk_host") / f"lib{Path(source).stem}.so"
    cmd = [*cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
           *(f"-D{d}" for d in defines), "-I", str(CSRC), str(HERE / source), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, " ".join(cmd) + "\n" + res.stdout + res.stderr
    return ctypes.CDLL(str(lib))


def patch_cext(monkeypatch, mod):
    """Replace vitkern._C by ``mod`` (a stand-in whose entry points run the CPU build on CPU
    tensors and return (status, why)) for the op layer."""
    from vitkern import _cext

    def launch(entry, *args, device=None):
        assert device is not None and device.type == "cpu"
        status, why = getattr(mod, entry)(*args)
        _cext.check(status, f"vitkern._C.{entry}", why)

    monkeypatch.setattr(_cext, "launch", launch)
    monkeypatch.setattr(_cext, "load", lambda require_device=True: (mod, "CPU build of vitkern._C"))
    return mod
