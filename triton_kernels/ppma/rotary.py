"""RoPE as PPMA applies it (``theta_shift``): 1D over the raster index, interleaved pairs.

One elementwise pass with the pair partner loaded alongside; the backward is the transpose.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..attention_core import bh_offset, cdiv, load_rows, program_coords, store_rows, strides_of
from .common import aot_signature


@triton.jit
def ppma_rope_kernel(
    X, SIN, COS, Y, sxb, sxh, sxn, sxd, syb, syh, syn, syd, n_heads, N, HEAD_DIM,
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y = x·cos + rot(x)·sin, rot(x)_2m = -x_2m+1, rot(x)_2m+1 = x_2m (forward); the transpose
    dx = dy·cos + rotᵀ(dy·sin) (BACKWARD). SIN, COS: contiguous fp32 (N, HEAD_DIM) tables."""
    pid_bh, pid_t = program_coords(N, BLOCK_T)
    X += bh_offset(pid_bh, n_heads, sxb, sxh)
    Y += bh_offset(pid_bh, n_heads, syb, syh)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    pair = offs_d ^ 1  # the other channel of the interleaved pair
    valid = tok < N
    dmask = offs_d < HEAD_DIM
    mask = valid[:, None] & dmask[None, :]
    x = load_rows(X, tok, offs_d, valid, dmask, (sxn, sxd)).to(tl.float32)
    x_pair = load_rows(X, tok, pair, valid, dmask, (sxn, sxd)).to(tl.float32)
    tab = tok.to(tl.int64)[:, None] * HEAD_DIM
    cos = tl.load(COS + tab + offs_d[None, :], mask=mask, other=0.0)
    even = (offs_d % 2 == 0)[None, :]
    if BACKWARD:
        sin_pair = tl.load(SIN + tab + pair[None, :], mask=mask, other=0.0)
        y = x * cos + tl.where(even, x_pair, -x_pair) * sin_pair
    else:
        sin = tl.load(SIN + tab + offs_d[None, :], mask=mask, other=0.0)
        y = x * cos + tl.where(even, -x_pair, x_pair) * sin
    store_rows(Y, tok, offs_d, valid, dmask, (syn, syd), y)


ROPE_BLOCK_T = 64


def rope(x, sin, cos, y, backward: bool = False):
    """y (B, h, N, d) <- RoPE of x (or its transpose for ``backward``); sin, cos (N, d) fp32
    contiguous."""
    b, h, n, d = x.shape
    grid = (b * h * cdiv(n, ROPE_BLOCK_T),)
    ppma_rope_kernel[grid](X=x, SIN=sin, COS=cos, Y=y, **strides_of("x", x), **strides_of("y", y),
                           n_heads=h, N=n, HEAD_DIM=d, BACKWARD=backward, BLOCK_T=ROPE_BLOCK_T,
                           BLOCK_D=triton.next_power_of_2(d))


def aot_specs():
    """The forward at head dim 32, fp16 (one fixed config)."""
    from ..aot import AotCase, AotSpec

    sig, const = aot_signature(ppma_rope_kernel, "fp16")
    sig.update(SIN="*fp32", COS="*fp32")
    name = "ppma.rope[fp16,D=32]"
    return [AotSpec(name, (AotCase(name=name, fn=ppma_rope_kernel, signature=sig,
                                   constexprs={**const, "BACKWARD": False, "BLOCK_T": ROPE_BLOCK_T,
                                               "BLOCK_D": 32}, num_warps=4, num_stages=1),))]
