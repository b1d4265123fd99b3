"""Triton kernels for token attention (EViT / ToMe / token dropping): kept-token softmax attention.

q, k, v are the full (B, heads, N, d) token maps. With ``keep_idx`` (B, K) the kernels attend among
the K kept tokens only, reading them *in place*: tile row / column ``i`` of batch ``b`` is token
``keep_idx[b, i]``, turned into a pointer offset on the fly (int64), so no gathered copy of q, k, v
is ever made. Without it, row i is token i (K = N).

* ``key_bias`` (B, N) or (B, heads, N) is indexed by the *original* token index (it follows
  ``keep_idx``) and added to the logits in-kernel (ToMe's proportional attention: log(size);
  -inf masks a key). A query whose keys are all -inf gets o = 0, lse = -inf and zero gradients
  (the shared softmax core's empty-row rule).
* CLS importance (EViT): :func:`cls_probs` recomputes row 0 of P per head,
  p0[b, h, j] = exp2(s[0, j] - lse2[0]), from the forward's log-sum-exp: one extra q0·K pass,
  O(K·d) per (batch, head), no N×N matrix. The op averages it over heads.
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
    Launcher,
    block_d,
    cdiv,
    launch_delta,
    mma,
    program_coords,
    qk_scale_log2,
    softmax_bwd_scores,
    softmax_finish,
    softmax_step,
    strides4,
    tile_configs,
    tile_ptrs,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _tokens(IDX, idx_base, sik, pos, n_keep, HAS_IDX: tl.constexpr):
    """Kept positions ``pos`` -> (token index in the full map, position < K?)."""
    valid = pos < n_keep
    if HAS_IDX:
        tok = tl.load(IDX + idx_base + pos.to(tl.int64) * sik, mask=valid, other=0)
    else:
        tok = pos
    return tok, valid


@triton.jit
def _bias2(BIAS, bias_base, sbn, tok, valid):
    """Key bias of tokens ``tok`` in base-2 units (fp32); 0 outside the valid columns."""
    b = tl.load(BIAS + bias_base + tok.to(tl.int64) * sbn, mask=valid, other=0.0)
    return b.to(tl.float32) * 1.4426950408889634


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def token_fwd_kernel(
    Q, K, V, O, LSE, IDX, BIAS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    sib, sik, sbb, sbh, sbn,
    n_heads, slb, slh, n_keep, HEAD_DIM, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_keep, BLOCK_M)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh
    idx_base = b * sib
    bias_base = b * sbb + h * sbh
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m, valid_m = _tokens(IDX, idx_base, sik, rows, n_keep, HAS_IDX)
    q_mask = valid_m[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_keep, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        tok_n, valid_n = _tokens(IDX, idx_base, sik, cols, n_keep, HAS_IDX)
        kv_mask = valid_n[:, None] & dmask[None, :]
        k = tl.load(tile_ptrs(K, tok_n, offs_d, skn, skd), mask=kv_mask, other=0.0)
        v = tl.load(tile_ptrs(V, tok_n, offs_d, svn, svd), mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), IEEE) * qk_scale_log2
        if HAS_BIAS:
            s += _bias2(BIAS, bias_base, sbn, tok_n, valid_n)[None, :]
        s = tl.where(valid_m[:, None] & valid_n[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, v, IEEE)

    out, lse2 = softmax_finish(m_i, l_i, acc)
    tl.store(tile_ptrs(O, rows, offs_d, son, sod), out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + b * slb + h * slh + rows, lse2, mask=valid_m)


@triton.jit
def token_cls_probs_kernel(
    Q, K, LSE, IDX, BIAS, P0,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sib, sik, sbb, sbh, sbn,
    n_heads, slb, slh, spb, sph, n_keep, HEAD_DIM, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """p0[b, h, j] = P[b, h, 0, j]: row 0 of the probabilities, from the saved log-sum-exp."""
    pid_bh, pid_n = program_coords(n_keep, BLOCK_N)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    idx_base = b * sib
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    Q += b * sqb + h * sqh
    if HAS_IDX:  # the first kept token
        Q += tl.load(IDX + idx_base).to(tl.int64) * sqn
    q0 = tl.load(Q + offs_d * sqd, mask=dmask, other=0.0).to(tl.float32)
    lse0 = tl.load(LSE + b * slb + h * slh)
    lse0 = tl.where(lse0 == float("-inf"), 0.0, lse0)  # row 0 empty: every p is masked below

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_n, valid_n = _tokens(IDX, idx_base, sik, cols, n_keep, HAS_IDX)
    k = tl.load(tile_ptrs(K + b * skb + h * skh, tok_n, offs_d, skn, skd),
                mask=valid_n[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    s = tl.sum(k * q0[None, :], 1) * qk_scale_log2
    ok = valid_n
    if HAS_BIAS:
        bias = _bias2(BIAS, b * sbb + h * sbh, sbn, tok_n, valid_n)
        s += bias
        ok = ok & (bias > float("-inf"))
    p = tl.where(ok, tl.exp2(s - lse0), 0.0)
    tl.store(P0 + b * spb + h * sph + cols, p, mask=valid_n)


@triton.jit
def token_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, BIAS, G0, DK, DV, DB,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    sib, sik, sbb, sbh, sbn, sgb, sgh, sdbb, sdbh,
    n_heads, slb, slh, n_keep, HEAD_DIM, scale, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_G0: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_n = program_coords(n_keep, BLOCK_N)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    LSE += b * slb + h * slh
    DELTA += b * slb + h * slh
    idx_base = b * sib
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_n, valid_n = _tokens(IDX, idx_base, sik, cols, n_keep, HAS_IDX)
    kv_mask = valid_n[:, None] & dmask[None, :]
    k = tl.load(tile_ptrs(K, tok_n, offs_d, skn, skd), mask=kv_mask, other=0.0)
    v = tl.load(tile_ptrs(V, tok_n, offs_d, svn, svd), mask=kv_mask, other=0.0)
    col_ok = valid_n
    if HAS_BIAS:
        bias = _bias2(BIAS, b * sbb + h * sbh, sbn, tok_n, valid_n)
        col_ok = col_ok & (bias > float("-inf"))
    if HAS_G0:
        g0 = tl.load(G0 + b * sgb + h * sgh + cols, mask=valid_n, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, n_keep, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        tok_m, valid_m = _tokens(IDX, idx_base, sik, rows, n_keep, HAS_IDX)
        q_mask = valid_m[:, None] & dmask[None, :]
        q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)
        do = tl.load(tile_ptrs(DO, rows, offs_d, sdon, sdod), mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + rows, mask=valid_m, other=0.0)
        delta = tl.load(DELTA + rows, mask=valid_m, other=0.0)
        s = mma(q, tl.trans(k), IEEE) * qk_scale_log2
        if HAS_BIAS:
            s += bias[None, :]
        p, ds = softmax_bwd_scores(s, v, do, lse2, delta, valid_m[:, None] & col_ok[None, :],
                                   IEEE)
        if HAS_G0:  # importance gradient: dP[0, j] += g0[j]
            ds += tl.where((rows == 0)[:, None], p * g0[None, :], 0.0)
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
    Q, K, V, DO, LSE, DELTA, IDX, BIAS, G0, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    sib, sik, sbb, sbh, sbn, sgb, sgh,
    n_heads, slb, slh, n_keep, HEAD_DIM, scale, qk_scale_log2,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_G0: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = program_coords(n_keep, BLOCK_M)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    idx_base = b * sib
    bias_base = b * sbb + h * sbh
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m, valid_m = _tokens(IDX, idx_base, sik, rows, n_keep, HAS_IDX)
    q_mask = valid_m[:, None] & dmask[None, :]
    q = tl.load(tile_ptrs(Q, tok_m, offs_d, sqn, sqd), mask=q_mask, other=0.0)
    do = tl.load(tile_ptrs(DO, rows, offs_d, sdon, sdod), mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + b * slb + h * slh + rows, mask=valid_m, other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + rows, mask=valid_m, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_keep, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        tok_n, valid_n = _tokens(IDX, idx_base, sik, cols, n_keep, HAS_IDX)
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
        if HAS_G0:  # importance gradient: dP[0, j] += g0[j]
            g0 = tl.load(G0 + b * sgb + h * sgh + cols, mask=valid_n, other=0.0)
            ds += tl.where((rows == 0)[:, None], p * g0[None, :], 0.0)
        dq += mma(ds.to(k.dtype), k, IEEE)

    tl.store(tile_ptrs(DQ + b * sdqb + h * sdqh, tok_m, offs_d, sdqn, sdqd),
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and (BLOCK_D, fp32?): the largest tile of
# a sweep of candidates, (128, 64, 8, 2) down to (16, 16, 8, 1), that compiles for sm_80 and
# sm_90 without register spills and within shared memory in *every* specialisation (keep_idx,
# key_bias, importance gradient each on / off, (B, N) or (B, heads, N) bias: `aot_cases("all")`);
# tests/test_aot_compile.py re-checks the heaviest one of each entry
# (`python -m vitkern.triton_kernels.aot -k token`). fp32 (tf32x3 dots) needs ~3x the registers
# of fp16/bf16, hence the small fp32 tiles. Head dims above 128 have no entry: the triton
# backend refuses them (see `unsupported`). float32 head dims 72..128 have no dK/dV tiles (down to
# 16×16 every candidate spills on sm_90 in some specialisation: tf32x3 triples the dot operands),
# so no backward tiles at all there: the forward runs, the backward is refused.
CONFIGS = {
    "fwd": {
        (16, False): [(128, 64, 8, 2)],
        (32, False): [(128, 64, 8, 2)],
        (64, False): [(128, 64, 8, 2)],
        (128, False): [(128, 64, 8, 2)],
        (16, True): [(128, 64, 8, 2)],
        (32, True): [(64, 64, 8, 2)],
        (64, True): [(64, 32, 8, 1)],
        (128, True): [(16, 16, 8, 1)],
    },
    "dkdv": {
        (16, False): [(128, 64, 8, 2)],
        (32, False): [(64, 64, 8, 2)],
        (64, False): [(64, 32, 4, 2)],
        (128, False): [(64, 32, 4, 1)],
        (16, True): [(32, 32, 4, 2)],
        (32, True): [(32, 16, 4, 2)],
        (64, True): [(32, 32, 8, 1)],
    },
    "dq": {
        (16, False): [(128, 64, 8, 2)],
        (32, False): [(128, 64, 8, 2)],
        (64, False): [(128, 64, 8, 2)],
        (128, False): [(64, 64, 8, 2)],
        (16, True): [(128, 64, 8, 2)],
        (32, True): [(64, 32, 8, 2)],
        (64, True): [(32, 32, 8, 1)],
    },
}
# cls_probs: (BLOCK_N, num_warps) per BLOCK_D (fp32 multiply-reduce, no tl.dot: dtype-agnostic).
CLS_CONFIGS = {16: (128, 4), 32: (128, 4), 64: (64, 4), 128: (32, 4)}


def unsupported(head_dim: int, fp32: bool, backward: bool = True):
    """Why no spill-free kernel config exists for this input (None when one does).

    ``backward``: whether the gradient kernels are needed too (inputs require grad)."""
    key = (block_d(head_dim), fp32)
    kernels = ("fwd", "dkdv", "dq") if backward else ("fwd",)
    missing = [kernel for kernel in kernels if key not in CONFIGS[kernel]]
    if not missing:
        return None
    dtype = "float32" if fp32 else "16-bit"
    what = "backward " if "fwd" not in missing else ""
    hint = " (inference works; train in float16 / bfloat16)" if what else ""
    return (f"no spill-free triton tiles for {dtype} head_dim {head_dim} {what}"
            f"(token attention){hint}")


def _configs_for(kernel: str):
    def configs_for(*, BLOCK_D, IEEE, **_):
        return tile_configs(CONFIGS[kernel][(BLOCK_D, bool(IEEE))])
    return configs_for


def _cls_configs_for(*, BLOCK_D, **_):
    n, w = CLS_CONFIGS[BLOCK_D]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=1)]


_KEY = ["n_keep", "HEAD_DIM"]
token_fwd = Launcher(token_fwd_kernel, _configs_for("fwd"), _KEY)
token_bwd_dkdv = Launcher(token_bwd_dkdv_kernel, _configs_for("dkdv"), _KEY)
token_bwd_dq = Launcher(token_bwd_dq_kernel, _configs_for("dq"), _KEY)
token_cls_probs = Launcher(token_cls_probs_kernel, _cls_configs_for, _KEY)


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.token on inputs it has validated)
# --------------------------------------------------------------------------------------------


def _grid(bh: int, n: int, block: str):
    return lambda meta: (bh * cdiv(n, meta[block]),)


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


def forward(q, k, v, keep_idx, key_bias, o, lse, scale: float):
    """o (B, h, K, d) and base-2 log-sum-exp lse (B, h, K, fp32, unit K stride)."""
    b, h, _, d = q.shape
    n_keep = o.shape[2]
    idx, idx_s = _idx_args(keep_idx, q)
    bias, bias_s = _bias_args(key_bias, q)
    token_fwd(_grid(b * h, n_keep, "BLOCK_M"),
              q, k, v, o, lse, idx, bias, *strides4(q), *strides4(k), *strides4(v),
              *strides4(o), *idx_s, *bias_s, h, *lse.stride()[:2], n_keep, d,
              qk_scale_log2(scale), HAS_IDX=keep_idx is not None,
              HAS_BIAS=key_bias is not None, IEEE=q.dtype == torch.float32, BLOCK_D=block_d(d))


def cls_probs(q, k, keep_idx, key_bias, lse, p0, scale: float):
    """p0 (B, h, K) fp32 = row 0 (the first kept query) of the attention probabilities."""
    b, h, _, d = q.shape
    n_keep = p0.shape[2]
    idx, idx_s = _idx_args(keep_idx, q)
    bias, bias_s = _bias_args(key_bias, q)
    token_cls_probs(_grid(b * h, n_keep, "BLOCK_N"),
                    q, k, lse, idx, bias, p0, *strides4(q), *strides4(k), *idx_s, *bias_s,
                    h, *lse.stride()[:2], *p0.stride()[:2], n_keep, d, qk_scale_log2(scale),
                    HAS_IDX=keep_idx is not None, HAS_BIAS=key_bias is not None,
                    BLOCK_D=block_d(d))


def backward(do, q, k, v, o, lse, keep_idx, key_bias, p0, g0, dq, dk, dv, db, scale: float):
    """Gradients into dq, dk, dv (B, h, N, d) and db (B, h, N) fp32 (per-head key-bias grad).

    Only kept tokens are written: with ``keep_idx`` the caller zero-fills dq, dk, dv, db.
    ``g0`` (B, h, K) fp32 is the gradient of ``p0`` (the CLS-row probabilities), or None.
    """
    b, h, _, d = q.shape
    n_keep = o.shape[2]
    delta = launch_delta(o, do, lse)
    if g0 is not None:  # dP[0, j] += g0[j]  =>  delta[0] += sum_j P[0, j] g0[j]
        delta[:, :, 0] += (p0 * g0).sum(-1)
    idx, idx_s = _idx_args(keep_idx, q)
    bias, bias_s = _bias_args(key_bias, q)
    g0_t, g0_s = (q, (0, 0)) if g0 is None else (g0, g0.stride()[:2])
    db_t, db_s = (q, (0, 0)) if db is None else (db, db.stride()[:2])
    common = (h, *lse.stride()[:2], n_keep, d, float(scale), qk_scale_log2(scale))
    meta = dict(HAS_IDX=keep_idx is not None, HAS_BIAS=key_bias is not None,
                HAS_G0=g0 is not None, IEEE=q.dtype == torch.float32, BLOCK_D=block_d(d))
    qkvdo = (*strides4(q), *strides4(k), *strides4(v), *strides4(do))
    token_bwd_dkdv(_grid(b * h, n_keep, "BLOCK_N"),
                   q, k, v, do, lse, delta, idx, bias, g0_t, dk, dv, db_t, *qkvdo,
                   *strides4(dk), *strides4(dv), *idx_s, *bias_s, *g0_s, *db_s, *common, **meta)
    token_bwd_dq(_grid(b * h, n_keep, "BLOCK_M"),
                 q, k, v, do, lse, delta, idx, bias, g0_t, dq, *qkvdo, *strides4(dq), *idx_s,
                 *bias_s, *g0_s, *common, **meta)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile cases (tests/test_aot_compile.py compiles each for sm_80 and sm_90)
# --------------------------------------------------------------------------------------------

_FLOAT_PTRS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
_FP32_PTRS = ("LSE", "DELTA", "P0", "G0", "DB", "BIAS")
_CONSTEXPRS = ("HAS_IDX", "HAS_BIAS", "HAS_G0", "IEEE", "BLOCK_M", "BLOCK_N", "BLOCK_D")
# unit strides a real launch specialises to the constant 1: channel strides of q/k/v/o/grads,
# keep_idx's K stride, the key-bias token stride
_UNIT = ("sqd", "skd", "svd", "sod", "sdod", "sdkd", "sdvd", "sdqd", "sik", "sbn")


def _aot_signature(fn, ptr_dtype: str) -> tuple[dict, dict]:
    """Runtime-arg types of a launch on q, k, v viewed out of a packed projection, an int64
    keep_idx (B, K) with K a multiple of 16 and a fp32 key bias (B, N).

    Unit strides are constants; other strides and the head dim are multiples of 16 (``i32:16``);
    sizes (K, heads) plain i32; scales fp32. A (B, N) bias launches with head stride 0, which the
    JIT also turns into a constant.
    """
    sig, const = {}, {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            continue
        if name in _FLOAT_PTRS:
            sig[name] = f"*{ptr_dtype}"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name == "IDX":
            sig[name] = "*i64"
        elif name in _UNIT:
            const[name] = 1
        elif name == "sbh":
            const[name] = 0
        elif name in ("scale", "qk_scale_log2"):
            sig[name] = "fp32"
        elif name.startswith("s") or name == "HEAD_DIM":
            sig[name] = "i32:16"
        else:
            sig[name] = "i32"
    return sig, const


def aot_cases(variants: str = "heaviest"):
    """forward, dK/dV, dQ and CLS-probability kernels × head-dim class (16, 32, 64, 128) ×
    fp16 / fp32 × config: 30 cases, each in its heaviest specialisation (keep_idx, key_bias,
    importance gradient). bf16 compiles like fp16.

    Register allocation is not monotonic in the features (a config can spill *without* the
    bias), so every CONFIGS entry was also checked in every specialisation:
    ``aot_cases("all")`` lists them (each HAS_* flag on / off, plus a per-head (B, h, N) bias,
    264 cases; too many for CI, run them when a table entry changes)::

        from vitkern.triton_kernels import aot, token
        bad = [c.name for c in token.aot_cases("all") for a in aot.ARCHS
               if aot.compile_case(c, a).spills]
    """
    from .aot import AotCase

    cases = []
    kernels = (("fwd", token_fwd), ("dkdv", token_bwd_dkdv), ("dq", token_bwd_dq),
               ("cls", token_cls_probs))
    for kname, launcher in kernels:
        flags = [f for f in ("HAS_IDX", "HAS_BIAS", "HAS_G0") if f in launcher.fn.arg_names]
        if variants == "all":
            combos = [dict(zip(flags, bits)) for bits in itertools.product((True, False),
                                                                           repeat=len(flags))]
        else:
            combos = [dict.fromkeys(flags, True)]
        for dtype in ("fp16", "fp32"):
            for bd in (16, 32, 64, 128):
                if kname != "cls" and (bd, dtype == "fp32") not in CONFIGS[kname]:
                    continue  # the backend refuses these inputs: nothing to compile
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
                        off = "".join(f"-{f[4:].lower()}" for f, on in combo.items() if not on)
                        tag = off + ("+headbias" if per_head else "")
                        for cfg in launcher.configs_for(**{"IEEE": dtype == "fp32", **meta}):
                            kw = cfg.kwargs
                            tiles = ",".join(f"{k[6:]}={v}" for k, v in kw.items())
                            cases.append(AotCase(
                                name=f"token.{kname}{tag}[{dtype},D={bd},{tiles},"
                                     f"w{cfg.num_warps},s{cfg.num_stages}]",
                                fn=launcher.fn, signature=sig, constexprs={**const, **meta, **kw},
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return cases
