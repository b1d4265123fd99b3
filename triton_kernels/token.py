"""Triton kernels for token attention (EViT / ToMe / token dropping): kept-token softmax attention.

q, k, v are the full (B, heads, N, d) token maps. With ``keep_idx`` (B, K) the kernels attend among
the K kept tokens only, reading them *in place*: tile row / column ``i`` of batch ``b`` is token
``keep_idx[b, i]``, turned into a pointer offset on the fly (int64), so no gathered copy of q, k, v
is ever made. Without it, row i is token i (K = N).

* ``key_bias`` (B, N) or (B, heads, N) is indexed by the *original* token index (it follows
  ``keep_idx``) and added to the logits in-kernel (ToMe's proportional attention: log(size);
  -inf masks a key). A query whose keys are all -inf gets o = 0, lse = -inf and zero gradients
  (the shared softmax core's empty-row rule).
* Ragged batches (``cu_seqlens``, flash-attn's packed layout): the op passes the packed (T, h, d)
  tensors as (S, h, T, d) views with batch stride 0, so every kernel runs one program per
  (sequence, head, tile) exactly as for a dense batch item, with the sequence's first row and
  length read from ``cu_seqlens``; tiles past the end of a short sequence do no work.
* CLS importance (EViT): :func:`cls_probs` recomputes row 0 of P per head,
  p0[b, h, j] = exp2(s[0, j] - lse2[0]), from the forward's log-sum-exp: one extra q0·K pass,
  O(K·d) per (batch, head), no N×N matrix. The op averages it over heads.
* Column-sum importance (GTP-ViT): :func:`colsum`, c[b, h, j] = sum_i P[b, h, i, j], a second
  QKᵀ pass (one program per key tile, P recomputed from the saved log-sum-exp); no gradient.
* Backward (FlashAttention-2, shared core): dK/dV (+ dbias) with one program per key tile,
  dQ with one program per query tile, no atomics. The gradient g of the per-head row-0
  probabilities enters as dP[0, j] += g[j]: the host adds sum_j p0_j g_j to delta[0] and the
  kernels add p0_j g_j to dS[0, j], so it flows to q, k and key_bias exactly like dO does.
  The key-bias gradient is written per head (B, heads, N) at the kept tokens (unique indices:
  plain stores); the host sums over heads for a (B, N) bias.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .attention_core import (
    block_d,
    exact_fp32,
    launch_delta,
    mma,
    program_coords,
    qk_scale_log2,
    row_grid,
    softmax_bwd_scores,
    softmax_finish,
    softmax_step,
    strides4,
    tile_ptrs,
)
from .tuning import Launcher, capability_reason, table_candidates

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _seq(CU, b, n_rows, VARLEN: tl.constexpr):
    """(first row, row count) of sequence ``b``: from ``cu_seqlens`` in varlen mode, else
    (0, K) (every batch item has the same K rows)."""
    if VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = tl.program_id(0) * 0  # an int32 tensor even where n_rows is specialised to 1
        length = n_rows
    return start, length


@triton.jit
def _tokens(IDX, idx_base, sik, start, pos, length, HAS_IDX: tl.constexpr):
    """Positions ``pos`` of a sequence -> (output row, token index in the full map, valid).

    The output row is ``start + pos`` (rows of kept tokens, packed in varlen mode); the token is
    ``keep_idx[row]`` with ``keep_idx``, else the row itself."""
    valid = pos < length
    row = start + pos
    if HAS_IDX:
        tok = tl.load(IDX + idx_base + row.to(tl.int64) * sik, mask=valid, other=0)
    else:
        tok = row
    return row, tok, valid


@triton.jit
def _bias2(BIAS, bias_base, sbn, tok, valid):
    """Key bias of tokens ``tok`` in base-2 units (fp32); 0 outside the valid columns."""
    b = tl.load(BIAS + bias_base + tok.to(tl.int64) * sbn, mask=valid, other=0.0)
    return b.to(tl.float32) * 1.4426950408889634


@triton.jit
def _loop_end(first, length):
    """Loop bound over the other side of the tile: the sequence length, or 0 when this program's
    tile starts past the end of a (short) ragged sequence, so idle programs do no work."""
    return tl.where(first < length, length, 0)


# --------------------------------------------------------------------------------------------
# kernels
#
# Every kernel runs one program per (sequence, head, tile). Dense inputs: a sequence is a batch
# item, K = keep_idx.shape[1] rows (n_rows). Varlen (cu_seqlens): the caller passes the packed
# (T, h, d) tensors as (S, h, T, d) views with batch stride 0, sequence b owns the rows
# cu[b]..cu[b+1]-1 and n_rows is the longest sequence (it only sizes the grid).
# --------------------------------------------------------------------------------------------


@triton.jit
def token_fwd_kernel(
    Q, K, V, O, LSE, IDX, BIAS, CU,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    sib, sik, sbb, sbh, sbn,
    n_heads, slb, slh, n_rows, HEAD_DIM, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_rows, BLOCK_M)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    start, length = _seq(CU, b, n_rows, VARLEN)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh
    idx_base = b * sib
    bias_base = b * sbb + h * sbh
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    pos_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_m, tok_m, valid_m = _tokens(IDX, idx_base, sik, start, pos_m, length, HAS_IDX)
    q_mask = valid_m[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _loop_end(pid_m * BLOCK_M, length), BLOCK_N):
        pos_n = start_n + tl.arange(0, BLOCK_N)
        _, tok_n, valid_n = _tokens(IDX, idx_base, sik, start, pos_n, length, HAS_IDX)
        kv_mask = valid_n[:, None] & dmask[None, :]
        k = tl.load(tile_ptrs(K, tok_n, offs_d, skn, skd), mask=kv_mask, other=0.0)
        v = tl.load(tile_ptrs(V, tok_n, offs_d, svn, svd), mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), IEEE) * qk_scale_log2
        if HAS_BIAS:
            s += _bias2(BIAS, bias_base, sbn, tok_n, valid_n)[None, :]
        s = tl.where(valid_m[:, None] & valid_n[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, v, IEEE)

    out, lse2 = softmax_finish(m_i, l_i, acc)
    tl.store(tile_ptrs(O, row_m, offs_d, son, sod), out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + b * slb + h * slh + row_m, lse2, mask=valid_m)


@triton.jit
def token_cls_probs_kernel(
    Q, K, LSE, IDX, BIAS, CU, P0,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sib, sik, sbb, sbh, sbn,
    n_heads, slb, slh, spb, sph, n_rows, HEAD_DIM, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """p0[b, h, j] = P[b, h, 0, j]: row 0 of each sequence's probabilities, from the saved
    log-sum-exp."""
    pid_bh, pid_n = program_coords(n_rows, BLOCK_N)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    start, length = _seq(CU, b, n_rows, VARLEN)
    idx_base = b * sib
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    # An empty sequence stores nothing, but its start may be one past the last row: read row 0
    # instead (it exists: the op never launches with zero rows).
    first = tl.where(length > 0, start, 0)
    if HAS_IDX:  # the first row's token
        tok0 = tl.load(IDX + idx_base + first.to(tl.int64) * sik)
    else:
        tok0 = first
    Q += b * sqb + h * sqh + tok0.to(tl.int64) * sqn
    q0 = tl.load(Q + offs_d * sqd, mask=dmask, other=0.0).to(tl.float32)
    lse0 = tl.load(LSE + b * slb + h * slh + first)
    lse0 = tl.where(lse0 == float("-inf"), 0.0, lse0)  # row 0 empty: every p is masked below

    pos_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_n, tok_n, valid_n = _tokens(IDX, idx_base, sik, start, pos_n, length, HAS_IDX)
    k = tl.load(tile_ptrs(K + b * skb + h * skh, tok_n, offs_d, skn, skd),
                mask=valid_n[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    s = tl.sum(k * q0[None, :], 1) * qk_scale_log2
    ok = valid_n
    if HAS_BIAS:
        bias = _bias2(BIAS, b * sbb + h * sbh, sbn, tok_n, valid_n)
        s += bias
        ok = ok & (bias > float("-inf"))
    p = tl.where(ok, tl.exp2(s - lse0), 0.0)
    tl.store(P0 + b * spb + h * sph + row_n, p, mask=valid_n)


@triton.jit
def token_colsum_kernel(
    Q, K, LSE, IDX, BIAS, CU, C,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sib, sik, sbb, sbh, sbn,
    n_heads, slb, slh, scb, sch, n_rows, HEAD_DIM, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """c[b, h, j] = sum_i P[b, h, i, j], the attention key j receives (GTP-ViT): a second QKᵀ
    pass that recomputes P from the forward's log-sum-exp, one program per key tile."""
    pid_bh, pid_n = program_coords(n_rows, BLOCK_N)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    start, length = _seq(CU, b, n_rows, VARLEN)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    LSE += b * slb + h * slh
    idx_base = b * sib
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    pos_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_n, tok_n, valid_n = _tokens(IDX, idx_base, sik, start, pos_n, length, HAS_IDX)
    k = tl.load(tile_ptrs(K, tok_n, offs_d, skn, skd), mask=valid_n[:, None] & dmask[None, :],
                other=0.0)
    col_ok = valid_n
    if HAS_BIAS:
        bias = _bias2(BIAS, b * sbb + h * sbh, sbn, tok_n, valid_n)
        col_ok = col_ok & (bias > float("-inf"))
    c = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, _loop_end(pid_n * BLOCK_N, length), BLOCK_M):
        pos_m = start_m + tl.arange(0, BLOCK_M)
        row_m, tok_m, valid_m = _tokens(IDX, idx_base, sik, start, pos_m, length, HAS_IDX)
        q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=valid_m[:, None] & dmask[None, :],
                    other=0.0)
        lse2 = tl.load(LSE + row_m, mask=valid_m, other=0.0)
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # empty rows: every p is masked
        s = mma(q, tl.trans(k), IEEE) * qk_scale_log2
        if HAS_BIAS:
            s += bias[None, :]
        p = tl.where(valid_m[:, None] & col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        c += tl.sum(p, 0)
    tl.store(C + b * scb + h * sch + row_n, c, mask=valid_n)


@triton.jit
def token_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, BIAS, CU, G0, DK, DV, DB,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    sib, sik, sbb, sbh, sbn, sgb, sgh, sdbb, sdbh,
    n_heads, slb, slh, n_rows, HEAD_DIM, scale, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_G0: tl.constexpr, VARLEN: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_n = program_coords(n_rows, BLOCK_N)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    start, length = _seq(CU, b, n_rows, VARLEN)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    LSE += b * slb + h * slh
    DELTA += b * slb + h * slh
    idx_base = b * sib
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    pos_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_n, tok_n, valid_n = _tokens(IDX, idx_base, sik, start, pos_n, length, HAS_IDX)
    kv_mask = valid_n[:, None] & dmask[None, :]
    k = tl.load(tile_ptrs(K, tok_n, offs_d, skn, skd), mask=kv_mask, other=0.0)
    v = tl.load(tile_ptrs(V, tok_n, offs_d, svn, svd), mask=kv_mask, other=0.0)
    col_ok = valid_n
    if HAS_BIAS:
        bias = _bias2(BIAS, b * sbb + h * sbh, sbn, tok_n, valid_n)
        col_ok = col_ok & (bias > float("-inf"))
    if HAS_G0:
        g0 = tl.load(G0 + b * sgb + h * sgh + row_n, mask=valid_n, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, _loop_end(pid_n * BLOCK_N, length), BLOCK_M):
        pos_m = start_m + tl.arange(0, BLOCK_M)
        row_m, tok_m, valid_m = _tokens(IDX, idx_base, sik, start, pos_m, length, HAS_IDX)
        q_mask = valid_m[:, None] & dmask[None, :]
        q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)
        do = tl.load(tile_ptrs(DO, row_m, offs_d, sdon, sdod), mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + row_m, mask=valid_m, other=0.0)
        delta = tl.load(DELTA + row_m, mask=valid_m, other=0.0)
        s = mma(q, tl.trans(k), IEEE) * qk_scale_log2
        if HAS_BIAS:
            s += bias[None, :]
        p, ds = softmax_bwd_scores(s, v, do, lse2, delta, valid_m[:, None] & col_ok[None, :],
                                   IEEE)
        if HAS_G0:  # importance gradient: dP[0, j] += g0[j] (row 0 of the sequence)
            ds += tl.where((pos_m == 0)[:, None], p * g0[None, :], 0.0)
        dv += mma(tl.trans(p).to(do.dtype), do, IEEE)
        dk += mma(tl.trans(ds).to(q.dtype), q, IEEE)
        if HAS_BIAS:
            db += tl.sum(ds, 0)

    tl.store(tile_ptrs(DK + b * sdkb + h * sdkh, tok_n, offs_d, sdkn, sdkd),
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(tile_ptrs(DV + b * sdvb + h * sdvh, tok_n, offs_d, sdvn, sdvd),
             dv.to(DV.dtype.element_ty), mask=kv_mask)
    if HAS_BIAS:
        tl.store(DB + b * sdbb + h * sdbh + tok_n.to(tl.int64), db, mask=valid_n)


@triton.jit
def token_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, BIAS, CU, G0, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    sib, sik, sbb, sbh, sbn, sgb, sgh,
    n_heads, slb, slh, n_rows, HEAD_DIM, scale, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_G0: tl.constexpr, VARLEN: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_rows, BLOCK_M)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    start, length = _seq(CU, b, n_rows, VARLEN)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    idx_base = b * sib
    bias_base = b * sbb + h * sbh
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    pos_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_m, tok_m, valid_m = _tokens(IDX, idx_base, sik, start, pos_m, length, HAS_IDX)
    q_mask = valid_m[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)
    do = tl.load(tile_ptrs(DO, row_m, offs_d, sdon, sdod), mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + b * slb + h * slh + row_m, mask=valid_m, other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + row_m, mask=valid_m, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _loop_end(pid_m * BLOCK_M, length), BLOCK_N):
        pos_n = start_n + tl.arange(0, BLOCK_N)
        row_n, tok_n, valid_n = _tokens(IDX, idx_base, sik, start, pos_n, length, HAS_IDX)
        kv_mask = valid_n[:, None] & dmask[None, :]
        k = tl.load(tile_ptrs(K, tok_n, offs_d, skn, skd), mask=kv_mask, other=0.0)
        v = tl.load(tile_ptrs(V, tok_n, offs_d, svn, svd), mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), IEEE) * qk_scale_log2
        col_ok = valid_n
        if HAS_BIAS:
            bias = _bias2(BIAS, bias_base, sbn, tok_n, valid_n)
            s += bias[None, :]
            col_ok = col_ok & (bias > float("-inf"))
        p, ds = softmax_bwd_scores(s, v, do, lse2, delta, valid_m[:, None] & col_ok[None, :],
                                   IEEE)
        if HAS_G0:  # importance gradient: dP[0, j] += g0[j] (row 0 of the sequence)
            g0 = tl.load(G0 + b * sgb + h * sgh + row_n, mask=valid_n, other=0.0)
            ds += tl.where((pos_m == 0)[:, None], p * g0[None, :], 0.0)
        dq += mma(ds.to(k.dtype), k, IEEE)

    tl.store(tile_ptrs(DQ + b * sdqb + h * sdqh, tok_m, offs_d, sdqn, sdqd),
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

# Tile candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and (BLOCK_D, fp32?),
# preferred first, then tuning.FALLBACK_TILES. The preferred tile is the largest of a sweep,
# (128, 64, 8, 2) down to (16, 16, 8, 1), that compiled without spills in *every*
# specialisation (keep_idx, key_bias, importance gradient, varlen each on / off, (B, N) or
# (B, heads, N) bias: `aot_specs("all")`). Pure tuning: the launcher drops the candidates that
# spill on the machine that runs them (tuning.py). fp32 (tf32x3 dots) needs ~3x the registers of
# fp16/bf16, hence the small fp32 tiles.
TILES = {
    "fwd": {
        (16, False): [(128, 64, 8, 2)],
        (32, False): [(128, 64, 8, 2)],
        (64, False): [(128, 64, 8, 2)],
        (128, False): [(128, 64, 8, 2)],
        (16, True): [(128, 64, 8, 2)],
        (32, True): [(64, 64, 8, 2)],
        (64, True): [(32, 64, 8, 1)],
        (128, True): [(16, 16, 8, 1)],
    },
    "dkdv": {
        (16, False): [(128, 64, 8, 2)],
        (32, False): [(64, 32, 8, 1)],
        (64, False): [(64, 32, 8, 2)],
        (128, False): [(64, 32, 4, 1)],
        (16, True): [(32, 32, 8, 2)],
        (32, True): [(32, 16, 4, 2)],
        (64, True): [(32, 16, 8, 1)],
    },
    "dq": {
        (16, False): [(128, 64, 8, 2)],
        (32, False): [(128, 64, 8, 2)],
        (64, False): [(128, 64, 8, 2)],
        (128, False): [(64, 64, 8, 2)],
        (16, True): [(128, 64, 8, 2)],
        (32, True): [(64, 16, 8, 2)],
        (64, True): [(32, 32, 8, 1)],
    },
}
# colsum (second QKᵀ pass, "colsum" importance): resident key tile, loop over query tiles; it
# holds less than the forward (no V, no accumulator) and takes the forward's tiles except where
# the all-specialisation sweep found a spill (fp16 D=128, fp32 D=16 on sm_80).
TILES["colsum"] = {**TILES["fwd"], (128, False): [(64, 64, 8, 2)],
                     (16, True): [(128, 32, 8, 2)]}
# cls_probs: (BLOCK_N, num_warps) per BLOCK_D (fp32 multiply-reduce, no tl.dot: dtype-agnostic),
# then a small fallback.
CLS_TILES = {16: (128, 4), 32: (128, 4), 64: (64, 4), 128: (32, 4)}
CLS_FALLBACK = (16, 4)

# Declared capability: the largest head dim per (direction, fp32?). The forward (and the
# importance kernels) to 128 in every dtype; the fp32 backward to 64 (above it every dK/dV tile
# down to 16×16 spilled on sm_90 in some specialisation: tf32x3 triples the dot operands).
MAX_HEAD_DIM = {("fwd", False): 128, ("fwd", True): 128, ("bwd", False): 128, ("bwd", True): 64}


def unsupported(head_dim: int, fp32: bool, backward: bool = True):
    """Why the triton backend refuses this input (None when it takes it).

    ``backward``: whether the gradient kernels are needed too (inputs require grad)."""
    if why := capability_reason("token attention", head_dim, fp32, MAX_HEAD_DIM["fwd", fp32]):
        return why
    if backward:
        return capability_reason("token attention's backward", head_dim, fp32,
                                 MAX_HEAD_DIM["bwd", fp32],
                                 " (inference works; train in float16 / bfloat16)")
    return None


def _cls_candidates(*, BLOCK_D, **_):
    rows = dict.fromkeys([CLS_TILES[BLOCK_D], CLS_FALLBACK])
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=1) for n, w in rows]


