"""Backend availability and per-call dispatch.

Backends, fastest first: ``cuda`` (hand-written kernels in ``vitkern._C``; ``auto`` takes them only
where :mod:`vitkern.cuda_auto` approves them), ``triton`` (the default GPU backend), ``eager``
(:mod:`vitkern.eager`: fast composite PyTorch, e.g. SDPA on gathered tokens; what ``auto`` uses for
CPU tensors of the ops it covers) and ``reference`` (pure PyTorch, the definition; ``auto``'s CPU
path for the other ops).
Every op takes ``backend="auto" | "cuda" | "triton" | "eager" | "reference"``; an op without an
eager module runs its reference under ``backend="eager"``. The environment variable
``VITKERN_BACKEND`` replaces ``auto`` (an explicit ``backend=`` argument still wins). When the chosen
backend refuses an input, :class:`BackendError` lists every backend and its reason.

This module holds what is the same for every op: availability, each backend's device rule
(:func:`device_reason`) and the priority walk (:func:`select`). What each op family's backends
take is declared in its descriptor (:mod:`vitkern.ops._dispatch`).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Callable, Optional

import torch

from vitkern import cuda_auto
from vitkern.errors import BackendError
from vitkern.triton_kernels import interpreting

BACKENDS = ("cuda", "triton", "eager", "reference")
#: The order ``auto`` tries. It picks a CUDA C++ kernel only where ``vitkern/cuda_auto.json``
#: approves it (passed the GPU test tier and measured faster than triton in a committed results
#: file, for that GPU generation and dtype; see :mod:`vitkern.cuda_auto`); elsewhere triton.
#: CPU tensors go to ``eager`` where the op has an eager module, else to the reference.
AUTO_ORDER = ("cuda", "triton", "eager", "reference")


def _probe_triton() -> tuple[bool, str]:
    """Whether triton is installed, without importing it (vitkern imports stay cheap)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    return True, f"triton {importlib.metadata.version('triton')}"


# Probed once at import, so that dispatch inside torch.compile reads a constant.
_TRITON = _probe_triton()


def triton_status() -> tuple[bool, str]:
    ok, why = _TRITON
    if not ok:
        return ok, why
    if torch.cuda.is_available():
        return True, f"{why} on {torch.cuda.get_device_name()}"
    if interpreting():
        return True, f"{why}, CPU interpreter (TRITON_INTERPRET=1; slow, for tests)"
    return False, f"{why} installed, but no CUDA device (TRITON_INTERPRET=1 runs it on the CPU)"


#: What vitkern._C's kernels cover, and why ``auto`` does not pick them yet.
CUDA_KERNELS = ("HiLo Hi-Fi forward + backward (window_size <= 4), HiLo Lo-Fi forward with "
                "in-kernel pooling (inference), fp32 / fp16 / bf16; Swin window forward "
                "(inference; window 7 / 12, head_dim 32, fp16 / bf16, tensor cores)")
_CUDA_ENTRIES = ("hifi_fwd", "hifi_bwd", "lofi_fwd", "window_fwd")
CUDA_OPT_IN = ("opt-in with backend='cuda': auto picks a kernel only on the GPU generations and "
               "dtypes where it has passed the GPU test tier and measured faster than triton in a "
               "committed bench/results file (vitkern/cuda_auto.json)")


def cuda_auto_summary() -> str:
    """The approvals ``auto`` follows, in one line."""
    got = cuda_auto.approvals()
    if not got:
        return "auto-approved: none yet (no GPU-tier run recorded)"
    return "auto-approved: " + ", ".join(
        f"{e['kernel']} sm_{e['capability'].replace('.', '')} {e['dtype']} "
        f"({e['speedup_vs_triton']:.2f}x triton)" for e in got)


