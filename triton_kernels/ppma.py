"""Triton kernels of PPMA (polyline path masked attention): full attention, decays, RoPE.

Full attention (PPMA's ``MambaAttentionAllDouble``): the N×N log-mask is never built. With
per-head prefix sums of the log-decays (fp32 (H, W) tables, made by the host before the launch)

    P[r, c] = Σ_{c' <= c} a[r, c']  (along rows),   Q[r, c] = Σ_{r' <= r} g[r', c]  (along columns)

the bias of query t = (r1, c1) and key s = (r2, c2) in the two directions is

    b1 = σc·(P[r1, c2] - P[r1, c1]) + σr·(Q[r2, c2] - Q[r1, c2])      (L:  corner (r1, c2))
    b2 = σc·(P[r2, c2] - P[r2, c1]) + σr·(Q[r2, c1] - Q[r1, c1])      (Lᵀ: corner (r2, c1))

with σc = sign(c2 - c1), σr = sign(r2 - r1): per-query and per-key values plus two gathers per
pair from the small, cache-resident table (P and Q of a cell are packed in one 64-bit word, so a
gather is one load). Both directions share one QKᵀ tile and keep their own online-softmax state
(``softmax_rescale`` of the shared core); the output is the 50/50 average of the two separately
normalised results. The forward also stores the direction-1 output O1 (fp32) so the backward can
form both softmax "delta" terms (delta2 = 2·rowsum(dO∘O) - delta1). fp32 inputs use exact fp32
(FMA) dots.

Tile geometry. Tokens are walked in a *virtual* raster with row pitch WP = next_pow2(W): virtual
index i -> (r = i // WP, c = i % WP), real when c < W. A tile of BLOCK >= WP tokens then holds
BLOCK/WP whole image rows, which the backward needs (below); the forward accepts any WP. Padding
costs at most WP/W (8/7 at W = 7, 16/14 at W = 14).

Backward. With G1, G2 the logit gradients of the two directions (dS, natural units), the gradient
of the prefix tables is a sum of ±G at the segment endpoints:

    dP[r1, c1] -= Σ_s G1 σc      dQ[r1, c1] -= Σ_s G2 σr     (the query's own cell)
    dP[r2, c2] += Σ_t G2 σc      dQ[r2, c2] += Σ_t G1 σr     (the key's own cell)
    dP[r1, c2] += Σ G1 σc,  dQ[r1, c2] -= Σ G1 σr     over the pairs with that corner
    dP[r2, c1] -= Σ G2 σc,  dQ[r2, c1] += Σ G2 σr     over the pairs with that corner

The dQ kernel owns whole query rows and meets every key, so it completes the first and third
lines for the cells of its rows: the pair sums reduce over key rows and query columns with two
reshape-sums of the [BM, BN] tile (no one-hot matmul, no atomics). The dK/dV kernel owns whole
key rows and completes the second and fourth lines. Each kernel writes one fp32 (B, h, N) table
per prefix table with plain stores (deterministic); the host adds the two and takes reverse
cumulative sums (dP -> da along rows, dQ -> dg along columns). No N×N tensor anywhere.

Decays (``PathEmbeding2D``): one pass over x per (token block, head); the backward writes dx and
per-program partial sums of the parameter gradients, reduced by the host in a fixed order.
RoPE (``theta_shift``): one elementwise pass with the pair partner loaded alongside.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_core import (
    LOG2E,
    bh_offset,
    block_d,
    cdiv,
    exact_fp32,
    launch_delta,
    program_coords,
    qk_scale_log2,
    row_grid,
    softmax_finish,
    softmax_p_ds,
    softmax_rescale,
    strides4,
    tile_ptrs,
)
from .tuning import Launcher, capability_reason, table_candidates

_LOG2E = tl.constexpr(LOG2E)  # jit code reads module globals only as constexprs

# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _coords(idx, H, W, WP: tl.constexpr):
    """Virtual index -> (row, column, raster token, real?)."""
    r = idx // WP
    c = idx % WP
    real = (c < W) & (r < H)
    return r, c, r * W + c, real


@triton.jit
def _mma(a, b, IEEE: tl.constexpr):
    """Full-precision fp32 dot for fp32 inputs (IEEE), the tensor-core default otherwise."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _load_pq(PQ, off, mask):
    """(P, Q) at cells ``off``: one 64-bit load of the packed fp32 pair (P low word, Q high)."""
    x = tl.load(PQ + off, mask=mask, other=0)
    p = x.to(tl.int32).to(tl.float32, bitcast=True)  # the cast truncates: the low word
    q = (x >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return p, q


@triton.jit
def _bias_pair(PQ, r1, c1, r2, c2, p_q, q_q, p_k, q_k, W, pair):
    """Log-mask of both directions for a [BM, BN] tile (natural units) and σc, σr.

    p_q, q_q: P, Q at the queries' cells [BM]; p_k, q_k at the keys' cells [BN]; pair: [BM, BN]
    bool, False outside the map (those gathers are not made).
    """
    corner1 = r1[:, None] * W + c2[None, :]  # (r1, c2): L's corner
    corner2 = r2[None, :] * W + c1[:, None]  # (r2, c1): Lᵀ's corner
    p_c1, q_c1 = _load_pq(PQ, corner1, pair)
    p_c2, q_c2 = _load_pq(PQ, corner2, pair)
    sc = _sign(c2[None, :] - c1[:, None])
    sr = _sign(r2[None, :] - r1[:, None])
    b1 = sc * (p_c1 - p_q[:, None]) + sr * (q_k[None, :] - q_c1)
    b2 = sc * (p_k[None, :] - p_c2) + sr * (q_c2 - q_q[:, None])
    return b1, b2, sc, sr


# --------------------------------------------------------------------------------------------
# kernels
#
# Per-token tensors are contiguous: PQ (B·h, N) int64 words packing the fp32 pair (P, Q) of a
# cell (one load per gather), fp32 GPQ/GQQ/GPK/GQK (B·h, N) and LSE, DELTA (B·h, 2, N) (one row
# per mask direction).
# --------------------------------------------------------------------------------------------


@triton.jit
def ppma_fwd_kernel(
    Q, K, V, O, O1, LSE, PQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    so1b, so1h, so1n, so1d,
    n_heads, N, H, W, n_virt, HEAD_DIM, qk_scale_log2,
    WP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_virt, BLOCK_M)
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    O += bh_offset(pid_bh, n_heads, sob, soh)
    O1 += bh_offset(pid_bh, n_heads, so1b, so1h)
    PQ += pid_bh * N
    LSE += pid_bh * 2 * N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    r1, c1, tq, vq = _coords(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), H, W, WP)
    q_mask = vq[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, tq, offs_d, sqn, sqd), mask=q_mask, other=0.0)
    p_q, q_q = _load_pq(PQ, tq, vq)

    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_virt, BLOCK_N):
        r2, c2, tk, vk = _coords(start_n + tl.arange(0, BLOCK_N), H, W, WP)
        kv_mask = vk[:, None] & dmask[None, :]
        k = tl.load(tile_ptrs(K, tk, offs_d, skn, skd), mask=kv_mask, other=0.0)
        v = tl.load(tile_ptrs(V, tk, offs_d, svn, svd), mask=kv_mask, other=0.0)
        p_k, q_k = _load_pq(PQ, tk, vk)
        pair = vq[:, None] & vk[None, :]
        b1, b2, _, _ = _bias_pair(PQ, r1, c1, r2, c2, p_q, q_q, p_k, q_k, W, pair)
        s = _mma(q, tl.trans(k), IEEE) * qk_scale_log2
        s1 = tl.where(pair, s + b1 * _LOG2E, float("-inf"))
        s2 = tl.where(pair, s + b2 * _LOG2E, float("-inf"))
        m1, l1, alpha1, p1 = softmax_rescale(m1, l1, s1)
        acc1 = acc1 * alpha1[:, None] + _mma(p1.to(v.dtype), v, IEEE)
        m2, l2, alpha2, p2 = softmax_rescale(m2, l2, s2)
        acc2 = acc2 * alpha2[:, None] + _mma(p2.to(v.dtype), v, IEEE)

    out1, lse1 = softmax_finish(m1, l1, acc1)
    out2, lse2 = softmax_finish(m2, l2, acc2)
    tl.store(tile_ptrs(O, tq, offs_d, son, sod), (0.5 * (out1 + out2)).to(O.dtype.element_ty),
             mask=q_mask)
    tl.store(tile_ptrs(O1, tq, offs_d, so1n, so1d), out1, mask=q_mask)
    tl.store(LSE + tq, lse1, mask=vq)
    tl.store(LSE + N + tq, lse2, mask=vq)


