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

import functools

import torch
import triton
import triton.language as tl

from .attention_core import (
    aot_precision,
    attention_dkdv,
    attention_dq,
    attention_fwd,
    bh_offset,
    block_d,
    cdiv,
    dot_precision,
    load_rows,
    no_dscore,
    program_coords,
    qk_scale_log2,
    row_grid,
    store_rows,
    strides_of,
    tile_ptrs,
    window_span,
)
from .tuning import Launcher, capability_reason, launch_key, table_candidates

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
def _attends(real_m, win_m, valid_n, win_n, WINDOW: tl.constexpr):
    mask = real_m[:, None] & valid_n[None, :]
    if WINDOW > 0:  # block-diagonal: only pairs inside one window
        mask = mask & (win_m[:, None] == win_n[None, :])
    return mask


# --------------------------------------------------------------------------------------------
# the engine's hooks (attention_core): ctx = (K, V, (skn, skd), (svn, svd), n_rows, n_keys,
# MH, MW, GW, DK, DV, (sdkn, sdkd), (sdvn, sdvd)), pointers at this (batch, head);
# CFG = (WINDOW, POOL, BLOCK_N, BLOCK_D)
# --------------------------------------------------------------------------------------------


@triton.jit
def _rows(ctx, CFG: tl.constexpr, rows):
    """Tile rows -> (raster token, real query?, window id); identity rows for Lo-Fi."""
    if CFG[0] > 0:
        tok, real, win, _ = _window_tokens(rows, ctx[4], ctx[8], ctx[6], ctx[7], CFG[0])
    else:
        tok, real, win = rows, rows < ctx[4], rows
    return tok, tok, real, win


@triton.jit
def _keys(ctx, CFG: tl.constexpr, cols, offs_d, dmask):
    """k, v tiles of key columns ``cols``, tagged (cols, window id, valid). Hi-Fi: window
    tokens, pad tokens read as zeros. Lo-Fi: POOL×POOL means pooled on the fly."""
    K, V, sk, sv = ctx[0], ctx[1], ctx[2], ctx[3]
    n_keys, MH, MW, GW = ctx[5], ctx[6], ctx[7], ctx[8]
    if CFG[0] > 0:
        tok, real, win, valid = _window_tokens(cols, n_keys, GW, MH, MW, CFG[0])
        k = load_rows(K, tok, offs_d, real, dmask, sk)
        v = load_rows(V, tok, offs_d, real, dmask, sv)
    else:
        k = _pooled_tile(K, cols, n_keys, GW, MH, MW, offs_d, dmask, sk[0], sk[1],
                         CFG[1], CFG[2], CFG[3])
        v = _pooled_tile(V, cols, n_keys, GW, MH, MW, offs_d, dmask, sv[0], sv[1],
                         CFG[1], CFG[2], CFG[3])
        win, valid = cols, cols < n_keys
    return k, v, (cols, win, valid)


@triton.jit
def _score(ctx, CFG: tl.constexpr, s, win_m, ktag, valid_m):
    return s, _attends(valid_m, win_m, ktag[2], ktag[1], CFG[0])


@triton.jit
def _span(ctx, CFG: tl.constexpr, start, BLOCK: tl.constexpr, OVER_KEYS: tl.constexpr):
    """Range of the other side that tile [start, start + BLOCK) meets: its windows, or all."""
    n = ctx[5] if OVER_KEYS else ctx[4]
    if CFG[0] > 0:
        lo, hi = window_span(start, n, CFG[0] * CFG[0], BLOCK)
    else:
        lo, hi = 0, n
    return lo, hi


@triton.jit
def _put_kv(ctx, CFG: tl.constexpr, ktag, offs_d, dmask, dk, dv, dbias):
    DK, DV, sdk, sdv, n_keys, MH, MW, GW = ctx[9], ctx[10], ctx[11], ctx[12], ctx[5], ctx[6], \
        ctx[7], ctx[8]
    cols, valid = ktag[0], ktag[2]
    if CFG[0] > 0:
        tok, real, _, _ = _window_tokens(cols, n_keys, GW, MH, MW, CFG[0])
        store_rows(DK, tok, offs_d, real, dmask, sdk, dk)
        store_rows(DV, tok, offs_d, real, dmask, sdv, dv)
    else:
        # Each source token of a pooled key receives 1/POOL² of its gradient.
        inv = 1.0 / (CFG[1] * CFG[1])
        dk = (dk * inv).to(DK.dtype.element_ty)
        dv = (dv * inv).to(DV.dtype.element_ty)
        pr = cols // GW
        pc = cols % GW
        for dy in tl.static_range(CFG[1]):
            for dx in tl.static_range(CFG[1]):
                r = pr * CFG[1] + dy
                c = pc * CFG[1] + dx
                ok = valid & (r < MH) & (c < MW)
                store_rows(DK, r * MW + c, offs_d, ok, dmask, sdk, dk)
                store_rows(DV, r * MW + c, offs_d, ok, dmask, sdv, dv)


