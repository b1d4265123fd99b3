"""Triton kernels for non-causal linear attention and XCiT's cross-covariance attention (XCA).

Both ops are a reduction over the tokens into a tiny per-(batch, head) state followed by a
per-token apply, so both are memory-bound: the target is one read of q, k, v and one write of o.

Split-N reductions, deterministic. A reduction kernel runs on a (B·heads, n_split) grid; program
(bh, s) walks a contiguous chunk of token tiles and writes its fp32 partial state to its own slot
of a workspace (bh, n_split, M). The partials are then folded in split order (a fold kernel, or
inside the consumer when it is one program per head): no atomics, the same bits every run. The
apply kernels use the same grid so each program loads the state once for its whole chunk.
``n_split`` is chosen on the host to fill the GPU (about 4 programs per SM).

Linear attention (``FEAT`` = 0 identity, 1 ReLU, 2 elu+1, fused into every load; padded rows,
padded channels and masked keys are forced to φ = 0 — elu+1 of a zero is 1, not 0):

* forward: ``gram_partials`` → (φ(K)ᵀV | Σφ(K)) partials → fold → ``la_apply``:
  ``o = c·φ(q)S / D``, c = t_h·scale, ``D = φ(q)·z + eps`` or ``max(φ(q)·z, eps)``;
* backward: ``la_bwd_q`` writes dq and partials of (dS = Σ φ(q)ᵀg | dz = Σ r·φ(q) | dt) with
  num = φ(q)S recomputed, ``g = c·dO/D``, ``r = -c·(dO·num)/D²`` (zero where the clamp is
  active), ``dφ(q) = gSᵀ + r·z``; fold; ``la_bwd_kv``: ``dφ(k) = V dSᵀ + dz``,
  ``dv = φ(k) dS``. φ' is taken from φ (ReLU: f > 0; elu+1: min(f, 1)).

XCA (q, k, v (B, h, N, d); channels are the rows of a d×d map):

* forward: ``gram_partials`` → (qᵀk | Σq² | Σk²) partials → ``xca_softmax`` (fold, cosine
  Gram Gn = G/(|q_i||k_j|), A = softmax(τ·Gn); per head and block of rows) → ``xca_apply``:
  ``o = V Aᵀ``. Saved for the backward: Gn and the channel norms (fp32, d×d + 2d per head);
* backward: ``gram_partials`` → dA = dOᵀV partials → ``xca_bwd_small`` (fold; dL = softmax'
  of dA; dG = τ·dL/(|q_i||k_j|); the norm-chain terms cq, ck; dτ) → ``xca_bwd_apply`` twice:
  ``dq = K dGᵀ + q·cq``, ``dk = Q dG + k·ck`` from q, k, then ``dv = dO A`` from dO.

SOFT (q (B, h, N, d) pre-scaled, landmarks l (B, h, m, d), v (B, h, N, e), Ainv (B, h, m, m);
``K1 = exp(-½(‖q‖² + ‖l‖² − 2q·l))`` recomputed per token tile from q and the m landmarks held
in registers, never written):

* forward: ``soft_reduce`` → W = K1ᵀV partials → fold; W2 = Ainv·W (torch bmm, m×m by m×e) →
  ``soft_apply``: o = K1·W2. Saved: (W, W2) fp32;
* backward: ``soft_reduce`` on dO → dW2 = K1ᵀdO; dAinv = dW2·Wᵀ, dW = Ainvᵀ·dW2 (torch bmm) →
  ``soft_bwd``: dq and the partials of (dSᵀq | Σ dS), dS = −½·(dO·W2ᵀ + V·dWᵀ)·K1 → fold,
  dl = 2l·ΣdS − 2dSᵀq (torch) → ``soft_apply`` with dW: dv = K1·dW.

Dots: fp32 inputs use ``tf32x3`` (IEEE-accurate); the fp32 state times 16-bit tokens is a tf32
dot (the state can exceed the fp16 range, so it is never cast down).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention_core import block_d, cdiv, mma
from .tuning import Launcher, capability_reason

FEATURES = {"identity": 0, "relu": 1, "elu1": 2}

# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _phi(x, FEAT: tl.constexpr):
    """Feature map of an fp32 tile."""
    if FEAT == 1:
        return tl.maximum(x, 0.0)
    elif FEAT == 2:
        return tl.where(x > 0.0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        return x


@triton.jit
def _dphi(f, FEAT: tl.constexpr):
    """φ'(x) from f = φ(x) (so the raw tile need not stay live): ReLU 1 where f > 0 (0 at the
    kink, as torch); elu+1: min(f, 1) (f = x + 1 > 1 for x > 0, f = exp(x) = φ'(x) below)."""
    if FEAT == 1:
        return tl.where(f > 0.0, 1.0, 0.0)
    elif FEAT == 2:
        return tl.minimum(f, 1.0)
    else:
        return tl.full(f.shape, 1.0, tl.float32)


@triton.jit
def _ptrs(base, rows, cols, stride_n, stride_d):
    return base + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d


@triton.jit
def _chunk(N, tiles_per_split, BLOCK_M: tl.constexpr):
    """Token-tile range [t0, t1) of this program's split."""
    t0 = tl.program_id(1) * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(N, BLOCK_M))
    return t0, t1


@triton.jit
def _mat(base, offs_r, offs_c, R, C):
    """[len(offs_r), len(offs_c)] fp32 row-major (R, C) matrix at ``base``; zeros outside."""
    m = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    return tl.load(base + offs_r[:, None] * C + offs_c[None, :], mask=m, other=0.0)


# --------------------------------------------------------------------------------------------
# split-N reductions
# --------------------------------------------------------------------------------------------


