"""What the PPMA kernels share: the packed prefix-sum tables of the log-decays, their jit readers,
the host side of their gradients, and the ahead-of-time signature convention.

With per-head log-decays a (along rows) and g (along columns) on the (H, W) map,

    P[r, c] = Σ_{c' <= c} a[r, c']  (along rows),   Q[r, c] = Σ_{r' <= r} g[r', c]  (along columns)

and the log-mask between two cells is a signed difference of P and Q values (``full.py``,
``criss_cross.py``). P and Q of a cell are packed in one 64-bit word, so a gather is one load.
Their gradients come back from the kernels as fp32 (B, h, N) tables; :func:`decay_grads` turns
them into log-decay gradients (reverse cumulative sums).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention_core import LOG2E

LOG2E_JIT = tl.constexpr(LOG2E)  # jit code reads module globals only as constexprs


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def load_pq(PQ, off, mask):
    """(P, Q) at cells ``off``: one 64-bit load of the packed fp32 pair (P low word, Q high)."""
    x = tl.load(PQ + off, mask=mask, other=0)
    p = x.to(tl.int32).to(tl.float32, bitcast=True)  # the cast truncates: the low word
    q = (x >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return p, q


# --------------------------------------------------------------------------------------------
# host
# --------------------------------------------------------------------------------------------


def prefix_table(log_decay_h: torch.Tensor, log_decay_v: torch.Tensor, H: int, W: int):
    """(B, h, N) int64 words, each packing the fp32 pair (P, Q) of a cell: P the row prefix sums
    of a, Q the column prefix sums of g (little-endian: P in the low word)."""
    b, h, n = log_decay_h.shape
    p = torch.cumsum(log_decay_h.float().reshape(b, h, H, W), dim=3)
    q = torch.cumsum(log_decay_v.float().reshape(b, h, H, W), dim=2)
    return torch.stack([p, q], dim=-1).reshape(b, h, n, 2).view(torch.int64).squeeze(-1)


def decay_grads(d_p: torch.Tensor, d_q: torch.Tensor, H: int, W: int):
    """Prefix-table gradients -> log-decay gradients: reverse cumulative sums along rows (a)
    and columns (g). (B, h, N) fp32 in and out."""
    b, h, n = d_p.shape
    d_p = d_p.reshape(b, h, H, W)
    d_q = d_q.reshape(b, h, H, W)
    da = d_p.flip(3).cumsum(3).flip(3)
    dg = d_q.flip(2).cumsum(2).flip(2)
    return da.reshape(b, h, n), dg.reshape(b, h, n)


# --------------------------------------------------------------------------------------------
# ahead-of-time signatures
# --------------------------------------------------------------------------------------------

_POINTERS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "X", "DX", "Y", "X1", "X2", "ADD",
             "OUT1", "OUT2")
_F32_POINTERS = ("O1", "LSE", "DELTA", "GPQ", "GQQ", "GPK", "GQK", "OUT_T", "ACC_Q", "ACC_K",
                 "ACC_V", "GZ")


def aot_signature(fn, ptr_dtype: str) -> tuple[dict, dict]:
    """Runtime-arg types of a launch on q, k, v viewed out of packed projections (see
    :func:`..aot.launch_signature`); per-token statistics and intermediates are fp32, the packed
    prefix-sum table is i64."""
    from ..aot import launch_signature

    pointers = {n: f"*{ptr_dtype}" for n in _POINTERS}
    pointers.update({n: "*fp32" for n in _F32_POINTERS}, PQ="*i64")
    return launch_signature(fn, pointers)