_KEY = ["n_rows", "HEAD_DIM"]
token_fwd = Launcher(token_fwd_kernel, table_candidates(TILES["fwd"]), _KEY)
token_bwd_dkdv = Launcher(token_bwd_dkdv_kernel, table_candidates(TILES["dkdv"]), _KEY)
token_bwd_dq = Launcher(token_bwd_dq_kernel, table_candidates(TILES["dq"]), _KEY)
token_cls_probs = Launcher(token_cls_probs_kernel, _cls_candidates, _KEY)
token_colsum = Launcher(token_colsum_kernel, table_candidates(TILES["colsum"]), _KEY)


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.token on inputs it has validated)
#
# Tensors are 4-D (B, h, N, d) / 3-D (B, h, K) / keep_idx (B, K) / key_bias (B, N) or
# (B, h, N). Varlen: the op passes packed tensors as views with one "batch" per sequence and
# batch stride 0 (e.g. q (T, h, d) as (S, h, T, d)), ``cu`` int32 (S + 1) and ``n_rows`` = the
# longest sequence; dense: ``cu`` None and ``n_rows`` = K.
# --------------------------------------------------------------------------------------------



def _idx_args(keep_idx, q):
    """(pointer, strides) of keep_idx (int64), or a dummy when absent (HAS_IDX = False)."""
    if keep_idx is None:
        return q, (0, 0)
    return keep_idx, tuple(keep_idx.stride())