@triton.jit
def _bwd_tile(q, k, v, do, s_qk, b1, b2, lse1, lse2, delta1, delta2, pair, IEEE: tl.constexpr):
    """(P1, P2, G1, G2) of one tile: P per direction and the natural-unit logit gradients
    G = ½·P·(dP - delta) (½: each direction carries half of the output)."""
    dp = _mma(do, tl.trans(v), IEEE)
    p1, ds1 = softmax_p_ds(s_qk + b1 * _LOG2E, dp, lse1, delta1, pair)
    p2, ds2 = softmax_p_ds(s_qk + b2 * _LOG2E, dp, lse2, delta2, pair)
    return p1, p2, 0.5 * ds1, 0.5 * ds2


@triton.jit
def ppma_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, PQ, DQ, GPQ, GQQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    n_heads, N, H, W, n_virt, HEAD_DIM, scale, qk_scale_log2,
    WP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq, and the prefix-table gradients of the cells of this program's query rows."""
    pid_bh, pid_m = program_coords(n_virt, BLOCK_M)
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    DQ += bh_offset(pid_bh, n_heads, sdqb, sdqh)
    PQ += pid_bh * N
    GPQ += pid_bh * N
    GQQ += pid_bh * N
    LSE += pid_bh * 2 * N
    DELTA += pid_bh * 2 * N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    r1, c1, tq, vq = _coords(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), H, W, WP)
    q_mask = vq[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, tq, offs_d, sqn, sqd), mask=q_mask, other=0.0)
    do = tl.load(tile_ptrs(DO, tq, offs_d, sdon, sdod), mask=q_mask, other=0.0)
    p_q, q_q = _load_pq(PQ, tq, vq)
    lse1 = tl.load(LSE + tq, mask=vq, other=0.0)
    lse2 = tl.load(LSE + N + tq, mask=vq, other=0.0)
    delta1 = tl.load(DELTA + tq, mask=vq, other=0.0)
    delta2 = tl.load(DELTA + N + tq, mask=vq, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    g_p = tl.zeros([BLOCK_M], tl.float32)       # own cells (query side)
    g_q = tl.zeros([BLOCK_M], tl.float32)
    x_p = tl.zeros([BLOCK_M // WP, WP], tl.float32)  # corners (r1, c2): [query row, key column]
    x_q = tl.zeros([BLOCK_M // WP, WP], tl.float32)
    for start_n in range(0, n_virt, BLOCK_N):
        r2, c2, tk, vk = _coords(start_n + tl.arange(0, BLOCK_N), H, W, WP)
        kv_mask = vk[:, None] & dmask[None, :]
        k = tl.load(tile_ptrs(K, tk, offs_d, skn, skd), mask=kv_mask, other=0.0)
        v = tl.load(tile_ptrs(V, tk, offs_d, svn, svd), mask=kv_mask, other=0.0)
        p_k, q_k = _load_pq(PQ, tk, vk)
        pair = vq[:, None] & vk[None, :]
        b1, b2, sc, sr = _bias_pair(PQ, r1, c1, r2, c2, p_q, q_q, p_k, q_k, W, pair)
        s = _mma(q, tl.trans(k), IEEE) * qk_scale_log2
        _, _, g1, g2 = _bwd_tile(q, k, v, do, s, b1, b2, lse1, lse2, delta1, delta2, pair, IEEE)
        dq += _mma((g1 + g2).to(k.dtype), k, IEEE)
        g1c = g1 * sc
        g1r = g1 * sr
        g_p -= tl.sum(g1c, 1)
        g_q -= tl.sum(g2 * sr, 1)
        # Σ over key rows (same key column), then over query columns (same query row).
        t_p = tl.sum(tl.reshape(g1c, [BLOCK_M, BLOCK_N // WP, WP]), 1)
        t_q = tl.sum(tl.reshape(g1r, [BLOCK_M, BLOCK_N // WP, WP]), 1)
        x_p += tl.sum(tl.reshape(t_p, [BLOCK_M // WP, WP, WP]), 1)
        x_q -= tl.sum(tl.reshape(t_q, [BLOCK_M // WP, WP, WP]), 1)

    tl.store(tile_ptrs(DQ, tq, offs_d, sdqn, sdqd), (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)
    # [query row, column] flattens to the tile's own virtual order: cell (r1, c) <-> index.
    tl.store(GPQ + tq, g_p + tl.reshape(x_p, [BLOCK_M]), mask=vq)
    tl.store(GQQ + tq, g_q + tl.reshape(x_q, [BLOCK_M]), mask=vq)


@triton.jit
def ppma_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, PQ, DK, DV, GPK, GQK,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, N, H, W, n_virt, HEAD_DIM, scale, qk_scale_log2,
    WP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv, and the prefix-table gradients of the cells of this program's key rows."""
    pid_bh, pid_n = program_coords(n_virt, BLOCK_N)
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    DK += bh_offset(pid_bh, n_heads, sdkb, sdkh)
    DV += bh_offset(pid_bh, n_heads, sdvb, sdvh)
    PQ += pid_bh * N
    GPK += pid_bh * N
    GQK += pid_bh * N
    LSE += pid_bh * 2 * N
    DELTA += pid_bh * 2 * N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    r2, c2, tk, vk = _coords(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), H, W, WP)
    kv_mask = vk[:, None] & dmask[None, :]
    k = tl.load(tile_ptrs(K, tk, offs_d, skn, skd), mask=kv_mask, other=0.0)
    v = tl.load(tile_ptrs(V, tk, offs_d, svn, svd), mask=kv_mask, other=0.0)
    p_k, q_k = _load_pq(PQ, tk, vk)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    g_p = tl.zeros([BLOCK_N], tl.float32)       # own cells (key side)
    g_q = tl.zeros([BLOCK_N], tl.float32)
    x_p = tl.zeros([WP, BLOCK_N // WP], tl.float32)  # corners (r2, c1): [query column, key row]
    x_q = tl.zeros([WP, BLOCK_N // WP], tl.float32)
    for start_m in range(0, n_virt, BLOCK_M):
        r1, c1, tq, vq = _coords(start_m + tl.arange(0, BLOCK_M), H, W, WP)
        q_mask = vq[:, None] & dmask[None, :]
        q = tl.load(tile_ptrs(Q, tq, offs_d, sqn, sqd), mask=q_mask, other=0.0)
        do = tl.load(tile_ptrs(DO, tq, offs_d, sdon, sdod), mask=q_mask, other=0.0)
        p_q, q_q = _load_pq(PQ, tq, vq)
        lse1 = tl.load(LSE + tq, mask=vq, other=0.0)
        lse2 = tl.load(LSE + N + tq, mask=vq, other=0.0)
        delta1 = tl.load(DELTA + tq, mask=vq, other=0.0)
        delta2 = tl.load(DELTA + N + tq, mask=vq, other=0.0)
        pair = vq[:, None] & vk[None, :]
        b1, b2, sc, sr = _bias_pair(PQ, r1, c1, r2, c2, p_q, q_q, p_k, q_k, W, pair)
        s = _mma(q, tl.trans(k), IEEE) * qk_scale_log2
        p1, p2, g1, g2 = _bwd_tile(q, k, v, do, s, b1, b2, lse1, lse2, delta1, delta2, pair,
                                   IEEE)
        dv += _mma(tl.trans(0.5 * (p1 + p2)).to(do.dtype), do, IEEE)
        dk += _mma(tl.trans(g1 + g2).to(q.dtype), q, IEEE)
        g2c = g2 * sc
        g2r = g2 * sr
        g_p += tl.sum(g2c, 0)
        g_q += tl.sum(g1 * sr, 0)
        # Σ over query rows (same query column), then over key columns (same key row).
        t_p = tl.sum(tl.reshape(g2c, [BLOCK_M // WP, WP, BLOCK_N]), 0)
        t_q = tl.sum(tl.reshape(g2r, [BLOCK_M // WP, WP, BLOCK_N]), 0)
        x_p -= tl.sum(tl.reshape(t_p, [WP, BLOCK_N // WP, WP]), 2)
        x_q += tl.sum(tl.reshape(t_q, [WP, BLOCK_N // WP, WP]), 2)

    tl.store(tile_ptrs(DK, tk, offs_d, sdkn, sdkd), (dk * scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(tile_ptrs(DV, tk, offs_d, sdvn, sdvd), dv.to(DV.dtype.element_ty), mask=kv_mask)
    # [key row, column] flattens to the tile's own virtual order: cell (r2, c) <-> index.
    tl.store(GPK + tk, g_p + tl.reshape(tl.trans(x_p), [BLOCK_N]), mask=vk)
    tl.store(GQK + tk, g_q + tl.reshape(tl.trans(x_q), [BLOCK_N]), mask=vk)


# --------------------------------------------------------------------------------------------
# criss-cross attention (PPMA's ``MambaAttentionChunkDouble``)
#
# One program per (batch·head, line): a line is an image row (ROW, the 1D mask S^W from the row
# prefix sums P) or an image column (the mask S^H from the column prefix sums Q). A line holds at
# most 64 tokens, so its whole attention map A (softmax over the line, [L, L]) lives in registers
# and is recomputed by every pass that needs it; only O(N·d) intermediates go to HBM:
#
#   forward   Y = Aw·v (rows);  Z = Ah·v, OA = Ah·Y (columns);  O = ½·OA + ½·Aw·Z (rows)
#   backward  dZ = ½·Awᵀ·dO (rows);  dY = ½·Ahᵀ·dO (columns);
#             dAh = ½·dO·Yᵀ + dZ·vᵀ -> dq, dk, dv (= Ahᵀ·dZ), dQ (columns, fp32 partials);
#             dAw = ½·dO·Zᵀ + dY·vᵀ -> dq, dk, dv (+= Awᵀ·dY), dP, plus the column parts (rows)
# --------------------------------------------------------------------------------------------


@triton.jit
def _line_attention(Q, K, PQ, sqn, sqd, skn, skd, offs_d, dmask, line, H, W, L, qk_scale_log2,
                    ROW: tl.constexpr, IEEE: tl.constexpr, BLOCK_L: tl.constexpr):
    """Tokens of one line, their q, k, σ = sign(j - i) and the line's softmax A [BLOCK_L]²."""
    pos = tl.arange(0, BLOCK_L)
    valid = pos < L
    if ROW:
        tok = line * W + pos
    else:
        tok = pos * W + line
    m2 = valid[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, tok, offs_d, sqn, sqd), mask=m2, other=0.0)
    k = tl.load(tile_ptrs(K, tok, offs_d, skn, skd), mask=m2, other=0.0)
    p_tab, q_tab = _load_pq(PQ, tok, valid)
    if ROW:
        z = p_tab
    else:
        z = q_tab
    sig = _sign(pos[None, :] - pos[:, None])
    pair = valid[:, None] & valid[None, :]
    s = _mma(q, tl.trans(k), IEEE) * qk_scale_log2 + sig * (z[None, :] - z[:, None]) * _LOG2E
    s = tl.where(pair, s, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(valid, m, 0.0)
    e = tl.where(pair, tl.exp2(s - m[:, None]), 0.0)
    l_sum = tl.sum(e, 1)
    a = e / tl.where(valid, l_sum, 1.0)[:, None]
    return tok, valid, q, k, sig, a


@triton.jit
def _line_load(X, tok, offs_d, valid, dmask, sxn, sxd):
    return tl.load(tile_ptrs(X, tok, offs_d, sxn, sxd), mask=valid[:, None] & dmask[None, :],
                   other=0.0)


@triton.jit
def ppma_cc_fwd_kernel(
    Q, K, PQ, X1, X2, ADD, OUT1, OUT2,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sx1b, sx1h, sx1n, sx1d, sx2b, sx2h, sx2n, sx2d,
    sab, sah, san, sad, so1b, so1h, so1n, so1d, so2b, so2h, so2n, so2d,
    n_heads, N, H, W, n_lines, L, HEAD_DIM, qk_scale_log2,
    ROW: tl.constexpr, HAS_X2: tl.constexpr, HAS_ADD: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT1 = A·X1 (or ½·A·X1 + ½·ADD), OUT2 = A·X2 for the line's softmax A."""
    pid = tl.program_id(0)
    pid_bh = (pid // n_lines).to(tl.int64)
    line = pid % n_lines
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    PQ += pid_bh * N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    tok, valid, q, k, sig, a = _line_attention(Q, K, PQ, sqn, sqd, skn, skd, offs_d, dmask, line,
                                               H, W, L, qk_scale_log2, ROW, IEEE, BLOCK_L)
    x1 = _line_load(X1 + bh_offset(pid_bh, n_heads, sx1b, sx1h), tok, offs_d, valid, dmask, sx1n, sx1d)
    out1 = _mma(a.to(Q.dtype.element_ty), x1.to(Q.dtype.element_ty), IEEE)
    if HAS_ADD:
        add = _line_load(ADD + bh_offset(pid_bh, n_heads, sab, sah), tok, offs_d, valid, dmask, san, sad)
        out1 = 0.5 * out1 + 0.5 * add.to(tl.float32)
    m2 = valid[:, None] & dmask[None, :]
    OUT1 += bh_offset(pid_bh, n_heads, so1b, so1h)
    tl.store(tile_ptrs(OUT1, tok, offs_d, so1n, so1d), out1.to(OUT1.dtype.element_ty), mask=m2)
    if HAS_X2:
        x2 = _line_load(X2 + bh_offset(pid_bh, n_heads, sx2b, sx2h), tok, offs_d, valid, dmask, sx2n,
                        sx2d)
        out2 = _mma(a.to(Q.dtype.element_ty), x2.to(Q.dtype.element_ty), IEEE)
        OUT2 += bh_offset(pid_bh, n_heads, so2b, so2h)
        tl.store(tile_ptrs(OUT2, tok, offs_d, so2n, so2d), out2.to(OUT2.dtype.element_ty),
                 mask=m2)


@triton.jit
def ppma_cc_bwd_kernel(
    Q, K, V, DO, PQ, X, DX, OUT_T, ACC_Q, ACC_K, ACC_V, DQ, DK, DV, GZ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sgb, sgh, sgn, sgd,
    n_heads, N, H, W, n_lines, L, HEAD_DIM, scale, qk_scale_log2,
    ROW: tl.constexpr, WRITE_T: tl.constexpr, GRADS: tl.constexpr, ACCUM: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One backward pass over lines (fp32 intermediates X, DX, OUT_T, ACC_*, GZ: contiguous
    (B, h, N, d) / (B, h, N)).

    WRITE_T: OUT_T = ½·Aᵀ·dO. GRADS: dA = ½·dO·Xᵀ + DX·vᵀ, dS = A∘(dA - rowsum(A∘dA)) ->
    dq, dk, dv = Aᵀ·DX and GZ (the line's prefix-table gradient), stored to DQ/DK/DV (ACCUM:
    plus ACC_Q/K/V, the other direction's fp32 partials; DQ, DK, DV share the strides sg*) or to
    ACC_Q/K/V (fp32) otherwise.
    """
    pid = tl.program_id(0)
    pid_bh = (pid // n_lines).to(tl.int64)
    line = pid % n_lines
    Q += bh_offset(pid_bh, n_heads, sqb, sqh)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    PQ += pid_bh * N
    f32_base = pid_bh * N * HEAD_DIM  # contiguous fp32 (B, h, N, d) intermediates
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    tok, valid, q, k, sig, a = _line_attention(Q, K, PQ, sqn, sqd, skn, skd, offs_d, dmask, line,
                                               H, W, L, qk_scale_log2, ROW, IEEE, BLOCK_L)
    m2 = valid[:, None] & dmask[None, :]
    do = _line_load(DO, tok, offs_d, valid, dmask, sdon, sdod)
    dt = Q.dtype.element_ty
    if WRITE_T:
        out_t = 0.5 * _mma(tl.trans(a).to(dt), do.to(dt), IEEE)
        tl.store(tile_ptrs(OUT_T + f32_base, tok, offs_d, HEAD_DIM, 1), out_t, mask=m2)
    if GRADS:
        g_base = bh_offset(pid_bh, n_heads, sgb, sgh)
        # each gradient is stored as soon as it is formed (dv first), to keep the register
        # pressure of the L×L tiles down at 64-token lines
        dx = _line_load(DX + f32_base, tok, offs_d, valid, dmask, HEAD_DIM, 1).to(dt)
        _cc_store_grad(_mma(tl.trans(a).to(dt), dx, IEEE), ACC_V + f32_base, DV + g_base,
                       tok, offs_d, m2, sgn, sgd, HEAD_DIM, ACCUM)
        x = _line_load(X + f32_base, tok, offs_d, valid, dmask, HEAD_DIM, 1)
        v = _line_load(V, tok, offs_d, valid, dmask, svn, svd)
        d_a = 0.5 * _mma(do.to(dt), tl.trans(x.to(dt)), IEEE) + _mma(dx, tl.trans(v), IEEE)
        ds = a * (d_a - tl.sum(a * d_a, 1)[:, None])
        gs = ds * sig
        tl.store(GZ + pid_bh * N + tok, tl.sum(gs, 0) - tl.sum(gs, 1), mask=valid)
        _cc_store_grad(_mma(ds.to(dt), k, IEEE) * scale, ACC_Q + f32_base, DQ + g_base, tok,
                       offs_d, m2, sgn, sgd, HEAD_DIM, ACCUM)
        _cc_store_grad(_mma(tl.trans(ds).to(dt), q, IEEE) * scale, ACC_K + f32_base, DK + g_base,
                       tok, offs_d, m2, sgn, sgd, HEAD_DIM, ACCUM)


@triton.jit
def _cc_store_grad(g, ACC, G, tok, offs_d, m2, sgn, sgd, HEAD_DIM, ACCUM: tl.constexpr):
    """A line's fp32 gradient tile: to G (plus the other direction's partial in ACC) when
    ACCUM, else to the fp32 partial ACC (contiguous (N, d) rows)."""
    acc_ptrs = tile_ptrs(ACC, tok, offs_d, HEAD_DIM, 1)
    if ACCUM:
        g += tl.load(acc_ptrs, mask=m2)
        tl.store(tile_ptrs(G, tok, offs_d, sgn, sgd), g.to(G.dtype.element_ty), mask=m2)
    else:
        tl.store(acc_ptrs, g, mask=m2)


# --------------------------------------------------------------------------------------------
# decays: PPMA's PathEmbeding2D, one pass over x per head
# --------------------------------------------------------------------------------------------


@triton.jit
def _softplus(z):
    """PyTorch's softplus (beta 1, threshold 20), accurate for very negative z too."""
    e = tl.exp(-tl.abs(z))
    # log(1 + e) loses e's digits for small e: use its series there
    log1p_e = tl.where(e < 1e-3, e * (1.0 - e * (0.5 - e * (1.0 / 3.0))), tl.log(1.0 + e))
    return tl.where(z > 20.0, z, tl.maximum(z, 0.0) + log1p_e)


@triton.jit
def _decay_inputs(X, WDT, BIAS, ALOG, pid, h, sxb, sxn, sxc, N, HEAD_DIM, n_blocks,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The head-h slice of a token block and the pre-activations z0, z1 [BLOCK_T] (fp32)."""
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
    return b, tok, tmask, x, chan, xmask, w0, w1, A, z0, z1


@triton.jit
def ppma_decays_fwd_kernel(
    X, WDT, BIAS, ALOG, OA, OG, sxb, sxn, sxc, n_heads, N, HEAD_DIM, n_blocks,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """a, g (B, heads, N), contiguous: -exp(A_log)·softplus(x_h·w + dt_bias) per direction."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b, tok, tmask, _, _, _, _, _, A, z0, z1 = _decay_inputs(
        X, WDT, BIAS, ALOG, pid, h, sxb, sxn, sxc, N, HEAD_DIM, n_blocks, BLOCK_T, BLOCK_D)
    out = (b * n_heads + h) * N + tok
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
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b, tok, tmask, x, chan, xmask, w0, w1, A, z0, z1 = _decay_inputs(
        X, WDT, BIAS, ALOG, pid, h, sxb, sxn, sxc, N, HEAD_DIM, n_blocks, BLOCK_T, BLOCK_D)
    out = (b * n_heads + h) * N + tok
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
    part = h * tl.num_programs(0) + pid
    dmask = offs_d < HEAD_DIM
    tl.store(PW + part * 2 * HEAD_DIM + offs_d, tl.sum(dz0[:, None] * x, 0), mask=dmask)
    tl.store(PW + part * 2 * HEAD_DIM + HEAD_DIM + offs_d, tl.sum(dz1[:, None] * x, 0),
             mask=dmask)
    tl.store(PB + part, tl.sum(dz0 + dz1, 0))
    # d a / d A_log = a (a = -exp(A_log)·softplus)
    tl.store(PA + part, tl.sum(da * (-A * _softplus(z0)) + dg * (-A * _softplus(z1)), 0))


DECAY_BLOCK_T = 64


def _decayrow_grid(B: int, N: int, heads: int):
    n_blocks = cdiv(N, DECAY_BLOCK_T)
    return (B * n_blocks, heads), n_blocks


def decays_forward(x, dt_weight, dt_bias, A_log, a, g):
    """x (B, N, C) (any strides) -> a, g (B, heads, N) contiguous, written in place."""
    B, N, C = x.shape
    heads = a.shape[1]
    d = C // heads
    grid, n_blocks = _decayrow_grid(B, N, heads)
    ppma_decays_fwd_kernel[grid](x, dt_weight.contiguous(), dt_bias, A_log, a, g, *x.stride(),
                                 heads, N, d, n_blocks, BLOCK_T=DECAY_BLOCK_T,
                                 BLOCK_D=triton.next_power_of_2(d))


def decays_backward(x, dt_weight, dt_bias, A_log, da, dg, dx):
    """Gradients: dx (B, N, C) written in place; returns (d dt_weight, d dt_bias,
    d A_log) in fp32, reduced deterministically from per-program partials."""
    B, N, C = x.shape
    heads = da.shape[1]
    d = C // heads
    grid, n_blocks = _decayrow_grid(B, N, heads)
    n_prog = grid[0]
    pw = x.new_empty((heads, n_prog, 2, d), dtype=torch.float32)
    pb = x.new_empty((heads, n_prog), dtype=torch.float32)
    pa = x.new_empty((heads, n_prog), dtype=torch.float32)
    ppma_decays_bwd_kernel[grid](x, dt_weight.contiguous(), dt_bias, A_log, da.contiguous(),
                                 dg.contiguous(), dx, pw, pb, pa, *x.stride(), *dx.stride(), heads,
                                 N, d,
                                 n_blocks, BLOCK_T=DECAY_BLOCK_T,
                                 BLOCK_D=triton.next_power_of_2(d))
    return pw.sum(dim=(0, 1)), pb.sum(dim=1), pa.sum(dim=1)


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


def _cc_launch(kernel, q, n_lines: int, L: int, H: int, W: int, args, **meta):
    b, h, n, d = q.shape
    fp32 = q.dtype == torch.float32
    kernel[(b * h * n_lines,)](*args, h, n, H, W, n_lines, L, d, **meta,
                               IEEE=exact_fp32(q.dtype),
                               BLOCK_L=cc_block(L), BLOCK_D=block_d(d),
                               num_warps=cc_warps(cc_block(L), block_d(d), fp32), num_stages=1)


def cc_forward(q, k, v, pq, o, y, z, oa, H: int, W: int, scale: float):
    """Criss-cross forward into o; y, z, oa: fp32 contiguous (B, h, N, d) intermediates
    (y, z are kept for the backward)."""
    sl = qk_scale_log2(scale)
    rows = dict(ROW=True, n_lines=H, L=W)
    cols = dict(ROW=False, n_lines=W, L=H)
    for geo, x1, x2, add, out1, out2 in ((rows, v, None, None, y, None),
                                         (cols, v, y, None, z, oa),
                                         (rows, z, None, oa, o, None)):
        x2_, add_, out2_ = (x2 if x2 is not None else x1), (add if add is not None else x1), \
            (out2 if out2 is not None else out1)
        args = (q, k, pq, x1, x2_, add_, out1, out2_, *strides4(q), *strides4(k), *strides4(x1),
                *strides4(x2_), *strides4(add_), *strides4(out1), *strides4(out2_))
        _cc_launch(ppma_cc_fwd_kernel, q, geo["n_lines"], geo["L"], H, W, (*args,),
                   qk_scale_log2=sl, ROW=geo["ROW"], HAS_X2=x2 is not None,
                   HAS_ADD=add is not None)


def cc_backward(do, q, k, v, pq, y, z, dq, dk, dv, H: int, W: int, scale: float):
    """Criss-cross gradients into dq, dk, dv (same strides); returns (dP, dQ) fp32 (B, h, N)."""
    b, h, n, d = q.shape
    f32 = [q.new_empty((b, h, n, d), dtype=torch.float32) for _ in range(5)]
    d_z, d_y, acc_q, acc_k, acc_v = f32
    g_p, g_q = (q.new_empty((b, h, n), dtype=torch.float32) for _ in range(2))
    sl = qk_scale_log2(scale)
    base = (*strides4(q), *strides4(k), *strides4(v), *strides4(do), *strides4(dq))
    passes = (  # (row?, X, DX, OUT_T, GZ, WRITE_T, GRADS, ACCUM): transposes first, then
        # the gradient passes (one job per pass keeps registers low enough for 64-token lines)
        (True, y, y, d_z, g_p, True, False, False),
        (False, y, y, d_y, g_q, True, False, False),
        (False, y, d_z, d_y, g_q, False, True, False),
        (True, z, d_y, d_y, g_p, False, True, True),
    )
    for row, x, dx, out_t, gz, write_t, grads, accum in passes:
        args = (q, k, v, do, pq, x, dx, out_t, acc_q, acc_k, acc_v, dq, dk, dv, gz, *base)
        _cc_launch(ppma_cc_bwd_kernel, q, H if row else W, W if row else H, H, W, args,
                   scale=float(scale), qk_scale_log2=sl, ROW=row, WRITE_T=write_t, GRADS=grads,
                   ACCUM=accum)
    return g_p, g_q


# --------------------------------------------------------------------------------------------
# RoPE as PPMA applies it (theta_shift): 1D over the raster index, interleaved pairs
# --------------------------------------------------------------------------------------------


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
    mask = (tok < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(tile_ptrs(X, tok, offs_d, sxn, sxd), mask=mask, other=0.0).to(tl.float32)
    x_pair = tl.load(tile_ptrs(X, tok, pair, sxn, sxd), mask=mask, other=0.0).to(tl.float32)
    tab = tok.to(tl.int64)[:, None] * HEAD_DIM
    cos = tl.load(COS + tab + offs_d[None, :], mask=mask, other=0.0)
    even = (offs_d % 2 == 0)[None, :]
    if BACKWARD:
        sin_pair = tl.load(SIN + tab + pair[None, :], mask=mask, other=0.0)
        y = x * cos + tl.where(even, x_pair, -x_pair) * sin_pair
    else:
        sin = tl.load(SIN + tab + offs_d[None, :], mask=mask, other=0.0)
        y = x * cos + tl.where(even, -x_pair, x_pair) * sin
    tl.store(tile_ptrs(Y, tok, offs_d, syn, syd), y.to(Y.dtype.element_ty), mask=mask)


ROPE_BLOCK_T = 64


def rope(x, sin, cos, y, backward: bool = False):
    """y (B, h, N, d) <- RoPE of x (or its transpose for ``backward``); sin, cos (N, d) fp32
    contiguous."""
    b, h, n, d = x.shape
    grid = (b * h * cdiv(n, ROPE_BLOCK_T),)
    ppma_rope_kernel[grid](x, sin, cos, y, *strides4(x), *strides4(y), h, n, d,
                           BACKWARD=backward, BLOCK_T=ROPE_BLOCK_T,
                           BLOCK_D=triton.next_power_of_2(d))


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

# Tile candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and (BLOCK_D, fp32?),
# preferred first (spill-free in a sweep with the AOT harness), then tuning.FALLBACK_TILES. Pure
# tuning: the launcher drops those that spill on the machine that runs them (tuning.py). fp32
# uses full-precision FMA dots and needs smaller tiles. The backward tiles must hold whole image
# rows (WP <= min(BLOCK_M, BLOCK_N)): a geometric constraint, so candidates are filtered by it.
TILES = {
    "fwd": {
        (16, False): [(64, 32, 4, 1), (32, 32, 8, 1)],
        (32, False): [(64, 32, 4, 1), (32, 32, 8, 1)],
        (64, False): [(64, 32, 4, 1), (32, 32, 8, 1)],
        (16, True): [(32, 32, 8, 1), (32, 32, 4, 1)],
        (32, True): [(32, 16, 4, 1), (16, 16, 4, 1)],
        (64, True): [(32, 32, 8, 1), (16, 32, 4, 1)],
    },
    "dq": {
        (16, False): [(32, 32, 4, 1), (32, 32, 8, 1)],
        (32, False): [(32, 32, 4, 1), (32, 32, 8, 1)],
        (64, False): [(32, 32, 8, 1)],
        (16, True): [(32, 32, 4, 1)],
        (32, True): [(32, 32, 8, 1)],
        (64, True): [(32, 32, 4, 1)],
    },
    "dkdv": {
        (16, False): [(32, 32, 4, 1), (32, 32, 8, 1)],
        (32, False): [(32, 32, 4, 1), (32, 32, 8, 1)],
        (64, False): [(32, 32, 8, 1)],
        (16, True): [(32, 32, 4, 1)],
        (32, True): [(32, 32, 4, 1)],
        (64, True): [(16, 16, 4, 1)],
    },
}


def _candidates(kernel: str):
    preferred = table_candidates(TILES[kernel])

    def candidates(*, WP, **meta):
        # the forward takes any WP; the backward needs whole rows per tile
        return [c for c in preferred(**meta) if kernel == "fwd" or min(c.kwargs.values()) >= WP]
    return candidates


# Declared capability: head dims up to 64; the backward takes maps up to MAX_TRAIN_WIDTH[fp32,
# BLOCK_D] wide (its tiles hold whole rows, and wider tiles spill registers).
MAX_HEAD_DIM = 64
MAX_TRAIN_WIDTH = {(False, 16): 32, (False, 32): 32, (False, 64): 32,
                   (True, 16): 32, (True, 32): 32, (True, 64): 16}


def max_width(head_dim: int, fp32: bool) -> int:
    """Widest map (W) the backward takes: its tiles must hold whole image rows."""
    return MAX_TRAIN_WIDTH[fp32, block_d(head_dim)]


def unsupported(head_dim: int, fp32: bool, W: int, backward: bool = True):
    """Why the triton backend refuses these inputs (None when it takes them)."""
    if why := capability_reason("PPMA", head_dim, fp32, MAX_HEAD_DIM):
        return why
    if backward and W > max_width(head_dim, fp32):
        dtype = "float32" if fp32 else "16-bit"
        return (f"map width W={W} > {max_width(head_dim, fp32)}: the {dtype} triton backward "
                "needs whole image rows per tile (forward-only calls take any width)")
    return None


_KEY = ["n_virt", "HEAD_DIM"]
ppma_fwd = Launcher(ppma_fwd_kernel, _candidates("fwd"), _KEY)
ppma_bwd_dq = Launcher(ppma_bwd_dq_kernel, _candidates("dq"), _KEY)
ppma_bwd_dkdv = Launcher(ppma_bwd_dkdv_kernel, _candidates("dkdv"), _KEY)


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.ppma on validated inputs)
# --------------------------------------------------------------------------------------------


def prefix_table(log_decay_h: torch.Tensor, log_decay_v: torch.Tensor, H: int, W: int):
    """(B, h, N) int64 words, each packing the fp32 pair (P, Q) of a cell: P the row prefix sums
    of a, Q the column prefix sums of g (little-endian: P in the low word)."""
    b, h, n = log_decay_h.shape
    p = torch.cumsum(log_decay_h.float().reshape(b, h, H, W), dim=3)
    q = torch.cumsum(log_decay_v.float().reshape(b, h, H, W), dim=2)
    return torch.stack([p, q], dim=-1).reshape(b, h, n, 2).view(torch.int64).squeeze(-1)


def _geometry(H: int, W: int) -> tuple[int, int]:
    wp = triton.next_power_of_2(W)
    return wp, H * wp



def forward(q, k, v, pq, o, o1, lse, H: int, W: int, scale: float):
    """q, k, v (B, h, N, d) -> o (B, h, N, d), o1 (direction-1 output, fp32) and lse (B, h, 2, N)
    (base-2 log-sum-exp per direction); pq from :func:`prefix_table`."""
    b, h, n, d = q.shape
    wp, n_virt = _geometry(H, W)
    ppma_fwd(row_grid(b * h, n_virt, "BLOCK_M"), q, k, v, o, o1, lse, pq,
             *strides4(q), *strides4(k), *strides4(v), *strides4(o), *strides4(o1),
             h, n, H, W, n_virt, d, qk_scale_log2(scale),
             WP=wp, IEEE=exact_fp32(q.dtype), BLOCK_D=block_d(d))


def backward(do, q, k, v, o, o1, lse, pq, dq, dk, dv, H: int, W: int, scale: float):
    """Gradients into dq, dk, dv; returns (dP, dQ), fp32 (B, h, N) gradients of the prefix
    tables (every element written: each cell belongs to one query row tile and one key row
    tile)."""
    b, h, n, d = q.shape
    wp, n_virt = _geometry(H, W)
    # delta per direction: rowsum(dO∘O1) and rowsum(dO∘O2) = 2·rowsum(dO∘O) - rowsum(dO∘O1)
    lse1 = lse[:, :, 0]
    delta = torch.stack([launch_delta(o1, do, lse1), launch_delta(o, do, lse1)], dim=2)
    delta[:, :, 1].mul_(2.0).sub_(delta[:, :, 0])
    gpq, gqq, gpk, gqk = (q.new_empty((b, h, n), dtype=torch.float32) for _ in range(4))
    common = (h, n, H, W, n_virt, d, float(scale), qk_scale_log2(scale))
    meta = dict(WP=wp, IEEE=exact_fp32(q.dtype), BLOCK_D=block_d(d))
    qkv = (*strides4(q), *strides4(k), *strides4(v), *strides4(do))
    ppma_bwd_dq(row_grid(b * h, n_virt, "BLOCK_M"), q, k, v, do, lse, delta, pq, dq,
                gpq, gqq, *qkv, *strides4(dq), *common, **meta)
    ppma_bwd_dkdv(row_grid(b * h, n_virt, "BLOCK_N"), q, k, v, do, lse, delta, pq, dk,
                  dv, gpk, gqk, *qkv, *strides4(dk), *strides4(dv), *common, **meta)
    return gpq + gpk, gqq + gqk


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
# ahead-of-time compile cases (tests/test_aot_compile.py compiles each for sm_80 and sm_90)
# --------------------------------------------------------------------------------------------

_POINTERS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "X", "DX", "Y", "X1", "X2", "ADD",
             "OUT1", "OUT2")
_F32_POINTERS = ("O1", "LSE", "DELTA", "GPQ", "GQQ", "GPK", "GQK", "OUT_T", "ACC_Q", "ACC_K",
                 "ACC_V", "GZ")


def _aot_signature(fn, ptr_dtype: str) -> tuple[dict, dict]:
    """Runtime-arg types of a launch on q, k, v viewed out of packed projections (see
    :func:`.aot.launch_signature`); the packed prefix-sum table is i64."""
    pointers = {n: f"*{ptr_dtype}" for n in _POINTERS}
    pointers.update({n: "*fp32" for n in _F32_POINTERS}, PQ="*i64")
    from .aot import launch_signature

    return launch_signature(fn, pointers)



def aot_specs():
    """A handful of specialisations: the three full-attention kernels in fp16 and fp32 at PPMA-T
    stage 3 (14×14 map: WP = 16, d = 32) and the backward at the widest declared map (WP = 32),
    each with its tile candidates; the criss-cross kernels at the longest lines (64 in 16-bit,
    32 in fp32); the decay and RoPE kernels (one fixed config each). bf16 compiles like fp16."""
    from .aot import AotCase, AotSpec, spec_from_launcher

    specs = []
    full = [(k, dt, 32, wp) for k in ("fwd", "dq", "dkdv") for dt in ("fp16", "fp32")
            for wp in ((16,) if k == "fwd" else (16, 32))]
    launchers = {"fwd": ppma_fwd, "dq": ppma_bwd_dq, "dkdv": ppma_bwd_dkdv}
    for kname, dtype, bd, wp in full:
        launcher = launchers[kname]
        sig, const = _aot_signature(launcher.fn, dtype)
        meta = dict(WP=wp, IEEE=dtype == "fp32", BLOCK_D=bd)
        specs.append(spec_from_launcher(f"ppma.{kname}[{dtype},D={bd},WP={wp}]", launcher, sig,
                                        const, meta))
    cases = []
    for fn in (ppma_decays_fwd_kernel, ppma_decays_bwd_kernel):
        sig, const = _aot_signature(fn, "fp16")
        for name in ("WDT", "BIAS", "ALOG", "DA", "DG", "PW", "PB", "PA"):
            if name in sig:  # fp32 parameters and gradients (an AMP model), fp16 activations
                sig[name] = "*fp32"
        sig.update({n: "*fp32" for n in ("OA", "OG") if n in sig})
        for name in ("sxc", "sdxc"):  # channels-last x: unit channel stride
            if name in sig:
                del sig[name]
                const[name] = 1
        cases.append(AotCase(name=f"ppma.{fn.__name__}[fp16,D=32]", fn=fn, signature=sig,
                             constexprs={**const, "BLOCK_T": DECAY_BLOCK_T, "BLOCK_D": 32},
                             num_warps=4, num_stages=1))
    cc_modes = {"fwd_x2": dict(ROW=False, HAS_X2=True, HAS_ADD=False),
                "bwd_t": dict(ROW=True, WRITE_T=True, GRADS=False, ACCUM=False),
                "bwd_accum": dict(ROW=True, WRITE_T=False, GRADS=True, ACCUM=True)}
    for mname, mode in cc_modes.items():  # the longest lines at head dim 32
        fn = ppma_cc_fwd_kernel if mname.startswith("fwd") else ppma_cc_bwd_kernel
        for dtype in ("fp16", "fp32"):
            sig, const = _aot_signature(fn, dtype)
            if fn is ppma_cc_bwd_kernel:
                sig.update({n: "*fp32" for n in ("X", "DX", "OUT_T", "ACC_Q", "ACC_K", "ACC_V")})
            bl = CC_MAX_LINE[dtype == "fp32"]
            warps = cc_warps(bl, 32, dtype == "fp32")
            cases.append(AotCase(
                name=f"ppma.cc_{mname}[{dtype},L={bl},D=32,w{warps}]", fn=fn, signature=sig,
                constexprs={**const, **mode, "IEEE": dtype == "fp32", "BLOCK_L": bl,
                            "BLOCK_D": 32}, num_warps=warps, num_stages=1))
    sig, const = _aot_signature(ppma_rope_kernel, "fp16")
    sig.update(SIN="*fp32", COS="*fp32")
    cases.append(AotCase(name="ppma.rope[fp16,D=32]", fn=ppma_rope_kernel, signature=sig,
                         constexprs={**const, "BACKWARD": False, "BLOCK_T": ROPE_BLOCK_T,
                                     "BLOCK_D": 32}, num_warps=4, num_stages=1))
    return specs + [AotSpec(c.name, (c,)) for c in cases]  # fixed configs: one candidate
