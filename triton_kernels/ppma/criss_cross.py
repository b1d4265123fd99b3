"""PPMA criss-cross attention (PPMA's ``MambaAttentionChunkDouble``): forward and backward passes.

One program per (batch·head, line): a line is an image row (ROW, the 1D mask S^W from the row
prefix sums P of ``common.py``) or an image column (the mask S^H from the column prefix sums Q).
A line holds at most 64 tokens, so its whole attention map A (softmax over the line, [L, L])
lives in registers and is recomputed by every pass that needs it; only O(N·d) intermediates go
to HBM:

  forward   Y = Aw·v (rows);  Z = Ah·v, OA = Ah·Y (columns);  O = ½·OA + ½·Aw·Z (rows)
  backward  dZ = ½·Awᵀ·dO (rows);  dY = ½·Ahᵀ·dO (columns);
            dAh = ½·dO·Yᵀ + dZ·vᵀ -> dq, dk, dv (= Ahᵀ·dZ), dQ (columns, fp32 partials);
            dAw = ½·dO·Zᵀ + dY·vᵀ -> dq, dk, dv (+= Awᵀ·dY), dP, plus the column parts (rows)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention_core import (
    aot_precision,
    bh_offset,
    block_d,
    dot_precision,
    load_rows,
    mma,
    qk_scale_log2,
    store_rows,
    strides_of,
)
from .common import LOG2E_JIT, aot_signature, load_pq, sign

# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _line(Q, K, PQ, sq, sk, n_heads, N, W, n_lines, L, HEAD_DIM, qk_scale_log2,
          ROW: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_L: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """This program's (batch·head) and line: (pid_bh, offs_d, dmask, the line's tokens, valid?,
    q, k, σ = sign(j - i), the line's softmax A [BLOCK_L]²); sq, sk: (batch, head, token,
    channel) strides."""
    pid = tl.program_id(0)
    pid_bh = (pid // n_lines).to(tl.int64)
    line = pid % n_lines
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    pos = tl.arange(0, BLOCK_L)
    valid = pos < L
    if ROW:
        tok = line * W + pos
    else:
        tok = pos * W + line
    q = _load_line(Q, sq, pid_bh, n_heads, tok, offs_d, valid, dmask)
    k = _load_line(K, sk, pid_bh, n_heads, tok, offs_d, valid, dmask)
    p_tab, q_tab = load_pq(PQ + pid_bh * N, tok, valid)
    if ROW:
        z = p_tab
    else:
        z = q_tab
    sig = sign(pos[None, :] - pos[:, None])
    pair = valid[:, None] & valid[None, :]
    s = (mma(q, tl.trans(k), DOT_PRECISION) * qk_scale_log2
         + sig * (z[None, :] - z[:, None]) * LOG2E_JIT)
    s = tl.where(pair, s, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(valid, m, 0.0)
    e = tl.where(pair, tl.exp2(s - m[:, None]), 0.0)
    l_sum = tl.sum(e, 1)
    a = e / tl.where(valid, l_sum, 1.0)[:, None]
    return pid_bh, offs_d, dmask, tok, valid, q, k, sig, a


@triton.jit
def _load_line(X, sx, pid_bh, n_heads, tok, offs_d, valid, dmask):
    """The line's rows of X (sx: its (batch, head, token, channel) strides)."""
    return load_rows(X + bh_offset(pid_bh, n_heads, sx[0], sx[1]), tok, offs_d, valid, dmask,
                     (sx[2], sx[3]))


@triton.jit
def _store_line(X, sx, pid_bh, n_heads, tok, offs_d, valid, dmask, x):
    store_rows(X + bh_offset(pid_bh, n_heads, sx[0], sx[1]), tok, offs_d, valid, dmask,
               (sx[2], sx[3]), x)