@triton.jit
def _head_offset(pid_bh, n_heads, head0, sb, sh):
    """Offset of (batch, head0 + head) of program ``pid_bh`` over a group of ``n_heads`` heads:
    a head group is launched on the whole tensors (no per-group views on the host)."""
    return bh_offset(pid_bh, n_heads, sb, sh) + head0 * sh


@triton.jit
def _context(pid_bh, K, V, DK, DV, skb, skh, skn, skd, svb, svh, svn, svd, sdkb, sdkh, sdkn,
             sdkd, sdvb, sdvh, sdvn, sdvd, n_heads, head0, n_rows, n_keys, MH, MW, GW):
    """The hooks' ctx for program (batch·head) ``pid_bh`` (DK, DV: the dK/dV kernel's outputs,
    else any pointer)."""
    return (K + _head_offset(pid_bh, n_heads, head0, skb, skh),
            V + _head_offset(pid_bh, n_heads, head0, svb, svh),
            (skn, skd), (svn, svd), n_rows, n_keys, MH, MW, GW,
            DK + _head_offset(pid_bh, n_heads, head0, sdkb, sdkh),
            DV + _head_offset(pid_bh, n_heads, head0, sdvb, sdvh),
            (sdkn, sdkd), (sdvn, sdvd))


# --------------------------------------------------------------------------------------------
# kernels: WINDOW = s for Hi-Fi heads, WINDOW = 0 (and POOL = s or 1) for Lo-Fi heads
#
# Geometry (runtime): n_rows / n_keys = query / key positions of the tile space (the virtual
# window sequence for Hi-Fi, N tokens / M pooled keys for Lo-Fi); MH×MW the token map keys are
# read from; GW its width in windows or pooled blocks; N the token count (LSE is per token).
# Launched with keywords (see the host entry points below).
# --------------------------------------------------------------------------------------------