def _bias_args(key_bias, q):
    """(pointer, (batch, head, token) strides) of key_bias; head stride 0 for a (B, N) bias."""
    if key_bias is None:
        return q, (0, 0, 0)
    if key_bias.dim() == 2:
        return key_bias, (key_bias.stride(0), 0, key_bias.stride(1))
    return key_bias, tuple(key_bias.stride())


def _flags(q, keep_idx, key_bias, cu):
    return dict(HAS_IDX=keep_idx is not None, HAS_BIAS=key_bias is not None,
                VARLEN=cu is not None, BLOCK_D=block_d(q.shape[-1]))


def forward(q, k, v, keep_idx, key_bias, cu, o, lse, scale: float, n_rows: int):
    """o (B, h, K, d) and base-2 log-sum-exp lse (B, h, K, fp32, unit K stride)."""
    b, h, _, d = q.shape
    idx, idx_s = _idx_args(keep_idx, q)
    bias, bias_s = _bias_args(key_bias, q)
    token_fwd(row_grid(b * h, n_rows, "BLOCK_M"),
              q, k, v, o, lse, idx, bias, q if cu is None else cu, *strides4(q), *strides4(k),
              *strides4(v), *strides4(o), *idx_s, *bias_s, h, *lse.stride()[:2], n_rows, d,
              qk_scale_log2(scale), IEEE=exact_fp32(q.dtype),
              **_flags(q, keep_idx, key_bias, cu))


