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
    aot_precision,
    attention_dkdv,
    attention_dq,
    attention_fwd,
    block_d,
    dot_precision,
    launch_delta,
    load_rows,
    mma,
    program_coords,
    qk_scale_log2,
    row_grid,
    store_rows,
    strides_of,
)
from .tuning import Launcher, capability_reason, launch_key, table_candidates

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _tokens(IDX, sik, start, pos, length, HAS_IDX: tl.constexpr):
    """Positions ``pos`` of a sequence -> (output row, token index in the full map, valid).

    The output row is ``start + pos`` (rows of kept tokens, packed in varlen mode); the token is
    ``keep_idx[row]`` with ``keep_idx`` (IDX: this batch item's row of it), else the row."""
    valid = pos < length
    row = start + pos
    if HAS_IDX:
        tok = tl.load(IDX + row.to(tl.int64) * sik, mask=valid, other=0)
    else:
        tok = row
    return row, tok, valid


@triton.jit
def _bias2(BIAS, sbn, tok, valid):
    """Key bias of tokens ``tok`` in base-2 units (fp32); 0 outside the valid columns."""
    b = tl.load(BIAS + tok.to(tl.int64) * sbn, mask=valid, other=0.0)
    return b.to(tl.float32) * 1.4426950408889634


@triton.jit
def _loop_end(first, length):
    """Loop bound over the other side of the tile: the sequence length, or 0 when this program's
    tile starts past the end of a (short) ragged sequence, so idle programs do no work."""
    return tl.where(first < length, length, 0)


# --------------------------------------------------------------------------------------------
# the engine's hooks (attention_core): ctx = (K, V, (skn, skd), (svn, svd), IDX, sik, start,
# length, BIAS, sbn, G0, DK, DV, (sdkn, sdkd), (sdvn, sdvd), DB), pointers at this (sequence,
# head); CFG = (HAS_IDX, HAS_BIAS, HAS_G0)
# --------------------------------------------------------------------------------------------


@triton.jit
def _rows(ctx, CFG: tl.constexpr, pos):
    row, tok, valid = _tokens(ctx[4], ctx[5], ctx[6], pos, ctx[7], CFG[0])
    return tok, row, valid, pos


@triton.jit
def _key_tag(ctx, CFG: tl.constexpr, pos):
    """(token, valid, attended, bias (base 2), importance gradient g0) of key positions."""
    row, tok, valid = _tokens(ctx[4], ctx[5], ctx[6], pos, ctx[7], CFG[0])
    ok = valid
    bias = tl.zeros(pos.shape, tl.float32)
    if CFG[1]:
        bias = _bias2(ctx[8], ctx[9], tok, valid)
        ok = ok & (bias > float("-inf"))  # a -inf key gets P = 0, never exp(-inf - -inf)
    g0 = tl.zeros(pos.shape, tl.float32)
    if CFG[2]:
        g0 = tl.load(ctx[10] + row, mask=valid, other=0.0)
    return tok, valid, ok, bias, g0


@triton.jit
def _keys(ctx, CFG: tl.constexpr, pos, offs_d, dmask):
    ktag = _key_tag(ctx, CFG, pos)
    k = load_rows(ctx[0], ktag[0], offs_d, ktag[1], dmask, ctx[2])
    v = load_rows(ctx[1], ktag[0], offs_d, ktag[1], dmask, ctx[3])
    return k, v, ktag


@triton.jit
def _score(ctx, CFG: tl.constexpr, s, pos_m, ktag, valid_m):
    if CFG[1]:
        s += ktag[3][None, :]
    return s, valid_m[:, None] & ktag[2][None, :]


@triton.jit
def _dscore(ctx, CFG: tl.constexpr, ds, p, pos_m, ktag):
    if CFG[2]:  # importance gradient: dP[0, j] += g0[j] (row 0 of the sequence)
        ds += tl.where((pos_m == 0)[:, None], p * ktag[4][None, :], 0.0)
    return ds


@triton.jit
def _span(ctx, CFG: tl.constexpr, start, BLOCK: tl.constexpr, OVER_KEYS: tl.constexpr):
    return 0, _loop_end(start, ctx[7])