@triton.jit
def hilo_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    n_heads, head0, slb, slh, N, n_rows, n_keys, MH, MW, GW, HEAD_DIM, qk_scale_log2,
    WINDOW: tl.constexpr, POOL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_rows, BLOCK_M)
    ctx = _context(pid_bh, K, V, K, V, skb, skh, skn, skd, svb, svh, svn, svd, 0, 0, 0, 0, 0, 0,
                   0, 0, n_heads, head0, n_rows, n_keys, MH, MW, GW)
    Q += _head_offset(pid_bh, n_heads, head0, sqb, sqh)
    O += _head_offset(pid_bh, n_heads, head0, sob, soh)
    LSE += _head_offset(pid_bh, n_heads, head0, slb, slh)
    attention_fwd(Q, O, LSE, (sqn, sqd), (son, sod), pid_m, ctx,
                  (WINDOW, POOL, BLOCK_N, BLOCK_D), _rows, _keys, _score, _span, HEAD_DIM,
                  qk_scale_log2, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def hilo_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, head0, slb, slh, N, n_rows, n_keys, MH, MW, GW, HEAD_DIM, scale,
    qk_scale_log2,
    WINDOW: tl.constexpr, POOL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_n = program_coords(n_keys, BLOCK_N)
    ctx = _context(pid_bh, K, V, DK, DV, skb, skh, skn, skd, svb, svh, svn, svd, sdkb, sdkh,
                   sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, n_heads, head0, n_rows, n_keys, MH,
                   MW, GW)
    lse = _head_offset(pid_bh, n_heads, head0, slb, slh)
    # pad queries have no output, so no gradient: ROWS marks them invalid
    Q += _head_offset(pid_bh, n_heads, head0, sqb, sqh)
    DO += _head_offset(pid_bh, n_heads, head0, sdob, sdoh)
    attention_dkdv(Q, DO, LSE + lse, DELTA + lse, (sqn, sqd), (sdon, sdod), pid_n, ctx,
                   (WINDOW, POOL, BLOCK_N, BLOCK_D), _rows, _keys, _score, no_dscore, _span,
                   _put_kv, HEAD_DIM, scale, qk_scale_log2, False, DOT_PRECISION, BLOCK_M,
                   BLOCK_N, BLOCK_D)


@triton.jit
def hilo_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, O,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd, sob, soh, son, sod,
    n_heads, head0, slb, slh, N, n_rows, n_keys, MH, MW, GW, HEAD_DIM, scale,
    qk_scale_log2,
    WINDOW: tl.constexpr, POOL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_rows, BLOCK_M)
    ctx = _context(pid_bh, K, V, K, V, skb, skh, skn, skd, svb, svh, svn, svd, 0, 0, 0, 0, 0, 0,
                   0, 0, n_heads, head0, n_rows, n_keys, MH, MW, GW)
    lse = _head_offset(pid_bh, n_heads, head0, slb, slh)
    Q += _head_offset(pid_bh, n_heads, head0, sqb, sqh)
    DO += _head_offset(pid_bh, n_heads, head0, sdob, sdoh)
    DQ += _head_offset(pid_bh, n_heads, head0, sdqb, sdqh)
    O += _head_offset(pid_bh, n_heads, head0, sob, soh)
    # the rows' deltas are computed here and stored for the dK/dV kernel launched after this one
    attention_dq(Q, DO, DQ, LSE + lse, DELTA + lse, O, (sqn, sqd), (sdon, sdod), (sdqn, sdqd),
                 (son, sod), pid_m, ctx, (WINDOW, POOL, BLOCK_N, BLOCK_D), _rows, _keys, _score,
                 no_dscore, _span, HEAD_DIM, scale, qk_scale_log2, True, DOT_PRECISION,
                 BLOCK_M, BLOCK_N, BLOCK_D)


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
    n_heads, head0, slb, slh, n_win, MH, MW, GW, HEAD_DIM, qk_scale_log2,
    S: tl.constexpr, SS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_w = program_coords(n_win, BLOCK_W)
    Q += _head_offset(pid_bh, n_heads, head0, sqb, sqh)
    K += _head_offset(pid_bh, n_heads, head0, skb, skh)
    V += _head_offset(pid_bh, n_heads, head0, svb, svh)
    O += _head_offset(pid_bh, n_heads, head0, sob, soh)
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
    tl.store(LSE + _head_offset(pid_bh, n_heads, head0, slb, slh) + tok, m + tl.log2(l),
             mask=real)


@triton.jit
def hifi_small_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    n_heads, head0, n_win, MH, MW, GW, HEAD_DIM, scale, qk_scale_log2,
    S: tl.constexpr, SS: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_w = program_coords(n_win, BLOCK_W)
    Q += _head_offset(pid_bh, n_heads, head0, sqb, sqh)
    K += _head_offset(pid_bh, n_heads, head0, skb, skh)
    V += _head_offset(pid_bh, n_heads, head0, svb, svh)
    DO += _head_offset(pid_bh, n_heads, head0, sdob, sdoh)
    DQ += _head_offset(pid_bh, n_heads, head0, sdqb, sdqh)
    DK += _head_offset(pid_bh, n_heads, head0, sdkb, sdkh)
    DV += _head_offset(pid_bh, n_heads, head0, sdvb, sdvh)
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


@functools.lru_cache(maxsize=1024)  # read-only: computed once per map and mode
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



def _small(window: bool, s: int) -> bool:
    """Whether a head group runs the per-window Hi-Fi kernels."""
    return window and 2 <= s <= SMALL_WINDOW_MAX


def needs_delta(window: bool, s: int) -> bool:
    """Whether a head group's backward runs the packed kernels, which read rowsum(dO·O)."""
    return not _small(window, s)


@functools.lru_cache(maxsize=1024)
def _small_geometry(H: int, W: int, s: int) -> dict:
    """Runtime geometry and constexprs of the per-window kernels."""
    gw = cdiv(W, s)
    return dict(n_win=cdiv(H, s) * gw, MH=H, MW=W, GW=gw, S=s,
                SS=triton.next_power_of_2(s * s))


def _strides(**named) -> dict:
    """Strides of (B, h, N, d) tensors as the kernels name them: ``Q=q`` gives sqb .. sqd."""
    args = {}
    for name, t in named.items():
        args.update(strides_of(name.lower(), t))
    return args


