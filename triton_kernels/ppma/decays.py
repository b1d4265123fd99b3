"""PPMA's decays (``PathEmbeding2D``): the per-head log-decays a, g of the attention input.

One pass over x per (token block, head): a, g = -exp(A_log)·softplus(x_h·w + dt_bias) per
direction. The backward writes dx and per-program partial sums of the parameter gradients,
reduced by the host in a fixed order (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention_core import cdiv, strides_of
from .common import aot_signature


@triton.jit
def _softplus(z):
    """PyTorch's softplus (beta 1, threshold 20), accurate for very negative z too."""
    e = tl.exp(-tl.abs(z))
    # log(1 + e) loses e's digits for small e: use its series there
    log1p_e = tl.where(e < 1e-3, e * (1.0 - e * (0.5 - e * (1.0 / 3.0))), tl.log(1.0 + e))
    return tl.where(z > 20.0, z, tl.maximum(z, 0.0) + log1p_e)


@triton.jit
def _decay_inputs(X, WDT, BIAS, ALOG, sxb, sxn, sxc, n_heads, N, HEAD_DIM, n_blocks,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's token block of head h = program_id(1): (b, h, tokens, real?, offset of the
    (B, heads, N) outputs, x [BLOCK_T, BLOCK_D] fp32, its channels, mask, w0, w1, A, and the
    pre-activations z0, z1 [BLOCK_T] (fp32))."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = (pid // n_blocks).to(tl.int64)
    tok = (pid % n_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    tmask = tok < N
    dmask = offs_d < HEAD_DIM
    xmask = tmask[:, None] & dmask[None, :]
    chan = h * HEAD_DIM + offs_d
    x_ptrs = X + b * sxb + tok.to(tl.int64)[:, None] * sxn + chan[None, :] * sxc
    x = tl.load(x_ptrs, mask=xmask, other=0.0).to(tl.float32)
    w0 = tl.load(WDT + offs_d, mask=dmask, other=0.0).to(tl.float32)
    w1 = tl.load(WDT + HEAD_DIM + offs_d, mask=dmask, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + h).to(tl.float32)
    A = tl.exp(tl.load(ALOG + h).to(tl.float32))
    z0 = tl.sum(x * w0[None, :], 1) + bias
    z1 = tl.sum(x * w1[None, :], 1) + bias
    out = (b * n_heads + h) * N + tok
    return b, h, tok, tmask, out, x, chan, xmask, w0, w1, A, z0, z1


@triton.jit
def ppma_decays_fwd_kernel(
    X, WDT, BIAS, ALOG, OA, OG, sxb, sxn, sxc, n_heads, N, HEAD_DIM, n_blocks,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """a, g (B, heads, N), contiguous: -exp(A_log)·softplus(x_h·w + dt_bias) per direction."""
    _, _, _, tmask, out, _, _, _, _, _, A, z0, z1 = _decay_inputs(
        X, WDT, BIAS, ALOG, sxb, sxn, sxc, n_heads, N, HEAD_DIM, n_blocks, BLOCK_T, BLOCK_D)
    tl.store(OA + out, (-A * _softplus(z0)).to(OA.dtype.element_ty), mask=tmask)
    tl.store(OG + out, (-A * _softplus(z1)).to(OG.dtype.element_ty), mask=tmask)


@triton.jit
def ppma_decays_bwd_kernel(
    X, WDT, BIAS, ALOG, DA, DG, DX, PW, PB, PA, sxb, sxn, sxc, sdxb, sdxn, sdxc, n_heads, N,
    HEAD_DIM, n_blocks,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx and per-program partial sums of the parameter gradients:
    PW (heads, programs, 2, HEAD_DIM), PB, PA (heads, programs); the host reduces them."""
    b, h, tok, tmask, out, x, chan, xmask, w0, w1, A, z0, z1 = _decay_inputs(
        X, WDT, BIAS, ALOG, sxb, sxn, sxc, n_heads, N, HEAD_DIM, n_blocks, BLOCK_T, BLOCK_D)
    da = tl.load(DA + out, mask=tmask, other=0.0).to(tl.float32)
    dg = tl.load(DG + out, mask=tmask, other=0.0).to(tl.float32)
    # d softplus / dz = sigmoid(z), 1 above the threshold (as PyTorch)
    sig0 = tl.where(z0 > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-z0)))
    sig1 = tl.where(z1 > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-z1)))
    dz0 = -A * sig0 * da
    dz1 = -A * sig1 * dg
    dx = dz0[:, None] * w0[None, :] + dz1[:, None] * w1[None, :]
    dx_ptrs = DX + b * sdxb + tok.to(tl.int64)[:, None] * sdxn + chan[None, :] * sdxc
    tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=xmask)
    offs_d = tl.arange(0, BLOCK_D)
    part = h * tl.num_programs(0) + tl.program_id(0)
    dmask = offs_d < HEAD_DIM
    tl.store(PW + part * 2 * HEAD_DIM + offs_d, tl.sum(dz0[:, None] * x, 0), mask=dmask)
    tl.store(PW + part * 2 * HEAD_DIM + HEAD_DIM + offs_d, tl.sum(dz1[:, None] * x, 0),
             mask=dmask)
    tl.store(PB + part, tl.sum(dz0 + dz1, 0))
    # d a / d A_log = a (a = -exp(A_log)·softplus)
    tl.store(PA + part, tl.sum(da * (-A * _softplus(z0)) + dg * (-A * _softplus(z1)), 0))


DECAY_BLOCK_T = 64


def _launch_args(x, dt_weight, dt_bias, A_log, heads: int) -> tuple[tuple, dict]:
    """(grid, the keyword arguments both kernels take) for x (B, N, C)."""
    B, N, C = x.shape
    d = C // heads
    n_blocks = cdiv(N, DECAY_BLOCK_T)
    return (B * n_blocks, heads), dict(
        X=x, WDT=dt_weight.contiguous(), BIAS=dt_bias, ALOG=A_log, **strides_of("x", x, "bnc"),
        n_heads=heads, N=N, HEAD_DIM=d, n_blocks=n_blocks, BLOCK_T=DECAY_BLOCK_T,
        BLOCK_D=triton.next_power_of_2(d))


def decays_forward(x, dt_weight, dt_bias, A_log, a, g):
    """x (B, N, C) (any strides) -> a, g (B, heads, N) contiguous, written in place."""
    grid, args = _launch_args(x, dt_weight, dt_bias, A_log, a.shape[1])
    ppma_decays_fwd_kernel[grid](OA=a, OG=g, **args)


def decays_backward(x, dt_weight, dt_bias, A_log, da, dg, dx):
    """Gradients: dx (B, N, C) written in place; returns (d dt_weight, d dt_bias,
    d A_log) in fp32, reduced deterministically from per-program partials."""
    heads = da.shape[1]
    grid, args = _launch_args(x, dt_weight, dt_bias, A_log, heads)
    n_prog, d = grid[0], args["HEAD_DIM"]
    pw = x.new_empty((heads, n_prog, 2, d), dtype=torch.float32)
    pb = x.new_empty((heads, n_prog), dtype=torch.float32)
    pa = x.new_empty((heads, n_prog), dtype=torch.float32)
    ppma_decays_bwd_kernel[grid](DA=da.contiguous(), DG=dg.contiguous(), DX=dx, PW=pw, PB=pb,
                                 PA=pa, **strides_of("dx", dx, "bnc"), **args)
    return pw.sum(dim=(0, 1)), pb.sum(dim=1), pa.sum(dim=1)


def aot_specs():
    """Both kernels at head dim 32 (one fixed config each): fp16 activations, fp32 parameters
    and gradients (an AMP model), channels-last x."""
    from ..aot import AotCase, AotSpec

    specs = []
    for fn in (ppma_decays_fwd_kernel, ppma_decays_bwd_kernel):
        sig, const = aot_signature(fn, "fp16")
        for name in ("WDT", "BIAS", "ALOG", "DA", "DG", "PW", "PB", "PA", "OA", "OG"):
            if name in sig:
                sig[name] = "*fp32"
        for name in ("sxc", "sdxc"):  # channels-last x: unit channel stride
            if name in sig:
                del sig[name]
                const[name] = 1
        name = f"ppma.{fn.__name__}[fp16,D=32]"
        specs.append(AotSpec(name, (AotCase(
            name=name, fn=fn, signature=sig, num_warps=4, num_stages=1,
            constexprs={**const, "BLOCK_T": DECAY_BLOCK_T, "BLOCK_D": 32}),)))
    return specs