def cls_probs(q, k, keep_idx, key_bias, cu, lse, p0, scale: float, n_rows: int):
    """p0 (B, h, K) fp32 = row 0 (the first kept query) of the attention probabilities."""
    b, h, _, d = q.shape
    idx, idx_s = _idx_args(keep_idx, q)
    bias, bias_s = _bias_args(key_bias, q)
    token_cls_probs(row_grid(b * h, n_rows, "BLOCK_N"),
                    q, k, lse, idx, bias, q if cu is None else cu, p0, *strides4(q),
                    *strides4(k), *idx_s, *bias_s, h, *lse.stride()[:2], *p0.stride()[:2],
                    n_rows, d, qk_scale_log2(scale), **_flags(q, keep_idx, key_bias, cu))


def colsum(q, k, keep_idx, key_bias, cu, lse, c, scale: float, n_rows: int):
    """c (B, h, K) fp32 = column sums of the attention probabilities (a second QKᵀ pass)."""
    b, h, _, d = q.shape
    idx, idx_s = _idx_args(keep_idx, q)
    bias, bias_s = _bias_args(key_bias, q)
    token_colsum(row_grid(b * h, n_rows, "BLOCK_N"),
                 q, k, lse, idx, bias, q if cu is None else cu, c, *strides4(q), *strides4(k),
                 *idx_s, *bias_s, h, *lse.stride()[:2], *c.stride()[:2], n_rows, d,
                 qk_scale_log2(scale), IEEE=exact_fp32(q.dtype),
                 **_flags(q, keep_idx, key_bias, cu))


