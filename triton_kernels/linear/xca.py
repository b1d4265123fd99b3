"""XCiT's cross-covariance attention (XCA): q, k, v (B, h, N, d); the channels are the rows of a
d×d attention map.

* forward, maps of up to FUSED_MAX_N tokens and d <= 64: ``xca_fused_fwd`` (one program per
  head: q, k, v read once, o written once, one launch);
* forward otherwise: ``gram_partials`` (common.py) → (qᵀk | Σq² | Σk²) partials →
  ``xca_softmax`` (fold, cosine Gram Gn = G/(|q_i||k_j|), A = softmax(τ·Gn); per head and block
  of rows) → ``xca_apply``: ``o = V Aᵀ``. Saved for the backward (both): Gn and the channel
  norms (fp32, d×d + 2d per head);
* backward: ``gram_partials`` → dA = dOᵀV partials → ``xca_bwd_small`` (fold; dL = softmax'
  of dA; dG = τ·dL/(|q_i||k_j|); the norm-chain terms cq, ck; dτ) → ``xca_bwd_apply`` twice:
  ``dq = K dGᵀ + q·cq``, ``dk = Q dG + k·ck`` from q, k, then ``dv = dO A`` from dO.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention_core import bh_offset, block_d, load_rows, mma, store_rows
from ..tuning import launch_key
from .common import (FEATURES, aot_spec, configs, declared_reason, dots, fold_mat, fold_vec, gram,
                     gram_tiles, head, head_args, lanes, launch, load_mat, partial_slot,
                     split_launch, store_mat, stride_args, tile_launcher, tile_rows, token_chunk,
                     token_tiles)

# --------------------------------------------------------------------------------------------
# the per-(b, h) d×d kernels: one program per head and block of BLOCK_I rows
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_block(n_heads, D, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    """(pid_bh, head, row offsets and mask, column offsets and mask) of this program's block
    of BLOCK_I rows (grid axis 1) of a d×d map."""
    pid_bh, _, h = head(n_heads)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d, dmask = lanes(BLOCK_D, D)
    return pid_bh, h, offs_i, offs_i < D, offs_d, dmask


@triton.jit
def _xca_probs(gn, t, offs_i, offs_d, D):
    """A = softmax_j(t·Gn_ij) over the D real key channels (padded rows / columns -> 0)."""
    m2 = (offs_i < D)[:, None] & (offs_d < D)[None, :]
    logits = tl.where(m2, gn * t, float("-inf"))
    mx = tl.max(logits, 1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    p = tl.exp(logits - mx[:, None])
    s = tl.sum(p, 1)
    s = tl.where(s == 0.0, 1.0, s)
    return p / s[:, None]


@triton.jit
def xca_softmax_kernel(P, TEMP, GN, NORMS, A, n_split, n_heads, D, M, eps,
                       BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (b, h) and block of BLOCK_I query channels (rows): fold the (G | Σq² | Σk²) partials
    in split order; store the cosine Gram Gn = G_ij / (max(|q_i|, eps)·max(|k_j|, eps)), the
    norms (|q|, |k|) and A = softmax(τ·Gn). Rows are independent (the softmax is per row), so
    large head dims split over programs instead of spilling a d×d tile."""
    pid_bh, h, offs_i, imask, offs_d, dmask = _row_block(n_heads, D, BLOCK_I, BLOCK_D)
    G = fold_mat(P, pid_bh, n_split, M, offs_i, offs_d, D, D)
    nq = tl.sqrt(fold_vec(P + D * D, pid_bh, n_split, M, offs_i, D))
    nk = tl.sqrt(fold_vec(P + D * D + D, pid_bh, n_split, M, offs_d, D))
    gn = G * (1.0 / tl.maximum(nq, eps))[:, None] * (1.0 / tl.maximum(nk, eps))[None, :]
    a = _xca_probs(gn, tl.load(TEMP + h).to(tl.float32), offs_i, offs_d, D)
    store_mat(GN + pid_bh * D * D, offs_i, offs_d, D, D, gn)
    store_mat(A + pid_bh * D * D, offs_i, offs_d, D, D, a)
    tl.store(NORMS + pid_bh * 2 * D + offs_i, nq, mask=imask)
    nk_len = tl.where(tl.program_id(1) == 0, D, 0)  # |k| is the same in every row block
    tl.store(NORMS + pid_bh * 2 * D + D + offs_d, nk, mask=offs_d < nk_len)


