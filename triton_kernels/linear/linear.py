"""Non-causal kernelized linear attention (feature maps identity, ReLU, elu+1; L2ViT,
fast-transformers).

* forward: ``gram_partials`` (common.py) → (φ(K)ᵀV | Σφ(K)) partials → fold → ``la_apply``:
  ``o = c·φ(q)S / D``, c = t_h·scale, ``D = φ(q)·z + eps`` or ``max(φ(q)·z, eps)``;
* backward: ``la_bwd_q`` writes dq and partials of (dS = Σ φ(q)ᵀg | dz = Σ r·φ(q) | dt) with
  num = φ(q)S recomputed, ``g = c·dO/D``, ``r = -c·(dO·num)/D²`` (zero where the clamp is
  active), ``dφ(q) = gSᵀ + r·z``; fold; ``la_bwd_kv``: ``dφ(k) = V dSᵀ + dz``,
  ``dv = φ(k) dS``. φ' is taken from φ (ReLU: f > 0; elu+1: min(f, 1)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention_core import bh_offset, block_d, load_rows, mma, store_rows
from ..tuning import launch_key
from .common import (FEATURES, aot_spec, declared_reason, dots, dphi, fold_partials, gram, head,
                     head_args, kept, lanes, load_state, mask_strides, mask_tensor, partial_slot,
                     phi_tile, split_launch, store_mat, stride_args, tile_launcher, tile_rows,
                     token_chunk, token_tiles)

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _query_side(Q, ST, TEMP, sqb, sqh, n_heads, M, D, E, scale, HAS_TEMP: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """What a query-side kernel holds across its token loop: (pid_bh, Q at this head, channel
    offsets and masks of q (D) and v (E), the state S [D, E] and z [D], c = t_h·scale)."""
    pid_bh, _, h = head(n_heads)
    offs_d, dmask = lanes(BLOCK_D, D)
    offs_e, emask = lanes(BLOCK_E, E)
    S, z = load_state(ST + pid_bh * M, offs_d, offs_e, D, E)
    c = scale
    if HAS_TEMP:
        c = c * tl.load(TEMP + h).to(tl.float32)
    return pid_bh, Q + bh_offset(pid_bh, n_heads, sqb, sqh), offs_d, dmask, offs_e, emask, S, z, c


@triton.jit
def _la_tile(Q, rows, valid, offs_d, dmask, sq, S, z, eps,
             FEAT: tl.constexpr, CLAMP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query tile: (φ(q), num = φ(q)S, 1/D, clamp active) with den = φ(q)·z."""
    q = load_rows(Q, rows, offs_d, valid, dmask, sq).to(tl.float32)
    fq = phi_tile(q, valid, dmask, FEAT)  # pad rows / channels: φ = 0 (elu+1 would give 1)
    num = mma(fq, S, DOT_PRECISION)
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
    FEAT: tl.constexpr, CLAMP: tl.constexpr, HAS_TEMP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """o = t_h·scale·φ(q)S / D for this split's tokens; ST[bh] = (S [D, E] | z [D]) fp32."""
    pid_bh, Q, offs_d, dmask, offs_e, emask, S, z, c = _query_side(
        Q, ST, TEMP, sqb, sqh, n_heads, M, D, E, scale, HAS_TEMP, BLOCK_D, BLOCK_E)
    O += bh_offset(pid_bh, n_heads, sob, soh)
    t0, t1 = token_chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows, valid = tile_rows(t, N, BLOCK_M)
        fq, num, inv, active = _la_tile(Q, rows, valid, offs_d, dmask, (sqn, sqd), S, z, eps,
                                        FEAT, CLAMP, DOT_PRECISION)
        store_rows(O, rows, offs_e, valid, emask, (son, sod), num * (c * inv)[:, None])