def _add_importance_delta(delta, p0, g0, cu):
    """dP[0, j] += g0[j] adds sum_j P[0, j] g0[j] to delta of row 0 of every sequence."""
    if cu is None:
        delta[:, :, 0] += (p0 * g0).sum(-1)
        return
    # varlen: delta, p0, g0 are (S, h, R) views of one (h, R) tensor; row r belongs to sequence
    # seg[r] whose first row is cu[seg[r]] (no host sync: searchsorted on the device)
    rows = torch.arange(p0.shape[-1], device=cu.device, dtype=cu.dtype)
    first = cu[torch.searchsorted(cu[1:], rows, right=True)].long()
    delta[0].index_add_(1, first, p0[0] * g0[0])


def backward(do, q, k, v, o, lse, keep_idx, key_bias, cu, p0, g0, dq, dk, dv, db,
             scale: float, n_rows: int):
    """Gradients into dq, dk, dv (B, h, N, d) and db (B, h, N) fp32 (per-head key-bias grad).

    Only kept tokens are written: with ``keep_idx`` the caller zero-fills dq, dk, dv, db.
    ``g0`` (B, h, K) fp32 is the gradient of ``p0`` (the CLS-row probabilities), or None.
    """
    b, h, _, d = q.shape
    if cu is None:
        delta = launch_delta(o, do, lse)
    else:  # one (1, h, R) pass over the packed rows, seen by every sequence
        delta = launch_delta(o[:1], do[:1], lse[:1]).expand(lse.shape)
    if g0 is not None:
        _add_importance_delta(delta, p0, g0, cu)
    idx, idx_s = _idx_args(keep_idx, q)
    bias, bias_s = _bias_args(key_bias, q)
    cu_t = q if cu is None else cu
    g0_t, g0_s = (q, (0, 0)) if g0 is None else (g0, g0.stride()[:2])
    db_t, db_s = (q, (0, 0)) if db is None else (db, db.stride()[:2])
    common = (h, *lse.stride()[:2], n_rows, d, float(scale), qk_scale_log2(scale))
    meta = dict(HAS_G0=g0 is not None, IEEE=exact_fp32(q.dtype),
                **_flags(q, keep_idx, key_bias, cu))
    qkvdo = (*strides4(q), *strides4(k), *strides4(v), *strides4(do))
    token_bwd_dkdv(row_grid(b * h, n_rows, "BLOCK_N"),
                   q, k, v, do, lse, delta, idx, bias, cu_t, g0_t, dk, dv, db_t, *qkvdo,
                   *strides4(dk), *strides4(dv), *idx_s, *bias_s, *g0_s, *db_s, *common, **meta)
    token_bwd_dq(row_grid(b * h, n_rows, "BLOCK_M"),
                 q, k, v, do, lse, delta, idx, bias, cu_t, g0_t, dq, *qkvdo, *strides4(dq),
                 *idx_s, *bias_s, *g0_s, *common, **meta)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot_compile.py compiles each for sm_80 and sm_90)
