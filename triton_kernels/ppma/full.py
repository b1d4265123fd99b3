"""PPMA full attention (PPMA's ``MambaAttentionAllDouble``): forward, dQ and dK/dV kernels.

The N×N log-mask is never built. With the prefix tables P (row sums of a) and Q (column sums of
g) of ``common.py``, the bias of query t = (r1, c1) and key s = (r2, c2) in the two directions is

    b1 = σc·(P[r1, c2] - P[r1, c1]) + σr·(Q[r2, c2] - Q[r1, c2])      (L:  corner (r1, c2))
    b2 = σc·(P[r2, c2] - P[r2, c1]) + σr·(Q[r2, c1] - Q[r1, c1])      (Lᵀ: corner (r2, c1))

with σc = sign(c2 - c1), σr = sign(r2 - r1): per-query and per-key values plus the corner
values, which a tile reads once per distinct corner (its query rows × key columns, its key rows
× query columns) and spreads over its scores by broadcast (``_scores``), not one gather per
score. Both directions share one QKᵀ tile and keep their own
online-softmax state (``softmax_rescale`` of the shared core; the single-softmax engine bodies of
``attention_core`` do not apply); the output is the 50/50 average of the two separately
normalised results. A training forward also stores the direction-1 output O1 (fp32) so the
backward can form both softmax "delta" terms (delta2 = 2·rowsum(dO∘O) - delta1): the dQ kernel
computes them as it loads its query rows and stores them for the dK/dV kernel that runs after
it (no delta pre-pass). fp32 inputs use exact fp32
(FMA) dots (``DOT_PRECISION`` "ieee").

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
cumulative sums (``common.decay_grads``). No N×N tensor anywhere.
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
    program_coords,
    qk_scale_log2,
    row_grid,
    softmax_finish,
    softmax_p_ds,
    softmax_rescale,
    store_rows,
    strides_of,
)
from ..tuning import Launcher, capability_reason, launch_key, table_candidates
from .common import LOG2E_JIT, aot_signature, load_pq, sign

# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _coords(idx, H, W, WP: tl.constexpr):
    """Virtual indices ``idx`` -> (row, column, raster token, real?)."""
    r = idx // WP
    c = idx % WP
    real = (c < W) & (r < H)
    return r, c, r * W + c, real


@triton.jit
def _key_tile(K, V, PQ, sk, sv, idx, H, W, WP: tl.constexpr, offs_d, dmask):
    """The key positions ``idx``: their cells (row, column, token, real?, P, Q), k and v."""
    r, c, tok, real = _coords(idx, H, W, WP)
    k = load_rows(K, tok, offs_d, real, dmask, sk)
    v = load_rows(V, tok, offs_d, real, dmask, sv)
    p, q = load_pq(PQ, tok, real)
    return (r, c, tok, real, p, q), k, v


@triton.jit
def _query_grad_tile(Q, DO, LSE, DELTA, PQ, sq, sdo, idx, N, H, W, WP: tl.constexpr, offs_d,
                     dmask, outs, FROM_OUTPUTS: tl.constexpr):
    """The query positions ``idx``: their cells (as :func:`_key_tile`), q, dO and the
    per-direction statistics (lse1, lse2, delta1, delta2; LSE, DELTA: (2, N), a row per
    direction). delta1 = rowsum(dO∘O1), delta2 = rowsum(dO∘O2) = 2·rowsum(dO∘O) - delta1: read
    from DELTA, or with ``FROM_OUTPUTS`` computed from ``outs`` = (O, (son, sod), O1,
    (so1n, so1d)) and stored to DELTA (the dQ kernel does, for the dK/dV kernel after it)."""
    r, c, tok, real = _coords(idx, H, W, WP)
    q = load_rows(Q, tok, offs_d, real, dmask, sq)
    do = load_rows(DO, tok, offs_d, real, dmask, sdo)
    p_cell, q_cell = load_pq(PQ, tok, real)
    if FROM_OUTPUTS:
        o1 = load_rows(outs[2], tok, offs_d, real, dmask, outs[3])
        delta1 = tl.sum(o1 * do.to(tl.float32), 1)
        o = load_rows(outs[0], tok, offs_d, real, dmask, outs[1])
        delta2 = 2.0 * tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - delta1
        tl.store(DELTA + tok, delta1, mask=real)
        tl.store(DELTA + N + tok, delta2, mask=real)
    else:
        delta1 = tl.load(DELTA + tok, mask=real, other=0.0)
        delta2 = tl.load(DELTA + N + tok, mask=real, other=0.0)
    stats = (tl.load(LSE + tok, mask=real, other=0.0), tl.load(LSE + N + tok, mask=real, other=0.0),
             delta1, delta2)
    return (r, c, tok, real, p_cell, q_cell), q, do, stats


@triton.jit
def _tile_lines(start, BLOCK: tl.constexpr, WP: tl.constexpr):
    """The tile of BLOCK virtual positions from ``start`` as (image rows, columns per row): its
    BLOCK // WP whole rows, or the one row a tile narrower than WP lies in; a position m of
    the tile is (rows[m // C], cols[m % C]), C = min(BLOCK, WP)."""
    C: tl.constexpr = BLOCK if BLOCK < WP else WP
    rows = start // WP + tl.arange(0, BLOCK // C)
    cols = start % WP + tl.arange(0, C)
    return rows, cols


@triton.jit
def _corners(PQ, H, W, rows, cols):
    """(P, Q) at the cells (rows[a], cols[b]) of the map: [len(rows), len(cols)], 0 off the map."""
    cell = rows[:, None] * W + cols[None, :]
    return load_pq(PQ, cell, (rows[:, None] < H) & (cols[None, :] < W))


@triton.jit
def _spread(t, KEY_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            WP: tl.constexpr):
    """A [BM, BN] tile from the per-corner values ``t``: t[query row, key column] (``t`` from
    :func:`_corners` of the query rows and key columns), or t[key row, query column] with
    ``KEY_ROWS``. Pure broadcast and reshape over the [row, column, row, column] view of the
    tile (query position m = row·C + column; keys alike): no per-score loads."""
    CM: tl.constexpr = BLOCK_M if BLOCK_M < WP else WP
    CN: tl.constexpr = BLOCK_N if BLOCK_N < WP else WP
    RM: tl.constexpr = BLOCK_M // CM
    RN: tl.constexpr = BLOCK_N // CN
    if KEY_ROWS:
        x = tl.broadcast_to(tl.trans(t)[None, :, :, None], [RM, CM, RN, CN])
    else:
        x = tl.broadcast_to(t[:, None, None, :], [RM, CM, RN, CN])
    return tl.reshape(x, [BLOCK_M, BLOCK_N])


@triton.jit
def _scores(PQ, geo, cq, ck, q, k, qk_scale_log2, WP: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(s, b1, b2, pair, σc, σr) of a [BM, BN] tile: s = q·kᵀ·scale·log2(e), the log-masks b1, b2
    of both directions (natural units; direction i's logits are s + bi·log2(e)), the pairs that
    exist (both cells real). ``geo`` = (H, W, first query position, first key position).

    The corner values come from the tile's few distinct corners, not one gather per score: the
    corners (r1, c2) of a tile are its query rows × its key columns, and (r2, c1) its key rows ×
    its query columns (e.g. 4 × 16 and 2 × 16 cells for a 64 × 32 tile of a 14-wide map)."""
    H, W, start_m, start_n = geo
    r1, c1, _, vq, p_q, q_q = cq
    r2, c2, _, vk, p_k, q_k = ck
    pair = vq[:, None] & vk[None, :]
    rows_m, cols_m = _tile_lines(start_m, BLOCK_M, WP)
    rows_n, cols_n = _tile_lines(start_n, BLOCK_N, WP)
    t_p1, t_q1 = _corners(PQ, H, W, rows_m, cols_n)  # L's corners (r1, c2)
    t_p2, t_q2 = _corners(PQ, H, W, rows_n, cols_m)  # Lᵀ's corners (r2, c1)
    p_c1 = _spread(t_p1, False, BLOCK_M, BLOCK_N, WP)
    q_c1 = _spread(t_q1, False, BLOCK_M, BLOCK_N, WP)
    p_c2 = _spread(t_p2, True, BLOCK_M, BLOCK_N, WP)
    q_c2 = _spread(t_q2, True, BLOCK_M, BLOCK_N, WP)
    sc = sign(c2[None, :] - c1[:, None])
    sr = sign(r2[None, :] - r1[:, None])
    b1 = sc * (p_c1 - p_q[:, None]) + sr * (q_k[None, :] - q_c1)
    b2 = sc * (p_k[None, :] - p_c2) + sr * (q_c2 - q_q[:, None])
    s = mma(q, tl.trans(k), DOT_PRECISION) * qk_scale_log2
    return s, b1, b2, pair, sc, sr


@triton.jit
def _bwd_pair(PQ, geo, cq, ck, q, k, v, do, stats, qk_scale_log2, WP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(P1, P2, G1, G2, σc, σr) of one tile: P per direction and the natural-unit logit
    gradients G = ½·P·(dP - delta) (½: each direction carries half of the output)."""
    lse1, lse2, delta1, delta2 = stats
    s, b1, b2, pair, sc, sr = _scores(PQ, geo, cq, ck, q, k, qk_scale_log2, WP, BLOCK_M,
                                      BLOCK_N, DOT_PRECISION)
    dp = mma(do, tl.trans(v), DOT_PRECISION)
    p1, ds1 = softmax_p_ds(s + b1 * LOG2E_JIT, dp, lse1, delta1, pair)
    p2, ds2 = softmax_p_ds(s + b2 * LOG2E_JIT, dp, lse2, delta2, pair)
    return p1, p2, 0.5 * ds1, 0.5 * ds2, sc, sr


@triton.jit
def _corner_sums_q(g, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WP: tl.constexpr):
    """Σ of a [BM, BN] tile over key rows (same key column), then over query columns (same
    query row): [query row, key column]."""
    t = tl.sum(tl.reshape(g, [BLOCK_M, BLOCK_N // WP, WP]), 1)
    return tl.sum(tl.reshape(t, [BLOCK_M // WP, WP, WP]), 1)


@triton.jit
def _corner_sums_k(g, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WP: tl.constexpr):
    """Σ of a [BM, BN] tile over query rows (same query column), then over key columns (same
    key row): [query column, key row]."""
    t = tl.sum(tl.reshape(g, [BLOCK_M // WP, WP, BLOCK_N]), 0)
    return tl.sum(tl.reshape(t, [WP, BLOCK_N // WP, WP]), 2)


@triton.jit
def _head_bases(pid_bh, n_heads, N, Q, K, V, PQ, LSE, sqb, sqh, skb, skh, svb, svh):
    """Q, K, V, PQ and LSE at (batch, head) ``pid_bh``."""
    return (Q + bh_offset(pid_bh, n_heads, sqb, sqh), K + bh_offset(pid_bh, n_heads, skb, skh),
            V + bh_offset(pid_bh, n_heads, svb, svh), PQ + pid_bh * N, LSE + pid_bh * 2 * N)


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
    WP: tl.constexpr, DOT_PRECISION: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """o, and with ``SAVE`` (training) what the backward reads: O1 and both directions' LSE."""
    pid_bh, pid_m = program_coords(n_virt, BLOCK_M)
    Q, K, V, PQ, LSE = _head_bases(pid_bh, n_heads, N, Q, K, V, PQ, LSE, sqb, sqh, skb, skh,
                                   svb, svh)
    O += bh_offset(pid_bh, n_heads, sob, soh)
    O1 += bh_offset(pid_bh, n_heads, so1b, so1h)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    r1, c1, tq, vq = _coords(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), H, W, WP)
    q = load_rows(Q, tq, offs_d, vq, dmask, (sqn, sqd))
    p_q, q_q = load_pq(PQ, tq, vq)
    cq = (r1, c1, tq, vq, p_q, q_q)

    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_virt, BLOCK_N):
        ck, k, v = _key_tile(K, V, PQ, (skn, skd), (svn, svd), start_n + tl.arange(0, BLOCK_N),
                             H, W, WP, offs_d, dmask)
        s, b1, b2, pair, _, _ = _scores(PQ, (H, W, pid_m * BLOCK_M, start_n), cq, ck, q, k,
                                        qk_scale_log2, WP, BLOCK_M, BLOCK_N, DOT_PRECISION)
        s1 = tl.where(pair, s + b1 * LOG2E_JIT, float("-inf"))
        s2 = tl.where(pair, s + b2 * LOG2E_JIT, float("-inf"))
        m1, l1, alpha1, p1 = softmax_rescale(m1, l1, s1)
        acc1 = acc1 * alpha1[:, None] + mma(p1.to(v.dtype), v, DOT_PRECISION)
        m2, l2, alpha2, p2 = softmax_rescale(m2, l2, s2)
        acc2 = acc2 * alpha2[:, None] + mma(p2.to(v.dtype), v, DOT_PRECISION)

    out1, lse1 = softmax_finish(m1, l1, acc1)
    out2, lse2 = softmax_finish(m2, l2, acc2)
    store_rows(O, tq, offs_d, vq, dmask, (son, sod), 0.5 * (out1 + out2))
    if SAVE:
        store_rows(O1, tq, offs_d, vq, dmask, (so1n, so1d), out1)
        tl.store(LSE + tq, lse1, mask=vq)
        tl.store(LSE + N + tq, lse2, mask=vq)


@triton.jit
def ppma_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, PQ, DQ, GPQ, GQQ, O, O1,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd, sob, soh, son, sod, so1b, so1h, so1n, so1d,
    n_heads, N, H, W, n_virt, HEAD_DIM, scale, qk_scale_log2,
    WP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq, and the prefix-table gradients of the cells of this program's query rows; also the
    rows' softmax deltas (from O, O1 and dO) into DELTA, which the dK/dV kernel reads after it
    (no delta pre-pass)."""
    pid_bh, pid_m = program_coords(n_virt, BLOCK_M)
    Q, K, V, PQ, LSE = _head_bases(pid_bh, n_heads, N, Q, K, V, PQ, LSE, sqb, sqh, skb, skh,
                                   svb, svh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    DELTA += pid_bh * 2 * N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    outs = (O + bh_offset(pid_bh, n_heads, sob, soh), (son, sod),
            O1 + bh_offset(pid_bh, n_heads, so1b, so1h), (so1n, so1d))
    cq, q, do, stats = _query_grad_tile(Q, DO, LSE, DELTA, PQ, (sqn, sqd), (sdon, sdod),
                                        pid_m * BLOCK_M + tl.arange(0, BLOCK_M), N, H, W, WP,
                                        offs_d, dmask, outs, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    g_p = tl.zeros([BLOCK_M], tl.float32)       # own cells (query side)
    g_q = tl.zeros([BLOCK_M], tl.float32)
    x_p = tl.zeros([BLOCK_M // WP, WP], tl.float32)  # corners (r1, c2): [query row, key column]
    x_q = tl.zeros([BLOCK_M // WP, WP], tl.float32)
    for start_n in range(0, n_virt, BLOCK_N):
        ck, k, v = _key_tile(K, V, PQ, (skn, skd), (svn, svd), start_n + tl.arange(0, BLOCK_N),
                             H, W, WP, offs_d, dmask)
        _, _, g1, g2, sc, sr = _bwd_pair(PQ, (H, W, pid_m * BLOCK_M, start_n), cq, ck, q, k, v,
                                         do, stats, qk_scale_log2, WP, BLOCK_M, BLOCK_N,
                                         DOT_PRECISION)
        dq += mma((g1 + g2).to(k.dtype), k, DOT_PRECISION)
        g1c = g1 * sc
        g1r = g1 * sr
        g_p -= tl.sum(g1c, 1)
        g_q -= tl.sum(g2 * sr, 1)
        x_p += _corner_sums_q(g1c, BLOCK_M, BLOCK_N, WP)
        x_q -= _corner_sums_q(g1r, BLOCK_M, BLOCK_N, WP)

    tq = cq[2]
    vq = cq[3]
    DQ += bh_offset(pid_bh, n_heads, sdqb, sdqh)
    store_rows(DQ, tq, offs_d, vq, dmask, (sdqn, sdqd), dq * scale)
    # [query row, column] flattens to the tile's own virtual order: cell (r1, c) <-> index.
    tl.store(GPQ + pid_bh * N + tq, g_p + tl.reshape(x_p, [BLOCK_M]), mask=vq)
    tl.store(GQQ + pid_bh * N + tq, g_q + tl.reshape(x_q, [BLOCK_M]), mask=vq)


@triton.jit
def ppma_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, PQ, DK, DV, GPK, GQK,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, N, H, W, n_virt, HEAD_DIM, scale, qk_scale_log2,
    WP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv, and the prefix-table gradients of the cells of this program's key rows."""
    pid_bh, pid_n = program_coords(n_virt, BLOCK_N)
    Q, K, V, PQ, LSE = _head_bases(pid_bh, n_heads, N, Q, K, V, PQ, LSE, sqb, sqh, skb, skh,
                                   svb, svh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    DELTA += pid_bh * 2 * N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    ck, k, v = _key_tile(K, V, PQ, (skn, skd), (svn, svd), pid_n * BLOCK_N + tl.arange(0, BLOCK_N),
                         H, W, WP, offs_d, dmask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    g_p = tl.zeros([BLOCK_N], tl.float32)       # own cells (key side)
    g_q = tl.zeros([BLOCK_N], tl.float32)
    x_p = tl.zeros([WP, BLOCK_N // WP], tl.float32)  # corners (r2, c1): [query column, key row]
    x_q = tl.zeros([WP, BLOCK_N // WP], tl.float32)
    for start_m in range(0, n_virt, BLOCK_M):
        cq, q, do, stats = _query_grad_tile(Q, DO, LSE, DELTA, PQ, (sqn, sqd), (sdon, sdod),
                                            start_m + tl.arange(0, BLOCK_M), N, H, W, WP, offs_d,
                                            dmask, (), False)
        p1, p2, g1, g2, sc, sr = _bwd_pair(PQ, (H, W, start_m, pid_n * BLOCK_N), cq, ck, q, k,
                                           v, do, stats, qk_scale_log2, WP, BLOCK_M, BLOCK_N,
                                           DOT_PRECISION)
        dv += mma(tl.trans(0.5 * (p1 + p2)).to(do.dtype), do, DOT_PRECISION)
        dk += mma(tl.trans(g1 + g2).to(q.dtype), q, DOT_PRECISION)
        g2c = g2 * sc
        g_p += tl.sum(g2c, 0)
        g_q += tl.sum(g1 * sr, 0)
        x_p -= _corner_sums_k(g2c, BLOCK_M, BLOCK_N, WP)
        x_q += _corner_sums_k(g2 * sr, BLOCK_M, BLOCK_N, WP)

    tk = ck[2]
    vk = ck[3]
    DK += bh_offset(pid_bh, n_heads, sdkb, sdkh)
    DV += bh_offset(pid_bh, n_heads, sdvb, sdvh)
    store_rows(DK, tk, offs_d, vk, dmask, (sdkn, sdkd), dk * scale)
    store_rows(DV, tk, offs_d, vk, dmask, (sdvn, sdvd), dv)
    # [key row, column] flattens to the tile's own virtual order: cell (r2, c) <-> index.
    tl.store(GPK + pid_bh * N + tk, g_p + tl.reshape(tl.trans(x_p), [BLOCK_N]), mask=vk)
    tl.store(GQK + pid_bh * N + tk, g_q + tl.reshape(tl.trans(x_q), [BLOCK_N]), mask=vk)


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


def _geometry(H: int, W: int) -> tuple[int, int]:
    wp = triton.next_power_of_2(W)
    return wp, H * wp


def _launch_args(q, k, v, pq, lse, H: int, W: int, scale: float) -> dict:
    """The keyword arguments every full-attention kernel takes."""
    b, h, n, d = q.shape
    wp, n_virt = _geometry(H, W)
    return dict(Q=q, K=k, V=v, PQ=pq, LSE=lse, **strides_of("q", q), **strides_of("k", k),
                **strides_of("v", v), n_heads=h, N=n, H=H, W=W, n_virt=n_virt, HEAD_DIM=d,
                qk_scale_log2=qk_scale_log2(scale), WP=wp,
                DOT_PRECISION=dot_precision(q.dtype, exact="ieee"), BLOCK_D=block_d(d))


def forward(q, k, v, pq, o, o1, lse, H: int, W: int, scale: float):
    """q, k, v (B, h, N, d) -> o (B, h, N, d), o1 (direction-1 output, fp32) and lse (B, h, 2, N)
    (base-2 log-sum-exp per direction); pq from :func:`.common.prefix_table`. o1 and lse None:
    inference, o alone is written (o1 would be half again the bytes of q, k, v and o)."""
    save = o1 is not None
    o1, lse = (o1, lse) if save else (o, pq)  # placeholders the kernel does not touch
    ppma_fwd.launch(launch_key(H, W, scale, save, q, k, v, pq, o, o1, lse),
                    row_grid(q.shape[0] * q.shape[1], _geometry(H, W)[1], "BLOCK_M"),
                    dict(Q=q, K=k, V=v, PQ=pq, LSE=lse, O=o, O1=o1),
                    lambda: dict(**strides_of("o", o), **strides_of("o1", o1), SAVE=save,
                                 **_launch_args(q, k, v, pq, lse, H, W, scale)))


def backward(do, q, k, v, o, o1, lse, pq, dq, dk, dv, H: int, W: int, scale: float):
    """Gradients into dq, dk, dv; returns (dP, dQ) of the query side and (dP, dQ) of the key
    side, fp32 (B, h, N) gradients of the prefix tables, summed by :func:`.common.decay_grads`
    (every element written: each cell belongs to one query row tile and one key row tile)."""
    b, h, n, d = q.shape
    delta = torch.empty_like(lse)  # the dQ kernel writes both directions' deltas for dK/dV
    gpq, gqq, gpk, gqk = (q.new_empty((b, h, n), dtype=torch.float32) for _ in range(4))
    key = launch_key(H, W, scale, q, k, v, pq, lse, do, o, o1, dq, dk, dv)
    tensors = dict(Q=q, K=k, V=v, PQ=pq, LSE=lse, DO=do, DELTA=delta)

    def common(**more):
        return dict(_launch_args(q, k, v, pq, lse, H, W, scale), **strides_of("do", do),
                    scale=float(scale), **more)

    n_virt = _geometry(H, W)[1]
    ppma_bwd_dq.launch(key, row_grid(b * h, n_virt, "BLOCK_M"),
                       dict(tensors, DQ=dq, GPQ=gpq, GQQ=gqq, O=o, O1=o1),
                       lambda: common(**strides_of("dq", dq), **strides_of("o", o),
                                      **strides_of("o1", o1)))
    ppma_bwd_dkdv.launch(key, row_grid(b * h, n_virt, "BLOCK_N"),
                         dict(tensors, DK=dk, DV=dv, GPK=gpk, GQK=gqk),
                         lambda: common(**strides_of("dk", dk), **strides_of("dv", dv)))
    return gpq, gqq, gpk, gqk


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot_compile.py compiles each for sm_80 and sm_90)
# --------------------------------------------------------------------------------------------


def aot_specs():
    """The three kernels in fp16 and fp32 at PPMA-T stage 3 (14×14 map: WP = 16, d = 32) and the
    backward at the widest declared map (WP = 32), each with its tile candidates. bf16 compiles
    like fp16."""
    from ..aot import spec_from_launcher

    specs = []
    launchers = {"fwd": ppma_fwd, "dq": ppma_bwd_dq, "dkdv": ppma_bwd_dkdv}
    for kname, launcher in launchers.items():
        for dtype in ("fp16", "fp32"):
            for wp in ((16,) if kname == "fwd" else (16, 32)):
                sig, const = aot_signature(launcher.fn, dtype)
                meta = dict(WP=wp, DOT_PRECISION=aot_precision(dtype, exact="ieee"), BLOCK_D=32,
                            **(dict(SAVE=True) if kname == "fwd" else {}))
                specs.append(spec_from_launcher(f"ppma.{kname}[{dtype},D=32,WP={wp}]", launcher,
                                                sig, const, meta))
    return specs
