"""Triton kernels for Swin window attention (W-MSA / SW-MSA with relative position bias).

Geometry. Windows (wh × ww with shift (sh, sw): WH, WW constexprs and SH, SW runtime ints; below
ws² means wh·ww and s the shift of the axis at hand) are read straight from the (B, heads, N, d)
raster map by index math: no roll, no pad, no partition copy and no materialised (nW, N, N) mask.
Like HiLo's Hi-Fi heads, the windows of the *shifted, padded* frame (Hp×Wp) are laid end to end
in a virtual sequence ``v = window * NS + slot`` (windows raster over the window grid, slots
row-major inside a window, NS = ws² rounded up to a multiple of 16 by :func:`window_slots`, the
extra slots empty), so a tile holds whole windows (Swin's 49-token windows take 64 slots: a
64-row tile is one window) and a block-diagonal mask keeps windows apart where a tile holds
several. A virtual index becomes a token on the fly:

    (window, slot) -> frame position (r', c') -> source (r, c) = ((r' + s) mod MH, (c' + s) mod MW)

with MH = H for timm's "shift_then_pad" (roll the map, then pad: frame rows r' >= H are padding)
and MH = Hp for mmdet's "pad_then_shift" (pad, then roll: a frame row is padding when its source
row r >= H). Pad tokens read as zero keys / values and take part in the softmax (no reference
masks them); pad queries are computed and not stored.

The SW-MSA mask is Swin's region-id mask, computed from the frame position: on each axis the
slices [0, P-ws), [P-ws, P-s), [P-s, P) of the padded length P get ids 0, 1, 2 and a pair of
tokens in different regions gets ``mask_value`` (-100) added. The bias is read by index from the
((2ws-1)², heads) table, or from a dense (heads, ws², ws²) bias: both are addressed as
``BIAS + h*sbh + boff + i_q*b0 + j_q*b1 + i_k*b2 + j_k*b3`` for window-local coordinates (i, j),
strides chosen on the host (the table's are negative for the key side).

Backward: FlashAttention-2 style (dQ per query tile, which also computes and stores the rows'
deltas rowsum(dO∘O), then dK/dV per key tile reading them; no delta pre-pass, no atomics).

Bias gradient, deterministic and without atomics: ``window_bwd_dbias_kernel`` runs one program
per (head, chunk of (batch, window) pairs, query-slot block, key-slot block); it walks its
chunk's windows in a fixed order, recomputes dS for that slot-pair block of each window and sums
it in registers, then writes one fp32 partial (ws², ws²) block to a scratch buffer (n_chunks,
heads, ws², ws²). One launch of ``window_dbias_fold_kernel`` sums the chunks and, for a table,
folds the pairs of each table row (listed by ``fold_gather`` in a fixed order), writing the
gradient in the bias's dtype. Every step has a fixed summation order, so the result is bitwise
reproducible. The pass recomputes QKᵀ and dO·Vᵀ; it reads q, k, v, dO once (the chunking keeps
the scratch at most ~256 partials per head). Where its tile's key-slot block can hold a whole
window (``WITH_DQ``: Swin's 16-bit head dims up to 32 at ws = 7, every head dim for windows of
up to 32 tokens) it also writes dq from the same dS tile, and the dQ kernel is not launched:
the bias gradient then costs no pass of its own.

Active windows (SparseViT): with ``HAS_ACTIVE`` the virtual sequence lists only the K kept windows
of each image, ``v = k * NS + slot``, and the k-th virtual window is window ``AW[b, k]`` of the
frame (an int32 (B, K) id list read in the kernel: no gathered copy). Tokens of other windows are
neither read nor written (the host zero-fills the outputs and gradients they would own), and the
bias-gradient kernel sums over the B·K kept (image, window) pairs only.

All softmax math is the shared core in ``attention_core``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention_core import (
    LOG2E,
    aot_precision,
    attention_dkdv,
    attention_dq,
    attention_fwd,
    bh_offset,
    block_d,
    cdiv,
    dot_precision,
    load_rows,
    mma,
    no_dscore,
    program_coords,
    qk_scale_log2,
    row_grid,
    softmax_bwd_ds,
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
def _tokens(win, slot, in_range, geo, WH: tl.constexpr, WW: tl.constexpr):
    """(window, slot) -> (raster token, real?, local row, local col, region id); ``geo`` the
    runtime geometry tuple (n_virt, GW, H, W, MH, MW, LH, LW, Hp, Wp, SH, SW)."""
    GW, H, W, MH, MW, LH, LW = geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7]
    Hp, Wp, SH, SW = geo[8], geo[9], geo[10], geo[11]
    i = slot // WW
    j = slot % WW
    rp = (win // GW) * WH + i
    cp = (win % GW) * WW + j
    r = (rp + SH) % MH
    c = (cp + SW) % MW
    real = in_range & (rp < LH) & (cp < LW) & (r < H) & (c < W)
    # Swin's region ids on the padded frame (rp >= Hp - 0 never holds: an axis without shift
    # splits only at a window boundary, so no window mixes regions along it)
    region = ((rp >= Hp - WH).to(tl.int32) + (rp >= Hp - SH).to(tl.int32)) * 3 \
        + (cp >= Wp - WW).to(tl.int32) + (cp >= Wp - SW).to(tl.int32)
    return r * W + c, real, i, j, region


@triton.jit
def _virtual(idx, AW, geo, CFG: tl.constexpr):
    """Virtual index -> (token, real?, virtual window, in range?, i, j, region); NS virtual
    slots per window, the last NS - wh·ww of them empty. With HAS_ACTIVE the k-th virtual
    window is window AW[k] of the frame (AW: this image's row of active window ids), else
    window k. CFG = (WH, WW, NS, HAS_BIAS, HAS_ACTIVE)."""
    vwin = idx // CFG[2]
    slot = idx % CFG[2]
    in_range = (idx < geo[0]) & (slot < CFG[0] * CFG[1])
    if CFG[4]:
        win = tl.load(AW + vwin, mask=in_range, other=0)
    else:
        win = vwin
    tok, real, i, j, region = _tokens(win, slot, in_range, geo, CFG[0], CFG[1])
    return tok, real, vwin, in_range, i, j, region


@triton.jit
def _extra2(bias, i_m, j_m, reg_m, i_n, j_n, reg_n, attend, HAS_BIAS: tl.constexpr):
    """Bias + shift mask of a tile, base-2 units (fp32); bias = (BIAS at this head, boff, b0,
    b1, b2, b3, mask2) (see the module docstring)."""
    BIAS, boff, b0, b1, b2, b3, mask2 = bias
    extra = tl.where(reg_m[:, None] != reg_n[None, :], mask2, 0.0)
    if HAS_BIAS:
        off = (boff + (i_m * b0 + j_m * b1)[:, None] + (i_n * b2 + j_n * b3)[None, :])
        extra += tl.load(BIAS + off, mask=attend, other=0.0).to(tl.float32) * 1.4426950408889634
    return extra


# --------------------------------------------------------------------------------------------
# the engine's hooks (attention_core): ctx = (K, V, (skn, skd), (svn, svd), AW, geo, bias,
# DK, DV, (sdkn, sdkd), (sdvn, sdvd)), CFG = (WH, WW, NS, HAS_BIAS, HAS_ACTIVE)
# --------------------------------------------------------------------------------------------


@triton.jit
def _rows(ctx, CFG: tl.constexpr, idx):
    tok, real, win, _, i, j, region = _virtual(idx, ctx[4], ctx[5], CFG)
    return tok, tok, real, (win, i, j, region)


@triton.jit
def _keys(ctx, CFG: tl.constexpr, idx, offs_d, dmask):
    """Pad keys (frame positions outside the map) read as zero and take part in the softmax."""
    tok, real, win, in_range, i, j, region = _virtual(idx, ctx[4], ctx[5], CFG)
    k = load_rows(ctx[0], tok, offs_d, real, dmask, ctx[2])
    v = load_rows(ctx[1], tok, offs_d, real, dmask, ctx[3])
    return k, v, (tok, real, win, in_range, i, j, region)


@triton.jit
def _score(ctx, CFG: tl.constexpr, s, rtag, ktag, valid_m):
    win_m, i_m, j_m, reg_m = rtag
    _, _, win_n, in_range_n, i_n, j_n, reg_n = ktag
    attend = valid_m[:, None] & in_range_n[None, :] & (win_m[:, None] == win_n[None, :])
    return s + _extra2(ctx[6], i_m, j_m, reg_m, i_n, j_n, reg_n, attend, CFG[3]), attend


@triton.jit
def _span(ctx, CFG: tl.constexpr, start, BLOCK: tl.constexpr, OVER_KEYS: tl.constexpr):
    return window_span(start, ctx[5][0], CFG[2], BLOCK)


@triton.jit
def _put_kv(ctx, CFG: tl.constexpr, ktag, offs_d, dmask, dk, dv, dbias):
    store_rows(ctx[7], ktag[0], offs_d, ktag[1], dmask, ctx[9], dk)
    store_rows(ctx[8], ktag[0], offs_d, ktag[1], dmask, ctx[10], dv)


@triton.jit
def _context(pid_bh, K, V, DK, DV, BIAS, AW, skb, skh, skn, skd, svb, svh, svn, svd, sdkb, sdkh,
             sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, n_heads, saw, geo, sbh, boff, b0, b1, b2, b3,
             mask2):
    """The hooks' ctx for program (batch·head) ``pid_bh`` (DK, DV: the dK/dV kernel's outputs,
    else any pointer)."""
    bias = (BIAS + (pid_bh % n_heads) * sbh, boff, b0, b1, b2, b3, mask2)
    return (K + bh_offset(pid_bh, n_heads, skb, skh), V + bh_offset(pid_bh, n_heads, svb, svh),
            (skn, skd), (svn, svd), AW + (pid_bh // n_heads) * saw, geo, bias,
            DK + bh_offset(pid_bh, n_heads, sdkb, sdkh),
            DV + bh_offset(pid_bh, n_heads, sdvb, sdvh),
            (sdkn, sdkd), (sdvn, sdvd))


# --------------------------------------------------------------------------------------------
# kernels
#
# Runtime geometry: n_virt = Hp·Wp virtual positions; GW windows per frame row; H×W the map,
# MH×MW the modulus of the source rows / cols, LH×LW the frame limit (see module docstring).
# Launched with keywords (see the host entry points below).
# --------------------------------------------------------------------------------------------


@triton.jit
def window_fwd_kernel(
    Q, K, V, O, LSE, BIAS, AW,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    n_heads, slb, slh, saw, n_virt, GW, H, W, MH, MW, LH, LW, Hp, Wp, SH, SW,
    sbh, boff, b0, b1, b2, b3, HEAD_DIM, qk_scale_log2, mask2,
    WH: tl.constexpr, WW: tl.constexpr, NS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ACTIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_virt, BLOCK_M)
    geo = (n_virt, GW, H, W, MH, MW, LH, LW, Hp, Wp, SH, SW)
    ctx = _context(pid_bh, K, V, K, V, BIAS, AW, skb, skh, skn, skd, svb, svh, svn, svd, 0, 0,
                   0, 0, 0, 0, 0, 0, n_heads, saw, geo, sbh, boff, b0, b1, b2, b3, mask2)
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    O += bh_offset(pid_bh, n_heads, sob, soh)
    LSE += bh_offset(pid_bh, n_heads, slb, slh)
    attention_fwd(Q, O, LSE, (sqn, sqd), (son, sod), pid_m, ctx,
                  (WH, WW, NS, HAS_BIAS, HAS_ACTIVE), _rows, _keys, _score, _span, HEAD_DIM,
                  qk_scale_log2, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def window_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, AW,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, slb, slh, saw, n_virt, GW, H, W, MH, MW, LH, LW, Hp, Wp, SH, SW,
    sbh, boff, b0, b1, b2, b3, HEAD_DIM, scale, qk_scale_log2, mask2,
    WH: tl.constexpr, WW: tl.constexpr, NS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ACTIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_n = program_coords(n_virt, BLOCK_N)
    geo = (n_virt, GW, H, W, MH, MW, LH, LW, Hp, Wp, SH, SW)
    ctx = _context(pid_bh, K, V, DK, DV, BIAS, AW, skb, skh, skn, skd, svb, svh, svn, svd, sdkb,
                   sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, n_heads, saw, geo, sbh, boff, b0, b1,
                   b2, b3, mask2)
    lse = bh_offset(pid_bh, n_heads, slb, slh)
    # pad queries have no output, so no gradient: ROWS marks them invalid
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    attention_dkdv(Q, DO, LSE + lse, DELTA + lse, (sqn, sqd), (sdon, sdod), pid_n, ctx,
                   (WH, WW, NS, HAS_BIAS, HAS_ACTIVE), _rows, _keys, _score, no_dscore, _span,
                   _put_kv, HEAD_DIM, scale, qk_scale_log2, False, DOT_PRECISION, BLOCK_M,
                   BLOCK_N, BLOCK_D)


@triton.jit
def window_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, BIAS, AW, O,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd, sob, soh, son, sod,
    n_heads, slb, slh, saw, n_virt, GW, H, W, MH, MW, LH, LW, Hp, Wp, SH, SW,
    sbh, boff, b0, b1, b2, b3, HEAD_DIM, scale, qk_scale_log2, mask2,
    WH: tl.constexpr, WW: tl.constexpr, NS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ACTIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_virt, BLOCK_M)
    geo = (n_virt, GW, H, W, MH, MW, LH, LW, Hp, Wp, SH, SW)
    ctx = _context(pid_bh, K, V, K, V, BIAS, AW, skb, skh, skn, skd, svb, svh, svn, svd, 0, 0,
                   0, 0, 0, 0, 0, 0, n_heads, saw, geo, sbh, boff, b0, b1, b2, b3, mask2)
    lse = bh_offset(pid_bh, n_heads, slb, slh)
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    DQ += bh_offset(pid_bh, n_heads, sdqb, sdqh)
    O += bh_offset(pid_bh, n_heads, sob, soh)
    # the rows' deltas are computed here and stored for the dK/dV kernel launched after this one
    attention_dq(Q, DO, DQ, LSE + lse, DELTA + lse, O, (sqn, sqd), (sdon, sdod), (sdqn, sdqd),
                 (son, sod), pid_m, ctx, (WH, WW, NS, HAS_BIAS, HAS_ACTIVE), _rows, _keys,
                 _score, no_dscore, _span, HEAD_DIM, scale, qk_scale_log2, True, DOT_PRECISION,
                 BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def window_bwd_dbias_kernel(
    Q, K, V, DO, LSE, DELTA, DB, DQ, BIAS, AW, O,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd, sob, soh, son, sod,
    n_heads, slb, slh, saw, n_win, n_pairs, per_chunk, GW, H, W, MH, MW, LH, LW, Hp, Wp, SH, SW,
    sbh, boff, b0, b1, b2, b3, HEAD_DIM, scale, qk_scale_log2, mask2,
    WH: tl.constexpr, WW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WITH_DQ: tl.constexpr,
    D_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial dBias[chunk, h, slot_q, slot_k] = sum over the chunk's (batch, window) pairs of dS
    (n_win windows per image: all of them, or the active ones listed in AW).

    With ``WITH_DQ`` (a key-slot block holds the whole window, BLOCK_N >= ws²) the dS tile of a
    window holds every key of its query rows, so the kernel also writes their dq = dS·k·scale:
    the dQ pass folded into this one (the dQ kernel is not launched). It then also computes
    the rows' deltas rowsum(dO∘O) (instead of reading them) and stores them for the dK/dV
    kernel launched after it.

    DB: fp32 (n_chunks, heads, ws², ws²), contiguous. Grid: heads * n_chunks * nbm * nbn.
    """
    NS: tl.constexpr = WH * WW
    nbm = tl.cdiv(NS, BLOCK_M)
    nbn = tl.cdiv(NS, BLOCK_N)
    pid = tl.program_id(0)
    bn = pid % nbn
    bm = (pid // nbn) % nbm
    hc = pid // (nbn * nbm)
    h = hc % n_heads
    chunk = hc // n_heads
    slot_m = bm * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_n = bn * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_m = slot_m < NS
    ok_n = slot_n < NS
    h64 = h.to(tl.int64)
    geo = (n_win, GW, H, W, MH, MW, LH, LW, Hp, Wp, SH, SW)  # n_win: unused by _tokens
    bias = (BIAS + h * sbh, boff, b0, b1, b2, b3, mask2)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    g0 = chunk * per_chunk
    g1 = tl.minimum(g0 + per_chunk, n_pairs)
    for g in range(g0, g1):
        b = (g // n_win).to(tl.int64)
        win = g % n_win
        if HAS_ACTIVE:
            win = tl.load(AW + b * saw + win)
        tok_m, real_m, i_m, j_m, reg_m = _tokens(win, slot_m, ok_m, geo, WH, WW)
        tok_n, real_n, i_n, j_n, reg_n = _tokens(win, slot_n, ok_n, geo, WH, WW)
        q_base = Q + b * sqb + h64 * sqh
        do_base = DO + b * sdob + h64 * sdoh
        k_base = K + b * skb + h64 * skh
        v_base = V + b * svb + h64 * svh
        # q·kᵀ and dO·vᵀ accumulated over head-dim chunks: only D_CHUNK columns live at a time
        qk = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        delta = tl.zeros([BLOCK_M], tl.float32)
        for c in tl.static_range(BLOCK_D // D_CHUNK):
            offs_c = c * D_CHUNK + tl.arange(0, D_CHUNK)
            cmask = offs_c < HEAD_DIM
            q_mask = real_m[:, None] & cmask[None, :]
            kv_mask = real_n[:, None] & cmask[None, :]
            q = tl.load(tile_ptrs(q_base, tok_m, offs_c, sqn, sqd), mask=q_mask, other=0.0)
            k = tl.load(tile_ptrs(k_base, tok_n, offs_c, skn, skd), mask=kv_mask, other=0.0)
            qk += mma(q, tl.trans(k), DOT_PRECISION)
            do = tl.load(tile_ptrs(do_base, tok_m, offs_c, sdon, sdod), mask=q_mask, other=0.0)
            v = tl.load(tile_ptrs(v_base, tok_n, offs_c, svn, svd), mask=kv_mask, other=0.0)
            dp += mma(do, tl.trans(v), DOT_PRECISION)
            if WITH_DQ:
                o = tl.load(tile_ptrs(O + b * sob + h64 * soh, tok_m, offs_c, son, sod),
                            mask=q_mask, other=0.0)
                delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse_base = b * slb + h64 * slh
        lse2 = tl.load(LSE + lse_base + tok_m, mask=real_m, other=0.0)
        if WITH_DQ:
            tl.store(DELTA + lse_base + tok_m, delta, mask=real_m)
        else:
            delta = tl.load(DELTA + lse_base + tok_m, mask=real_m, other=0.0)
        attend = real_m[:, None] & ok_n[None, :]
        extra = _extra2(bias, i_m, j_m, reg_m, i_n, j_n, reg_n, attend, HAS_BIAS)
        p, ds = softmax_bwd_ds(qk, dp, lse2, delta, qk_scale_log2, extra, attend)
        acc += ds
        if WITH_DQ:
            dq_base = DQ + b * sdqb + h64 * sdqh
            for c in tl.static_range(BLOCK_D // D_CHUNK):
                offs_c = c * D_CHUNK + tl.arange(0, D_CHUNK)
                cmask = offs_c < HEAD_DIM
                k = tl.load(tile_ptrs(k_base, tok_n, offs_c, skn, skd),
                            mask=real_n[:, None] & cmask[None, :], other=0.0)
                store_rows(dq_base, tok_m, offs_c, real_m, cmask, (sdqn, sdqd),
                           mma(ds.to(k.dtype), k, DOT_PRECISION) * scale)

    out = DB + (chunk.to(tl.int64) * n_heads + h) * (NS * NS)
    tl.store(out + slot_m[:, None] * NS + slot_n[None, :], acc, mask=ok_m[:, None] & ok_n[None, :])


@triton.jit
def window_dbias_fold_kernel(
    DB, GATHER, OUT, n_chunks, n_heads, n_out, width, sot, soh,
    FOLD: tl.constexpr, NSNS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The bias gradient from the dbias kernel's partials DB (n_chunks, heads, ws², ws²) fp32:
    OUT[t, h] (strides sot, soh; OUT's dtype) = sum over chunks, then with ``FOLD`` over the
    ``width`` slot pairs GATHER[t] lists for table row t (padded with NSNS), else of pair t
    itself (a dense bias). Fixed order: deterministic. Grid: heads * cdiv(n_out, BLOCK_T)."""
    pid = tl.program_id(0)
    h = pid % n_heads
    t = (pid // n_heads) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok_t = t < n_out
    if FOLD:
        p = tl.arange(0, BLOCK_P)
        pair = tl.load(GATHER + t[:, None] * width + p[None, :],
                       mask=ok_t[:, None] & (p[None, :] < width), other=NSNS)
    else:
        pair = tl.where(ok_t, t, NSNS)[:, None]
    ok = pair < NSNS
    acc = tl.zeros(pair.shape, tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(DB + (c * n_heads + h).to(tl.int64) * NSNS + pair, mask=ok, other=0.0)
    tl.store(OUT + t * sot + h * soh, tl.sum(acc, 1).to(OUT.dtype.element_ty), mask=ok_t)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

# Tile candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and (BLOCK_D, fp32?),
# preferred first (the largest spill-free tiles of a sweep), then tuning.FALLBACK_TILES. Pure
# tuning: the launcher drops those that spill on the machine that runs them (tuning.py). For
# "dbias" the tile is over (query slot, key slot) pairs of one window.
TILES = {
    "fwd": {
        (16, False): [(128, 64, 8, 2)],
        (32, False): [(64, 64, 8, 2)],
        (64, False): [(128, 64, 8, 2)],
        (128, False): [(64, 32, 8, 2)],
        (16, True): [(64, 64, 8, 2)],
        (32, True): [(64, 32, 8, 2)],
        (64, True): [(32, 32, 4, 2)],
    },
    "dkdv": {
        (16, False): [(64, 32, 8, 2)],
        (32, False): [(64, 32, 8, 2)],
        (64, False): [(32, 32, 8, 1)],  # (32, 16, 4, 1) spills 4 B on sm_80 with active windows
        (128, False): [(32, 32, 8, 1)],
        (16, True): [(32, 32, 8, 1)],
        (32, True): [(32, 16, 4, 1)],
        (64, True): [(16, 16, 4, 1)],
    },
    "dq": {
        (16, False): [(128, 64, 8, 2)],
        (32, False): [(64, 64, 8, 2)],
        (64, False): [(64, 64, 8, 2)],
        (128, False): [(64, 32, 8, 2)],
        (16, True): [(64, 32, 8, 2)],
        (32, True): [(32, 16, 4, 1)],
        (64, True): [(16, 16, 4, 2)],  # (16, 16, 4, 1) spills 4 B on sm_90 (since the AW args)
    },
    # the bias-gradient kernel that also writes dq: whole windows per key-slot block (Swin's
    # 49 tokens -> 64), the query-slot block halved where the 64 x 64 tile spills
    "dbias_dq": {
        (16, False): [(64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 1), (32, 64, 4, 1)],
        (32, False): [(64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 1), (32, 64, 4, 1)],
    },
    "dbias": {
        (16, False): [(64, 64, 8, 2)],
        (32, False): [(64, 64, 8, 2)],
        (64, False): [(64, 32, 8, 2)],
        (128, False): [(64, 32, 8, 2)],
        (16, True): [(64, 32, 8, 2)],
        (32, True): [(32, 32, 8, 1)],
        (64, True): [(16, 16, 4, 1)],
    },
}

MIN_WS, MAX_WS = 1, 16
MAX_HEAD_DIM = 128
# Declared capability per fp32?: the largest head dim whose four kernels (fwd, dK/dV, dQ, dbias)
# have a tile that fits in registers (tests/test_aot_compile.py proves it with the installed
# compiler).
MAX_HEAD_DIM_FOR = {False: 128, True: 64}


def unsupported(head_dim: int, fp32: bool, window_size):
    """Why the triton backend refuses this input (None when it takes it); ``window_size`` the
    effective window, an int or (wh, ww)."""
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return (f"head_dim {head_dim} not supported by triton window attention (multiples of 8 "
                f"up to {MAX_HEAD_DIM})")
    ws = max(window_size) if isinstance(window_size, (tuple, list)) else window_size
    if ws > MAX_WS:
        return f"window_size {ws} > {MAX_WS} not supported by triton window attention"
    return capability_reason("window attention", head_dim, fp32, MAX_HEAD_DIM_FOR[fp32])


_KEY = ["n_virt", "HEAD_DIM"]
window_fwd = Launcher(window_fwd_kernel, table_candidates(TILES["fwd"]), _KEY)
window_bwd_dkdv = Launcher(window_bwd_dkdv_kernel, table_candidates(TILES["dkdv"]), _KEY)
window_bwd_dq = Launcher(window_bwd_dq_kernel, table_candidates(TILES["dq"]), _KEY)
def _dbias_candidates(*, WITH_DQ: bool, WH: int, WW: int, **constexprs) -> list:
    """The bias-gradient kernel's tiles; with ``WITH_DQ`` only those whose key-slot block holds
    a whole window (none: the dQ pass runs on its own)."""
    if not WITH_DQ:
        return table_candidates(TILES["dbias"])(**constexprs)
    candidates = table_candidates(TILES["dbias_dq"])(**constexprs)
    return [c for c in candidates if c.kwargs["BLOCK_N"] >= WH * WW]


window_bwd_dbias = Launcher(window_bwd_dbias_kernel, _dbias_candidates, ["n_pairs", "HEAD_DIM"])
#: a reduction over the partials (nothing to tune)
window_dbias_fold = Launcher(window_dbias_fold_kernel,
                             lambda **_: [triton.Config({"BLOCK_T": 16}, num_warps=4)], [])


@functools.lru_cache(maxsize=256)
def _fused_dq(wh: int, ww: int, bd: int, precision: str) -> bool:
    """Whether the bias-gradient pass writes dq (a tile candidate's key slots hold a window)."""
    return bool(_dbias_candidates(WITH_DQ=True, WH=wh, WW=ww, BLOCK_D=bd,
                                  DOT_PRECISION=precision))


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.window on inputs it has validated)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def geometry(H: int, W: int, wh: int, ww: int, sh: int, sw: int, pad_then_shift: bool,
             n_active: int | None = None) -> dict:
    """Runtime geometry of an *effective* wh × ww window and (sh, sw) shift (see the module
    docstring). ``n_active``: windows computed per image (None: all of them); n_win / n_virt
    count those; ``key`` is the arguments (for launch plans). Cached: treat it as read-only."""
    Hp, Wp = cdiv(H, wh) * wh, cdiv(W, ww) * ww
    MH, MW = (Hp, Wp) if pad_then_shift else (H, W)
    n_win = (Hp // wh) * (Wp // ww) if n_active is None else n_active
    ns = window_slots(wh * ww)
    return dict(n_virt=n_win * ns, GW=Wp // ww, H=H, W=W, MH=MH, MW=MW, LH=MH, LW=MW, Hp=Hp,
                Wp=Wp, SH=sh, SW=sw, n_win=n_win, WH=wh, WW=ww, NS=ns,
                key=(H, W, wh, ww, sh, sw, pad_then_shift, n_active))


def window_slots(area: int) -> int:
    """Virtual slots per window: the window's wh·ww tokens rounded up to a multiple of 16, so
    that a tile holds whole windows and meets only its own windows' keys (Swin's 49 -> 64: a
    64-row tile is one window, 59 % of its QKᵀ useful, against a third when 49-token windows
    were packed end to end and tiles straddled them). Windows of at most 16 tokens stay packed:
    padding them would only add empty rows."""
    return area if area <= 16 else cdiv(area, 16) * 16


_GEO = ("GW", "H", "W", "MH", "MW", "LH", "LW", "Hp", "Wp", "SH", "SW")


def bias_strides(bias, wh: int, ww: int) -> dict:
    """sbh, boff, b0, b1, b2, b3 addressing bias[h, (i_q, j_q), (i_k, j_k)] (see docstring)."""
    if bias is None:
        vals = (0,) * 6
    elif bias.dim() == 2:  # table ((2wh-1)(2ww-1), heads)
        st, sh = bias.stride()
        row = (2 * ww - 1) * st
        vals = (sh, (wh - 1) * row + (ww - 1) * st, row, st, -row, -st)
    else:
        sh, sq, sk = bias.stride()  # dense (heads, wh·ww, wh·ww)
        vals = (sh, 0, ww * sq, sq, ww * sk, sk)
    return dict(zip(("sbh", "boff", "b0", "b1", "b2", "b3"), vals))


def _tensors(q, k, v, lse, bias, active, **more) -> dict:
    """The tensor arguments every window kernel takes (absent ones: a dummy pointer)."""
    return dict(Q=q, K=k, V=v, LSE=lse, BIAS=bias if bias is not None else lse,
                AW=active if active is not None else lse, **more)


def _launch_args(q, k, v, lse, bias, geo: dict, scale: float, mask_value: float, active) -> dict:
    """The other keyword arguments every window kernel takes (strides, geometry, scalars)."""
    return dict(
        **strides_of("q", q), **strides_of("k", k), **strides_of("v", v),
        **strides_of("l", lse, "bh"), n_heads=q.shape[1],
        saw=active.stride(0) if active is not None else 0,
        **{x: geo[x] for x in _GEO}, **bias_strides(bias, geo["WH"], geo["WW"]),
        HEAD_DIM=q.shape[3], qk_scale_log2=qk_scale_log2(scale),
        mask2=float(mask_value) * LOG2E, WH=geo["WH"], WW=geo["WW"], HAS_BIAS=bias is not None,
        HAS_ACTIVE=active is not None, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=block_d(q.shape[3]))


def forward(q, k, v, o, lse, bias, geo: dict, scale: float, mask_value: float, active=None):
    """q, k, v (B, h, N, d) into o (B, h, N, d) and base-2 LSE (B, h, N) fp32, token stride 1.
    ``bias`` is an fp32 table / dense bias or None; ``active`` None or contiguous int32 (B, K)
    window ids (geometry built with n_active=K): only the tokens of those windows are written."""
    b, h, n, d = q.shape
    if b * h * geo["n_virt"] == 0:
        return
    window_fwd.launch(
        launch_key(geo["key"], scale, mask_value, q, k, v, o, lse, bias, active),
        row_grid(b * h, geo["n_virt"], "BLOCK_M"), _tensors(q, k, v, lse, bias, active, O=o),
        lambda: dict(**strides_of("o", o), n_virt=geo["n_virt"], NS=geo["NS"],
                     **_launch_args(q, k, v, lse, bias, geo, scale, mask_value, active)))


#: fewest (batch, window) pairs per chunk of the bias-gradient pass: a chunk's fp32 partial,
#: written once and read once by the fold, costs about as many bytes as one window's inputs
MIN_WINDOWS_PER_CHUNK = 8


def _n_chunks(n_pairs: int, heads: int) -> int:
    """Windows are split into at most ~256 chunks per head (and at least ~512 programs), each
    of at least MIN_WINDOWS_PER_CHUNK windows."""
    return max(1, min(cdiv(n_pairs, MIN_WINDOWS_PER_CHUNK), 256, cdiv(512, heads)))


def backward(do, q, k, v, o, lse, dq, dk, dv, bias, geo: dict, scale: float,
             mask_value: float, dbias=None, active=None):
    """Gradients into dq, dk, dv (the tokens of the computed windows are written: every token
    without ``active``) and, when ``dbias`` is given (shaped like the bias, any float dtype: a
    table with any strides, a dense bias contiguous), the bias gradient, summed
    deterministically over the computed windows."""
    b, h, n, d = q.shape
    ns = geo["WH"] * geo["WW"]
    if b * h * geo["n_virt"] == 0:
        if dbias is not None:
            dbias.zero_()
        return
    key = launch_key(geo["key"], scale, mask_value, q, k, v, o, lse, bias, active, do, dq, dk, dv)
    # the deltas rowsum(dO∘O): written by the pass that computes dq (launched first), read by
    # dK/dV and the bias gradient
    delta = torch.empty_strided(lse.shape, lse.stride(), device=lse.device, dtype=torch.float32)
    tensors = _tensors(q, k, v, lse, bias, active, DO=do, DELTA=delta)

    def common():
        return dict(**strides_of("do", do),
                    **_launch_args(q, k, v, lse, bias, geo, scale, mask_value, active))

    def rows(**more):
        return dict(common(), n_virt=geo["n_virt"], NS=geo["NS"], scale=float(scale), **more)

    def dq_pass():
        window_bwd_dq.launch(key, row_grid(b * h, geo["n_virt"], "BLOCK_M"),
                             dict(tensors, DQ=dq, O=o),
                             lambda: rows(**strides_of("dq", dq), **strides_of("o", o)))

    def dkdv_pass():
        window_bwd_dkdv.launch(key, row_grid(b * h, geo["n_virt"], "BLOCK_N"),
                               dict(tensors, DK=dk, DV=dv),
                               lambda: rows(**strides_of("dk", dk), **strides_of("dv", dv)))

    if dbias is None:
        dq_pass()
        dkdv_pass()
        return
    n_pairs = b * geo["n_win"]
    n_chunks = _n_chunks(n_pairs, h)
    per_chunk = cdiv(n_pairs, n_chunks)
    n_chunks = cdiv(n_pairs, per_chunk)
    scratch = torch.empty((n_chunks, h, ns, ns), device=q.device, dtype=torch.float32)

    def grid(meta):
        return (h * n_chunks * cdiv(ns, meta["BLOCK_M"]) * cdiv(ns, meta["BLOCK_N"]),)

    def dbias_args(with_dq: bool):
        args = common()
        return dict(args, n_win=geo["n_win"], n_pairs=n_pairs, per_chunk=per_chunk,
                    **strides_of("dq", dq), **strides_of("o", o), scale=float(scale),
                    WITH_DQ=with_dq,
                    D_CHUNK=dbias_chunk(args["BLOCK_D"], args["DOT_PRECISION"] != "native"))

    # dQ rides on the bias-gradient pass when a tile's key slots can cover a whole window
    with_dq = _fused_dq(geo["WH"], geo["WW"], block_d(d), dot_precision(q.dtype))
    if not with_dq:
        dq_pass()
    window_bwd_dbias.launch(key, grid, dict(tensors, DB=scratch, DQ=dq, O=o),
                            lambda: dbias_args(with_dq))
    dkdv_pass()
    fold_bias_grad(scratch, dbias, geo["WH"], geo["WW"])


def fold_bias_grad(partials, dbias, wh: int, ww: int) -> None:
    """dbias (a ((2wh-1)(2ww-1), heads) table, any strides, or a contiguous dense (heads,
    wh·ww, wh·ww) bias; any float dtype) = the partials (n_chunks, heads, ns, ns) summed over
    chunks and, for a table, folded into its rows (:func:`fold_gather`): one launch of
    :func:`window_dbias_fold_kernel`."""
    n_chunks, h, ns, _ = partials.shape
    fold = dbias.dim() == 2
    if fold:
        gather = fold_gather(wh, ww, partials.device)
        n_out, width = gather.shape
        sot, soh = dbias.stride()
    else:  # the (i, j) pairs of a head as one flat axis; GATHER unread
        assert dbias.is_contiguous(), "dense bias gradient: contiguous (heads, ns, ns)"
        gather, n_out, width, sot, soh = partials, ns * ns, 1, 1, ns * ns
    window_dbias_fold.launch(
        launch_key(n_chunks, h, ns, fold, partials, dbias), lambda meta: (
            h * cdiv(n_out, meta["BLOCK_T"]),), dict(DB=partials, GATHER=gather, OUT=dbias),
        lambda: dict(n_chunks=n_chunks, n_heads=h, n_out=n_out, width=width, sot=sot, soh=soh,
                     FOLD=fold, NSNS=ns * ns, BLOCK_P=max(triton.next_power_of_2(width), 1)))


def dbias_chunk(bd: int, fp32: bool) -> int:
    """Head-dim chunk of the dbias kernel: 32 columns at a time (what lets fp32 d = 64 and
    16-bit d = 128 compile without spills; fp32 operands are split in two by tf32x3)."""
    return min(bd, 32)


@functools.lru_cache(maxsize=64)
def fold_gather(wh: int, ww: int, device) -> torch.Tensor:
    """((2wh-1)(2ww-1), width) int32: the (query slot, key slot) pairs (flat, i·ns + j) that
    share each bias-table row, in a fixed order, padded with ns² (no pair)."""
    ns = wh * ww
    hi = torch.arange(wh).repeat_interleave(ww)
    wi = torch.arange(ww).repeat(wh)
    idx = ((hi[:, None] - hi[None, :] + wh - 1) * (2 * ww - 1)
           + (wi[:, None] - wi[None, :] + ww - 1)).reshape(-1)
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=(2 * wh - 1) * (2 * ww - 1))
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max())
    slot = torch.arange(width)[None, :]
    pos = starts[:, None] + slot
    gather = torch.where(slot < counts[:, None], order[pos.clamp(max=ns * ns - 1)],
                         torch.full_like(pos, ns * ns))
    return gather.to(device=device, dtype=torch.int32).contiguous()


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot_compile.py compiles each for sm_80 and sm_90)
# --------------------------------------------------------------------------------------------

_POINTERS = ("Q", "K", "V", "O", "LSE", "DO", "DELTA", "DQ", "DK", "DV", "DB", "BIAS", "AW")
_FP32_POINTERS = ("LSE", "DELTA", "DB", "BIAS")
_PLAIN_INTS = ("sbh", "boff", "b0", "b1", "b2", "b3", "saw")


def _aot_signature(fn, ptr_dtype: str) -> tuple[dict, dict]:
    """Runtime-arg types of a launch on q, k, v viewed out of a packed projection (see
    :func:`.aot.launch_signature`): a contiguous fp32 table (its strides plain ints), the active
    window list i32, geometry plain i32."""
    pointers = {n: "*i32" if n == "AW" else "*fp32" if n in _FP32_POINTERS else f"*{ptr_dtype}"
                for n in _POINTERS}
    from .aot import launch_signature

    return launch_signature(fn, pointers, plain=_PLAIN_INTS)



def aot_specs(all_active: bool = False):
    """Every kernel × declared head-dim class × fp16/fp32, each with its tile candidates, for
    Swin's ws = 7 with a bias table (the heavier path), plus the active-window (SparseViT) variant
    for Swin's head dim 32 (``all_active=True``: for every head dim). bf16 compiles like fp16."""
    from .aot import spec_from_launcher

    specs = []
    kernels = (("fwd", window_fwd), ("dkdv", window_bwd_dkdv), ("dq", window_bwd_dq),
               ("dbias", window_bwd_dbias))
    for kname, launcher in kernels:
        for dtype in ("fp16", "fp32"):
            sig, const = _aot_signature(launcher.fn, dtype)
            for bd in (16, 32, 64, 128):
                if unsupported(bd, dtype == "fp32", 7):
                    continue  # outside the declared capability: nothing to prove
                for active in (False, True):
                    if active and not (all_active or bd == 32):
                        continue
                    meta = dict(WH=7, WW=7, HAS_BIAS=True, HAS_ACTIVE=active,
                                DOT_PRECISION=aot_precision(dtype), BLOCK_D=bd)
                    variants = [("", meta)]
                    if kname == "dbias":
                        meta["D_CHUNK"] = dbias_chunk(bd, dtype == "fp32")
                        with_dq = dict(meta, WITH_DQ=True)
                        variants = [("", dict(meta, WITH_DQ=False))] + (
                            [(",dq", with_dq)] if _dbias_candidates(**with_dq) else [])
                    else:
                        meta["NS"] = window_slots(49)
                    for tag, m in variants:
                        specs.append(spec_from_launcher(
                            f"window.{kname}[{dtype},D={bd}{',active' * active}{tag}]",
                            launcher, sig, const, m))
    specs += _fold_aot_specs()
    return specs


def _fold_aot_specs():
    """The bias-gradient fold at ws = 7: into an fp32 table (169 rows of up to 49 pairs) and
    into a 16-bit dense bias."""
    from .aot import AotCase, AotSpec

    specs = []
    for fold, out in ((True, "fp32"), (False, "fp16")):
        name = f"window.dbias_fold[{'table' if fold else 'dense'},{out}]"
        sig = dict(DB="*fp32", GATHER="*i32", OUT=f"*{out}", n_chunks="i32", n_heads="i32",
                   n_out="i32", width="i32", sot="i32", soh="i32")
        specs.append(AotSpec(name, (AotCase(
            name=name, fn=window_dbias_fold_kernel, signature=sig, num_warps=4, num_stages=1,
            constexprs=dict(FOLD=fold, NSNS=49 * 49, BLOCK_T=16, BLOCK_P=64 if fold else 1)),)))
    return specs
