"""Triton kernels of PPMA (polyline path masked attention), one algorithm per file:

- ``common.py``: the packed prefix-sum tables of the log-decays (P along rows, Q along columns)
  that both attention kernels read, and the one scan kernel that builds them and turns their
  gradients into log-decay gradients; the AOT signature convention;
- ``full.py``: full attention (``MambaAttentionAllDouble``), forward, dQ and dK/dV;
- ``criss_cross.py``: criss-cross attention (``MambaAttentionChunkDouble``), per-line passes;
- ``decays.py``: the decays a, g (``PathEmbeding2D``), forward and backward;
- ``rotary.py``: RoPE as PPMA applies it (``theta_shift``); not ``rope.py``, whose module
  would be shadowed by the re-exported host function :func:`rope`.

This package re-exports what ``vitkern.ops.ppma`` and the tests call (capabilities, launchers,
host entry points), and gathers the files' ahead-of-time cases in :func:`aot_specs`.
"""
from . import common, criss_cross, decays, full, rotary
from .common import SCAN_MAX_WIDTH, decay_grads, ppma_scan, ppma_scan_kernel, prefix_table
from .criss_cross import (
    CC_MAX_HEAD_DIM,
    CC_MAX_LINE,
    cc_backward,
    cc_block,
    cc_forward,
    cc_unsupported,
    cc_warps,
    ppma_cc_bwd_kernel,
    ppma_cc_fwd_kernel,
)
from .decays import (
    DECAY_BLOCK_T,
    decays_backward,
    decays_forward,
    ppma_decays_bwd_kernel,
    ppma_decays_fwd_kernel,
)
from .full import (
    MAX_HEAD_DIM,
    MAX_TRAIN_WIDTH,
    TILES,
    backward,
    forward,
    max_width,
    ppma_bwd_dkdv,
    ppma_bwd_dkdv_kernel,
    ppma_bwd_dq,
    ppma_bwd_dq_kernel,
    ppma_fwd,
    ppma_fwd_kernel,
    unsupported,
)
from .rotary import ROPE_BLOCK_T, ppma_rope_kernel, rope

__all__ = [
    "CC_MAX_HEAD_DIM", "CC_MAX_LINE", "DECAY_BLOCK_T", "MAX_HEAD_DIM", "MAX_TRAIN_WIDTH",
    "ROPE_BLOCK_T", "SCAN_MAX_WIDTH", "TILES", "aot_specs", "backward", "cc_backward", "cc_block", "cc_forward",
    "cc_unsupported", "cc_warps", "decay_grads", "decays_backward", "decays_forward", "forward",
    "max_width", "ppma_bwd_dkdv", "ppma_bwd_dkdv_kernel", "ppma_bwd_dq", "ppma_bwd_dq_kernel",
    "ppma_cc_bwd_kernel", "ppma_cc_fwd_kernel", "ppma_decays_bwd_kernel",
    "ppma_decays_fwd_kernel", "ppma_fwd", "ppma_fwd_kernel", "ppma_rope_kernel", "ppma_scan",
    "ppma_scan_kernel", "prefix_table",
    "rope", "unsupported",
]


def aot_specs():
    """The ahead-of-time cases of every PPMA kernel: prefix scans, full attention, decays,
    criss-cross, RoPE (see each file's ``aot_specs``)."""
    return [*common.aot_specs(), *full.aot_specs(), *decays.aot_specs(), *criss_cross.aot_specs(),
            *rotary.aot_specs()]