@triton.jit
def xca_bwd_small_kernel(P, GN, NORMS, TEMP, DG, CQ, A, CKP, DTP, n_split, n_heads, D, M, eps,
                         BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (b, h) and block of BLOCK_I rows: fold the dA = dOᵀV partials; with A = softmax(τ·Gn)
    recomputed, dL = A∘(dA − rowsum(A∘dA)), dG = τ·dL_ij·rq_i·rk_j, the norm term
    cq_i = −rq_i²·Σ_j τ·dL_ij·Gn_ij (0 where max(|q_i|, eps) clamps), rq = 1/max(|q_i|, eps).
    The column sums Σ_i τ·dL_ij·Gn_ij (for ck) and Σ dL∘Gn (dτ) of this row block are written
    as partials CKP[bh, ib, :], DTP[bh, ib] that the host folds over the row blocks."""
    pid_bh, h, offs_i, imask, offs_d, dmask = _row_block(n_heads, D, BLOCK_I, BLOCK_D)
    dA = fold_mat(P, pid_bh, n_split, M, offs_i, offs_d, D, D)
    gn = load_mat(GN + pid_bh * D * D, offs_i, offs_d, D, D)
    t = tl.load(TEMP + h).to(tl.float32)
    a = _xca_probs(gn, t, offs_i, offs_d, D)
    dl = a * (dA - tl.sum(a * dA, 1)[:, None])
    dl = tl.where(imask[:, None] & dmask[None, :], dl, 0.0)
    nq = tl.load(NORMS + pid_bh * 2 * D + offs_i, mask=imask, other=1.0)
    nk = tl.load(NORMS + pid_bh * 2 * D + D + offs_d, mask=dmask, other=1.0)
    rq = 1.0 / tl.maximum(nq, eps)
    rk = 1.0 / tl.maximum(nk, eps)
    hh = t * dl * gn
    cq = tl.where(nq >= eps, -rq * rq * tl.sum(hh, 1), 0.0)
    store_mat(DG + pid_bh * D * D, offs_i, offs_d, D, D, t * dl * rq[:, None] * rk[None, :])
    store_mat(A + pid_bh * D * D, offs_i, offs_d, D, D, a)
    tl.store(CQ + pid_bh * D + offs_i, cq, mask=imask)
    tl.store(partial_slot(CKP, pid_bh, D) + offs_d, tl.sum(hh, 0), mask=dmask)
    tl.store(partial_slot(DTP, pid_bh, 1), tl.sum(tl.sum(dl * gn, 1), 0))


# --------------------------------------------------------------------------------------------
# token-streaming apply kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _times_mat(X, Y, sx, sy, mat, N, offs_d, dmask, tiles_per_split,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Y = X·mat for this split's tokens (X, Y at this head; ``mat`` [BLOCK_D, BLOCK_D] fp32)."""
    t0, t1 = token_chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows, valid = tile_rows(t, N, BLOCK_M)
        x = load_rows(X, rows, offs_d, valid, dmask, sx).to(tl.float32)
        store_rows(Y, rows, offs_d, valid, dmask, sy, mma(x, mat, DOT_PRECISION))


@triton.jit
def xca_apply_kernel(
    V, A, O,
    svb, svh, svn, svd, sob, soh, son, sod,
    n_heads, N, D, tiles_per_split,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """o = V Aᵀ for this split's tokens (A[bh]: fp32 row-major D×D)."""
    pid_bh, _, _ = head(n_heads)
    offs_d, dmask = lanes(BLOCK_D, D)
    # Aᵀ loaded directly: at[j, i] = A[i, j]
    at = tl.load(A + pid_bh * D * D + offs_d[None, :] * D + offs_d[:, None],
                 mask=dmask[:, None] & dmask[None, :], other=0.0)
    _times_mat(V + bh_offset(pid_bh, n_heads, svb, svh), O + bh_offset(pid_bh, n_heads, sob, soh),
               (svn, svd), (son, sod), at, N, offs_d, dmask, tiles_per_split, DOT_PRECISION,
               BLOCK_M)


@triton.jit
def xca_fused_fwd_kernel(
    Q, K, V, TEMP, O, GN, NORMS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    n_heads, N, D, eps,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The whole forward of one (b, h) in one program, for maps of up to FUSED_MAX_N tokens:
    QᵀK and the channel norms over q, k (read once), Gn and A = softmax(τ·Gn) in registers
    (Gn and the norms stored for the backward), then o = V Aᵀ over v (read once). The three
    launches, the partials and A of the split path are gone; the token loops are those of the
    split kernels (gram_tiles, _times_mat) over one split."""
    pid_bh, _, h = head(n_heads)
    offs_d, dmask = lanes(BLOCK_D, D)
    n_tiles = tl.cdiv(N, BLOCK_M)
    g, sq, sk = gram_tiles(
        Q + bh_offset(pid_bh, n_heads, sqb, sqh), K + bh_offset(pid_bh, n_heads, skb, skh), Q,
        0, (sqn, sqd), (skn, skd), 0, 0, N, 0, n_tiles, offs_d, dmask, offs_d, dmask, 0, False,
        False, True, DOT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_D)
    nq, nk = tl.sqrt(sq), tl.sqrt(sk)
    gn = g * (1.0 / tl.maximum(nq, eps))[:, None] * (1.0 / tl.maximum(nk, eps))[None, :]
    a = _xca_probs(gn, tl.load(TEMP + h).to(tl.float32), offs_d, offs_d, D)
    store_mat(GN + pid_bh * D * D, offs_d, offs_d, D, D, gn)
    tl.store(NORMS + pid_bh * 2 * D + offs_d, nq, mask=dmask)
    tl.store(NORMS + pid_bh * 2 * D + D + offs_d, nk, mask=dmask)
    _times_mat(V + bh_offset(pid_bh, n_heads, svb, svh), O + bh_offset(pid_bh, n_heads, sob, soh),
               (svn, svd), (son, sod), tl.trans(a), N, offs_d, dmask, n_tiles, DOT_PRECISION,
               BLOCK_M)


@triton.jit
def xca_bwd_apply_kernel(
    Q, K, DO, DG, CQ, CK, A, DQ, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, N, D, tiles_per_split,
    DV_PASS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """This split's tokens: dq = K dGᵀ + q·cq and dk = Q dG + k·ck (DV_PASS = False), or
    dv = dO A (DV_PASS = True). Two launches read every token tensor once, as one would, with
    half the d×d operands live in registers."""
    pid_bh, _, _ = head(n_heads)
    offs_d, dmask = lanes(BLOCK_D, D)
    if DV_PASS:
        _times_mat(DO + bh_offset(pid_bh, n_heads, sdob, sdoh),
                   DV + bh_offset(pid_bh, n_heads, sdvb, sdvh), (sdon, sdod), (sdvn, sdvd),
                   load_mat(A + pid_bh * D * D, offs_d, offs_d, D, D), N, offs_d, dmask,
                   tiles_per_split, DOT_PRECISION, BLOCK_M)
    else:
        Q += bh_offset(pid_bh, n_heads, sqb, sqh)
        K += bh_offset(pid_bh, n_heads, skb, skh)
        DQ += bh_offset(pid_bh, n_heads, sdqb, sdqh)
        DK += bh_offset(pid_bh, n_heads, sdkb, sdkh)
        dg = load_mat(DG + pid_bh * D * D, offs_d, offs_d, D, D)
        cq = tl.load(CQ + pid_bh * D + offs_d, mask=dmask, other=0.0)
        ck = tl.load(CK + pid_bh * D + offs_d, mask=dmask, other=0.0)
        t0, t1 = token_chunk(N, tiles_per_split, BLOCK_M)
        for t in range(t0, t1):
            rows, valid = tile_rows(t, N, BLOCK_M)
            q = load_rows(Q, rows, offs_d, valid, dmask, (sqn, sqd)).to(tl.float32)
            k = load_rows(K, rows, offs_d, valid, dmask, (skn, skd)).to(tl.float32)
            dq = mma(k, tl.trans(dg), DOT_PRECISION) + q * cq[None, :]
            dk = mma(q, dg, DOT_PRECISION) + k * ck[None, :]
            store_rows(DQ, rows, offs_d, valid, dmask, (sdqn, sdqd), dq)
            store_rows(DK, rows, offs_d, valid, dmask, (sdkn, sdkd), dk)


# --------------------------------------------------------------------------------------------
# tile candidates (pure tuning, see common.TILES) and the declared capability
# --------------------------------------------------------------------------------------------

TILES = {
    # the fused forward holds a d×d Gram, then A, across its token loops (as gram and xca_apply)
    "xca_fused": {(16, False): (64, 4, 2), (32, False): (64, 4, 2), (64, False): (64, 8, 2),
                  (16, True): (64, 4, 2), (32, True): (64, 4, 2), (64, True): (32, 8, 2)},
    "xca_apply": {(16, False): (128, 4, 2), (32, False): (128, 4, 2), (64, False): (64, 4, 2),
                  (128, False): (64, 8, 2),
                  (16, True): (128, 4, 2), (32, True): (128, 4, 2), (64, True): (64, 4, 2),
                  (128, True): (32, 8, 2)},
    "xca_bwd_qk": {(16, False): (128, 4, 2), (32, False): (128, 4, 2), (64, False): (64, 4, 2),
                   (128, False): (32, 8, 2),
                   (16, True): (128, 4, 2), (32, True): (64, 4, 2), (64, True): (16, 16, 1)},
    "xca_bwd_v": {(16, False): (128, 4, 2), (32, False): (128, 4, 2), (64, False): (64, 4, 2),
                  (128, False): (64, 8, 2),
                  (16, True): (128, 4, 2), (32, True): (128, 4, 2), (64, True): (64, 4, 2)},
}

# The per-(b, h) d×d kernels (xca_softmax, xca_bwd_small): (rows per program BLOCK_I, num_warps,
# num_stages) per BLOCK_D, then SMALL_FALLBACK. The grid and the row-block partials follow
# BLOCK_I.
SMALL_TILES = {16: (16, 4, 1), 32: (32, 4, 1), 64: (64, 8, 1), 128: (32, 8, 1)}
SMALL_FALLBACK = ((16, 8, 1),)

# Declared capability: the largest head dim per pass and fp32? (see linear.MAX_HEAD_DIM).
MAX_HEAD_DIM = {("forward", False): 128, ("forward", True): 64,
                ("backward", False): 128, ("backward", True): 64}


def unsupported(head_dim: int, fp32: bool, backward: bool = True):
    """Why the triton backend refuses this head dim for XCA (None when it is within the
    declared capability); ``backward=False``: the forward's capability only."""
    return declared_reason("XCA", head_dim, fp32, MAX_HEAD_DIM, backward)


def _small_tiles(*, BLOCK_D):
    return configs(SMALL_TILES.get(BLOCK_D), SMALL_FALLBACK, "BLOCK_I")


#: maps of up to this many tokens run the fused forward (one program per head: XCiT's 196 /
#: 784-token maps at 224 px; at 1024 px the token loops want the split path's parallelism);
#: head dims up to FUSED_MAX_BLOCK_D (a d×d fp32 state per program)
FUSED_MAX_N = 1024
FUSED_MAX_BLOCK_D = 64

xca_fused = tile_launcher(xca_fused_fwd_kernel, token_tiles(TILES, "xca_fused"))
xca_apply = tile_launcher(xca_apply_kernel, token_tiles(TILES, "xca_apply"))
xca_bwd_apply = tile_launcher(xca_bwd_apply_kernel, token_tiles(
    TILES, lambda DV_PASS: "xca_bwd_v" if DV_PASS else "xca_bwd_qk"))
xca_softmax = tile_launcher(xca_softmax_kernel, _small_tiles)
xca_bwd_small = tile_launcher(xca_bwd_small_kernel, _small_tiles)


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.linear on validated inputs)
# --------------------------------------------------------------------------------------------


def _small_args(part, h: int, d: int, eps: float) -> dict:
    """The runtime arguments but tensors the d×d kernels share (``part``: the gram partials)."""
    return dict(n_split=part.shape[1], n_heads=h, D=d, M=part.shape[2], eps=float(eps))


def fused(n: int, d: int) -> bool:
    """Whether the forward of n tokens, head dim d, runs the fused kernel (one launch)."""
    return n <= FUSED_MAX_N and block_d(d) <= FUSED_MAX_BLOCK_D


def xca_forward(q, k, v, temp, o, eps: float):
    """XCA into o (B, h, N, d); returns (gn (B·h, d, d), norms (B·h, 2, d)) fp32 for backward."""
    b, h, n, d = q.shape
    bd = block_d(d)
    gn = torch.empty((b * h, d, d), device=q.device, dtype=torch.float32)
    norms = torch.empty((b * h, 2, d), device=q.device, dtype=torch.float32)
    if fused(n, d):
        launch(xca_fused, launch_key(q, k, v, o, eps),
               dict(Q=q, K=k, V=v, TEMP=temp, O=o, GN=gn, NORMS=norms),
               lambda: (dict(DOT_PRECISION=dots(q), BLOCK_D=bd),
                        lambda tile: dict(stride_args(q=q, k=k, v=v, o=o), **head_args(q), D=d,
                                          eps=float(eps)),
                        lambda tile: (b * h,)))
        return gn, norms
    part = gram(q, k, None, FEATURES["identity"], colsum=False, sq=True)
    attn = torch.empty_like(gn)
    launch(xca_softmax, launch_key(part, eps, q),
           dict(P=part, TEMP=temp, GN=gn, NORMS=norms, A=attn),
           lambda: (dict(BLOCK_D=bd), lambda tile: _small_args(part, h, d, eps),
                    lambda tile: (b * h, bd // tile["BLOCK_I"])))
    split_launch(xca_apply, q, launch_key(q, v, o), dict(V=v, O=o, A=attn),
                 lambda: (dict(stride_args(v=v, o=o), **head_args(q), D=d),
                          dict(DOT_PRECISION=dots(q), BLOCK_D=bd)))
    return gn, norms


def xca_backward(do, q, k, v, temp, gn, norms, dq, dk, dv, eps: float) -> torch.Tensor:
    """Gradients into dq, dk, dv; returns dτ per (b, h) as (B·h,) fp32."""
    b, h, n, d = q.shape
    bd = block_d(d)
    part = gram(do, v, None, FEATURES["identity"], colsum=False, sq=False)
    f32 = dict(device=q.device, dtype=torch.float32)
    dg, attn = torch.empty((b * h, d, d), **f32), torch.empty((b * h, d, d), **f32)
    cq = torch.empty((b * h, d), **f32)

    def row_block_partials(tile):  # of ck and dτ: one per program
        n_rb = bd // tile["BLOCK_I"]
        return dict(CKP=torch.empty((b * h, n_rb, d), **f32),
                    DTP=torch.empty((b * h, n_rb), **f32))

    small = launch(xca_bwd_small, launch_key(part, eps, q),
                   dict(P=part, GN=gn, NORMS=norms, TEMP=temp, DG=dg, CQ=cq, A=attn),
                   lambda: (dict(BLOCK_D=bd), lambda tile: _small_args(part, h, d, eps),
                            lambda tile: (b * h, bd // tile["BLOCK_I"])), row_block_partials)
    # fold the row-block partials (a fixed-order sum of bd / BLOCK_I terms) and finish ck
    nk = norms[:, 1]
    rk = 1.0 / nk.clamp_min(eps)
    ck = torch.where(nk >= eps, -rk * rk * small["CKP"].sum(1), 0.0)
    dt = small["DTP"].sum(1)
    tensors = dict(Q=q, K=k, DO=do, DQ=dq, DK=dk, DV=dv, DG=dg, CQ=cq, CK=ck, A=attn)
    key = launch_key(q, k, do, dq, dk, dv)
    for dv_pass in (False, True):
        split_launch(xca_bwd_apply, q, (dv_pass, *key), tensors,
                     lambda: (dict(stride_args(q=q, k=k, do=do, dq=dq, dk=dk, dv=dv),
                                   **head_args(q), D=d),
                              dict(DV_PASS=dv_pass, DOT_PRECISION=dots(q), BLOCK_D=bd)))
    return dt


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specialisations (tests/test_aot_compile.py: one candidate of each fits)
# --------------------------------------------------------------------------------------------


def aot_specs():
    """The token-streaming kernels in fp16 at BLOCK_D 64 (XCiT-S head dim 48 -> class 64), the
    fused forward at its largest head-dim class in fp16 and fp32, the per-head d×d kernels in
    fp32 at BLOCK_D 128 (row blocks)."""
    passes = {"xca_apply": (xca_apply, {}), "xca_bwd_qk": (xca_bwd_apply, dict(DV_PASS=False)),
              "xca_bwd_v": (xca_bwd_apply, dict(DV_PASS=True))}
    specs = [aot_spec(k, fn, "fp16", dict(BLOCK_D=64), flags) for k, (fn, flags) in passes.items()]
    specs += [aot_spec("xca_fused", xca_fused, dtype, dict(BLOCK_D=FUSED_MAX_BLOCK_D))
              for dtype in ("fp16", "fp32")]
    specs += [aot_spec(k, fn, "fp32", dict(BLOCK_D=128))
              for k, fn in (("xca_softmax", xca_softmax), ("xca_bwd_small", xca_bwd_small))]
    return specs
