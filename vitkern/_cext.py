"""Lazy access to the CUDA C++ extension ``vitkern._C`` (built from ``csrc/`` by ``setup.py``).

``load()`` returns ``(module, reason)``: the module when it can run kernels (``None`` otherwise) and
a human-readable reason that says why not, or what was loaded. Importing this file never imports
``vitkern._C``, and neither this file nor ``load()`` ever raises.

``vitkern._C`` takes raw device pointers (``tensor.data_ptr()``), sizes, strides in elements, a
dtype code (``DTYPE_CODES``) and a stream handle (``torch.cuda.current_stream().cuda_stream``), and
returns a status code (0 = success, ``_C.status_string(code)`` for the message); it never needs
torch.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

__all__ = ["load", "info", "check", "DTYPE_CODES", "CudaExtError", "has", "tensor_desc", "launch"]

#: dtype code of the C ABI (csrc/common.h ``vitkern_dtype``), keyed by the dtype's name.
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}

_REBUILD_HINT = ("reinstall with VITKERN_CUDA=1 to build it (e.g. `VITKERN_CUDA=1 pip install -e .` "
                 "from the source tree; needs the CUDA toolkit, set CUDA_HOME if nvcc is not on PATH)")

# cudaError_t values of interest (driver_types.h), offset by the C ABI's VK_STATUS_CUDA_ERROR_BASE.
_CUDA_BASE = 1000
_CUDA_INSUFFICIENT_DRIVER = 35
_CUDA_NO_DEVICE = 100


class CudaExtError(RuntimeError):
    """A vitkern._C entry point returned a non-success status."""


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v > 0 else "none"


def _import() -> tuple[Optional[ModuleType], str]:
    try:
        _C = importlib.import_module("vitkern._C")
    except ModuleNotFoundError as exc:
        if exc.name == "vitkern._C":
            return None, ("vitkern._C was not built: nvcc was not found at install time (or "
                          f"VITKERN_CUDA=0 was set); {_REBUILD_HINT}")
        return None, f"vitkern._C failed to import: {exc}"
    except Exception as exc:  # ImportError (bad ABI, missing symbol, old glibc), anything else
        return None, f"vitkern._C failed to import: {exc!r}; {_REBUILD_HINT}"
    return _C, ""


def _device_problem(mod: ModuleType) -> str:
    """Why no GPU can run vitkern._C's kernels ('' when at least one can)."""
    count, status = mod.probe_devices()
    runtime = _cuda_version(mod.cuda_runtime_version())
    if count == 0:
        driver = mod.driver_version()
        if driver == 0:
            return "no NVIDIA driver found (libcuda.so.1 could not be loaded): no GPU to run on"
        if status == _CUDA_BASE + _CUDA_INSUFFICIENT_DRIVER:
            return (f"the NVIDIA driver supports CUDA {_cuda_version(driver)}, older than the CUDA "
                    f"{runtime} runtime linked into vitkern._C: update the driver or rebuild "
                    "vitkern._C with an older CUDA toolkit")
        if status in (0, _CUDA_BASE + _CUDA_NO_DEVICE):
            return "no CUDA device visible (check CUDA_VISIBLE_DEVICES)"
        return f"no usable CUDA device: {mod.status_string(status)}"
    archs = list(mod.compiled_archs())
    caps = [mod.device_capability(i) for i in range(count)]
    # Every compiled arch also carries PTX (CMake's "80" = sm_80 SASS + compute_80 PTX), which the
    # driver JIT-compiles for newer GPUs; older GPUs than the oldest arch cannot run it.
    if archs and not any(maj * 10 + mnr >= min(archs) for maj, mnr in caps):
        found = ", ".join(f"sm_{maj}{mnr}" for maj, mnr in caps)
        return (f"vitkern._C was compiled for {archs} but the GPUs are {found}; rebuild with "
                "VITKERN_CUDA_ARCHS including them")
    return ""


