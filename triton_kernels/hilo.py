"""Triton kernels for HiLo attention (LITv2): Hi-Fi window heads and Lo-Fi pooled-key heads.

One set of three kernels (forward, dK/dV, dQ) serves both head groups; the constexpr ``WINDOW``
picks the tile geometry (Hi-Fi: WINDOW = s; Lo-Fi: WINDOW = 0, POOL = s, or 1 for keys given as
they are), everything else is shared.

Hi-Fi (window mode). The s×s windows are laid end to end in a *virtual* sequence: virtual
index ``v = window * s² + slot`` with windows in raster order over the (padded) window grid and
slots row-major inside a window. A tile of virtual rows therefore holds many whole windows (16
windows of 4 tokens in a 64-row tile for s = 2) and its keys are the same virtual range, so one
tensor-core ``tl.dot`` with a block-diagonal mask serves them all. Virtual indices are turned into
raster token offsets on the fly: no window-partition copy is ever made. For windows larger than a
tile (s² > BLOCK) the key loop walks the window in BLOCK_N steps, flash-attention style. With
``pad="zero"`` the window grid covers ceil(H/s)×ceil(W/s) windows and tokens outside the map read
as zero keys/values (LITv2's unmasked zero padding); their queries are computed and not stored.

Lo-Fi (pool / direct mode). Queries are the N raster tokens; a key tile is the mean of s×s blocks
of the full-resolution k / v map, averaged in fp32 registers as it is loaded (divisor s² also for
border blocks of a zero-padded map), so the pooled tensor is never materialised. ``POOL = 1``
serves both global attention (window_size = 1) and callers that pass already-pooled k, v.
Backward: dK̄, dV̄ of a pooled key are spread back over its s² source tokens (÷ s²) by plain
stores — each token has exactly one pooled key, so no atomics and the result is deterministic.

Hi-Fi small windows (2 <= s <= SMALL_WINDOW_MAX): the packed tile above spends over 90% of its dot
FLOPs and exps on masked pairs at s = 2, so these run per-window kernels instead (a program holds
whole windows as (window, slot) rows, scores by broadcast multiply-reduce, exact softmax in
registers, and a single backward kernel: see the section below).

All other softmax math is the shared core in ``attention_core``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_core import (
    bh_offset,
    block_d,
    cdiv,
    exact_fp32,
    launch_delta,
    mma,
    program_coords,
    qk_scale_log2,
    row_grid,
    softmax_bwd_tile,
    softmax_finish,
    softmax_step,
    strides4,
    tile_ptrs,
    window_span,
)
from .tuning import Launcher, capability_reason, table_candidates

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
def _query_rows(rows, n_rows, GW, MH, MW, WINDOW: tl.constexpr):
    """Tile rows -> (raster token, real query?, window id); identity rows for Lo-Fi."""
    if WINDOW > 0:
        tok, real, win, _ = _window_tokens(rows, n_rows, GW, MH, MW, WINDOW)
    else:
        tok, real, win = rows, rows < n_rows, rows
    return tok, real, win


@triton.jit
def _key_tiles(K, V, cols, n_keys, GW, MH, MW, offs_d, dmask, skn, skd, svn, svd,
               WINDOW: tl.constexpr, POOL: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """k, v tiles [BLOCK_N, BLOCK_D] of key columns ``cols``, their window ids and validity.

    Hi-Fi: window tokens, pad tokens read as zeros. Lo-Fi: POOL×POOL means pooled on the fly.
    """
    if WINDOW > 0:
        tok, real, win, valid = _window_tokens(cols, n_keys, GW, MH, MW, WINDOW)
        kv_mask = real[:, None] & dmask[None, :]
        k = tl.load(tile_ptrs(K, tok, offs_d, skn, skd), mask=kv_mask, other=0.0)
        v = tl.load(tile_ptrs(V, tok, offs_d, svn, svd), mask=kv_mask, other=0.0)
    else:
        k = _pooled_tile(K, cols, n_keys, GW, MH, MW, offs_d, dmask, skn, skd,
                         POOL, BLOCK_N, BLOCK_D)
        v = _pooled_tile(V, cols, n_keys, GW, MH, MW, offs_d, dmask, svn, svd,
                         POOL, BLOCK_N, BLOCK_D)
        win, valid = cols, cols < n_keys
    return k, v, win, valid


@triton.jit
def _span(start, n, WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    """Range of the other side that tile [start, start + BLOCK) meets: its windows, or all n."""
    if WINDOW > 0:
        lo, hi = window_span(start, n, WINDOW * WINDOW, BLOCK)
    else:
        lo, hi = 0, n
    return lo, hi


@triton.jit
def _attends(real_m, win_m, valid_n, win_n, WINDOW: tl.constexpr):
    mask = real_m[:, None] & valid_n[None, :]
    if WINDOW > 0:  # block-diagonal: only pairs inside one window
        mask = mask & (win_m[:, None] == win_n[None, :])
    return mask


# --------------------------------------------------------------------------------------------
# kernels: WINDOW = s for Hi-Fi heads, WINDOW = 0 (and POOL = s or 1) for Lo-Fi heads
#
# Geometry (runtime): n_rows / n_keys = query / key positions of the tile space (the virtual
# window sequence for Hi-Fi, N tokens / M pooled keys for Lo-Fi); MH×MW the token map keys are
# read from; GW its width in windows or pooled blocks; N the token count (LSE is per token).
# --------------------------------------------------------------------------------------------


@triton.jit
def hilo_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    n_heads, slb, slh, N, n_rows, n_keys, MH, MW, GW, HEAD_DIM, qk_scale_log2,
    WINDOW: tl.constexpr, POOL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_rows, BLOCK_M)
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    O += bh_offset(pid_bh, n_heads, sob, soh)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m, real_m, win_m = _query_rows(rows, n_rows, GW, MH, MW, WINDOW)
    q_mask = real_m[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _span(pid_m * BLOCK_M, n_keys, WINDOW, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k, v, win_n, valid_n = _key_tiles(K, V, cols, n_keys, GW, MH, MW, offs_d, dmask, skn,
                                          skd, svn, svd, WINDOW, POOL, BLOCK_N, BLOCK_D)
        s = mma(q, tl.trans(k), IEEE) * qk_scale_log2
        s = tl.where(_attends(real_m, win_m, valid_n, win_n, WINDOW), s, float("-inf"))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, v, IEEE)

    out, lse2 = softmax_finish(m_i, l_i, acc)
    tl.store(tile_ptrs(O, tok_m, offs_d, son, sod), out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh_offset(pid_bh, n_heads, slb, slh) + tok_m, lse2, mask=real_m)


@triton.jit
def hilo_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, slb, slh, N, n_rows, n_keys, MH, MW, GW, HEAD_DIM, scale, qk_scale_log2,
    WINDOW: tl.constexpr, POOL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_n = program_coords(n_keys, BLOCK_N)
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    DK += bh_offset(pid_bh, n_heads, sdkb, sdkh)
    DV += bh_offset(pid_bh, n_heads, sdvb, sdvh)
    LSE += bh_offset(pid_bh, n_heads, slb, slh)
    DELTA += bh_offset(pid_bh, n_heads, slb, slh)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v, win_n, valid_n = _key_tiles(K, V, cols, n_keys, GW, MH, MW, offs_d, dmask, skn, skd,
                                      svn, svd, WINDOW, POOL, BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi = _span(pid_n * BLOCK_N, n_rows, WINDOW, BLOCK_N)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        tok_m, real_m, win_m = _query_rows(rows, n_rows, GW, MH, MW, WINDOW)
        q_mask = real_m[:, None] & dmask[None, :]  # pad queries have no output: no gradient
        q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)
        do = tl.load(tile_ptrs(DO, tok_m, offs_d, sdon, sdod), mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + tok_m, mask=real_m, other=0.0)
        delta = tl.load(DELTA + tok_m, mask=real_m, other=0.0)
        attend = _attends(real_m, win_m, valid_n, win_n, WINDOW)
        p, ds = softmax_bwd_tile(q, k, v, do, lse2, delta, qk_scale_log2, attend, IEEE)
        dv += mma(tl.trans(p).to(do.dtype), do, IEEE)
        dk += mma(tl.trans(ds).to(q.dtype), q, IEEE)

    if WINDOW > 0:
        tok_n, real_n, _, _ = _window_tokens(cols, n_keys, GW, MH, MW, WINDOW)
        kv_mask = real_n[:, None] & dmask[None, :]
        tl.store(tile_ptrs(DK, tok_n, offs_d, sdkn, sdkd), (dk * scale).to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(tile_ptrs(DV, tok_n, offs_d, sdvn, sdvd), dv.to(DV.dtype.element_ty),
                 mask=kv_mask)
    else:
        # Each source token of a pooled key receives 1/POOL² of its gradient.
        inv = 1.0 / (POOL * POOL)
        dk = (dk * (scale * inv)).to(DK.dtype.element_ty)
        dv = (dv * inv).to(DV.dtype.element_ty)
        pr = cols // GW
        pc = cols % GW
        for dy in tl.static_range(POOL):
            for dx in tl.static_range(POOL):
                r = pr * POOL + dy
                c = pc * POOL + dx
                ok = (valid_n & (r < MH) & (c < MW))[:, None] & dmask[None, :]
                tl.store(tile_ptrs(DK, r * MW + c, offs_d, sdkn, sdkd), dk, mask=ok)
                tl.store(tile_ptrs(DV, r * MW + c, offs_d, sdvn, sdvd), dv, mask=ok)


@triton.jit
def hilo_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    n_heads, slb, slh, N, n_rows, n_keys, MH, MW, GW, HEAD_DIM, scale, qk_scale_log2,
    WINDOW: tl.constexpr, POOL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_rows, BLOCK_M)
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    DQ += bh_offset(pid_bh, n_heads, sdqb, sdqh)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m, real_m, win_m = _query_rows(rows, n_rows, GW, MH, MW, WINDOW)
    q_mask = real_m[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)
    do = tl.load(tile_ptrs(DO, tok_m, offs_d, sdon, sdod), mask=q_mask, other=0.0)
    lse_base = bh_offset(pid_bh, n_heads, slb, slh)
    lse2 = tl.load(LSE + lse_base + tok_m, mask=real_m, other=0.0)
    delta = tl.load(DELTA + lse_base + tok_m, mask=real_m, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _span(pid_m * BLOCK_M, n_keys, WINDOW, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k, v, win_n, valid_n = _key_tiles(K, V, cols, n_keys, GW, MH, MW, offs_d, dmask, skn,
                                          skd, svn, svd, WINDOW, POOL, BLOCK_N, BLOCK_D)
        attend = _attends(real_m, win_m, valid_n, win_n, WINDOW)
        p, ds = softmax_bwd_tile(q, k, v, do, lse2, delta, qk_scale_log2, attend, IEEE)
        dq += mma(ds.to(k.dtype), k, IEEE)

    tl.store(tile_ptrs(DQ, tok_m, offs_d, sdqn, sdqd), (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


# --------------------------------------------------------------------------------------------
# Hi-Fi small windows (s <= SMALL_WINDOW_MAX): one window per row of a [BLOCK_W, SS] tile
#
# A packed block-diagonal tile wastes almost all of its tensor-core work on tiny windows (s = 2:
# 16 windows of 4 tokens in a 64×64 tile, ~2% of the dot FLOPs and exps are useful). Here a
# program takes BLOCK_W windows of one (batch, head), each as SS = next_pow2(s²) slots, and
# computes every window's SS×SS scores by a broadcast multiply-reduce over head-dim chunks of
# BLOCK_C in fp32 (CUDA cores: the windows are too small for tensor-core shapes, and Hi-Fi is
# memory-bound). The softmax is exact in registers (all of a window's keys are present), so the
# backward needs no log-sum-exp and no delta pre-pass: one kernel recomputes P and writes dq, dk,
# dv of its windows (a window's keys are its queries: no cross-program reduction, no atomics).
# --------------------------------------------------------------------------------------------


@triton.jit
def _small_windows(pid_w, n_win, GW, MH, MW, S: tl.constexpr, SS: tl.constexpr,
                   BLOCK_W: tl.constexpr):
    """[BLOCK_W, SS] raster tokens of this block's windows, real token?; [SS] slot in use?"""
    win = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    slot = tl.arange(0, SS)
    used = slot < S * S
    r = ((win // GW) * S)[:, None] + (slot // S)[None, :]
    c = ((win % GW) * S)[:, None] + (slot % S)[None, :]
    real = (win < n_win)[:, None] & used[None, :] & (r < MH) & (c < MW)
    return r * MW + c, real, used


@triton.jit
def _small_ptrs(base, tok, offs_c, stride_n, stride_d):
    """[BLOCK_W, SS, BLOCK_C] pointers of a (window, slot, channel) tile; int64 token offsets."""
    return base + tok.to(tl.int64)[:, :, None] * stride_n + offs_c[None, None, :] * stride_d


@triton.jit
def _small_load(base, tok, real, offs_c, HEAD_DIM, stride_n, stride_d):
    """fp32 (window, slot, channel) tile; pad tokens and channels read as zero."""
    mask = real[:, :, None] & (offs_c < HEAD_DIM)[None, None, :]
    return tl.load(_small_ptrs(base, tok, offs_c, stride_n, stride_d), mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _small_store(base, tok, real, offs_c, HEAD_DIM, stride_n, stride_d, x):
    mask = real[:, :, None] & (offs_c < HEAD_DIM)[None, None, :]
    tl.store(_small_ptrs(base, tok, offs_c, stride_n, stride_d),
             x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _small_softmax(s, used, qk_scale_log2):
    """Row softmax of [BLOCK_W, SS, SS] dot products over the used key slots: (P, row max, row
    sum), base 2. Pad tokens of the map's last windows stay in as zero keys (LITv2's padding)."""
    s = tl.where(used[None, None, :], s * qk_scale_log2, float("-inf"))
    m = tl.max(s, 2)  # finite: slot 0 is always used
    p = tl.exp2(s - m[:, :, None])
    l = tl.sum(p, 2)
    return p / l[:, :, None], m, l


@triton.jit
def hifi_small_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    n_heads, slb, slh, n_win, MH, MW, GW, HEAD_DIM, qk_scale_log2,
    S: tl.constexpr, SS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_w = program_coords(n_win, BLOCK_W)
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    O += bh_offset(pid_bh, n_heads, sob, soh)
    tok, real, used = _small_windows(pid_w, n_win, GW, MH, MW, S, SS, BLOCK_W)

    s = tl.zeros([BLOCK_W, SS, SS], tl.float32)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        q = _small_load(Q, tok, real, offs_c, HEAD_DIM, sqn, sqd)
        k = _small_load(K, tok, real, offs_c, HEAD_DIM, skn, skd)
        s += tl.sum(q[:, :, None, :] * k[:, None, :, :], 3)
    p, m, l = _small_softmax(s, used, qk_scale_log2)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        v = _small_load(V, tok, real, offs_c, HEAD_DIM, svn, svd)
        _small_store(O, tok, real, offs_c, HEAD_DIM, son, sod,
                     tl.sum(p[:, :, :, None] * v[:, None, :, :], 2))
    tl.store(LSE + bh_offset(pid_bh, n_heads, slb, slh) + tok, m + tl.log2(l), mask=real)


@triton.jit
def hifi_small_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    n_heads, n_win, MH, MW, GW, HEAD_DIM, scale, qk_scale_log2,
    S: tl.constexpr, SS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_w = program_coords(n_win, BLOCK_W)
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    DQ += bh_offset(pid_bh, n_heads, sdqb, sdqh)
    DK += bh_offset(pid_bh, n_heads, sdkb, sdkh)
    DV += bh_offset(pid_bh, n_heads, sdvb, sdvh)
    tok, real, used = _small_windows(pid_w, n_win, GW, MH, MW, S, SS, BLOCK_W)

    # Pad queries read dO = 0 (they have no output), so their rows of dS and P·dO vanish.
    s = tl.zeros([BLOCK_W, SS, SS], tl.float32)
    dp = tl.zeros([BLOCK_W, SS, SS], tl.float32)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        q = _small_load(Q, tok, real, offs_c, HEAD_DIM, sqn, sqd)
        k = _small_load(K, tok, real, offs_c, HEAD_DIM, skn, skd)
        v = _small_load(V, tok, real, offs_c, HEAD_DIM, svn, svd)
        do = _small_load(DO, tok, real, offs_c, HEAD_DIM, sdon, sdod)
        s += tl.sum(q[:, :, None, :] * k[:, None, :, :], 3)
        dp += tl.sum(do[:, :, None, :] * v[:, None, :, :], 3)
    p, _, _ = _small_softmax(s, used, qk_scale_log2)
    # delta = rowsum(dO ∘ O) = rowsum(P ∘ dP): from what is in registers, no pass over O.
    ds = p * (dp - tl.sum(p * dp, 2)[:, :, None]) * scale
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        if BLOCK_C < BLOCK_D:  # several chunks: the first loop's tiles are gone, read again
            q = _small_load(Q, tok, real, offs_c, HEAD_DIM, sqn, sqd)
            k = _small_load(K, tok, real, offs_c, HEAD_DIM, skn, skd)
            do = _small_load(DO, tok, real, offs_c, HEAD_DIM, sdon, sdod)
        _small_store(DQ, tok, real, offs_c, HEAD_DIM, sdqn, sdqd,
                     tl.sum(ds[:, :, :, None] * k[:, None, :, :], 2))
        _small_store(DK, tok, real, offs_c, HEAD_DIM, sdkn, sdkd,
                     tl.sum(ds[:, :, :, None] * q[:, :, None, :], 1))
        _small_store(DV, tok, real, offs_c, HEAD_DIM, sdvn, sdvd,
                     tl.sum(p[:, :, :, None] * do[:, :, None, :], 1))


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

# Tile candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, mode and (BLOCK_D,
# fp32?), preferred first (the largest spill-free tiles of a sweep), then tuning.FALLBACK_TILES.
# Pure tuning: the launcher drops those that spill on the machine that runs them (tuning.py).
# Modes: "window" = Hi-Fi, "pool" = Lo-Fi pooling s×s in the kernel, "direct" = Lo-Fi on keys as
# given (pre-pooled, or s = 1).
TILES = {
    "fwd": {
        "window": {
            (16, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (64, False): [(64, 64, 4, 2)],
            (128, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (256, False): [(64, 64, 8, 2), (64, 32, 8, 1)],
            (16, True): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, True): [(64, 64, 8, 2)],
            (64, True): [(64, 32, 4, 2), (32, 32, 4, 2)],
            (128, True): [(16, 16, 8, 1)],
            (256, True): [(16, 16, 8, 1)],
        },
        "pool": {
            (16, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (64, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (128, False): [(64, 64, 8, 2), (64, 32, 8, 1)],
            (256, False): [(16, 16, 8, 1)],
            (16, True): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, True): [(64, 32, 4, 2)],
            (64, True): [(32, 32, 4, 2), (32, 32, 8, 1)],
            (128, True): [(32, 32, 8, 1), (16, 16, 4, 1)],
        },
        "direct": {
            (16, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (64, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (128, False): [(128, 64, 8, 2)],
            (256, False): [(64, 32, 8, 1), (32, 32, 4, 2)],
            (16, True): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, True): [(128, 64, 8, 2), (64, 64, 8, 2)],
            (64, True): [(64, 32, 8, 1)],
            (128, True): [(32, 32, 8, 1), (16, 16, 4, 1)],
            (256, True): [(16, 16, 8, 1)],
        },
    },
    "dkdv": {
        "window": {
            (16, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (64, False): [(64, 64, 8, 2), (64, 32, 4, 2)],
            (128, False): [(32, 32, 4, 2), (32, 16, 4, 1)],
            (256, False): [(32, 32, 8, 1), (32, 16, 4, 1)],
            (16, True): [(64, 32, 4, 2), (32, 32, 4, 2)],
            (32, True): [(32, 16, 4, 1), (16, 16, 4, 1)],
            (64, True): [(32, 32, 8, 1), (16, 16, 4, 1)],
            (128, True): [(16, 16, 8, 1)],
        },
        "pool": {
            (16, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (64, False): [(64, 32, 4, 2), (64, 32, 8, 1)],
            (128, False): [(64, 32, 8, 1), (32, 32, 4, 2)],
            (256, False): [(32, 32, 8, 1), (32, 16, 4, 1)],
            (16, True): [(32, 32, 4, 2), (32, 32, 8, 1)],
            (32, True): [(32, 16, 4, 1), (16, 16, 4, 1)],
            (64, True): [(32, 32, 8, 1), (32, 16, 4, 1)],
            (128, True): [(16, 16, 8, 1)],
        },
        "direct": {
            (16, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (64, False): [(64, 32, 4, 2)],
            (128, False): [(64, 64, 8, 2)],
            (256, False): [(32, 32, 8, 1), (32, 16, 4, 1)],
            (16, True): [(64, 32, 4, 2), (32, 32, 4, 2)],
            (32, True): [(32, 16, 4, 1), (16, 16, 4, 1)],
            (64, True): [(32, 32, 8, 1), (16, 16, 8, 1)],
            (128, True): [(16, 16, 8, 1)],
        },
    },
    "dq": {
        "window": {
            (16, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, False): [(64, 64, 4, 2), (64, 64, 8, 2)],
            (64, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (128, False): [(64, 64, 8, 2), (64, 32, 4, 2)],
            (256, False): [(32, 32, 4, 2), (16, 16, 4, 1)],
            (16, True): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, True): [(64, 32, 8, 1), (16, 16, 4, 1)],
            (64, True): [(32, 32, 8, 1), (16, 16, 4, 1)],
            (128, True): [(16, 16, 4, 1), (16, 16, 8, 1)],
        },
        "pool": {
            (16, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (64, False): [(64, 32, 4, 2), (32, 32, 4, 2)],
            (128, False): [(64, 32, 4, 2), (64, 32, 8, 1)],
            (16, True): [(64, 32, 4, 2), (64, 32, 8, 1)],
            (32, True): [(32, 16, 4, 1), (16, 16, 8, 1)],
            (64, True): [(32, 32, 4, 2), (32, 32, 8, 1)],
        },
        "direct": {
            (16, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (32, False): [(128, 64, 8, 2), (64, 64, 4, 2)],
            (64, False): [(64, 32, 4, 2), (32, 32, 4, 2)],
            (128, False): [(64, 32, 4, 2), (64, 32, 8, 1)],
            (256, False): [(32, 32, 4, 2), (16, 16, 4, 1)],
            (16, True): [(64, 32, 4, 2), (64, 32, 8, 1)],
            (32, True): [(32, 16, 4, 1), (16, 16, 8, 1)],
            (64, True): [(32, 32, 8, 1)],
            (128, True): [(16, 16, 8, 1)],
        },
    },
}


def _mode(WINDOW: int, POOL: int) -> str:
    return "window" if WINDOW else ("pool" if POOL > 1 else "direct")


def _candidates(kernel: str):
    by_mode = {mode: table_candidates(table) for mode, table in TILES[kernel].items()}

    def candidates(*, WINDOW, POOL, **meta):
        return by_mode[_mode(WINDOW, POOL)](**meta)
    return candidates


# Declared capability: the largest head dim per (mode, fp32?, direction). Beyond it no tile fits
# in registers (tests/test_aot_compile.py proves a candidate fits within it, with the installed
# compiler, for every kernel and mode). fp32 Lo-Fi training on keys as given stops at 64: every
# dK/dV tile of head dim 128 spills on sm_90 with triton 3.8 (its forward fits).
MAX_HEAD_DIM = {("window", False, "fwd"): 256, ("window", True, "fwd"): 128,
                ("window", False, "bwd"): 256, ("window", True, "bwd"): 128,
                ("pool", False, "fwd"): 128, ("pool", True, "fwd"): 64,
                ("pool", False, "bwd"): 128, ("pool", True, "bwd"): 64,
                ("direct", False, "fwd"): 256, ("direct", True, "fwd"): 128,
                ("direct", False, "bwd"): 256, ("direct", True, "bwd"): 64}


def unsupported(head_dim: int, fp32: bool, window: int, pool: int, backward: bool = True):
    """Why the triton backend refuses this head group (None when it is within the capability);
    ``backward``: whether the gradient kernels are needed too."""
    mode = _mode(window, pool)
    hint = "; pool k, v first (kv_pooled=True)" if mode == "pool" else ""
    if why := capability_reason(f"HiLo in {mode} mode", head_dim, fp32,
                                MAX_HEAD_DIM[mode, fp32, "fwd"], hint):
        return why
    if backward:
        return capability_reason(f"HiLo's backward in {mode} mode", head_dim, fp32,
                                 MAX_HEAD_DIM[mode, fp32, "bwd"],
                                 hint + " (inference works; train in float16 / bfloat16)")
    return None


_KEY = ["n_rows", "n_keys", "HEAD_DIM"]
hilo_fwd = Launcher(hilo_fwd_kernel, _candidates("fwd"), _KEY)
hilo_bwd_dkdv = Launcher(hilo_bwd_dkdv_kernel, _candidates("dkdv"), _KEY)
hilo_bwd_dq = Launcher(hilo_bwd_dq_kernel, _candidates("dq"), _KEY)

# Hi-Fi windows of s <= SMALL_WINDOW_MAX run the per-window kernels; larger ones (and s = 1) the
# packed tile kernels above, whose useful fraction grows with s² (s = 8: one window per tile).
SMALL_WINDOW_MAX = 4

# Per-window tiles: (fp32 elements of one broadcast product [BLOCK_W, SS, SS, BLOCK_C] per
# program, num_warps), preferred first; BLOCK_C (head-dim chunk) is the whole head dim where it
# fits, so the backward reads each input once, and BLOCK_W fills the rest with windows.
SMALL_TILES = {"fwd": ((8192, 8), (4096, 4), (4096, 8), (2048, 4), (1024, 4)),
               "bwd": ((8192, 8), (4096, 8), (4096, 4), (2048, 4), (1024, 4))}


def _small_candidates(kernel: str):
    def candidates(*, SS, BLOCK_D, **_):
        configs = {}
        for elems, warps in SMALL_TILES[kernel]:
            c = min(BLOCK_D, max(1, elems // (SS * SS)))
            w = max(1, elems // (SS * SS * c))
            configs.setdefault((w, c, warps), triton.Config(
                {"BLOCK_W": w, "BLOCK_C": c}, num_warps=warps, num_stages=1))
        return list(configs.values())
    return candidates


hifi_small_fwd = Launcher(hifi_small_fwd_kernel, _small_candidates("fwd"), ["n_win", "HEAD_DIM"])
hifi_small_bwd = Launcher(hifi_small_bwd_kernel, _small_candidates("bwd"), ["n_win", "HEAD_DIM"])


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.hilo on inputs it has validated)
# --------------------------------------------------------------------------------------------


def _geometry(H: int, W: int, s: int, window: bool, kv_pooled: bool) -> dict:
    """Tile-space geometry and mode constexprs of one head group."""
    if window:  # virtual sequence of ceil(H/s)·ceil(W/s) windows of s² tokens
        gw = cdiv(W, s)
        n_virt = cdiv(H, s) * gw * s * s
        return dict(n_rows=n_virt, n_keys=n_virt, MH=H, MW=W, GW=gw, WINDOW=s, POOL=1)
    if kv_pooled or s == 1:  # keys as given: pooled map, or the full map for s = 1
        mh, mw = (cdiv(H, s), cdiv(W, s)) if kv_pooled else (H, W)
        return dict(n_rows=H * W, n_keys=mh * mw, MH=mh, MW=mw, GW=mw, WINDOW=0, POOL=1)
    gw = cdiv(W, s)
    return dict(n_rows=H * W, n_keys=cdiv(H, s) * gw, MH=H, MW=W, GW=gw, WINDOW=0, POOL=s)



def _split(geo: dict):
    sizes = (geo["n_rows"], geo["n_keys"], geo["MH"], geo["MW"], geo["GW"])
    return sizes, dict(WINDOW=geo["WINDOW"], POOL=geo["POOL"])


def _small(window: bool, s: int) -> bool:
    """Whether a head group runs the per-window Hi-Fi kernels."""
    return window and 2 <= s <= SMALL_WINDOW_MAX


def _small_geometry(H: int, W: int, s: int, d: int):
    """(n_win, MH, MW, GW) and the constexprs of the per-window kernels."""
    gw = cdiv(W, s)
    return ((cdiv(H, s) * gw, H, W, gw),
            dict(S=s, SS=triton.next_power_of_2(s * s), BLOCK_D=block_d(d)))


def forward(q, k, v, o, lse, H: int, W: int, s: int, scale: float, window: bool,
            kv_pooled: bool = False):
    """One head group (all Hi-Fi if ``window`` else all Lo-Fi) of q, k, v (B, h, N, d) into
    o (B, h, N, d) and the base-2 log-sum-exp ``lse`` (B, h, N, fp32, token stride 1)."""
    b, h, n, d = q.shape
    if _small(window, s):
        sizes, meta = _small_geometry(H, W, s, d)
        hifi_small_fwd(row_grid(b * h, sizes[0], "BLOCK_W"),
                       q, k, v, o, lse, *strides4(q), *strides4(k), *strides4(v), *strides4(o),
                       h, *lse.stride()[:2], *sizes, d, qk_scale_log2(scale), **meta)
        return
    geo = _geometry(H, W, s, window, kv_pooled)
    sizes, mode = _split(geo)
    hilo_fwd(row_grid(b * h, geo["n_rows"], "BLOCK_M"),
             q, k, v, o, lse, *strides4(q), *strides4(k), *strides4(v), *strides4(o),
             h, *lse.stride()[:2], n, *sizes, d, qk_scale_log2(scale),
             **mode, IEEE=exact_fp32(q.dtype), BLOCK_D=block_d(d))


def backward(do, q, k, v, o, lse, dq, dk, dv, H: int, W: int, s: int, scale: float,
             window: bool, kv_pooled: bool = False):
    """Gradients of one head group into dq, dk, dv; every element of them is written (each
    token lies in exactly one window / pooled block, pad tokens are never stored)."""
    b, h, n, d = q.shape
    if _small(window, s):  # P recomputed exactly per window: o and lse are not needed
        sizes, meta = _small_geometry(H, W, s, d)
        hifi_small_bwd(row_grid(b * h, sizes[0], "BLOCK_W"), q, k, v, do, dq, dk, dv,
                       *strides4(q), *strides4(k), *strides4(v), *strides4(do), *strides4(dq),
                       *strides4(dk), *strides4(dv), h, *sizes, d, float(scale),
                       qk_scale_log2(scale), **meta)
        return
    geo = _geometry(H, W, s, window, kv_pooled)
    sizes, mode = _split(geo)
    delta = launch_delta(o, do, lse)
    common = (h, *lse.stride()[:2], n, *sizes, d, float(scale), qk_scale_log2(scale))
    meta = dict(**mode, IEEE=exact_fp32(q.dtype), BLOCK_D=block_d(d))
    qkv = (*strides4(q), *strides4(k), *strides4(v), *strides4(do))
    hilo_bwd_dkdv(row_grid(b * h, geo["n_keys"], "BLOCK_N"), q, k, v, do, lse, delta, dk, dv,
                  *qkv, *strides4(dk), *strides4(dv), *common, **meta)
    hilo_bwd_dq(row_grid(b * h, geo["n_rows"], "BLOCK_M"), q, k, v, do, lse, delta, dq,
                *qkv, *strides4(dq), *common, **meta)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot_compile.py compiles each for sm_80 and sm_90)
# --------------------------------------------------------------------------------------------

_POINTERS = ("Q", "K", "V", "O", "LSE", "DO", "DELTA", "DQ", "DK", "DV")


def _aot_signature(fn, ptr_dtype: str) -> tuple[dict, dict]:
    """Runtime-arg types of a launch on q, k, v viewed out of a packed projection (see
    :func:`.aot.launch_signature`; LSE and DELTA are fp32 whatever the input dtype)."""
    pointers = {n: "*fp32" if n in ("LSE", "DELTA") else f"*{ptr_dtype}" for n in _POINTERS}
    from .aot import launch_signature

    return launch_signature(fn, pointers)



def aot_specs():
    """Every kernel × mode (Hi-Fi per window, s = 2 and 4; Hi-Fi packed tiles, s = 5; Lo-Fi
    pooling 2×2 and pre-pooled) × declared head-dim class × fp16/fp32, each with its tile
    candidates. bf16 compiles like fp16."""
    from .aot import spec_from_launcher

    specs = []
    for kname, launcher in (("fwd", hifi_small_fwd), ("bwd", hifi_small_bwd)):
        # s = 3 pads its 9 tokens to 16 slots like s = 4: the same tile shapes, so s = 2 and
        # s = 4 prove the register budget of every per-window specialisation
        for s in (2, SMALL_WINDOW_MAX):
            for dtype in ("fp16", "fp32"):
                sig, const = _aot_signature(launcher.fn, dtype)
                for bd in (16, 32, 64, 128, 256):
                    if unsupported(bd, dtype == "fp32", s, 1, backward=kname != "fwd"):
                        continue
                    _, meta = _small_geometry(s, s, s, bd)
                    specs.append(spec_from_launcher(f"hilo.{kname}.hifi_small_s{s}[{dtype},D={bd}]",
                                                    launcher, sig, const, meta))
    modes = {"hifi": dict(WINDOW=SMALL_WINDOW_MAX + 1, POOL=1), "lofi": dict(WINDOW=0, POOL=2),
             "lofi_pooled": dict(WINDOW=0, POOL=1)}
    for kname, launcher in (("fwd", hilo_fwd), ("dkdv", hilo_bwd_dkdv), ("dq", hilo_bwd_dq)):
        for mname, mode in modes.items():
            for dtype in ("fp16", "fp32"):
                sig, const = _aot_signature(launcher.fn, dtype)
                for bd in (16, 32, 64, 128, 256):
                    if unsupported(bd, dtype == "fp32", mode["WINDOW"], mode["POOL"],
                                   backward=kname != "fwd"):
                        continue  # outside the declared capability: nothing to prove
                    meta = dict(mode, IEEE=dtype == "fp32", BLOCK_D=bd)
                    specs.append(spec_from_launcher(f"hilo.{kname}.{mname}[{dtype},D={bd}]",
                                                    launcher, sig, const, meta))
    return specs