def cuda_status() -> tuple[bool, str]:
    from vitkern import _cext

    mod, why = _cext.load()
    if mod is None:
        built, _ = _cext.load(require_device=False)
        if built is not None and all(hasattr(built, e) for e in _CUDA_ENTRIES):
            why += f" (vitkern._C is built with kernels for {CUDA_KERNELS}; {CUDA_OPT_IN})"
        return False, why
    if not all(hasattr(mod, e) for e in _CUDA_ENTRIES):
        return False, ("vitkern._C is built but lacks the op kernels (a stale build): rebuild "
                       "with VITKERN_CUDA=1")
    return True, f"{why}; kernels: {CUDA_KERNELS}; {CUDA_OPT_IN}"


def reference_status() -> tuple[bool, str]:
    return True, f"pure PyTorch {torch.__version__}"


#: What vitkern.eager covers (the other ops run their reference under backend="eager").
EAGER_OPS = ("token_attention (SDPA on the gathered kept tokens, the CLS row alone)",
             "ppma_attention (log-masks per block of query rows from the 1D row / column masks, "
             "SDPA above 1024 tokens)",
             "window_attention (SDPA per shift-mask pattern on windows gathered by one index)",
             "linear_attention / xca_attention / soft_attention (matrix-vector denominator; "
             "Gram matrix scaled by channel norms; bmm + baddbmm Newton-Schulz)")


def eager_status() -> tuple[bool, str]:
    return True, (f"composite PyTorch {torch.__version__}, any device; fast paths: "
                  f"{'; '.join(EAGER_OPS)}; auto takes it for CPU tensors")


def backend_status() -> dict[str, tuple[bool, str]]:
    """Backend name -> (available, human-readable reason)."""
    return {"cuda": cuda_status(), "triton": triton_status(), "eager": eager_status(),
            "reference": reference_status()}


def device_reason(backend: str, device: torch.device, explicit: bool) -> Optional[str]:
    """Why ``backend`` cannot run on tensors of ``device`` (None if it can)."""
    if backend == "reference":
        return None
    if backend == "eager":
        # on a GPU auto keeps today's order (triton, then the reference where triton refuses);
        # backend="eager" runs anywhere
        return None if explicit or device.type == "cpu" else (
            "auto takes eager for CPU tensors only (ask for it with backend='eager')")
    if backend == "triton":
        # the cheap questions first (this runs on every call): CUDA tensors need only triton
        # installed; torch.cuda.is_available() and the status text only where they decide
        ok, why = _TRITON
        if not ok:
            return why
        if device.type == "cuda":
            return None
        interpret = interpreting()
        if device.type == "cpu" and interpret:
            return None if explicit else (
                "CPU tensors go to the reference under auto (the Triton interpreter is for tests; "
                "ask for it with backend='triton')")
        if not interpret and not torch.cuda.is_available():
            return triton_status()[1]
        return f"tensors are on {device.type}; triton needs CUDA tensors"
    if backend == "cuda":
        if not explicit:  # cheap, and first: auto takes CUDA only where the GPU tier approved it
            why = cuda_auto.device_reason(device)
            if why is not None:
                return why
        ok, why = cuda_status()
        return None if ok else why
    raise AssertionError(backend)


def select(op: str, backend: str, reason: Callable[[str, bool], Optional[str]]) -> str:
    """Pick the backend for one call: the requested one, or for ``auto`` the first of
    :data:`AUTO_ORDER` that accepts.

    ``reason(name, explicit)`` returns why backend ``name`` refuses the inputs, or None; it is
    asked at most once per backend (the ops pass :func:`vitkern.ops._dispatch.dispatch`'s, which
    reads the families' declarations).
    """
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("VITKERN_BACKEND", "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of "
                         f"{('auto',) + BACKENDS} (or set VITKERN_BACKEND)")
    explicit = backend != "auto"
    asked = {}
    for name in (backend,) if explicit else AUTO_ORDER:
        why = asked[name] = reason(name, explicit)
        if why is None:
            return name
    for name in BACKENDS:  # refused: the others are asked now, once each, for the error text
        if name not in asked:
            asked[name] = reason(name, explicit)
    lines = "\n".join(f"  {name}: {asked[name] or 'accepts these inputs'}" for name in BACKENDS)
    wanted = f"backend {backend!r}" if explicit else "any backend"
    raise BackendError(f"{op}: {wanted} cannot run these inputs:\n{lines}")