@triton.jit
def la_bwd_q_kernel(
    Q, DO, ST, TEMP, DQ, P,
    sqb, sqh, sqn, sqd, sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    n_heads, N, D, E, M, MP, tiles_per_split, scale, eps,
    FEAT: tl.constexpr, CLAMP: tl.constexpr, HAS_TEMP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dq for this split's tokens, and the partials (dS [D, E] | dz [D] | dt) into P[bh, split].

    With num = φ(q)S, D the denominator, c = t·scale, w = dO·num / D:
    g = c·dO/D (∂num), r = -c·w/D (∂den, 0 where the clamp is active), dφ(q) = gSᵀ + r·z,
    dS = Σ φ(q)ᵀg, dz = Σ r·φ(q), dt = scale·Σ w.
    """
    pid_bh, Q, offs_d, dmask, offs_e, emask, S, z, c = _query_side(
        Q, ST, TEMP, sqb, sqh, n_heads, M, D, E, scale, HAS_TEMP, BLOCK_D, BLOCK_E)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    DQ += bh_offset(pid_bh, n_heads, sdqb, sdqh)
    dS = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    dz = tl.zeros([BLOCK_D], tl.float32)
    dt = tl.zeros([BLOCK_M], tl.float32)
    t0, t1 = token_chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows, valid = tile_rows(t, N, BLOCK_M)
        fq, num, inv, active = _la_tile(Q, rows, valid, offs_d, dmask, (sqn, sqd), S, z, eps,
                                        FEAT, CLAMP, DOT_PRECISION)
        do = load_rows(DO, rows, offs_e, valid, emask, (sdon, sdod)).to(tl.float32)
        w = tl.sum(do * num, 1) * inv
        g = do * (c * inv)[:, None]
        r = tl.where(active, -c * w * inv, 0.0)
        dfq = mma(g, tl.trans(S), DOT_PRECISION) + r[:, None] * z[None, :]
        store_rows(DQ, rows, offs_d, valid, dmask, (sdqn, sdqd), dfq * dphi(fq, FEAT))
        dS += mma(tl.trans(fq), g, DOT_PRECISION)
        dz += tl.sum(r[:, None] * fq, 0)
        dt += w
    P = partial_slot(P, pid_bh, MP)
    store_mat(P, offs_d, offs_e, D, E, dS)
    tl.store(P + D * E + offs_d, dz, mask=dmask)
    tl.store(P + D * E + D, tl.sum(dt, 0) * scale)


@triton.jit
def la_bwd_kv_kernel(
    K, V, MASK, G, DK, DV,
    skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    n_heads, N, D, E, MP, tiles_per_split,
    FEAT: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dk = (V dSᵀ + dz)·φ'(k), dv = φ(k) dS for this split's keys (0 for padding keys);
    G[bh] = (dS [D, E] | dz [D] | dt) fp32."""
    pid_bh, b, _ = head(n_heads)
    K += bh_offset(pid_bh, n_heads, skb, skh)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    DK += bh_offset(pid_bh, n_heads, sdkb, sdkh)
    DV += bh_offset(pid_bh, n_heads, sdvb, sdvh)
    offs_d, dmask = lanes(BLOCK_D, D)
    offs_e, emask = lanes(BLOCK_E, E)
    dS, dz = load_state(G + pid_bh * MP, offs_d, offs_e, D, E)
    t0, t1 = token_chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows, valid = tile_rows(t, N, BLOCK_M)
        keep = kept(MASK, b, rows, valid, smb, smn, HAS_MASK)
        k = load_rows(K, rows, offs_d, keep, dmask, (skn, skd)).to(tl.float32)
        v = load_rows(V, rows, offs_e, keep, emask, (svn, svd)).to(tl.float32)
        fk = phi_tile(k, keep, dmask, FEAT)
        dfk = mma(v, tl.trans(dS), DOT_PRECISION) + dz[None, :]
        dk = tl.where(keep[:, None] & dmask[None, :], dfk * dphi(fk, FEAT), 0.0)
        store_rows(DK, rows, offs_d, valid, dmask, (sdkn, sdkd), dk)
        store_rows(DV, rows, offs_e, valid, emask, (sdvn, sdvd), mma(fk, dS, DOT_PRECISION))


# --------------------------------------------------------------------------------------------
# tile candidates (pure tuning, see common.TILES) and the declared capability
# --------------------------------------------------------------------------------------------

TILES = {
    "la_apply": {(16, False): (128, 4, 2), (32, False): (128, 4, 2), (64, False): (64, 4, 2),
                 (128, False): (64, 8, 2),
                 (16, True): (128, 4, 2), (32, True): (128, 4, 2), (64, True): (64, 8, 2),
                 (128, True): (16, 8, 1)},
    "la_bwd_q": {(16, False): (128, 4, 2), (32, False): (64, 4, 2), (64, False): (64, 8, 2),
                 (16, True): (64, 4, 2), (32, True): (32, 4, 2)},
    "la_bwd_kv": {(16, False): (128, 4, 2), (32, False): (128, 4, 2), (64, False): (64, 4, 2),
                  (128, False): (32, 8, 2),
                  (16, True): (128, 4, 2), (32, True): (64, 4, 2), (64, True): (32, 8, 2)},
}

# Declared capability: the largest max(d, e) per pass and fp32?; the backward of a call with
# gradients needs both passes. Within it every kernel the pass launches has a candidate that fits
# in registers (tests/test_aot_compile.py proves it for the declared specialisations with the
# installed compiler); beyond it the fp32 tf32x3 dots and the fp32 d×e states held across the
# token loop run out of registers.
MAX_HEAD_DIM = {("forward", False): 128, ("forward", True): 64,
                ("backward", False): 64, ("backward", True): 32}


def unsupported(head_dim: int, fp32: bool, v_dim: int | None = None, backward: bool = True):
    """Why the triton backend refuses these head dims (None when they are within the declared
    capability). With ``backward=False`` only the forward's capability applies (inference
    without gradients)."""
    return declared_reason("linear attention", max(head_dim, v_dim or 0), fp32, MAX_HEAD_DIM,
                           backward)


la_apply = tile_launcher(la_apply_kernel, token_tiles(TILES, "la_apply"))
la_bwd_q = tile_launcher(la_bwd_q_kernel, token_tiles(TILES, "la_bwd_q"))
la_bwd_kv = tile_launcher(la_bwd_kv_kernel, token_tiles(TILES, "la_bwd_kv"))


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.linear on validated inputs)
# --------------------------------------------------------------------------------------------