@triton.jit
def gram_partials_kernel(
    X, Y, MASK, P,
    sxb, sxh, sxn, sxd, syb, syh, syn, syd, smb, smn,
    n_heads, N, DX, DY, M, tiles_per_split,
    FEAT: tl.constexpr, HAS_MASK: tl.constexpr, COLSUM: tl.constexpr, SQ: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Partial (over this split's tokens) of φ(X)ᵀY [DX, DY], then Σφ(X) [DX] (COLSUM) or
    ΣX² [DX], ΣY² [DY] (SQ), packed row-major into P[bh, split, 0:M] (fp32).

    X: (B, h, N, DX), Y: (B, h, N, DY), MASK: (B, N) uint8, nonzero = padding token (skipped).
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    X += b * sxb + h * sxh
    Y += b * syb + h * syh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    dmask = offs_d < DX
    emask = offs_e < DY
    acc = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    vec_x = tl.zeros([BLOCK_D], tl.float32)
    vec_y = tl.zeros([BLOCK_E], tl.float32)
    t0, t1 = _chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rows < N
        if HAS_MASK:
            pad = tl.load(MASK + b * smb + rows.to(tl.int64) * smn, mask=valid, other=1)
            valid = valid & (pad == 0)
        xm = valid[:, None] & dmask[None, :]
        x = tl.load(_ptrs(X, rows, offs_d, sxn, sxd), mask=xm, other=0.0)
        y = tl.load(_ptrs(Y, rows, offs_e, syn, syd), mask=valid[:, None] & emask[None, :],
                    other=0.0)
        xf = tl.where(xm, _phi(x.to(tl.float32), FEAT), 0.0)
        acc += mma(tl.trans(xf.to(x.dtype)), y, IEEE)
        if COLSUM:
            vec_x += tl.sum(xf, 0)
        if SQ:
            vec_x += tl.sum(xf * xf, 0)
            yf = y.to(tl.float32)
            vec_y += tl.sum(yf * yf, 0)
    P += (pid_bh * tl.num_programs(1) + split) * M
    tl.store(P + offs_d[:, None] * DY + offs_e[None, :], acc,
             mask=dmask[:, None] & emask[None, :])
    if COLSUM or SQ:
        tl.store(P + DX * DY + offs_d, vec_x, mask=dmask)
    if SQ:
        tl.store(P + DX * DY + DX + offs_e, vec_y, mask=emask)


@triton.jit
def fold_kernel(P, OUT, n_split, M, BLOCK: tl.constexpr):
    """OUT[r, :] = Σ_s P[r, s, :] summed in split order (deterministic)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < M
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(n_split):
        acc += tl.load(P + (r * n_split + s) * M + cols, mask=m, other=0.0)
    tl.store(OUT + r * M + cols, acc, mask=m)


# --------------------------------------------------------------------------------------------
# linear attention
# --------------------------------------------------------------------------------------------


@triton.jit
def _la_tile(Q, rows, N, offs_d, dmask, sqn, sqd, S, z, c, eps,
             FEAT: tl.constexpr, CLAMP: tl.constexpr, IEEE: tl.constexpr):
    """One query tile: (φ(q), num = φ(q)S, 1/D, clamp active) with den = φ(q)·z."""
    valid = rows < N
    qm = valid[:, None] & dmask[None, :]
    q = tl.load(_ptrs(Q, rows, offs_d, sqn, sqd), mask=qm, other=0.0).to(tl.float32)
    fq = tl.where(qm, _phi(q, FEAT), 0.0)  # pad rows / channels: φ = 0 (elu+1 would give 1)
    num = mma(fq, S, IEEE)
    den = tl.sum(fq * z[None, :], 1)
    if CLAMP:
        d_full = tl.maximum(den, eps)
        active = den >= eps
    else:
        d_full = den + eps
        active = den == den
    inv = tl.where(valid, 1.0 / d_full, 0.0)  # pad rows: no 1/0
    return fq, num, inv, active & valid


@triton.jit
def la_apply_kernel(
    Q, ST, TEMP, O,
    sqb, sqh, sqn, sqd, sob, soh, son, sod,
    n_heads, N, D, E, M, tiles_per_split, scale, eps,
    FEAT: tl.constexpr, CLAMP: tl.constexpr, HAS_TEMP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """o = t_h·scale·φ(q)S / D for this split's tokens; ST[bh] = (S [D, E] | z [D]) fp32."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * sqb + h * sqh
    O += b * sob + h * soh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    dmask = offs_d < D
    emask = offs_e < E
    S = _mat(ST + pid_bh * M, offs_d, offs_e, D, E)
    z = tl.load(ST + pid_bh * M + D * E + offs_d, mask=dmask, other=0.0)
    c = scale
    if HAS_TEMP:
        c = c * tl.load(TEMP + h).to(tl.float32)
    t0, t1 = _chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        fq, num, inv, active = _la_tile(Q, rows, N, offs_d, dmask, sqn, sqd, S, z, c, eps,
                                           FEAT, CLAMP, IEEE)
        o = num * (c * inv)[:, None]
        tl.store(_ptrs(O, rows, offs_e, son, sod), o.to(O.dtype.element_ty),
                 mask=(rows < N)[:, None] & emask[None, :])


@triton.jit
def la_bwd_q_kernel(
    Q, DO, ST, TEMP, DQ, P,
    sqb, sqh, sqn, sqd, sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    n_heads, N, D, E, M, MP, tiles_per_split, scale, eps,
    FEAT: tl.constexpr, CLAMP: tl.constexpr, HAS_TEMP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dq for this split's tokens, and the partials (dS [D, E] | dz [D] | dt) into P[bh, split].

    With num = φ(q)S, D the denominator, c = t·scale, w = dO·num / D:
    g = c·dO/D (∂num), r = -c·w/D (∂den, 0 where the clamp is active), dφ(q) = gSᵀ + r·z,
    dS = Σ φ(q)ᵀg, dz = Σ r·φ(q), dt = scale·Σ w.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * sqb + h * sqh
    DO += b * sdob + h * sdoh
    DQ += b * sdqb + h * sdqh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    dmask = offs_d < D
    emask = offs_e < E
    S = _mat(ST + pid_bh * M, offs_d, offs_e, D, E)
    z = tl.load(ST + pid_bh * M + D * E + offs_d, mask=dmask, other=0.0)
    c = scale
    if HAS_TEMP:
        c = c * tl.load(TEMP + h).to(tl.float32)
    dS = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    dz = tl.zeros([BLOCK_D], tl.float32)
    dt = tl.zeros([BLOCK_M], tl.float32)
    t0, t1 = _chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rows < N
        fq, num, inv, active = _la_tile(Q, rows, N, offs_d, dmask, sqn, sqd, S, z, c, eps,
                                           FEAT, CLAMP, IEEE)
        do = tl.load(_ptrs(DO, rows, offs_e, sdon, sdod), mask=valid[:, None] & emask[None, :],
                     other=0.0).to(tl.float32)
        w = tl.sum(do * num, 1) * inv
        g = do * (c * inv)[:, None]
        r = tl.where(active, -c * w * inv, 0.0)
        dfq = mma(g, tl.trans(S), IEEE) + r[:, None] * z[None, :]
        dq = dfq * _dphi(fq, FEAT)
        tl.store(_ptrs(DQ, rows, offs_d, sdqn, sdqd), dq.to(DQ.dtype.element_ty),
                 mask=valid[:, None] & dmask[None, :])
        dS += mma(tl.trans(fq), g, IEEE)
        dz += tl.sum(r[:, None] * fq, 0)
        dt += w
    P += (pid_bh * tl.num_programs(1) + split) * MP
    tl.store(P + offs_d[:, None] * E + offs_e[None, :], dS, mask=dmask[:, None] & emask[None, :])
    tl.store(P + D * E + offs_d, dz, mask=dmask)
    tl.store(P + D * E + D, tl.sum(dt, 0) * scale)


@triton.jit
def la_bwd_kv_kernel(
    K, V, MASK, G, DK, DV,
    skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, N, D, E, MP, tiles_per_split,
    FEAT: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dk = (V dSᵀ + dz)·φ'(k), dv = φ(k) dS for this split's keys (0 for padding keys);
    G[bh] = (dS [D, E] | dz [D] | dt) fp32."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    K += b * skb + h * skh
    V += b * svb + h * svh
    DK += b * sdkb + h * sdkh
    DV += b * sdvb + h * sdvh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    dmask = offs_d < D
    emask = offs_e < E
    dS = _mat(G + pid_bh * MP, offs_d, offs_e, D, E)
    dz = tl.load(G + pid_bh * MP + D * E + offs_d, mask=dmask, other=0.0)
    t0, t1 = _chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rows < N
        keep = valid
        if HAS_MASK:
            pad = tl.load(MASK + b * smb + rows.to(tl.int64) * smn, mask=valid, other=1)
            keep = valid & (pad == 0)
        km = keep[:, None] & dmask[None, :]
        vm = keep[:, None] & emask[None, :]
        k = tl.load(_ptrs(K, rows, offs_d, skn, skd), mask=km, other=0.0).to(tl.float32)
        v = tl.load(_ptrs(V, rows, offs_e, svn, svd), mask=vm, other=0.0).to(tl.float32)
        fk = tl.where(km, _phi(k, FEAT), 0.0)
        dfk = mma(v, tl.trans(dS), IEEE) + dz[None, :]
        dk = tl.where(km, dfk * _dphi(fk, FEAT), 0.0)
        dv = mma(fk, dS, IEEE)
        tl.store(_ptrs(DK, rows, offs_d, sdkn, sdkd), dk.to(DK.dtype.element_ty),
                 mask=valid[:, None] & dmask[None, :])
        tl.store(_ptrs(DV, rows, offs_e, sdvn, sdvd), dv.to(DV.dtype.element_ty),
                 mask=valid[:, None] & emask[None, :])


# --------------------------------------------------------------------------------------------
# XCA
# --------------------------------------------------------------------------------------------


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
    pid_bh = tl.program_id(0).to(tl.int64)
    ib = tl.program_id(1)
    h = pid_bh % n_heads
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    imask = offs_i < D
    dmask = offs_d < D
    G = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    sq = tl.zeros([BLOCK_I], tl.float32)
    sk = tl.zeros([BLOCK_D], tl.float32)
    for s in range(n_split):
        base = P + (pid_bh * n_split + s) * M
        G += _mat(base, offs_i, offs_d, D, D)
        sq += tl.load(base + D * D + offs_i, mask=imask, other=0.0)
        sk += tl.load(base + D * D + D + offs_d, mask=dmask, other=0.0)
    nq = tl.sqrt(sq)
    nk = tl.sqrt(sk)
    gn = G * (1.0 / tl.maximum(nq, eps))[:, None] * (1.0 / tl.maximum(nk, eps))[None, :]
    a = _xca_probs(gn, tl.load(TEMP + h).to(tl.float32), offs_i, offs_d, D)
    m2 = imask[:, None] & dmask[None, :]
    mat = pid_bh * D * D + offs_i[:, None] * D + offs_d[None, :]
    tl.store(GN + mat, gn, mask=m2)
    tl.store(A + mat, a, mask=m2)
    tl.store(NORMS + pid_bh * 2 * D + offs_i, nq, mask=imask)
    nk_len = tl.where(ib == 0, D, 0)  # |k| is the same in every row block: the first stores it
    tl.store(NORMS + pid_bh * 2 * D + D + offs_d, nk, mask=offs_d < nk_len)


@triton.jit
def xca_apply_kernel(
    V, A, O,
    svb, svh, svn, svd, sob, soh, son, sod,
    n_heads, N, D, tiles_per_split,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """o = V Aᵀ for this split's tokens (A[bh]: fp32 row-major D×D)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    V += b * svb + h * svh
    O += b * sob + h * soh
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    # Aᵀ loaded directly: at[j, i] = A[i, j]
    at = tl.load(A + pid_bh * D * D + offs_d[None, :] * D + offs_d[:, None],
                 mask=dmask[:, None] & dmask[None, :], other=0.0)
    t0, t1 = _chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m = (rows < N)[:, None] & dmask[None, :]
        v = tl.load(_ptrs(V, rows, offs_d, svn, svd), mask=m, other=0.0).to(tl.float32)
        o = mma(v, at, IEEE)
        tl.store(_ptrs(O, rows, offs_d, son, sod), o.to(O.dtype.element_ty), mask=m)


@triton.jit
def xca_bwd_small_kernel(P, GN, NORMS, TEMP, DG, CQ, A, CKP, DTP, n_split, n_heads, D, M, eps,
                         BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (b, h) and block of BLOCK_I rows: fold the dA = dOᵀV partials; with A = softmax(τ·Gn)
    recomputed, dL = A∘(dA − rowsum(A∘dA)), dG = τ·dL_ij·rq_i·rk_j, the norm term
    cq_i = −rq_i²·Σ_j τ·dL_ij·Gn_ij (0 where max(|q_i|, eps) clamps), rq = 1/max(|q_i|, eps).
    The column sums Σ_i τ·dL_ij·Gn_ij (for ck) and Σ dL∘Gn (dτ) of this row block are written
    as partials CKP[bh, ib, :], DTP[bh, ib] that the host folds over the row blocks."""
    pid_bh = tl.program_id(0).to(tl.int64)
    ib = tl.program_id(1)
    h = pid_bh % n_heads
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    imask = offs_i < D
    dmask = offs_d < D
    m2 = imask[:, None] & dmask[None, :]
    dA = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    for s in range(n_split):
        dA += _mat(P + (pid_bh * n_split + s) * M, offs_i, offs_d, D, D)
    gn = _mat(GN + pid_bh * D * D, offs_i, offs_d, D, D)
    t = tl.load(TEMP + h).to(tl.float32)
    a = _xca_probs(gn, t, offs_i, offs_d, D)
    dl = a * (dA - tl.sum(a * dA, 1)[:, None])
    dl = tl.where(m2, dl, 0.0)
    nq = tl.load(NORMS + pid_bh * 2 * D + offs_i, mask=imask, other=1.0)
    nk = tl.load(NORMS + pid_bh * 2 * D + D + offs_d, mask=dmask, other=1.0)
    rq = 1.0 / tl.maximum(nq, eps)
    rk = 1.0 / tl.maximum(nk, eps)
    hh = t * dl * gn
    cq = tl.where(nq >= eps, -rq * rq * tl.sum(hh, 1), 0.0)
    dg = t * dl * rq[:, None] * rk[None, :]
    mat = pid_bh * D * D + offs_i[:, None] * D + offs_d[None, :]
    tl.store(DG + mat, dg, mask=m2)
    tl.store(A + mat, a, mask=m2)
    tl.store(CQ + pid_bh * D + offs_i, cq, mask=imask)
    tl.store(CKP + (pid_bh * tl.num_programs(1) + ib) * D + offs_d, tl.sum(hh, 0), mask=dmask)
    tl.store(DTP + pid_bh * tl.num_programs(1) + ib, tl.sum(tl.sum(dl * gn, 1), 0))


@triton.jit
def xca_bwd_apply_kernel(
    Q, K, DO, DG, CQ, CK, A, DQ, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, N, D, tiles_per_split,
    DV_PASS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """This split's tokens: dq = K dGᵀ + q·cq and dk = Q dG + k·ck (DV_PASS = False), or
    dv = dO A (DV_PASS = True). Two launches read every token tensor once, as one would, with
    half the d×d operands live in registers."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    t0, t1 = _chunk(N, tiles_per_split, BLOCK_M)
    if DV_PASS:
        DO += b * sdob + h * sdoh
        DV += b * sdvb + h * sdvh
        a = _mat(A + pid_bh * D * D, offs_d, offs_d, D, D)
        for t in range(t0, t1):
            rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
            m = (rows < N)[:, None] & dmask[None, :]
            do = tl.load(_ptrs(DO, rows, offs_d, sdon, sdod), mask=m, other=0.0).to(tl.float32)
            tl.store(_ptrs(DV, rows, offs_d, sdvn, sdvd), mma(do, a, IEEE).to(DV.dtype.element_ty),
                     mask=m)
    else:
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        DQ += b * sdqb + h * sdqh
        DK += b * sdkb + h * sdkh
        dg = _mat(DG + pid_bh * D * D, offs_d, offs_d, D, D)
        cq = tl.load(CQ + pid_bh * D + offs_d, mask=dmask, other=0.0)
        ck = tl.load(CK + pid_bh * D + offs_d, mask=dmask, other=0.0)
        for t in range(t0, t1):
            rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
            m = (rows < N)[:, None] & dmask[None, :]
            q = tl.load(_ptrs(Q, rows, offs_d, sqn, sqd), mask=m, other=0.0).to(tl.float32)
            k = tl.load(_ptrs(K, rows, offs_d, skn, skd), mask=m, other=0.0).to(tl.float32)
            dq = mma(k, tl.trans(dg), IEEE) + q * cq[None, :]
            dk = mma(q, dg, IEEE) + k * ck[None, :]
            tl.store(_ptrs(DQ, rows, offs_d, sdqn, sdqd), dq.to(DQ.dtype.element_ty), mask=m)
            tl.store(_ptrs(DK, rows, offs_d, sdkn, sdkd), dk.to(DK.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# SOFT: out = K1·(Ainv·(K1ᵀV)), K1 = exp(-½‖q − l‖²) recomputed per tile, never stored
# --------------------------------------------------------------------------------------------


@triton.jit
def _soft_landmarks(L, sln, sld, m, offs_l, offs_d, D):
    """Landmarks transposed [BLOCK_D, BLOCK_L] (input dtype; zeros outside) and ‖l‖² (fp32)."""
    lm = (offs_d < D)[:, None] & (offs_l < m)[None, :]
    lt = tl.load(L + offs_l[None, :] * sln + offs_d[:, None] * sld, mask=lm, other=0.0)
    ltf = lt.to(tl.float32)
    return lt, tl.sum(ltf * ltf, 0)


@triton.jit
def _sdot(a, b, IEEE: tl.constexpr, FMA: tl.constexpr):
    """mma, or (FMA) an exact fp32 dot on the FMA units: no tf32x3 hi/lo operand copies, which
    is what keeps the fp32 landmark-gradient pass from spilling."""
    if FMA:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return mma(a, b, IEEE)


@triton.jit
def _soft_k1(Q, rows, N, offs_d, D, sqn, sqd, lt, ll, lvalid, IEEE: tl.constexpr,
             FMA: tl.constexpr = False):
    """(q tile fp32, K1 tile [BLOCK_M, BLOCK_L] fp32). The squared distance is the expansion
    ‖q‖² + ‖l‖² − 2q·l of the reference (q·l a tensor-core dot, fp32 accumulation), not
    clamped; pad rows and pad landmarks get K1 = 0 (exp(0) would be 1)."""
    valid = rows < N
    q = tl.load(_ptrs(Q, rows, offs_d, sqn, sqd), mask=valid[:, None] & (offs_d < D)[None, :],
                other=0.0)
    qf = q.to(tl.float32)
    sq = tl.sum(qf * qf, 1)[:, None] + ll[None, :] - 2.0 * _sdot(q, lt, IEEE, FMA)
    k1 = tl.where(valid[:, None] & lvalid[None, :], tl.exp(-0.5 * sq), 0.0)
    return qf, k1


@triton.jit
def soft_reduce_kernel(
    Q, L, Y, P,
    sqb, sqh, sqn, sqd, slb, slh, sln, sld, syb, syh, syn, syd,
    n_heads, N, m, D, E, tiles_per_split,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Partial (this split's tokens) of K1ᵀY [m, E] into P[bh, split, 0:m·E] (fp32).
    Y = v in the forward (W = K1ᵀV), dO in the backward (dW2 = K1ᵀdO)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * sqb + h * sqh
    L += b * slb + h * slh
    Y += b * syb + h * syh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    offs_l = tl.arange(0, BLOCK_L)
    lt, ll = _soft_landmarks(L, sln, sld, m, offs_l, offs_d, D)
    acc = tl.zeros([BLOCK_L, BLOCK_E], tl.float32)
    t0, t1 = _chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        qf, k1 = _soft_k1(Q, rows, N, offs_d, D, sqn, sqd, lt, ll, offs_l < m, IEEE)
        y = tl.load(_ptrs(Y, rows, offs_e, syn, syd),
                    mask=(rows < N)[:, None] & (offs_e < E)[None, :], other=0.0)
        # K1 in [0, ~1]: cast to the token dtype like a softmax P tile
        acc += mma(tl.trans(k1.to(y.dtype)), y, IEEE)
    P += (pid_bh * tl.num_programs(1) + split) * (m * E)
    tl.store(P + offs_l[:, None] * E + offs_e[None, :], acc,
             mask=(offs_l < m)[:, None] & (offs_e < E)[None, :])


@triton.jit
def soft_apply_kernel(
    Q, L, W2, O,
    sqb, sqh, sqn, sqd, slb, slh, sln, sld, sob, soh, son, sod,
    n_heads, N, m, D, E, tiles_per_split,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """o = K1·W2 for this split's tokens; W2[bh] = Ainv·K1ᵀV [m, E] fp32 (kept fp32: a tf32
    dot for 16-bit inputs, Ainv's entries can be large)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * sqb + h * sqh
    L += b * slb + h * slh
    O += b * sob + h * soh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    offs_l = tl.arange(0, BLOCK_L)
    lt, ll = _soft_landmarks(L, sln, sld, m, offs_l, offs_d, D)
    w2 = _mat(W2 + pid_bh * m * E, offs_l, offs_e, m, E)
    t0, t1 = _chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        qf, k1 = _soft_k1(Q, rows, N, offs_d, D, sqn, sqd, lt, ll, offs_l < m, IEEE)
        o = mma(k1, w2, IEEE)
        tl.store(_ptrs(O, rows, offs_e, son, sod), o.to(O.dtype.element_ty),
                 mask=(rows < N)[:, None] & (offs_e < E)[None, :])


@triton.jit
def soft_bwd_kernel(
    Q, L, V, DO, W2, DW, DQ, P,
    sqb, sqh, sqn, sqd, slb, slh, sln, sld, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd,
    n_heads, N, m, D, E, tiles_per_split,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, DO_Q: tl.constexpr, DO_L: tl.constexpr,
    FMA: tl.constexpr,
):
    """dq (DO_Q) for this split's tokens and the landmark partials (dSᵀq [m, D] | Σ_n dS [m]).

    With W2 = Ainv·W, dW = Ainvᵀ·dW2 (host, m×E each): dK1 = dO·W2ᵀ + V·dWᵀ,
    dS = −½·dK1·K1 (∂ of the squared distance), dq = 2q·Σ_j dS − 2·dS·L; the host finishes
    dl = 2l·Σ_n dS − 2·dSᵀq. dv = K1·dW is ``soft_apply_kernel`` with dW for W2 (a separate
    pass: holding dW in a second register layout here spills). fp32 (tf32x3 dots hold split
    operands) runs this twice, DO_Q then DO_L, for the same reason.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * sqb + h * sqh
    L += b * slb + h * slh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    DQ += b * sdqb + h * sdqh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    offs_l = tl.arange(0, BLOCK_L)
    dmask = offs_d < D
    emask = offs_e < E
    lt, ll = _soft_landmarks(L, sln, sld, m, offs_l, offs_d, D)
    w2 = _mat(W2 + pid_bh * m * E, offs_l, offs_e, m, E)
    dw = _mat(DW + pid_bh * m * E, offs_l, offs_e, m, E)
    acc_l = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    acc_s = tl.zeros([BLOCK_L], tl.float32)
    t0, t1 = _chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rows < N
        qf, k1 = _soft_k1(Q, rows, N, offs_d, D, sqn, sqd, lt, ll, offs_l < m, IEEE, FMA)
        em = valid[:, None] & emask[None, :]
        do = tl.load(_ptrs(DO, rows, offs_e, sdon, sdod), mask=em, other=0.0).to(tl.float32)
        v = tl.load(_ptrs(V, rows, offs_e, svn, svd), mask=em, other=0.0).to(tl.float32)
        dk1 = _sdot(do, tl.trans(w2), IEEE, FMA) + _sdot(v, tl.trans(dw), IEEE, FMA)
        ds = -0.5 * dk1 * k1  # 0 at pad rows / landmarks (k1 = 0 there)
        # dS·L and dSᵀq in the token dtype (FlashAttention's dS·K convention): a 16-bit copy
        # of L held across the loop instead of an fp32 one keeps the tile spill-free
        ds_lp = ds.to(lt.dtype)
        if DO_Q:
            dq = 2.0 * qf * tl.sum(ds, 1)[:, None] - 2.0 * mma(ds_lp, tl.trans(lt), IEEE)
            tl.store(_ptrs(DQ, rows, offs_d, sdqn, sdqd), dq.to(DQ.dtype.element_ty),
                     mask=valid[:, None] & dmask[None, :])
        if DO_L:
            acc_l += _sdot(tl.trans(ds_lp), qf.to(lt.dtype), IEEE, FMA)
            acc_s += tl.sum(ds, 0)
    if DO_L:
        P += (pid_bh * tl.num_programs(1) + split) * (m * D + m)
        lmask = offs_l < m
        tl.store(P + offs_l[:, None] * D + offs_d[None, :], acc_l,
                 mask=lmask[:, None] & dmask[None, :])
        tl.store(P + m * D + offs_l, acc_s, mask=lmask)


# --------------------------------------------------------------------------------------------
# tile candidates (pure tuning) and declared capabilities
# --------------------------------------------------------------------------------------------

# Preferred tile (BLOCK_M, num_warps, num_stages) per token-streaming kernel and (BLOCK_D, fp32?),
# BLOCK_D the power-of-two class of max(d, e): the largest tile of the list (128, 4, 2),
# (64, 4, 2), (64, 8, 2), (32, 8, 2), (32, 8, 1), (16, 8, 1), (16, 16, 1) that compiled without
# register spills for sm_80 and sm_90 in a sweep (triton 3.9). A kernel's candidates are its
# preferred tile, then FALLBACK_TILES: which of them spill depends on the compiler, so the
# launcher keeps those that fit on the machine that runs them (tuning.py). Pure tuning: the
# inputs the backend takes are declared apart (MAX_HEAD_DIM); a key missing here only means the
# fallbacks alone are candidates.
TILES = {
    "gram": {(16, False): (128, 4, 2), (32, False): (128, 4, 2), (64, False): (64, 4, 2),
             (128, False): (64, 8, 2),
             (16, True): (64, 4, 2), (32, True): (64, 4, 2), (64, True): (32, 8, 2)},
    "la_apply": {(16, False): (128, 4, 2), (32, False): (128, 4, 2), (64, False): (64, 4, 2),
                 (128, False): (64, 8, 2),
                 (16, True): (128, 4, 2), (32, True): (128, 4, 2), (64, True): (64, 8, 2),
                 (128, True): (16, 8, 1)},
    "la_bwd_q": {(16, False): (128, 4, 2), (32, False): (64, 4, 2), (64, False): (64, 8, 2),
                 (16, True): (64, 4, 2), (32, True): (32, 4, 2)},
    "la_bwd_kv": {(16, False): (128, 4, 2), (32, False): (128, 4, 2), (64, False): (64, 4, 2),
                  (128, False): (32, 8, 2),
                  (16, True): (128, 4, 2), (32, True): (64, 4, 2), (64, True): (32, 8, 2)},
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

# SOFT: the same, per kernel and (max(32, BLOCK_L, BLOCK_D, BLOCK_E), fp32?), swept with
# BLOCK_L = BLOCK_D = BLOCK_E = the key (the largest tiles of the class). SOFT's shapes (m = 49,
# d = 32) are class 64. The backward is one pass in 16-bit ("soft_bwd"); in fp32 the tf32x3
# operand copies spill it at every tile size, so fp32 runs a dq pass ("soft_bwd_q") and a
# landmark-gradient pass ("soft_bwd_l") whose dots are exact fp32 FMA dots (tf32x3 spills there
# too).
SOFT_TILES = {
    "soft_reduce": {(32, False): (128, 4, 2), (64, False): (64, 4, 2),
                    (32, True): (64, 8, 2), (64, True): (32, 4, 1)},
    "soft_apply": {(32, False): (128, 4, 2), (64, False): (128, 4, 2),
                   (32, True): (64, 4, 2), (64, True): (32, 4, 2)},
    "soft_bwd": {(32, False): (128, 4, 2), (64, False): (32, 8, 2)},
    "soft_bwd_q": {(32, True): (64, 4, 2), (64, True): (32, 8, 2)},
    "soft_bwd_l": {(32, True): (32, 8, 2), (64, True): (16, 4, 1)},  # FMA dots
}
#: soft_bwd_kernel's passes: table name -> its flags.
SOFT_BWD_PASSES = {"soft_bwd": dict(DO_Q=True, DO_L=True, FMA=False),
                   "soft_bwd_q": dict(DO_Q=True, DO_L=False, FMA=False),
                   "soft_bwd_l": dict(DO_Q=False, DO_L=True, FMA=True)}

#: Candidates every token-streaming kernel also tries after its preferred tile: small enough to
#: fit in registers with the compilers we have met (8 warps: the d×d states held across the
#: token loop spread over more threads than with 4).
FALLBACK_TILES = ((32, 8, 1), (16, 8, 1))

# The per-(b, h) d×d kernels (xca_softmax, xca_bwd_small): (rows per program BLOCK_I, num_warps,
# num_stages) per BLOCK_D, then XCA_SMALL_FALLBACK. The grid and the row-block partials follow
# BLOCK_I.
XCA_SMALL_TILES = {16: (16, 4, 1), 32: (32, 4, 1), 64: (64, 8, 1), 128: (32, 8, 1)}
XCA_SMALL_FALLBACK = ((16, 8, 1),)
FOLD_BLOCK = 1024

# Declared capability: the largest head dim (max(d, e) for linear attention) per op, pass and
# fp32?; the backward of a call with gradients needs both passes. Within it every kernel the pass
# launches has a candidate that fits in registers (tests/test_aot_compile.py proves it for the
# declared specialisations with the installed compiler); beyond it the fp32 tf32x3 dots and the
# fp32 d×d states held across the token loop run out of registers.
MAX_HEAD_DIM = {
    ("linear", "forward", False): 128, ("linear", "forward", True): 64,
    ("linear", "backward", False): 64, ("linear", "backward", True): 32,
    ("xca", "forward", False): 128, ("xca", "forward", True): 64,
    ("xca", "backward", False): 128, ("xca", "backward", True): 64,
}
#: SOFT: the largest landmark count and head dims (each), per pass and fp32?; in fp32 the query /
#: landmark head dim stops at SOFT_FP32_MAX_HEAD_DIM: with more than 32 landmarks and d above 32
#: (BLOCK_L = BLOCK_D = 64) no soft_reduce tile fits sm_80 with triton 3.8. SOFT's own shapes
#: (m = 49, d = 32) are within both.
SOFT_MAX_SIZE = {("forward", False): 64, ("forward", True): 64,
                 ("backward", False): 64, ("backward", True): 64}
SOFT_FP32_MAX_HEAD_DIM = 32
_FORWARD_RUNS = "; the forward runs: call it without gradients"


def unsupported(head_dim: int, fp32: bool, v_dim: int | None = None, xca: bool = False,
                backward: bool = True):
    """Why the triton backend refuses these head dims (None when they are within the declared
    capability). With ``backward=False`` only the forward's capability applies (inference
    without gradients)."""
    op, what = ("xca", "XCA") if xca else ("linear", "linear attention")
    d = max(head_dim, v_dim or 0)
    reason = capability_reason(what, d, fp32, MAX_HEAD_DIM[op, "forward", fp32])
    if reason is None and backward:
        reason = capability_reason(f"{what} backward", d, fp32,
                                   MAX_HEAD_DIM[op, "backward", fp32], _FORWARD_RUNS)
    return reason


def soft_unsupported(m: int, head_dim: int, v_dim: int, fp32: bool, backward: bool = True):
    """Why the SOFT kernels refuse these sizes (None when they are within the declared
    capability)."""
    dtype = "float32" if fp32 else "16-bit"
    if fp32 and (why := capability_reason("SOFT", head_dim, fp32, SOFT_FP32_MAX_HEAD_DIM)):
        return why
    for pass_, hint in (("forward", ""), ("backward", _FORWARD_RUNS))[:1 + backward]:
        cap = SOFT_MAX_SIZE[pass_, fp32]
        if max(m, head_dim, v_dim) > cap:
            what = "SOFT" if pass_ == "forward" else "SOFT backward"
            return (f"{dtype} landmarks {m}, head_dim {head_dim}, v head_dim {v_dim} are outside "
                    f"the declared capability of triton {what} (up to {cap} each: larger tiles "
                    f"spill registers){hint}")
    return None


def _configs(preferred, fallback, name: str = "BLOCK_M") -> list:
    """``triton.Config``s from (tile, num_warps, num_stages) rows: ``preferred`` (None: none),
    then the ``fallback`` rows not already listed."""
    rows = dict.fromkeys(([tuple(preferred)] if preferred else []) + list(fallback))
    return [triton.Config({name: t}, num_warps=w, num_stages=s) for t, w, s in rows]


def _tiles(table: dict, kernel, floor: int = 0):
    """Candidates of a token-streaming kernel: its ``table`` entry for (max(floor, BLOCK_D,
    BLOCK_E, BLOCK_L), fp32?), then FALLBACK_TILES. ``kernel``: the table name, or a function of
    the launch's other constexprs that gives it (one jit kernel, several passes)."""
    def candidates(*, IEEE, BLOCK_D, BLOCK_E=0, BLOCK_L=0, **flags):
        name = kernel(**flags) if callable(kernel) else kernel
        key = max(floor, BLOCK_D, BLOCK_E, BLOCK_L)
        return _configs(table[name].get((key, bool(IEEE))), FALLBACK_TILES)
    return candidates


def _xca_small_tiles(*, BLOCK_D):
    return _configs(XCA_SMALL_TILES.get(BLOCK_D), XCA_SMALL_FALLBACK, "BLOCK_I")


def _soft_bwd_pass(**flags) -> str:
    return next(name for name, f in SOFT_BWD_PASSES.items() if f == flags)


# The grids and partial buffers depend on the tile, so these are launched with Launcher.pick
# (see _launch), never autotuned: the key is unused.
_KEY = ["N"]
gram_partials = Launcher(gram_partials_kernel, _tiles(TILES, "gram"), _KEY)
la_apply = Launcher(la_apply_kernel, _tiles(TILES, "la_apply"), _KEY)
la_bwd_q = Launcher(la_bwd_q_kernel, _tiles(TILES, "la_bwd_q"), _KEY)
la_bwd_kv = Launcher(la_bwd_kv_kernel, _tiles(TILES, "la_bwd_kv"), _KEY)
xca_apply = Launcher(xca_apply_kernel, _tiles(TILES, "xca_apply"), _KEY)
xca_bwd_apply = Launcher(xca_bwd_apply_kernel, _tiles(
    TILES, lambda DV_PASS: "xca_bwd_v" if DV_PASS else "xca_bwd_qk"), _KEY)
soft_reduce = Launcher(soft_reduce_kernel, _tiles(SOFT_TILES, "soft_reduce", 32), _KEY)
soft_apply = Launcher(soft_apply_kernel, _tiles(SOFT_TILES, "soft_apply", 32), _KEY)
soft_bwd = Launcher(soft_bwd_kernel, _tiles(SOFT_TILES, _soft_bwd_pass, 32), _KEY)
xca_softmax = Launcher(xca_softmax_kernel, _xca_small_tiles, _KEY)
xca_bwd_small = Launcher(xca_bwd_small_kernel, _xca_small_tiles, _KEY)
fold = Launcher(fold_kernel, lambda: [triton.Config({"BLOCK": FOLD_BLOCK}, num_warps=4)], _KEY)


# --------------------------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_plan(t: torch.Tensor, bh: int, n: int, block_m: int) -> tuple[int, int]:
    """(n_split, tiles_per_split) for ``bh`` heads of ``n`` tokens: about 4 programs per SM on a
    GPU; under the interpreter up to 3 splits, so that small test shapes cross split boundaries."""
    n_tiles = max(1, cdiv(n, block_m))
    if t.is_cuda:
        want = max(1, cdiv(4 * _sm_count(t.device.index or 0), max(bh, 1)))
    else:
        want = 3
    per = cdiv(n_tiles, min(want, n_tiles))
    return cdiv(n_tiles, per), per  # no empty split: each one writes its partial


def _launch(launcher: Launcher, plan, **constexprs):
    """Launch ``launcher``'s kernel with the candidate it picks for ``constexprs``; returns the
    third item of ``plan(tile)`` = (grid, runtime args, result), ``tile`` a candidate's sizes.
    The grid, and the buffers sized by it, depend on the tile: only on the first call on a GPU,
    when the pick compiles the candidates, are they also planned for the preferred one."""
    probed = {}

    def probe_args():  # the preferred candidate's arguments, for the spill check
        tile = launcher.candidates(**constexprs)[0].kwargs
        probed["plan"] = (tile, plan(tile))
        return probed["plan"][1][1]

    cfg = launcher.pick(probe_args, **constexprs)
    tile, planned = probed.get("plan", (None, None))
    grid, args, result = planned if tile == cfg.kwargs else plan(cfg.kwargs)
    launcher.fn[grid](*args, **constexprs, **cfg.all_kwargs())
    return result


def _split_launch(launcher: Launcher, t: torch.Tensor, bh: int, n: int, args,
                  part_len: int | None = None, **constexprs):
    """Split-N launch over ``n`` tokens of ``bh`` heads (grid (bh, n_split), see split_plan):
    ``args(part, tiles_per_split)`` gives the runtime arguments, ``part`` the (bh, n_split,
    part_len) fp32 partial buffer allocated here (None without ``part_len``); returns ``part``."""
    def plan(tile):
        n_split, per = split_plan(t, bh, n, tile["BLOCK_M"])
        part = None if part_len is None else t.new_empty((bh, n_split, part_len),
                                                         dtype=torch.float32)
        return (bh, n_split), args(part, per), part
    return _launch(launcher, plan, **constexprs)


def _s4(t):
    return tuple(t.stride())


def _mask_args(mask):
    """(pointer, stride_b, stride_n) of a (B, N) bool padding mask read as uint8, or dummies."""
    if mask is None:
        return None, 0, 0
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def _fold(part: torch.Tensor) -> torch.Tensor:
    """(R, n_split, M) fp32 partials -> (R, M), in split order. One split: the partial itself."""
    r, n_split, m = part.shape
    if n_split == 1:
        return part[:, 0]
    out = part.new_empty((r, m))
    return _launch(fold, lambda tile: ((r, cdiv(m, tile["BLOCK"])), (part, out, n_split, m), out))


def _gram(x, y, mask, feat: int, colsum: bool, sq: bool) -> torch.Tensor:
    """(B·h, n_split, M) fp32 partials of φ(x)ᵀy (+ Σφ(x) or Σx², Σy²) — see the kernel."""
    b, h, n, dx = x.shape
    dy = y.shape[-1]
    m = dx * dy + (dx if (colsum or sq) else 0) + (dy if sq else 0)
    mp, smb, smn = _mask_args(mask)
    return _split_launch(
        gram_partials, x, b * h, n, lambda part, per: (
            x, y, mp, part, *_s4(x), *_s4(y), smb, smn, h, n, dx, dy, m, per),
        part_len=m, FEAT=feat, HAS_MASK=mask is not None, COLSUM=colsum, SQ=sq,
        IEEE=x.dtype == torch.float32, BLOCK_D=block_d(dx), BLOCK_E=block_d(dy))


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.linear on validated inputs)
# --------------------------------------------------------------------------------------------


def la_forward(q, k, v, temp, mask, o, feature_map: str, scale: float, clamp: bool,
               eps: float) -> torch.Tensor:
    """Linear attention into o (B, h, N, e); returns the state (B·h, d·e + d) fp32 = (S | z)."""
    b, h, n, d = q.shape
    e = v.shape[-1]
    feat = FEATURES[feature_map]
    state = _fold(_gram(k, v, mask, feat, colsum=True, sq=False))
    _split_launch(
        la_apply, q, b * h, n, lambda _, per: (
            q, state, temp, o, *_s4(q), *_s4(o), h, n, d, e, state.shape[1], per, float(scale),
            float(eps)),
        FEAT=feat, CLAMP=clamp, HAS_TEMP=temp is not None, IEEE=q.dtype == torch.float32,
        BLOCK_D=block_d(d), BLOCK_E=block_d(e))
    return state


def la_backward(do, q, k, v, temp, mask, state, dq, dk, dv, feature_map: str, scale: float,
                clamp: bool, eps: float) -> torch.Tensor:
    """Gradients into dq, dk, dv; returns dt per (b, h) as (B·h,) fp32 (summed by the caller)."""
    b, h, n, d = q.shape
    nk, e = v.shape[2], v.shape[3]
    feat = FEATURES[feature_map]
    meta = dict(FEAT=feat, IEEE=q.dtype == torch.float32, BLOCK_D=block_d(d), BLOCK_E=block_d(e))
    mp_len = d * e + d + 1
    part = _split_launch(
        la_bwd_q, q, b * h, n, lambda part, per: (
            q, do, state, temp, dq, part, *_s4(q), *_s4(do), *_s4(dq), h, n, d, e,
            state.shape[1], mp_len, per, float(scale), float(eps)),
        part_len=mp_len, CLAMP=clamp, HAS_TEMP=temp is not None, **meta)
    grads = _fold(part)
    mp, smb, smn = _mask_args(mask)
    _split_launch(
        la_bwd_kv, k, b * h, nk, lambda _, per: (
            k, v, mp, grads, dk, dv, *_s4(k), *_s4(v), smb, smn, *_s4(dk), *_s4(dv), h, nk, d,
            e, mp_len, per),
        HAS_MASK=mask is not None, **meta)
    return grads[:, d * e + d]


def xca_forward(q, k, v, temp, o, eps: float):
    """XCA into o (B, h, N, d); returns (gn (B·h, d, d), norms (B·h, 2, d)) fp32 for backward."""
    b, h, n, d = q.shape
    bd = block_d(d)
    part = _gram(q, k, None, FEATURES["identity"], colsum=False, sq=True)
    gn = torch.empty((b * h, d, d), device=q.device, dtype=torch.float32)
    attn = torch.empty_like(gn)
    norms = torch.empty((b * h, 2, d), device=q.device, dtype=torch.float32)
    args = (part, temp, gn, norms, attn, part.shape[1], h, d, part.shape[2], float(eps))
    _launch(xca_softmax, lambda tile: ((b * h, bd // tile["BLOCK_I"]), args, None), BLOCK_D=bd)
    _split_launch(
        xca_apply, q, b * h, n, lambda _, per: (v, attn, o, *_s4(v), *_s4(o), h, n, d, per),
        IEEE=q.dtype == torch.float32, BLOCK_D=bd)
    return gn, norms


def xca_backward(do, q, k, v, temp, gn, norms, dq, dk, dv, eps: float) -> torch.Tensor:
    """Gradients into dq, dk, dv; returns dτ per (b, h) as (B·h,) fp32."""
    b, h, n, d = q.shape
    bd = block_d(d)
    part = _gram(do, v, None, FEATURES["identity"], colsum=False, sq=False)
    f32 = dict(device=q.device, dtype=torch.float32)
    dg, attn = torch.empty((b * h, d, d), **f32), torch.empty((b * h, d, d), **f32)
    cq = torch.empty((b * h, d), **f32)

    def small(tile):  # the row-block partials of ck and dτ: one per program
        n_rb = bd // tile["BLOCK_I"]
        ck_part, dt_part = torch.empty((b * h, n_rb, d), **f32), torch.empty((b * h, n_rb), **f32)
        return (b * h, n_rb), (part, gn, norms, temp, dg, cq, attn, ck_part, dt_part,
                               part.shape[1], h, d, part.shape[2], float(eps)), (ck_part, dt_part)

    ck_part, dt_part = _launch(xca_bwd_small, small, BLOCK_D=bd)
    # fold the row-block partials (a fixed-order sum of bd / BLOCK_I terms) and finish ck
    nk = norms[:, 1]
    rk = 1.0 / nk.clamp_min(eps)
    ck = torch.where(nk >= eps, -rk * rk * ck_part.sum(1), 0.0)
    dt = dt_part.sum(1)
    args = (q, k, do, dg, cq, ck, attn, dq, dk, dv, *_s4(q), *_s4(k), *_s4(do), *_s4(dq),
            *_s4(dk), *_s4(dv), h, n, d)
    for dv_pass in (False, True):
        _split_launch(xca_bwd_apply, q, b * h, n, lambda _, per: (*args, per), DV_PASS=dv_pass,
                      IEEE=q.dtype == torch.float32, BLOCK_D=bd)
    return dt


# --------------------------------------------------------------------------------------------
# SOFT host entry points (called by vitkern.ops.linear on validated inputs)
# --------------------------------------------------------------------------------------------


def _soft_meta(q, landmarks, v):
    m, d, e = landmarks.shape[2], q.shape[3], v.shape[3]
    bl, bd, be = block_d(m), block_d(d), block_d(e)
    return m, d, e, dict(IEEE=q.dtype == torch.float32, BLOCK_L=bl, BLOCK_D=bd, BLOCK_E=be)


def _soft_reduce(q, landmarks, y) -> torch.Tensor:
    """K1ᵀy (B·h, m, e) fp32, a deterministic split-N reduction."""
    b, h, n, _ = q.shape
    m, d, e, meta = _soft_meta(q, landmarks, y)
    part = _split_launch(
        soft_reduce, q, b * h, n, lambda part, per: (
            q, landmarks, y, part, *_s4(q), *_s4(landmarks), *_s4(y), h, n, m, d, e, per),
        part_len=m * e, **meta)
    return _fold(part).view(b * h, m, e)


def _soft_apply(q, landmarks, w, out) -> None:
    """out = K1·w for the tokens of q; w (B·h, m, e) fp32."""
    b, h, n, _ = q.shape
    m, d, e, meta = _soft_meta(q, landmarks, out)
    _split_launch(
        soft_apply, q, b * h, n, lambda _, per: (
            q, landmarks, w, out, *_s4(q), *_s4(landmarks), *_s4(out), h, n, m, d, e, per),
        **meta)


def soft_forward(q, landmarks, v, ainv, o) -> torch.Tensor:
    """SOFT attention into o (B, h, N, e); returns the state (B·h, 2, m, e) fp32 =
    (W = K1ᵀV, W2 = Ainv·W). The m×m times m×e product is a tiny batched torch matmul."""
    b, h, _, _ = q.shape
    m = landmarks.shape[2]
    w = _soft_reduce(q, landmarks, v)
    w2 = torch.bmm(ainv.reshape(b * h, m, m).float(), w)
    _soft_apply(q, landmarks, w2, o)
    return torch.stack((w, w2), 1)


def soft_backward(do, q, landmarks, v, ainv, state, dq, dv):
    """dq, dv into the given tensors; returns (dlandmarks fp32 (B, h, m, d), dainv fp32
    (B, h, m, m)). The m×m / m×e products between the two token passes run in torch."""
    b, h, n, _ = q.shape
    m, d, e, meta = _soft_meta(q, landmarks, v)
    w, w2 = state[:, 0], state[:, 1]
    a = ainv.reshape(b * h, m, m).float()
    dw2 = _soft_reduce(q, landmarks, do)                       # K1ᵀ dO
    dainv = torch.bmm(dw2, w.transpose(1, 2))                  # dW2 Wᵀ
    dw = torch.bmm(a.transpose(1, 2), dw2).contiguous()        # Ainvᵀ dW2
    w2 = w2.contiguous()
    # 16-bit: one pass for dq and the landmark partials; fp32: a dq pass and a partials pass
    for kname in ("soft_bwd",) if not meta["IEEE"] else ("soft_bwd_q", "soft_bwd_l"):
        flags = SOFT_BWD_PASSES[kname]
        p = _split_launch(
            soft_bwd, q, b * h, n, lambda p, per: (
                q, landmarks, v, do, w2, dw, dq, dq if p is None else p, *_s4(q),
                *_s4(landmarks), *_s4(v), *_s4(do), *_s4(dq), h, n, m, d, e, per),
            part_len=m * d + m if flags["DO_L"] else None, **meta, **flags)
        if flags["DO_L"]:
            part = p
    _soft_apply(q, landmarks, dw, dv)                          # dv = K1·dW
    g = _fold(part)
    dsq, dsum = g[:, : m * d].view(b * h, m, d), g[:, m * d:]
    lf = landmarks.reshape(b * h, m, d).float()
    dl = 2.0 * lf * dsum[:, :, None] - 2.0 * dsq
    return dl.view(b, h, m, d), dainv.view(b, h, m, m)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specialisations (tests/test_aot_compile.py: one candidate of each fits)
# --------------------------------------------------------------------------------------------

_FP32_PTRS = ("P", "ST", "TEMP", "G", "GN", "NORMS", "A", "DG", "CQ", "CK", "CKP", "DTP",
              "OUT", "W2", "DW")


def _aot_signature(fn, ptr_dtype: str) -> tuple[dict, dict]:
    """Runtime-arg types of a launch on q, k, v viewed out of a packed projection (see
    :func:`.aot.launch_signature`); state / partial pointers fp32, the padding mask uint8, the
    mask's strides plain ints."""
    pointers = {n: f"*{ptr_dtype}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "X", "Y", "L")}
    pointers.update({n: "*fp32" for n in _FP32_PTRS}, MASK="*u8")
    from .aot import launch_signature

    return launch_signature(fn, pointers, plain=("smb", "smn"))


def aot_specs():
    """A handful of specialisations (the compile test runs each for two archs), each with its
    tile candidates: every token-streaming kernel in fp16 at BLOCK_D 64 (XCiT-S / L2ViT head dims
    48 / 32 -> 64 / 32 classes) with its most general specialisation (elu+1, mask, clamp,
    temperature), the two fp32 tf32x3 kernels with the largest register footprint at BLOCK_D 32,
    SOFT's kernels at their largest declared blocks (fp16: L = D = E = 64; fp32: d = 32), the
    per-head d×d kernels at BLOCK_D 128 (row blocks) and
    the fold."""
    from .aot import spec_from_launcher

    launchers = {"gram": gram_partials, "la_apply": la_apply, "la_bwd_q": la_bwd_q,
                 "la_bwd_kv": la_bwd_kv, "xca_apply": xca_apply, "xca_bwd_qk": xca_bwd_apply,
                 "xca_bwd_v": xca_bwd_apply, "soft_reduce": soft_reduce,
                 "soft_apply": soft_apply, "soft_bwd": soft_bwd, "soft_bwd_q": soft_bwd,
                 "soft_bwd_l": soft_bwd,
                 "xca_softmax": xca_softmax, "xca_bwd_small": xca_bwd_small, "fold": fold}
    flags = {"gram": dict(FEAT=2, HAS_MASK=True, COLSUM=True, SQ=False),
             "la_apply": dict(FEAT=2, CLAMP=False, HAS_TEMP=True),
             "la_bwd_q": dict(FEAT=2, CLAMP=True, HAS_TEMP=True),
             "la_bwd_kv": dict(FEAT=2, HAS_MASK=True),
             "xca_bwd_qk": dict(DV_PASS=False), "xca_bwd_v": dict(DV_PASS=True), **SOFT_BWD_PASSES}
    selection = [(k, "fp16", dict(BLOCK_D=64)) for k in TILES]
    selection += [("gram", "fp32", dict(BLOCK_D=32)), ("la_bwd_q", "fp32", dict(BLOCK_D=32))]
    soft = dict(BLOCK_L=64, BLOCK_D=64, BLOCK_E=64)
    selection += [(k, "fp16", soft) for k in ("soft_reduce", "soft_apply", "soft_bwd")]
    soft32 = dict(soft, BLOCK_D=SOFT_FP32_MAX_HEAD_DIM)
    selection += [(k, "fp32", soft32) for k in ("soft_reduce", "soft_apply", "soft_bwd_q",
                                                "soft_bwd_l")]
    selection += [(k, "fp32", dict(BLOCK_D=128)) for k in ("xca_softmax", "xca_bwd_small")]
    specs = []
    for kname, dtype, sizes in selection:
        launcher = launchers[kname]
        meta = {**flags.get(kname, {}), **sizes}
        if "IEEE" in launcher.fn.arg_names:
            meta["IEEE"] = dtype == "fp32"
        if "BLOCK_E" in launcher.fn.arg_names and "BLOCK_L" not in sizes:
            meta["BLOCK_E"] = sizes["BLOCK_D"]
        shape = (f"L={sizes['BLOCK_L']},D={sizes['BLOCK_D']},E={sizes['BLOCK_E']}"
                 if "BLOCK_L" in sizes else f"D={sizes['BLOCK_D']}")
        sig, const = _aot_signature(launcher.fn, dtype)
        specs.append(spec_from_launcher(f"linear.{kname}[{dtype},{shape}]", launcher, sig, const,
                                        meta))
    sig, const = _aot_signature(fold.fn, "fp32")
    specs.append(spec_from_launcher("linear.fold", fold, sig, const, {}))
    return specs