@functools.lru_cache(maxsize=None)
def load(require_device: bool = True) -> tuple[Optional[ModuleType], str]:
    """``(vitkern._C or None, reason)``; never raises.

    With ``require_device=True`` (the default, what backends use) the module is returned only
    when a GPU can run it; with ``False`` whenever it imports (for ``python -m vitkern info`` and
    build tests), the reason then still says what is missing.
    """
    try:
        mod, why = _import()
        if mod is None:
            return None, why
        try:
            from vitkern import __version__ as py_version
        except Exception:  # pragma: no cover - partial install
            py_version = None
        built = mod.version()
        if py_version is not None and built != py_version:
            why = (f"vitkern._C was built from vitkern {built} but vitkern is {py_version}: "
                   f"a stale build; {_REBUILD_HINT}")
            return (None if require_device else mod), why
        problem = _device_problem(mod)
        if problem:
            return (None if require_device else mod), problem
        count = mod.device_count()
        return mod, (f"vitkern._C {built} (CUDA runtime {_cuda_version(mod.cuda_runtime_version())}, "
                     f"archs {list(mod.compiled_archs())}), {count} device(s)")
    except Exception as exc:  # never raise: a broken extension just makes the backend unavailable
        return None, f"vitkern._C is unusable: {exc!r}"


def info() -> dict:
    """Build and runtime facts about vitkern._C, for ``python -m vitkern info``; never raises."""
    mod, why = load(require_device=False)
    usable, _ = load()
    out: dict = {"built": mod is not None, "usable": usable is not None, "reason": why}
    if mod is None:
        return out
    try:
        out.update(
            version=mod.version(),
            compiled_archs=list(mod.compiled_archs()),
            cuda_runtime=_cuda_version(mod.cuda_runtime_version()),
            driver=_cuda_version(mod.driver_version()),
            device_count=mod.device_count(),
        )
    except Exception as exc:  # pragma: no cover
        out["error"] = repr(exc)
    return out


def check(status: int, what: str = "vitkern._C call", detail: str = "") -> None:
    """Raise :class:`CudaExtError` unless ``status`` is 0 (the C ABI's VK_STATUS_SUCCESS)."""
    if status == 0:
        return
    mod, _ = load(require_device=False)
    msg = mod.status_string(status) if mod is not None else f"status {status}"
    raise CudaExtError(f"{what} failed: {msg}" + (f": {detail}" if detail else ""))


def has(*names: str) -> bool:
    """Whether the usable ``vitkern._C`` (a GPU can run it) exports every entry in ``names``."""
    mod, _ = load()
    return mod is not None and all(hasattr(mod, n) for n in names)


def tensor_desc(t) -> tuple:
    """A torch tensor as the C ABI's descriptor: ``(data_ptr, sizes, strides, dtype code)``.

    Strides are in elements and taken as they are (views are never copied)."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), DTYPE_CODES[str(t.dtype)[len("torch."):]])


def launch(entry: str, *args, device=None) -> None:
    """Call the ``vitkern._C`` kernel entry ``entry(*args, stream, device)`` on the current torch
    stream of ``device`` (a torch.device) and raise :class:`CudaExtError` on a failure status.

    Tensors among ``args`` are passed as :func:`tensor_desc` tuples (``None`` stays ``None``, an
    absent optional tensor). Entries return ``(status, reason)``."""
    import torch

    mod, why = load()
    if mod is None:
        raise CudaExtError(f"vitkern._C is not usable: {why}")
    fn = getattr(mod, entry, None)
    if fn is None:
        raise CudaExtError(f"vitkern._C has no entry {entry!r}: a stale build; {_REBUILD_HINT}")
    conv = [tensor_desc(a) if isinstance(a, torch.Tensor) else a for a in args]
    stream = torch.cuda.current_stream(device).cuda_stream
    status, reason = fn(*conv, stream, device.index if device is not None and device.index is not None
                        else torch.cuda.current_device())
    check(status, f"vitkern._C.{entry}", reason)