def forward(q, k, v, o, lse, H: int, W: int, s: int, scale: float, window: bool,
            kv_pooled: bool = False, heads: slice | None = None):
    """Head group ``heads`` (all Hi-Fi if ``window`` else all Lo-Fi; None: every head) of q, k,
    v (B, heads, N, d) into o (B, heads, N, d) and the base-2 log-sum-exp ``lse`` (B, heads, N,
    fp32, token stride 1). The tensors are the whole ones: the kernels offset by the group's
    first head (no per-group views)."""
    b, n, d = q.shape[0], q.shape[2], q.shape[3]
    h0, h = (0, q.shape[1]) if heads is None else (heads.start, heads.stop - heads.start)
    key = launch_key(H, W, s, scale, window, kv_pooled, h0, h, q, k, v, o, lse)
    tensors = dict(Q=q, K=k, V=v, O=o, LSE=lse)

    def common():
        return dict(_strides(Q=q, K=k, V=v, O=o), **strides_of("l", lse, "bh"), n_heads=h,
                    head0=h0, HEAD_DIM=d, qk_scale_log2=qk_scale_log2(scale),
                    BLOCK_D=block_d(d))

    if _small(window, s):
        geo = _small_geometry(H, W, s)
        hifi_small_fwd.launch(key, row_grid(b * h, geo["n_win"], "BLOCK_W"), tensors,
                              lambda: dict(common(), **geo))
        return
    geo = _geometry(H, W, s, window, kv_pooled)
    hilo_fwd.launch(key, row_grid(b * h, geo["n_rows"], "BLOCK_M"), tensors,
                    lambda: dict(common(), N=n, **geo, DOT_PRECISION=dot_precision(q.dtype)))


def backward(do, q, k, v, o, lse, dq, dk, dv, H: int, W: int, s: int, scale: float,
             window: bool, kv_pooled: bool = False, heads: slice | None = None,
             delta: torch.Tensor | None = None):
    """Gradients of head group ``heads`` (as :func:`forward`) into dq, dk, dv; every element
    of the group's heads is written (each token lies in exactly one window / pooled block, pad
    tokens are never stored). ``delta``: a (B, heads, N) fp32 buffer laid out like ``lse`` that
    the packed dQ kernel fills for the group's rows before dK/dV reads it (allocated when
    None)."""
    b, n, d = q.shape[0], q.shape[2], q.shape[3]
    h0, h = (0, q.shape[1]) if heads is None else (heads.start, heads.stop - heads.start)
    key = launch_key(H, W, s, scale, window, kv_pooled, h0, h, q, k, v, o, lse, do, dq, dk, dv)

    def common(**more):
        return dict(_strides(Q=q, K=k, V=v, DO=do, **more), n_heads=h, head0=h0, HEAD_DIM=d,
                    scale=float(scale), qk_scale_log2=qk_scale_log2(scale), BLOCK_D=block_d(d))

    if _small(window, s):  # P recomputed exactly per window: o and lse are not needed
        geo = _small_geometry(H, W, s)
        hifi_small_bwd.launch(key, row_grid(b * h, geo["n_win"], "BLOCK_W"),
                              dict(Q=q, K=k, V=v, DO=do, DQ=dq, DK=dk, DV=dv),
                              lambda: dict(common(DQ=dq, DK=dk, DV=dv), **geo))
        return
    geo = _geometry(H, W, s, window, kv_pooled)
    if delta is None:
        delta = torch.empty_strided(lse.shape, lse.stride(), device=lse.device,
                                    dtype=torch.float32)
    tensors = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta)

    def rows(**more):
        return dict(common(**more), **strides_of("l", lse, "bh"), N=n, **geo,
                    DOT_PRECISION=dot_precision(q.dtype))

    # dQ first: it computes the rows' deltas (rowsum(dO∘O)) that dK/dV reads: no pre-pass
    hilo_bwd_dq.launch(key, row_grid(b * h, geo["n_rows"], "BLOCK_M"),
                       dict(tensors, DQ=dq, O=o), lambda: rows(DQ=dq, O=o))
    hilo_bwd_dkdv.launch(key, row_grid(b * h, geo["n_keys"], "BLOCK_N"),
                         dict(tensors, DK=dk, DV=dv), lambda: rows(DK=dk, DV=dv))


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
                    meta = dict(S=s, SS=triton.next_power_of_2(s * s), BLOCK_D=bd)
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
                    meta = dict(mode, DOT_PRECISION=aot_precision(dtype), BLOCK_D=bd)
                    specs.append(spec_from_launcher(f"hilo.{kname}.{mname}[{dtype},D={bd}]",
                                                    launcher, sig, const, meta))
    return specs
