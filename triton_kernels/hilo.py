"""Triton kernels for HiLo attention (LITv2): Hi-Fi window heads and Lo-Fi pooled-key heads.

Hi-Fi ("window" kernels). The s×s windows are laid end to end in a *virtual* sequence: virtual
index ``v = window * s² + slot`` with windows in raster order over the (padded) window grid and
slots row-major inside a window. A tile of virtual rows therefore holds many whole windows (16
windows of 4 tokens in a 64-row tile for s = 2) and its keys are the same virtual range, so one
tensor-core ``tl.dot`` with a block-diagonal mask serves them all. Virtual indices are turned into
raster token offsets on the fly: no window-partition copy is ever made. For windows larger than a
tile (s² > BLOCK) the key loop walks the window in BLOCK_N steps, flash-attention style. With
``pad="zero"`` the window grid covers ceil(H/s)×ceil(W/s) windows and tokens outside the map read
as zero keys/values (LITv2's unmasked zero padding); their queries are computed and not stored.

Lo-Fi ("pooled" kernels). Queries are the N raster tokens; a key tile is the mean of s×s blocks
of the full-resolution k / v map, averaged in fp32 registers as it is loaded (divisor s² also for
border blocks of a zero-padded map), so the pooled tensor is never materialised. ``POOL = 1``
serves both global attention (window_size = 1) and callers that pass already-pooled k, v.
Backward: dK̄, dV̄ of a pooled key are spread back over its s² source tokens (÷ s²) by plain
stores — each token has exactly one pooled key, so no atomics and the result is deterministic.

All softmax math is the shared core in ``attention_core``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_core import (
    Launcher,
    block_d,
    cdiv,
    launch_delta,
    mma,
    program_coords,
    qk_scale_log2,
    softmax_bwd_tile,
    softmax_finish,
    softmax_step,
    strides4,
    tile_ptrs,
)

# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _window_tokens(idx, n_virt, n_win_w, H, W, S: tl.constexpr):
    """Virtual window index -> (raster token, real token?, window id, inside the virtual range?)."""
    win = idx // (S * S)
    slot = idx % (S * S)
    r = (win // n_win_w) * S + slot // S
    c = (win % n_win_w) * S + slot % S
    in_range = idx < n_virt
    real = in_range & (r < H) & (c < W)
    return r * W + c, real, win, in_range


@triton.jit
def _window_span(start, n_virt, S: tl.constexpr, BLOCK: tl.constexpr):
    """Virtual range [lo, hi) of the windows that rows [start, start + BLOCK) belong to."""
    lo = (start // (S * S)) * (S * S)
    hi = tl.minimum(((start + BLOCK - 1) // (S * S) + 1) * (S * S), n_virt)
    return lo, hi


@triton.jit
def _pooled_tile(base, cols, M, pool_w, KH, KW, offs_d, dmask, stride_n, stride_d,
                 POOL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_N, BLOCK_D] tile of POOL×POOL means of a (KH, KW) map; zeros outside the map."""
    pr = cols // pool_w
    pc = cols % pool_w
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for dy in tl.static_range(POOL):
        for dx in tl.static_range(POOL):
            r = pr * POOL + dy
            c = pc * POOL + dx
            ok = (cols < M) & (r < KH) & (c < KW)
            acc += tl.load(tile_ptrs(base, r * KW + c, offs_d, stride_n, stride_d),
                           mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    return (acc * (1.0 / (POOL * POOL))).to(base.dtype.element_ty)


@triton.jit
def _bh_bases(pid_bh, n_heads, sb, sh):
    return (pid_bh // n_heads) * sb + (pid_bh % n_heads) * sh


# --------------------------------------------------------------------------------------------
# Hi-Fi: window kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def hifi_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    n_heads, slb, slh, N, H, W, n_win_w, n_virt, HEAD_DIM, qk_scale_log2,
    S: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_virt, BLOCK_M)
    Q += _bh_bases(pid_bh, n_heads, sqb, sqh)
    K += _bh_bases(pid_bh, n_heads, skb, skh)
    V += _bh_bases(pid_bh, n_heads, svb, svh)
    O += _bh_bases(pid_bh, n_heads, sob, soh)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m, real_m, win_m, _ = _window_tokens(rows, n_virt, n_win_w, H, W, S)
    q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=real_m[:, None] & dmask[None, :],
                other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _window_span(pid_m * BLOCK_M, n_virt, S, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        tok_n, real_n, win_n, in_n = _window_tokens(cols, n_virt, n_win_w, H, W, S)
        kv_mask = real_n[:, None] & dmask[None, :]  # pad tokens read as zero keys / values
        k = tl.load(tile_ptrs(K, tok_n, offs_d, skn, skd), mask=kv_mask, other=0.0)
        v = tl.load(tile_ptrs(V, tok_n, offs_d, svn, svd), mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), IEEE) * qk_scale_log2
        s = tl.where((win_m[:, None] == win_n[None, :]) & in_n[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, v, IEEE)

    out, lse2 = softmax_finish(m_i, l_i, acc)
    tl.store(tile_ptrs(O, tok_m, offs_d, son, sod), out.to(O.dtype.element_ty),
             mask=real_m[:, None] & dmask[None, :])
    tl.store(LSE + _bh_bases(pid_bh, n_heads, slb, slh) + tok_m, lse2, mask=real_m)


@triton.jit
def hifi_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, slb, slh, N, H, W, n_win_w, n_virt, HEAD_DIM, scale, qk_scale_log2,
    S: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_n = program_coords(n_virt, BLOCK_N)
    Q += _bh_bases(pid_bh, n_heads, sqb, sqh)
    K += _bh_bases(pid_bh, n_heads, skb, skh)
    V += _bh_bases(pid_bh, n_heads, svb, svh)
    DO += _bh_bases(pid_bh, n_heads, sdob, sdoh)
    DK += _bh_bases(pid_bh, n_heads, sdkb, sdkh)
    DV += _bh_bases(pid_bh, n_heads, sdvb, sdvh)
    LSE += _bh_bases(pid_bh, n_heads, slb, slh)
    DELTA += _bh_bases(pid_bh, n_heads, slb, slh)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_n, real_n, win_n, in_n = _window_tokens(cols, n_virt, n_win_w, H, W, S)
    kv_mask = real_n[:, None] & dmask[None, :]
    k = tl.load(tile_ptrs(K, tok_n, offs_d, skn, skd), mask=kv_mask, other=0.0)
    v = tl.load(tile_ptrs(V, tok_n, offs_d, svn, svd), mask=kv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi = _window_span(pid_n * BLOCK_N, n_virt, S, BLOCK_N)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        tok_m, real_m, win_m, _ = _window_tokens(rows, n_virt, n_win_w, H, W, S)
        q_mask = real_m[:, None] & dmask[None, :]  # pad queries have no output: no gradient
        q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)
        do = tl.load(tile_ptrs(DO, tok_m, offs_d, sdon, sdod), mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + tok_m, mask=real_m, other=0.0)
        delta = tl.load(DELTA + tok_m, mask=real_m, other=0.0)
        attend = real_m[:, None] & in_n[None, :] & (win_m[:, None] == win_n[None, :])
        p, ds = softmax_bwd_tile(q, k, v, do, lse2, delta, qk_scale_log2, attend, IEEE)
        dv += mma(tl.trans(p).to(do.dtype), do, IEEE)
        dk += mma(tl.trans(ds).to(q.dtype), q, IEEE)

    tl.store(tile_ptrs(DK, tok_n, offs_d, sdkn, sdkd), (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(tile_ptrs(DV, tok_n, offs_d, sdvn, sdvd), dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def hifi_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    n_heads, slb, slh, N, H, W, n_win_w, n_virt, HEAD_DIM, scale, qk_scale_log2,
    S: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_virt, BLOCK_M)
    Q += _bh_bases(pid_bh, n_heads, sqb, sqh)
    K += _bh_bases(pid_bh, n_heads, skb, skh)
    V += _bh_bases(pid_bh, n_heads, svb, svh)
    DO += _bh_bases(pid_bh, n_heads, sdob, sdoh)
    DQ += _bh_bases(pid_bh, n_heads, sdqb, sdqh)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m, real_m, win_m, _ = _window_tokens(rows, n_virt, n_win_w, H, W, S)
    q_mask = real_m[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)
    do = tl.load(tile_ptrs(DO, tok_m, offs_d, sdon, sdod), mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + _bh_bases(pid_bh, n_heads, slb, slh) + tok_m, mask=real_m, other=0.0)
    delta = tl.load(DELTA + _bh_bases(pid_bh, n_heads, slb, slh) + tok_m, mask=real_m, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _window_span(pid_m * BLOCK_M, n_virt, S, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        tok_n, real_n, win_n, in_n = _window_tokens(cols, n_virt, n_win_w, H, W, S)
        kv_mask = real_n[:, None] & dmask[None, :]
        k = tl.load(tile_ptrs(K, tok_n, offs_d, skn, skd), mask=kv_mask, other=0.0)
        v = tl.load(tile_ptrs(V, tok_n, offs_d, svn, svd), mask=kv_mask, other=0.0)
        attend = real_m[:, None] & in_n[None, :] & (win_m[:, None] == win_n[None, :])
        p, ds = softmax_bwd_tile(q, k, v, do, lse2, delta, qk_scale_log2, attend, IEEE)
        dq += mma(ds.to(k.dtype), k, IEEE)

    tl.store(tile_ptrs(DQ, tok_m, offs_d, sdqn, sdqd), (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


# --------------------------------------------------------------------------------------------
# Lo-Fi: pooled-key kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def lofi_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    n_heads, slb, slh, N, KH, KW, pool_w, M, HEAD_DIM, qk_scale_log2,
    POOL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(N, BLOCK_M)
    Q += _bh_bases(pid_bh, n_heads, sqb, sqh)
    K += _bh_bases(pid_bh, n_heads, skb, skh)
    V += _bh_bases(pid_bh, n_heads, svb, svh)
    O += _bh_bases(pid_bh, n_heads, sob, soh)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_mask = (rows < N)[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, rows, offs_d, sqn, sqd), mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _pooled_tile(K, cols, M, pool_w, KH, KW, offs_d, dmask, skn, skd,
                         POOL, BLOCK_N, BLOCK_D)
        v = _pooled_tile(V, cols, M, pool_w, KH, KW, offs_d, dmask, svn, svd,
                         POOL, BLOCK_N, BLOCK_D)
        s = mma(q, tl.trans(k), IEEE) * qk_scale_log2
        s = tl.where((cols < M)[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, v, IEEE)

    out, lse2 = softmax_finish(m_i, l_i, acc)
    tl.store(tile_ptrs(O, rows, offs_d, son, sod), out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + _bh_bases(pid_bh, n_heads, slb, slh) + rows, lse2, mask=rows < N)


@triton.jit
def lofi_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, slb, slh, N, KH, KW, pool_w, M, HEAD_DIM, scale, qk_scale_log2,
    POOL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_n = program_coords(M, BLOCK_N)
    Q += _bh_bases(pid_bh, n_heads, sqb, sqh)
    K += _bh_bases(pid_bh, n_heads, skb, skh)
    V += _bh_bases(pid_bh, n_heads, svb, svh)
    DO += _bh_bases(pid_bh, n_heads, sdob, sdoh)
    DK += _bh_bases(pid_bh, n_heads, sdkb, sdkh)
    DV += _bh_bases(pid_bh, n_heads, sdvb, sdvh)
    LSE += _bh_bases(pid_bh, n_heads, slb, slh)
    DELTA += _bh_bases(pid_bh, n_heads, slb, slh)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _pooled_tile(K, cols, M, pool_w, KH, KW, offs_d, dmask, skn, skd, POOL, BLOCK_N, BLOCK_D)
    v = _pooled_tile(V, cols, M, pool_w, KH, KW, offs_d, dmask, svn, svd, POOL, BLOCK_N, BLOCK_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q_mask = (rows < N)[:, None] & dmask[None, :]
        q = tl.load(tile_ptrs(Q, rows, offs_d, sqn, sqd), mask=q_mask, other=0.0)
        do = tl.load(tile_ptrs(DO, rows, offs_d, sdon, sdod), mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + rows, mask=rows < N, other=0.0)
        delta = tl.load(DELTA + rows, mask=rows < N, other=0.0)
        attend = (rows < N)[:, None] & (cols < M)[None, :]
        p, ds = softmax_bwd_tile(q, k, v, do, lse2, delta, qk_scale_log2, attend, IEEE)
        dv += mma(tl.trans(p).to(do.dtype), do, IEEE)
        dk += mma(tl.trans(ds).to(q.dtype), q, IEEE)

    # Each source token of a pooled key receives 1/POOL² of its gradient.
    inv = 1.0 / (POOL * POOL)
    dk = (dk * (scale * inv)).to(DK.dtype.element_ty)
    dv = (dv * inv).to(DV.dtype.element_ty)
    pr = cols // pool_w
    pc = cols % pool_w
    for dy in tl.static_range(POOL):
        for dx in tl.static_range(POOL):
            r = pr * POOL + dy
            c = pc * POOL + dx
            ok = ((cols < M) & (r < KH) & (c < KW))[:, None] & dmask[None, :]
            tl.store(tile_ptrs(DK, r * KW + c, offs_d, sdkn, sdkd), dk, mask=ok)
            tl.store(tile_ptrs(DV, r * KW + c, offs_d, sdvn, sdvd), dv, mask=ok)


@triton.jit
def lofi_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    n_heads, slb, slh, N, KH, KW, pool_w, M, HEAD_DIM, scale, qk_scale_log2,
    POOL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(N, BLOCK_M)
    Q += _bh_bases(pid_bh, n_heads, sqb, sqh)
    K += _bh_bases(pid_bh, n_heads, skb, skh)
    V += _bh_bases(pid_bh, n_heads, svb, svh)
    DO += _bh_bases(pid_bh, n_heads, sdob, sdoh)
    DQ += _bh_bases(pid_bh, n_heads, sdqb, sdqh)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_mask = (rows < N)[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, rows, offs_d, sqn, sqd), mask=q_mask, other=0.0)
    do = tl.load(tile_ptrs(DO, rows, offs_d, sdon, sdod), mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + _bh_bases(pid_bh, n_heads, slb, slh) + rows, mask=rows < N, other=0.0)
    delta = tl.load(DELTA + _bh_bases(pid_bh, n_heads, slb, slh) + rows, mask=rows < N, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _pooled_tile(K, cols, M, pool_w, KH, KW, offs_d, dmask, skn, skd,
                         POOL, BLOCK_N, BLOCK_D)
        v = _pooled_tile(V, cols, M, pool_w, KH, KW, offs_d, dmask, svn, svd,
                         POOL, BLOCK_N, BLOCK_D)
        attend = (rows < N)[:, None] & (cols < M)[None, :]
        p, ds = softmax_bwd_tile(q, k, v, do, lse2, delta, qk_scale_log2, attend, IEEE)
        dq += mma(ds.to(k.dtype), k, IEEE)

    tl.store(tile_ptrs(DQ, rows, offs_d, sdqn, sdqd), (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in pairs]


def fwd_configs(BLOCK_D: int):
    """Forward tiles per head-dim class: the acc (BLOCK_M×BLOCK_D fp32) must fit in registers."""
    if BLOCK_D <= 64:
        return _configs([(64, 64, 4, 2), (128, 64, 4, 2), (32, 32, 2, 2)])
    if BLOCK_D <= 128:
        return _configs([(64, 64, 4, 2), (128, 32, 8, 2)])
    return _configs([(64, 32, 8, 1), (32, 32, 4, 1)])


def bwd_configs(BLOCK_D: int):
    """Backward tiles: dK and dV (two BLOCK_N×BLOCK_D fp32 accumulators) bound the size."""
    if BLOCK_D <= 64:
        return _configs([(64, 64, 4, 2), (32, 32, 2, 2)])
    if BLOCK_D <= 128:
        return _configs([(64, 32, 4, 2), (32, 32, 4, 2)])
    return _configs([(32, 32, 8, 1), (16, 16, 4, 1)])


_HIFI_KEY = ["n_virt", "HEAD_DIM", "S", "IEEE"]
_LOFI_KEY = ["N", "M", "HEAD_DIM", "POOL", "IEEE"]
hifi_fwd = Launcher(hifi_fwd_kernel, fwd_configs, _HIFI_KEY)
hifi_bwd_dkdv = Launcher(hifi_bwd_dkdv_kernel, bwd_configs, _HIFI_KEY)
hifi_bwd_dq = Launcher(hifi_bwd_dq_kernel, bwd_configs, _HIFI_KEY)
lofi_fwd = Launcher(lofi_fwd_kernel, fwd_configs, _LOFI_KEY)
lofi_bwd_dkdv = Launcher(lofi_bwd_dkdv_kernel, bwd_configs, _LOFI_KEY)
lofi_bwd_dq = Launcher(lofi_bwd_dq_kernel, bwd_configs, _LOFI_KEY)


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.hilo; inputs already validated there)
# --------------------------------------------------------------------------------------------


def _grid(bh: int, n: int, block: str):
    return lambda meta: (bh * cdiv(n, meta[block]),)


def _window_geometry(H: int, W: int, s: int):
    n_win_h, n_win_w = cdiv(H, s), cdiv(W, s)
    return n_win_w, n_win_h * n_win_w * s * s


def hifi_forward(q, k, v, o, lse, H: int, W: int, s: int, scale: float):
    """Window attention over every head of q, k, v (B, h, N, d) into o and lse2 (B, h, N)."""
    b, h, n, d = q.shape
    n_win_w, n_virt = _window_geometry(H, W, s)
    hifi_fwd(_grid(b * h, n_virt, "BLOCK_M"),
             q, k, v, o, lse, *strides4(q), *strides4(k), *strides4(v), *strides4(o),
             h, *lse.stride()[:2], n, H, W, n_win_w, n_virt, d, qk_scale_log2(scale),
             S=s, IEEE=q.dtype == torch.float32, BLOCK_D=block_d(d))


def hifi_backward(do, q, k, v, o, lse, dq, dk, dv, H: int, W: int, s: int, scale: float):
    b, h, n, d = q.shape
    delta = launch_delta(o, do, lse)
    n_win_w, n_virt = _window_geometry(H, W, s)
    common = (h, *lse.stride()[:2], n, H, W, n_win_w, n_virt, d, float(scale),
              qk_scale_log2(scale))
    meta = dict(S=s, IEEE=q.dtype == torch.float32, BLOCK_D=block_d(d))
    qkv = (*strides4(q), *strides4(k), *strides4(v), *strides4(do))
    hifi_bwd_dkdv(_grid(b * h, n_virt, "BLOCK_N"), q, k, v, do, lse, delta, dk, dv,
                  *qkv, *strides4(dk), *strides4(dv), *common, **meta)
    hifi_bwd_dq(_grid(b * h, n_virt, "BLOCK_M"), q, k, v, do, lse, delta, dq,
                *qkv, *strides4(dq), *common, **meta)


def _pool_geometry(H: int, W: int, s: int, kv_pooled: bool):
    """(KH, KW, POOL, pool_w, M) for the key map: full resolution, or already pooled."""
    if kv_pooled or s == 1:
        kh, kw = (cdiv(H, s), cdiv(W, s)) if kv_pooled else (H, W)
        return kh, kw, 1, kw, kh * kw
    return H, W, s, cdiv(W, s), cdiv(H, s) * cdiv(W, s)


def lofi_forward(q, k, v, o, lse, H: int, W: int, s: int, scale: float, kv_pooled: bool):
    """Attention of every query to s×s-pooled keys / values, into o and lse2 (B, h, N)."""
    b, h, n, d = q.shape
    kh, kw, pool, pool_w, m = _pool_geometry(H, W, s, kv_pooled)
    lofi_fwd(_grid(b * h, n, "BLOCK_M"),
             q, k, v, o, lse, *strides4(q), *strides4(k), *strides4(v), *strides4(o),
             h, *lse.stride()[:2], n, kh, kw, pool_w, m, d, qk_scale_log2(scale),
             POOL=pool, IEEE=q.dtype == torch.float32, BLOCK_D=block_d(d))


def lofi_backward(do, q, k, v, o, lse, dq, dk, dv, H: int, W: int, s: int, scale: float,
                  kv_pooled: bool):
    """dK / dV of every token are written: each token lies in exactly one (padded) block."""
    b, h, n, d = q.shape
    kh, kw, pool, pool_w, m = _pool_geometry(H, W, s, kv_pooled)
    delta = launch_delta(o, do, lse)
    common = (h, *lse.stride()[:2], n, kh, kw, pool_w, m, d, float(scale),
              qk_scale_log2(scale))
    meta = dict(POOL=pool, IEEE=q.dtype == torch.float32, BLOCK_D=block_d(d))
    qkv = (*strides4(q), *strides4(k), *strides4(v), *strides4(do))
    lofi_bwd_dkdv(_grid(b * h, m, "BLOCK_N"), q, k, v, do, lse, delta, dk, dv,
                  *qkv, *strides4(dk), *strides4(dv), *common, **meta)
    lofi_bwd_dq(_grid(b * h, n, "BLOCK_M"), q, k, v, do, lse, delta, dq,
                *qkv, *strides4(dq), *common, **meta)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot_compile.py compiles each for sm_80 and sm_90)
# --------------------------------------------------------------------------------------------

_AOT_DTYPES = {64: ("fp16", "fp32"), 128: ("fp16", "fp32")}  # other head dims: fp16 only


_POINTERS = ("Q", "K", "V", "O", "LSE", "DO", "DELTA", "DQ", "DK", "DV")


def _aot_signature(fn, ptr_dtype: str) -> tuple[dict, dict]:
    """Runtime-arg types of a launch on q, k, v viewed out of a packed projection.

    Token / batch / head strides are multiples of 16 there, channel strides are 1 (which the JIT
    turns into constants), sizes are plain i32, scales fp32.
    """
    sig, const = {}, {}
    for name in fn.arg_names:
        if name in ("S", "POOL", "IEEE", "BLOCK_M", "BLOCK_N", "BLOCK_D"):
            continue
        if name in _POINTERS:  # LSE and DELTA are fp32 whatever the input dtype
            sig[name] = "*fp32" if name in ("LSE", "DELTA") else f"*{ptr_dtype}"
        elif name.startswith("s") and name.endswith("d") and name != "scale":
            const[name] = 1
        elif name.startswith("s") and name not in ("scale",):
            sig[name] = "i32:16"
        elif name in ("scale", "qk_scale_log2"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, const


def aot_cases():
    from .aot import AotCase

    cases = []
    kernels = [
        ("hifi_fwd", hifi_fwd, {"S": 2}), ("hifi_bwd_dkdv", hifi_bwd_dkdv, {"S": 2}),
        ("hifi_bwd_dq", hifi_bwd_dq, {"S": 2}), ("lofi_fwd", lofi_fwd, {"POOL": 2}),
        ("lofi_bwd_dkdv", lofi_bwd_dkdv, {"POOL": 2}), ("lofi_bwd_dq", lofi_bwd_dq, {"POOL": 2}),
    ]
    for name, launcher, geometry in kernels:
        for bd in (16, 32, 64, 128, 256):
            for dtype in _AOT_DTYPES.get(bd, ("fp16",)):
                sig, const = _aot_signature(launcher.fn, dtype)
                for cfg in launcher.configs_for(bd):
                    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                    cases.append(AotCase(
                        name=f"hilo.{name}[{dtype},D={bd},BM={bm},BN={bn},w{cfg.num_warps}]",
                        fn=launcher.fn, signature=sig,
                        constexprs={**const, **geometry, "IEEE": dtype == "fp32",
                                    "BLOCK_D": bd, **cfg.kwargs},
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return cases