# --------------------------------------------------------------------------------------------

_FLOAT_PTRS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
_FP32_PTRS = ("LSE", "DELTA", "P0", "G0", "DB", "BIAS", "C")
# unit strides a real launch specialises to the constant 1: channel strides of q/k/v/o/grads,
# keep_idx's K stride, the key-bias token stride
_UNIT = ("sqd", "skd", "svd", "sod", "sdod", "sdkd", "sdvd", "sdqd", "sik", "sbn")


def _aot_signature(fn, ptr_dtype: str) -> tuple[dict, dict]:
    """Runtime-arg types of a launch on q, k, v viewed out of a packed projection, an int64
    keep_idx (B, K) with K a multiple of 16, int32 cu_seqlens and a fp32 key bias (B, N) (see
    :func:`.aot.launch_signature`): a (B, N) bias launches with head stride 0, a JIT constant."""
    from .aot import launch_signature

    pointers = {n: f"*{ptr_dtype}" for n in _FLOAT_PTRS}
    pointers.update({n: "*fp32" for n in _FP32_PTRS}, IDX="*i64", CU="*i32")
    return launch_signature(fn, pointers, unit=_UNIT.__contains__, zero=("sbh",))


def aot_specs(variants: str = "heaviest"):
    """forward, dK/dV, dQ, CLS-probability and column-sum kernels × declared head-dim class (16,
    32, 64, 128) × fp16 / fp32, each in its heaviest specialisation (keep_idx, key_bias,
    importance gradient, varlen) with its tile candidates. bf16 compiles like fp16.

    Register allocation is not monotonic in the features (a tile can spill *without* the bias):
    ``aot_specs("all")`` lists every specialisation (each HAS_* / VARLEN flag on / off, plus a
    per-head (B, h, N) bias; too many for CI, run them when a candidate list changes)::

        from vitkern.triton_kernels import aot, token
        unfit = [s.name for s in token.aot_specs("all") for a in aot.ARCHS
                 if aot.first_fit(s, a)[0] is None]
    """
    from .aot import spec_from_launcher

    specs = []
    kernels = (("fwd", token_fwd, "fwd"), ("dkdv", token_bwd_dkdv, "bwd"),
               ("dq", token_bwd_dq, "bwd"), ("cls", token_cls_probs, "fwd"),
               ("colsum", token_colsum, "fwd"))
    for kname, launcher, direction in kernels:
        flags = [f for f in ("HAS_IDX", "HAS_BIAS", "HAS_G0", "VARLEN")
                 if f in launcher.fn.arg_names]
        if variants == "all":
            combos = [dict(zip(flags, bits)) for bits in itertools.product((True, False),
                                                                           repeat=len(flags))]
        else:
            combos = [dict.fromkeys(flags, True)]
        for dtype in ("fp16", "fp32"):
            for bd in (16, 32, 64, 128):
                if bd > MAX_HEAD_DIM[direction, dtype == "fp32"]:
                    continue  # outside the declared capability: nothing to prove
                for combo in combos:
                    head_bias = (False, True) if variants == "all" and combo["HAS_BIAS"] else (
                        False,)
                    for per_head in head_bias:
                        sig, const = _aot_signature(launcher.fn, dtype)
                        if per_head:  # a (B, heads, N) bias: runtime head stride
                            del const["sbh"]
                            sig["sbh"] = "i32:16"
                        meta = dict(combo, BLOCK_D=bd)
                        if "IEEE" in launcher.fn.arg_names:
                            meta["IEEE"] = dtype == "fp32"
                        off = "".join(f"-{f.replace('HAS_', '').lower()}"
                                      for f, on in combo.items() if not on)
                        tag = off + ("+headbias" if per_head else "")
                        specs.append(spec_from_launcher(f"token.{kname}{tag}[{dtype},D={bd}]",
                                                        launcher, sig, const, meta))
    return specs