@triton.jit
def _store_grad(g, ACC, G, sg, pid_bh, n_heads, tok, offs_d, valid, dmask, HEAD_DIM,
                ACCUM: tl.constexpr):
    """A line's fp32 gradient tile: to G (plus the other direction's partial in ACC) when
    ACCUM, else to the fp32 partial ACC (contiguous (N, d) rows)."""
    if ACCUM:
        g += load_rows(ACC, tok, offs_d, valid, dmask, (HEAD_DIM, 1))
        _store_line(G, sg, pid_bh, n_heads, tok, offs_d, valid, dmask, g)
    else:
        store_rows(ACC, tok, offs_d, valid, dmask, (HEAD_DIM, 1), g)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def ppma_cc_fwd_kernel(
    Q, K, PQ, X1, X2, ADD, OUT1, OUT2,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sx1b, sx1h, sx1n, sx1d, sx2b, sx2h, sx2n, sx2d,
    sab, sah, san, sad, so1b, so1h, so1n, so1d, so2b, so2h, so2n, so2d,
    n_heads, N, H, W, n_lines, L, HEAD_DIM, qk_scale_log2,
    ROW: tl.constexpr, HAS_X2: tl.constexpr, HAS_ADD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT1 = A·X1 (or ½·A·X1 + ½·ADD), OUT2 = A·X2 for the line's softmax A."""
    pid_bh, offs_d, dmask, tok, valid, q, k, sig, a = _line(
        Q, K, PQ, (sqb, sqh, sqn, sqd), (skb, skh, skn, skd), n_heads, N, W, n_lines, L,
        HEAD_DIM, qk_scale_log2, ROW, DOT_PRECISION, BLOCK_L, BLOCK_D)
    dt = Q.dtype.element_ty
    x1 = _load_line(X1, (sx1b, sx1h, sx1n, sx1d), pid_bh, n_heads, tok, offs_d, valid, dmask)
    out1 = mma(a.to(dt), x1.to(dt), DOT_PRECISION)
    if HAS_ADD:
        add = _load_line(ADD, (sab, sah, san, sad), pid_bh, n_heads, tok, offs_d, valid, dmask)
        out1 = 0.5 * out1 + 0.5 * add.to(tl.float32)
    _store_line(OUT1, (so1b, so1h, so1n, so1d), pid_bh, n_heads, tok, offs_d, valid, dmask, out1)
    if HAS_X2:
        x2 = _load_line(X2, (sx2b, sx2h, sx2n, sx2d), pid_bh, n_heads, tok, offs_d, valid, dmask)
        out2 = mma(a.to(dt), x2.to(dt), DOT_PRECISION)
        _store_line(OUT2, (so2b, so2h, so2n, so2d), pid_bh, n_heads, tok, offs_d, valid, dmask,
                    out2)


@triton.jit
def ppma_cc_bwd_kernel(
    Q, K, V, DO, PQ, X, DX, OUT_T, ACC_Q, ACC_K, ACC_V, DQ, DK, DV, GZ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sgb, sgh, sgn, sgd,
    n_heads, N, H, W, n_lines, L, HEAD_DIM, scale, qk_scale_log2,
    ROW: tl.constexpr, WRITE_T: tl.constexpr, GRADS: tl.constexpr, ACCUM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One backward pass over lines (fp32 intermediates X, DX, OUT_T, ACC_*, GZ: contiguous
    (B, h, N, d) / (B, h, N)).

    WRITE_T: OUT_T = ½·Aᵀ·dO. GRADS: dA = ½·dO·Xᵀ + DX·vᵀ, dS = A∘(dA - rowsum(A∘dA)) ->
    dq, dk, dv = Aᵀ·DX and GZ (the line's prefix-table gradient), stored to DQ/DK/DV (ACCUM:
    plus ACC_Q/K/V, the other direction's fp32 partials; DQ, DK, DV share the strides sg*) or to
    ACC_Q/K/V (fp32) otherwise.
    """
    pid_bh, offs_d, dmask, tok, valid, q, k, sig, a = _line(
        Q, K, PQ, (sqb, sqh, sqn, sqd), (skb, skh, skn, skd), n_heads, N, W, n_lines, L,
        HEAD_DIM, qk_scale_log2, ROW, DOT_PRECISION, BLOCK_L, BLOCK_D)
    f32_base = pid_bh * N * HEAD_DIM  # contiguous fp32 (B, h, N, d) intermediates
    do = _load_line(DO, (sdob, sdoh, sdon, sdod), pid_bh, n_heads, tok, offs_d, valid, dmask)
    dt = Q.dtype.element_ty
    if WRITE_T:
        out_t = 0.5 * mma(tl.trans(a).to(dt), do.to(dt), DOT_PRECISION)
        store_rows(OUT_T + f32_base, tok, offs_d, valid, dmask, (HEAD_DIM, 1), out_t)
    if GRADS:
        sg = (sgb, sgh, sgn, sgd)
        # each gradient is stored as soon as it is formed (dv first), to keep the register
        # pressure of the L×L tiles down at 64-token lines
        dx = load_rows(DX + f32_base, tok, offs_d, valid, dmask, (HEAD_DIM, 1)).to(dt)
        _store_grad(mma(tl.trans(a).to(dt), dx, DOT_PRECISION), ACC_V + f32_base, DV, sg, pid_bh,
                    n_heads, tok, offs_d, valid, dmask, HEAD_DIM, ACCUM)
        x = load_rows(X + f32_base, tok, offs_d, valid, dmask, (HEAD_DIM, 1))
        v = _load_line(V, (svb, svh, svn, svd), pid_bh, n_heads, tok, offs_d, valid, dmask)
        d_a = (0.5 * mma(do.to(dt), tl.trans(x.to(dt)), DOT_PRECISION)
               + mma(dx, tl.trans(v), DOT_PRECISION))
        ds = a * (d_a - tl.sum(a * d_a, 1)[:, None])
        gs = ds * sig
        tl.store(GZ + pid_bh * N + tok, tl.sum(gs, 0) - tl.sum(gs, 1), mask=valid)
        _store_grad(mma(ds.to(dt), k, DOT_PRECISION) * scale, ACC_Q + f32_base, DQ, sg, pid_bh,
                    n_heads, tok, offs_d, valid, dmask, HEAD_DIM, ACCUM)
        _store_grad(mma(tl.trans(ds).to(dt), q, DOT_PRECISION) * scale, ACC_K + f32_base, DK, sg,
                    pid_bh, n_heads, tok, offs_d, valid, dmask, HEAD_DIM, ACCUM)


# --------------------------------------------------------------------------------------------
# capability and launch geometry
# --------------------------------------------------------------------------------------------

#: longest row / column (tokens) and widest head the criss-cross kernels take, per fp32?: a
#: whole line's attention map lives in registers. Spill-free on sm_80 / sm_90 with the warps of
#: `cc_warps` (swept with the AOT harness); fp32's exact dots need more registers.
CC_MAX_LINE = {False: 64, True: 32}
CC_MAX_HEAD_DIM = 32


def cc_block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def cc_warps(block_l: int, block_dim: int, fp32: bool) -> int:
    return 8 if block_l * block_dim >= (32 * 32 if fp32 else 64 * 32) else 4


def cc_unsupported(H: int, W: int, head_dim: int, fp32: bool):
    """Why the criss-cross kernels refuse these inputs (None when they take them)."""
    if head_dim > CC_MAX_HEAD_DIM:
        return (f"head_dim {head_dim} > {CC_MAX_HEAD_DIM} not supported by the triton "
                "criss-cross kernels")
    longest = CC_MAX_LINE[fp32]
    if max(H, W) > longest:
        return (f"map {H}x{W}: the {'float32' if fp32 else '16-bit'} triton criss-cross kernels "
                f"take rows and columns of at most {longest} tokens")
    return None


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.ppma on validated inputs)
# --------------------------------------------------------------------------------------------


def _launch(kernel, q, k, pq, H: int, W: int, row: bool, sm_scale: float, **args):
    """One pass of ``kernel`` over the rows (``row``) or the columns of the map."""
    b, h, n, d = q.shape
    n_lines, length = (H, W) if row else (W, H)
    bl, bd = cc_block(length), block_d(d)
    kernel[(b * h * n_lines,)](
        Q=q, K=k, PQ=pq, **strides_of("q", q), **strides_of("k", k), n_heads=h, N=n, H=H, W=W,
        n_lines=n_lines, L=length, HEAD_DIM=d, qk_scale_log2=qk_scale_log2(sm_scale), ROW=row,
        DOT_PRECISION=dot_precision(q.dtype, exact="ieee"), BLOCK_L=bl, BLOCK_D=bd,
        num_warps=cc_warps(bl, bd, q.dtype == torch.float32), num_stages=1, **args)


def cc_forward(q, k, v, pq, o, y, z, oa, H: int, W: int, scale: float):
    """Criss-cross forward into o; y, z, oa: fp32 contiguous (B, h, N, d) intermediates
    (y, z are kept for the backward)."""
    for row, x1, x2, add, out1, out2 in ((True, v, None, None, y, None),
                                         (False, v, y, None, z, oa),
                                         (True, z, None, oa, o, None)):
        # absent operands (HAS_X2 / HAS_ADD off) take a dummy pointer
        x2_, add_, out2_ = (x2 if x2 is not None else x1), (add if add is not None else x1), \
            (out2 if out2 is not None else out1)
        _launch(ppma_cc_fwd_kernel, q, k, pq, H, W, row, scale, X1=x1, X2=x2_, ADD=add_,
                OUT1=out1, OUT2=out2_, **strides_of("x1", x1), **strides_of("x2", x2_),
                **strides_of("a", add_), **strides_of("o1", out1), **strides_of("o2", out2_),
                HAS_X2=x2 is not None, HAS_ADD=add is not None)


def cc_backward(do, q, k, v, pq, y, z, dq, dk, dv, H: int, W: int, scale: float):
    """Criss-cross gradients into dq, dk, dv (same strides); returns (dP, dQ) fp32 (B, h, N)."""
    b, h, n, d = q.shape
    f32 = [q.new_empty((b, h, n, d), dtype=torch.float32) for _ in range(5)]
    d_z, d_y, acc_q, acc_k, acc_v = f32
    g_p, g_q = (q.new_empty((b, h, n), dtype=torch.float32) for _ in range(2))
    args = dict(V=v, DO=do, ACC_Q=acc_q, ACC_K=acc_k, ACC_V=acc_v, DQ=dq, DK=dk, DV=dv,
                **strides_of("v", v), **strides_of("do", do), **strides_of("g", dq),
                scale=float(scale))
    passes = (  # (row?, X, DX, OUT_T, GZ, WRITE_T, GRADS, ACCUM): transposes first, then
        # the gradient passes (one job per pass keeps registers low enough for 64-token lines)
        (True, y, y, d_z, g_p, True, False, False),
        (False, y, y, d_y, g_q, True, False, False),
        (False, y, d_z, d_y, g_q, False, True, False),
        (True, z, d_y, d_y, g_p, False, True, True),
    )
    for row, x, dx, out_t, gz, write_t, grads, accum in passes:
        _launch(ppma_cc_bwd_kernel, q, k, pq, H, W, row, scale, X=x, DX=dx, OUT_T=out_t, GZ=gz,
                WRITE_T=write_t, GRADS=grads, ACCUM=accum, **args)
    return g_p, g_q


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot_compile.py compiles each for sm_80 and sm_90)
# --------------------------------------------------------------------------------------------


def aot_specs():
    """Both kernels at the longest lines (64 tokens in 16-bit, 32 in fp32) and head dim 32, in
    their heaviest modes (one fixed config each: the warps of :func:`cc_warps`)."""
    from ..aot import AotCase, AotSpec

    modes = {"fwd_x2": dict(ROW=False, HAS_X2=True, HAS_ADD=False),
             "bwd_t": dict(ROW=True, WRITE_T=True, GRADS=False, ACCUM=False),
             "bwd_accum": dict(ROW=True, WRITE_T=False, GRADS=True, ACCUM=True)}
    specs = []
    for mname, mode in modes.items():
        fn = ppma_cc_fwd_kernel if mname.startswith("fwd") else ppma_cc_bwd_kernel
        for dtype in ("fp16", "fp32"):
            sig, const = aot_signature(fn, dtype)
            if fn is ppma_cc_bwd_kernel:
                sig.update({n: "*fp32" for n in ("X", "DX", "OUT_T", "ACC_Q", "ACC_K", "ACC_V")})
            bl = CC_MAX_LINE[dtype == "fp32"]
            warps = cc_warps(bl, 32, dtype == "fp32")
            name = f"ppma.cc_{mname}[{dtype},L={bl},D=32,w{warps}]"
            case = AotCase(name=name, fn=fn, signature=sig, num_warps=warps, num_stages=1,
                           constexprs={**const, **mode, "BLOCK_L": bl, "BLOCK_D": 32,
                                       "DOT_PRECISION": aot_precision(dtype, exact="ieee")})
            specs.append(AotSpec(name, (case,)))
    return specs
