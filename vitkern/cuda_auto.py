"""Which CUDA C++ kernels ``backend="auto"`` may pick: the GPU tier's evidence, read at dispatch.

A kernel of ``vitkern._C`` joins ``auto`` on a GPU generation and dtype only after it has passed
the GPU test tier there and measured faster than the Triton kernel in a committed results file.
``vitkern/cuda_auto.json`` (package data) records exactly those (kernel, compute capability,
dtype) triples, each with its evidence; ``python -m vitkern.bench.approve`` writes it from a GPU
tier run (``bash bench/gpu_tier.sh``), and nothing else does. Until a triple is listed, ``auto``
stays with triton for calls that would run that kernel, and ``backend="cuda"`` still runs it.

File layout (``schema`` ``vitkern.cuda_auto/1``)::

    {"schema": "vitkern.cuda_auto/1", "rule": "...",
     "approved": [{"kernel": "hifi_fwd", "capability": "9.0", "dtype": "float16",
                   "speedup_vs_triton": 1.7, "cases": 8, "device": "NVIDIA H100 ...",
                   "results": "bench/results/<file>.json", "tests": "..."}, ...]}
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch

#: The kernels of vitkern._C, as the ops name them when they ask.
KERNELS = ("hifi_fwd", "hifi_bwd", "lofi_fwd", "window_fwd")
SCHEMA = "vitkern.cuda_auto/1"
PATH = Path(__file__).with_name("cuda_auto.json")


@functools.lru_cache(maxsize=None)
def _approved() -> dict[tuple[str, str, str], dict]:
    """(kernel, capability, dtype) -> evidence entry, read once from :data:`PATH`."""
    if not PATH.exists():
        return {}
    data = json.loads(PATH.read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{PATH.name}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    out = {}
    for e in data.get("approved", []):
        if e.get("kernel") not in KERNELS:
            raise ValueError(f"{PATH.name}: unknown kernel {e.get('kernel')!r}")
        out[(e["kernel"], str(e["capability"]), str(e["dtype"]))] = e
    return out


def approvals() -> list[dict]:
    """Every approved (kernel, capability, dtype) entry with its evidence."""
    return list(_approved().values())


@functools.lru_cache(maxsize=None)
def capability(index: int) -> str:
    """``"9.0"`` for the sm_90 CUDA device ``index``."""
    major, minor = torch.cuda.get_device_capability(index)
    return f"{major}.{minor}"


# The two checks below are pure functions of plain arguments (the file is read once), so
# torch.compile evaluates them while tracing instead of breaking the graph on the device query.
@torch.compiler.assume_constant_result
def _reason(kernels: str, index: int, dtype: str) -> str:
    cap = capability(index)
    table = _approved()
    missing = [k for k in kernels.split(",") if (k, cap, dtype) not in table]
    if not missing:
        return ""
    return (f"{', '.join(missing)} not approved for auto on compute capability {cap} / {dtype} "
            f"(no GPU-tier pass and speedup over triton recorded in vitkern/{PATH.name}; "
            "backend='cuda' runs it)")


@torch.compiler.assume_constant_result
def _device_reason(index: int) -> str:
    cap = capability(index)
    if any(c == cap for _, c, _ in _approved()):
        return ""
    return (f"no CUDA kernel approved for auto on compute capability {cap} yet (vitkern/"
            f"{PATH.name}: written by python -m vitkern.bench.approve from a GPU-tier run)")


def reason(kernels: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``auto`` must not pick the CUDA backend for a call running ``kernels`` on tensors of
    ``device`` / ``dtype`` (None if it may): each must be approved for that GPU generation and
    dtype."""
    if device.type != "cuda":
        return f"tensors are on {device.type}"
    if not kernels:
        return "the op names no vitkern._C kernel to approve"
    return _reason(",".join(kernels), _index(device), str(dtype).removeprefix("torch.")) or None


def device_reason(device: torch.device) -> Optional[str]:
    """Why ``auto`` never picks the CUDA backend on ``device`` (None when some kernel is approved
    for its GPU generation; the op then asks :func:`reason` about its own kernels and dtype)."""
    if device.type != "cuda":
        return f"tensors are on {device.type}"
    return _device_reason(_index(device)) or None


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