@triton.jit
def _put_kv(ctx, CFG: tl.constexpr, ktag, offs_d, dmask, dk, dv, dbias):
    store_rows(ctx[11], ktag[0], offs_d, ktag[1], dmask, ctx[13], dk)
    store_rows(ctx[12], ktag[0], offs_d, ktag[1], dmask, ctx[14], dv)
    if CFG[1]:
        tl.store(ctx[15] + ktag[0].to(tl.int64), dbias, mask=ktag[1])


@triton.jit
def _context(CU, K, V, IDX, BIAS, G0, DK, DV, DB, skb, skh, skn, skd, svb, svh, svn, svd,
             sib, sik, sbb, sbh, sbn, sgb, sgh, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
             sdbb, sdbh, n_heads, n_rows, VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """(batch·head, tile, ctx) of this program (absent outputs: any pointer, zero strides)."""
    pid_bh, pid = program_coords(n_rows, BLOCK)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    if VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = tl.program_id(0) * 0  # an int32 tensor even where n_rows is specialised to 1
        length = n_rows
    ctx = (K + b * skb + h * skh, V + b * svb + h * svh, (skn, skd), (svn, svd), IDX + b * sib,
           sik, start, length, BIAS + b * sbb + h * sbh, sbn, G0 + b * sgb + h * sgh,
           DK + b * sdkb + h * sdkh, DV + b * sdvb + h * sdvh, (sdkn, sdkd), (sdvn, sdvd),
           DB + b * sdbb + h * sdbh)
    return pid_bh, pid, ctx


# --------------------------------------------------------------------------------------------
# kernels
#
# Every kernel runs one program per (sequence, head, tile). Dense inputs: a sequence is a batch
# item, K = keep_idx.shape[1] rows (n_rows). Varlen (cu_seqlens): the caller passes the packed
# (T, h, d) tensors as (S, h, T, d) views with batch stride 0, sequence b owns the rows
# cu[b]..cu[b+1]-1 and n_rows is the longest sequence (it only sizes the grid). Launched with
# keywords (see the host entry points below).
# --------------------------------------------------------------------------------------------


@triton.jit
def token_fwd_kernel(
    Q, K, V, O, LSE, IDX, BIAS, CU,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    sib, sik, sbb, sbh, sbn,
    n_heads, slb, slh, n_rows, HEAD_DIM, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m, ctx = _context(CU, K, V, IDX, BIAS, K, K, K, K, skb, skh, skn, skd, svb, svh,
                                  svn, svd, sib, sik, sbb, sbh, sbn, 0, 0, 0, 0, 0, 0, 0, 0,
                                  0, 0, 0, 0, n_heads, n_rows, VARLEN, BLOCK_M)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    attention_fwd(Q + b * sqb + h * sqh, O + b * sob + h * soh, LSE + b * slb + h * slh,
                  (sqn, sqd), (son, sod), pid_m, ctx, (HAS_IDX, HAS_BIAS, False), _rows, _keys,
                  _score, _span, HEAD_DIM, qk_scale_log2, DOT_PRECISION, BLOCK_M, BLOCK_N,
                  BLOCK_D)


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
    pid_bh, pid_n, ctx = _context(CU, K, K, IDX, BIAS, K, K, K, K, skb, skh, skn, skd, 0, 0, 0,
                                  0, sib, sik, sbb, sbh, sbn, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                  0, n_heads, n_rows, VARLEN, BLOCK_N)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    # An empty sequence stores nothing, but its start may be one past the last row: read row 0
    # instead (it exists: the op never launches with zero rows).
    first = tl.where(ctx[7] > 0, ctx[6], 0)
    if HAS_IDX:  # the first row's token
        tok0 = tl.load(ctx[4] + first.to(tl.int64) * sik)
    else:
        tok0 = first
    Q += b * sqb + h * sqh + tok0.to(tl.int64) * sqn
    q0 = tl.load(Q + offs_d * sqd, mask=dmask, other=0.0).to(tl.float32)
    lse0 = tl.load(LSE + b * slb + h * slh + first)
    lse0 = tl.where(lse0 == float("-inf"), 0.0, lse0)  # row 0 empty: every p is masked below

    pos_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_n, _, _ = _tokens(ctx[4], sik, ctx[6], pos_n, ctx[7], HAS_IDX)
    tok_n, valid_n, ok, bias, _ = _key_tag(ctx, (HAS_IDX, HAS_BIAS, False), pos_n)
    k = load_rows(ctx[0], tok_n, offs_d, valid_n, dmask, ctx[2]).to(tl.float32)
    s = tl.sum(k * q0[None, :], 1) * qk_scale_log2 + bias
    p = tl.where(ok, tl.exp2(s - lse0), 0.0)
    tl.store(P0 + b * spb + h * sph + row_n, p, mask=valid_n)


@triton.jit
def token_colsum_kernel(
    Q, K, LSE, IDX, BIAS, CU, C,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sib, sik, sbb, sbh, sbn,
    n_heads, slb, slh, scb, sch, n_rows, HEAD_DIM, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """c[b, h, j] = sum_i P[b, h, i, j], the attention key j receives (GTP-ViT): a second QKᵀ
    pass that recomputes P from the forward's log-sum-exp, one program per key tile."""
    pid_bh, pid_n, ctx = _context(CU, K, K, IDX, BIAS, K, K, K, K, skb, skh, skn, skd, 0, 0, 0,
                                  0, sib, sik, sbb, sbh, sbn, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                  0, n_heads, n_rows, VARLEN, BLOCK_N)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * sqb + h * sqh
    LSE += b * slb + h * slh
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    pos_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_n, _, _ = _tokens(ctx[4], sik, ctx[6], pos_n, ctx[7], HAS_IDX)
    ktag = _key_tag(ctx, (HAS_IDX, HAS_BIAS, False), pos_n)
    k = load_rows(ctx[0], ktag[0], offs_d, ktag[1], dmask, ctx[2])
    c = tl.zeros([BLOCK_N], tl.float32)
    lo, hi = _span(ctx, (HAS_IDX, HAS_BIAS, False), pid_n * BLOCK_N, BLOCK_N, False)
    for start_m in range(lo, hi, BLOCK_M):
        tok_m, row_m, valid_m, pos_m = _rows(ctx, (HAS_IDX, HAS_BIAS, False),
                                             start_m + tl.arange(0, BLOCK_M))
        q = load_rows(Q, tok_m, offs_d, valid_m, dmask, (sqn, sqd))
        lse2 = tl.load(LSE + row_m, mask=valid_m, other=0.0)
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # empty rows: every p is masked
        s, attend = _score(ctx, (HAS_IDX, HAS_BIAS, False),
                           mma(q, tl.trans(k), DOT_PRECISION) * qk_scale_log2, pos_m, ktag,
                           valid_m)
        c += tl.sum(tl.where(attend, tl.exp2(s - lse2[:, None]), 0.0), 0)
    tl.store(C + b * scb + h * sch + row_n, c, mask=ktag[1])


@triton.jit
def token_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, BIAS, CU, G0, DK, DV, DB,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    sib, sik, sbb, sbh, sbn, sgb, sgh, sdbb, sdbh,
    n_heads, slb, slh, n_rows, HEAD_DIM, scale, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_G0: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh, pid_n, ctx = _context(CU, K, V, IDX, BIAS, G0, DK, DV, DB, skb, skh, skn, skd, svb,
                                  svh, svn, svd, sib, sik, sbb, sbh, sbn, sgb, sgh, sdkb, sdkh,
                                  sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, sdbb, sdbh, n_heads, n_rows,
                                  VARLEN, BLOCK_N)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    lse = b * slb + h * slh
    attention_dkdv(Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, LSE + lse, DELTA + lse,
                   (sqn, sqd), (sdon, sdod), pid_n, ctx, (HAS_IDX, HAS_BIAS, HAS_G0), _rows,
                   _keys, _score, _dscore, _span, _put_kv, HEAD_DIM, scale, qk_scale_log2,
                   HAS_BIAS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def token_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, BIAS, CU, G0, DQ, O,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd, sob, soh, son, sod,
    sib, sik, sbb, sbh, sbn, sgb, sgh,
    n_heads, slb, slh, n_rows, HEAD_DIM, scale, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_G0: tl.constexpr, VARLEN: tl.constexpr,
    DELTA_FROM_O: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq; with ``DELTA_FROM_O`` (dense, no CLS-importance gradient) also the rows' deltas
    rowsum(dO∘O), stored for the dK/dV kernel launched after it. Otherwise a pre-pass wrote
    them (with CLS importance they carry the importance gradient's term)."""
    pid_bh, pid_m, ctx = _context(CU, K, V, IDX, BIAS, G0, K, K, K, skb, skh, skn, skd, svb,
                                  svh, svn, svd, sib, sik, sbb, sbh, sbn, sgb, sgh, 0, 0, 0, 0,
                                  0, 0, 0, 0, 0, 0, n_heads, n_rows, VARLEN, BLOCK_M)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    lse = b * slb + h * slh
    attention_dq(Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, DQ + b * sdqb + h * sdqh,
                 LSE + lse, DELTA + lse, O + b * sob + h * soh, (sqn, sqd), (sdon, sdod),
                 (sdqn, sdqd), (son, sod), pid_m, ctx, (HAS_IDX, HAS_BIAS, HAS_G0), _rows, _keys,
                 _score, _dscore, _span, HEAD_DIM, scale, qk_scale_log2, DELTA_FROM_O,
                 DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)


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



def _launch_args(q, k, keep_idx, key_bias, cu, lse, scale: float, n_rows: int) -> dict:
    """The keyword arguments every token kernel takes (absent tensors: a dummy pointer, zero
    strides; a (B, N) key bias gets head stride 0)."""
    if key_bias is None:
        bias = dict(BIAS=q, sbb=0, sbh=0, sbn=0)
    elif key_bias.dim() == 2:
        bias = dict(BIAS=key_bias, sbb=key_bias.stride(0), sbh=0, sbn=key_bias.stride(1))
    else:
        bias = dict(BIAS=key_bias, **strides_of("b", key_bias, "bhn"))
    return dict(
        Q=q, K=k, LSE=lse, IDX=q if keep_idx is None else keep_idx,
        CU=q if cu is None else cu, **strides_of("q", q), **strides_of("k", k),
        **(strides_of("i", keep_idx, "bk") if keep_idx is not None else dict(sib=0, sik=0)),
        **bias, n_heads=q.shape[1], **strides_of("l", lse, "bh"), n_rows=n_rows,
        HEAD_DIM=q.shape[3], qk_scale_log2=qk_scale_log2(scale),
        HAS_IDX=keep_idx is not None, HAS_BIAS=key_bias is not None, VARLEN=cu is not None,
        BLOCK_D=block_d(q.shape[3]))


def _tensors(q, k, keep_idx, key_bias, cu, lse, **more) -> dict:
    """The tensor arguments of :func:`_launch_args` (absent ones: a dummy pointer), plus more."""
    return dict(Q=q, K=k, LSE=lse, IDX=q if keep_idx is None else keep_idx,
                CU=q if cu is None else cu, BIAS=q if key_bias is None else key_bias, **more)


def forward(q, k, v, keep_idx, key_bias, cu, o, lse, scale: float, n_rows: int):
    """o (B, h, K, d) and base-2 log-sum-exp lse (B, h, K, fp32, unit K stride)."""
    token_fwd.launch(
        launch_key(scale, n_rows, q, k, v, keep_idx, key_bias, cu, o, lse),
        row_grid(q.shape[0] * q.shape[1], n_rows, "BLOCK_M"),
        _tensors(q, k, keep_idx, key_bias, cu, lse, V=v, O=o),
        lambda: dict(**strides_of("v", v), **strides_of("o", o),
                     DOT_PRECISION=dot_precision(q.dtype),
                     **_launch_args(q, k, keep_idx, key_bias, cu, lse, scale, n_rows)))


def cls_probs(q, k, keep_idx, key_bias, cu, lse, p0, scale: float, n_rows: int):
    """p0 (B, h, K) fp32 = row 0 (the first kept query) of the attention probabilities."""
    token_cls_probs.launch(
        launch_key(scale, n_rows, q, k, keep_idx, key_bias, cu, lse, p0),
        row_grid(q.shape[0] * q.shape[1], n_rows, "BLOCK_N"),
        _tensors(q, k, keep_idx, key_bias, cu, lse, P0=p0),
        lambda: dict(**strides_of("p", p0, "bh"),
                     **_launch_args(q, k, keep_idx, key_bias, cu, lse, scale, n_rows)))


def colsum(q, k, keep_idx, key_bias, cu, lse, c, scale: float, n_rows: int):
    """c (B, h, K) fp32 = column sums of the attention probabilities (a second QKᵀ pass)."""
    token_colsum.launch(
        launch_key(scale, n_rows, q, k, keep_idx, key_bias, cu, lse, c),
        row_grid(q.shape[0] * q.shape[1], n_rows, "BLOCK_N"),
        _tensors(q, k, keep_idx, key_bias, cu, lse, C=c),
        lambda: dict(**strides_of("c", c, "bh"), DOT_PRECISION=dot_precision(q.dtype),
                     **_launch_args(q, k, keep_idx, key_bias, cu, lse, scale, n_rows)))


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
    b, h = q.shape[:2]
    # dense without CLS importance: the dQ kernel (launched first) computes the deltas
    from_o = cu is None and g0 is None
    if from_o:
        delta = torch.empty_strided(lse.shape, lse.stride(), device=lse.device,
                                    dtype=torch.float32)
    elif cu is None:
        delta = launch_delta(o, do, lse)
    else:  # one (1, h, R) pass over the packed rows, seen by every sequence
        delta = launch_delta(o[:1], do[:1], lse[:1]).expand(lse.shape)
    if g0 is not None:
        _add_importance_delta(delta, p0, g0, cu)
    key = launch_key(scale, n_rows, q, k, v, o, lse, keep_idx, key_bias, cu, g0, dq, dk, dv, db,
                     do)
    tensors = _tensors(q, k, keep_idx, key_bias, cu, lse, V=v, DO=do, DELTA=delta,
                       G0=q if g0 is None else g0)

    def common(**more):
        return dict(**strides_of("v", v), **strides_of("do", do),
                    **strides_of("g", g0 if g0 is not None else lse, "bh"), scale=float(scale),
                    HAS_G0=g0 is not None, DOT_PRECISION=dot_precision(q.dtype),
                    **_launch_args(q, k, keep_idx, key_bias, cu, lse, scale, n_rows), **more)

    token_bwd_dq.launch(key, row_grid(b * h, n_rows, "BLOCK_M"), dict(tensors, DQ=dq, O=o),
                        lambda: common(**strides_of("dq", dq), **strides_of("o", o),
                                       DELTA_FROM_O=from_o))
    token_bwd_dkdv.launch(key, row_grid(b * h, n_rows, "BLOCK_N"),
                          dict(tensors, DK=dk, DV=dv, DB=q if db is None else db),
                          lambda: common(**strides_of("dk", dk), **strides_of("dv", dv),
                                         **strides_of("db", db if db is not None else lse, "bh")))


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
            if kname == "dq":  # dense, no CLS-importance gradient: deltas computed in dQ
                combos.append(dict(combos[0], HAS_G0=False, VARLEN=False))
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
                        if "DELTA_FROM_O" in launcher.fn.arg_names:
                            meta["DELTA_FROM_O"] = not (combo["HAS_G0"] or combo["VARLEN"])
                        if "DOT_PRECISION" in launcher.fn.arg_names:
                            meta["DOT_PRECISION"] = aot_precision(dtype)
                        off = "".join(f"-{f.replace('HAS_', '').lower()}"
                                      for f, on in combo.items() if not on)
                        tag = off + ("+headbias" if per_head else "")
                        specs.append(spec_from_launcher(f"token.{kname}{tag}[{dtype},D={bd}]",
                                                        launcher, sig, const, meta))
    return specs