def _meta(q, v, feature_map: str) -> dict:
    return dict(FEAT=FEATURES[feature_map], DOT_PRECISION=dots(q), BLOCK_D=block_d(q.shape[3]),
                BLOCK_E=block_d(v.shape[3]))


def la_forward(q, k, v, temp, mask, o, feature_map: str, scale: float, clamp: bool,
               eps: float) -> torch.Tensor:
    """Linear attention into o (B, h, N, e); returns the state (B·h, d·e + d) fp32 = (S | z)."""
    meta = _meta(q, v, feature_map)
    state = fold_partials(gram(k, v, mask, meta["FEAT"], colsum=True, sq=False))
    split_launch(
        la_apply, q, launch_key(q, v, o, temp, state, feature_map, scale, clamp, eps),
        dict(Q=q, O=o, ST=state, TEMP=temp),
        lambda: (dict(stride_args(q=q, o=o), **head_args(q), D=q.shape[3], E=v.shape[3],
                      M=state.shape[1], scale=float(scale), eps=float(eps)),
                 dict(CLAMP=clamp, HAS_TEMP=temp is not None, **meta)))
    return state


def la_backward(do, q, k, v, temp, mask, state, dq, dk, dv, feature_map: str, scale: float,
                clamp: bool, eps: float) -> torch.Tensor:
    """Gradients into dq, dk, dv; returns dt per (b, h) as (B·h,) fp32 (summed by the caller)."""
    d, e = q.shape[3], v.shape[3]
    meta = _meta(q, v, feature_map)
    mp_len = d * e + d + 1
    part = split_launch(
        la_bwd_q, q, launch_key(q, v, do, dq, temp, state, feature_map, scale, clamp, eps),
        dict(Q=q, DO=do, DQ=dq, ST=state, TEMP=temp),
        lambda: (dict(stride_args(q=q, do=do, dq=dq), **head_args(q), D=d, E=e,
                      M=state.shape[1], MP=mp_len, scale=float(scale), eps=float(eps)),
                 dict(CLAMP=clamp, HAS_TEMP=temp is not None, **meta)),
        part_len=mp_len)
    grads = fold_partials(part)
    split_launch(
        la_bwd_kv, k, launch_key(q, k, v, dk, dv, mask, grads, feature_map),
        dict(K=k, V=v, DK=dk, DV=dv, MASK=mask_tensor(mask), G=grads),
        lambda: (dict(stride_args(k=k, v=v, dk=dk, dv=dv), **mask_strides(mask),
                      **head_args(k), D=d, E=e, MP=mp_len),
                 dict(HAS_MASK=mask is not None, **meta)))
    return grads[:, d * e + d]


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specialisations (tests/test_aot_compile.py: one candidate of each fits)
# --------------------------------------------------------------------------------------------


def aot_specs():
    """Every kernel in fp16 at BLOCK_D 64 (L2ViT head dim 32 / XCiT 48 -> class 64) with its
    most general specialisation (elu+1, mask, clamp, temperature), and the fp32 tf32x3 kernel
    with the largest register footprint at BLOCK_D 32."""
    flags = {"la_apply": dict(FEAT=2, CLAMP=False, HAS_TEMP=True),
             "la_bwd_q": dict(FEAT=2, CLAMP=True, HAS_TEMP=True),
             "la_bwd_kv": dict(FEAT=2, HAS_MASK=True)}
    launchers = {"la_apply": la_apply, "la_bwd_q": la_bwd_q, "la_bwd_kv": la_bwd_kv}
    specs = [aot_spec(k, launchers[k], "fp16", dict(BLOCK_D=64), flags[k]) for k in TILES]
    specs.append(aot_spec("la_bwd_q", la_bwd_q, "fp32", dict(BLOCK_D=32), flags["la_bwd_q"]))
    return specs
