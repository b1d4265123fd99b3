"""Triton kernels of the softmax-free family: one algorithm per file on a shared engine.

* ``common.py``: the reduce-then-apply engine — jit helpers of a token-streaming kernel, the
  split-N reduction ``gram_partials`` (φ(X)ᵀY, KᵀV-style) and its ``fold``, the split-N launch
  (keyword arguments, strides named ``s<tensor><axis>``), tile-candidate helpers, AOT cases;
* ``linear.py``: kernelized linear attention (identity / ReLU / elu+1 feature maps);
* ``xca.py``: XCiT's cross-covariance attention;
* ``soft.py``: SOFT (Gaussian kernel of landmarks; the Newton–Schulz inverse is the op's).

Each algorithm module declares its capability (``unsupported``), its tile candidates
(``TILES``, pure tuning), its host entry points and its ``aot_specs()``. This package keeps the
names ``vitkern.ops.linear`` and the tests use: the entry points, the launchers (the tests reach
every one through this namespace), the capability functions (``unsupported`` for linear
attention and XCA, ``soft_unsupported``), the tile tables (``TILES`` merges the token-streaming
tables of common, linear and XCA) and ``aot_specs()``, which gathers its files'
specialisations for ``aot.collect_specs`` (``KERNEL_MODULES`` lists this package as "linear").
"""
from __future__ import annotations

from . import common, linear, soft, xca
from .common import FOLD_BLOCK, fold, gram_partials, split_plan
from .linear import la_apply, la_backward, la_bwd_kv, la_bwd_q, la_forward
from .soft import soft_apply, soft_backward, soft_bwd, soft_forward, soft_reduce
from .xca import (xca_apply, xca_backward, xca_bwd_apply, xca_bwd_small, xca_forward,
                  xca_fused, xca_softmax)
from .xca import unsupported as _xca_unsupported

__all__ = [
    "FOLD_BLOCK", "SOFT_FP32_MAX_HEAD_DIM", "SOFT_TILES", "TILES", "XCA_SMALL_TILES",
    "aot_specs", "fold", "gram_partials", "la_apply", "la_backward", "la_bwd_kv", "la_bwd_q",
    "la_forward", "soft_apply", "soft_backward", "soft_bwd", "soft_forward", "soft_reduce",
    "soft_unsupported", "split_plan", "unsupported", "xca_apply", "xca_backward",
    "xca_bwd_apply", "xca_bwd_small", "xca_forward", "xca_fused", "xca_softmax",
]

#: The token-streaming tile tables of the shared reduction, linear attention and XCA, by kernel
#: (a merged view: each module reads its own).
TILES = {**common.TILES, **linear.TILES, **xca.TILES}
SOFT_TILES = soft.TILES
XCA_SMALL_TILES = xca.SMALL_TILES
SOFT_FP32_MAX_HEAD_DIM = soft.FP32_MAX_HEAD_DIM
soft_unsupported = soft.unsupported


def unsupported(head_dim: int, fp32: bool, v_dim: int | None = None, xca: bool = False,
                backward: bool = True):
    """Why the triton backend refuses these head dims for linear attention (max(head_dim,
    v_dim)) or, with ``xca``, XCA (None within the declared capability); ``backward=False``:
    only the forward's capability applies (inference without gradients)."""
    if xca:
        return _xca_unsupported(max(head_dim, v_dim or 0), fp32, backward)
    return linear.unsupported(head_dim, fp32, v_dim, backward)


def aot_specs():
    """The ahead-of-time specialisations of the family's files."""
    return [spec for mod in (common, linear, xca, soft) for spec in mod.aot_specs()]
