"""SOFT (softmax-free attention, fudan-zvg/SOFT): out = K1·(Ainv·(K1ᵀV)) with the Gaussian
kernel ``K1 = exp(-½(‖q‖² + ‖l‖² − 2q·l))`` of the queries and m landmarks, recomputed per token
tile from q and the landmarks held in registers, never written.

q (B, h, N, d) pre-scaled, landmarks l (B, h, m, d), v (B, h, N, e), Ainv (B, h, m, m) (the
Newton–Schulz inverse, computed by the op):

* forward: ``soft_reduce`` → W = K1ᵀV partials → fold; W2 = Ainv·W (torch bmm, m×m by m×e) →
  ``soft_apply``: o = K1·W2. Saved: (W, W2) fp32;
* backward: ``soft_reduce`` on dO → dW2 = K1ᵀdO; dAinv = dW2·Wᵀ, dW = Ainvᵀ·dW2 (torch bmm) →
  ``soft_bwd``: dq and the partials of (dSᵀq | Σ dS), dS = −½·(dO·W2ᵀ + V·dWᵀ)·K1 → fold,
  dl = 2l·ΣdS − 2dSᵀq (torch) → ``soft_apply`` with dW: dv = K1·dW.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention_core import bh_offset, block_d, load_rows, mma, store_rows
from ..tuning import capability_reason, launch_key
from .common import (FORWARD_RUNS, aot_spec, dots, fold_partials, head, head_args, lanes,
                     load_mat, partial_slot, split_launch, store_mat, stride_args, tile_launcher,
                     tile_rows, token_chunk, token_tiles)

# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _landmark_side(Q, L, sqb, sqh, slb, slh, sln, sld, n_heads, m, D,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """What every SOFT kernel holds across its token loop: (pid_bh, Q at this head, landmark
    offsets, q channel offsets and mask, landmarks transposed [BLOCK_D, BLOCK_L] (input dtype;
    zeros outside), ‖l‖² (fp32))."""
    pid_bh, _, _ = head(n_heads)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d, dmask = lanes(BLOCK_D, D)
    L += bh_offset(pid_bh, n_heads, slb, slh)
    lt = tl.load(L + offs_l[None, :] * sln + offs_d[:, None] * sld,
                 mask=dmask[:, None] & (offs_l < m)[None, :], other=0.0)
    ltf = lt.to(tl.float32)
    return (pid_bh, Q + bh_offset(pid_bh, n_heads, sqb, sqh), offs_l, offs_d, dmask, lt,
            tl.sum(ltf * ltf, 0))


@triton.jit
def _sdot(a, b, DOT_PRECISION: tl.constexpr, FMA: tl.constexpr):
    """mma, or (FMA) an exact fp32 dot on the FMA units: no tf32x3 hi/lo operand copies, which
    is what keeps the fp32 landmark-gradient pass from spilling."""
    if FMA:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return mma(a, b, DOT_PRECISION)


@triton.jit
def _soft_k1(Q, rows, valid, offs_d, dmask, sq, lt, ll, lvalid, DOT_PRECISION: tl.constexpr,
             FMA: tl.constexpr):
    """(q tile fp32, K1 tile [BLOCK_M, BLOCK_L] fp32). The squared distance is the expansion
    ‖q‖² + ‖l‖² − 2q·l of the reference (q·l a tensor-core dot, fp32 accumulation), not
    clamped; pad rows and pad landmarks get K1 = 0 (exp(0) would be 1)."""
    q = load_rows(Q, rows, offs_d, valid, dmask, sq)
    qf = q.to(tl.float32)
    dist = tl.sum(qf * qf, 1)[:, None] + ll[None, :] - 2.0 * _sdot(q, lt, DOT_PRECISION, FMA)
    k1 = tl.where(valid[:, None] & lvalid[None, :], tl.exp(-0.5 * dist), 0.0)
    return qf, k1


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def soft_reduce_kernel(
    Q, L, Y, P,
    sqb, sqh, sqn, sqd, slb, slh, sln, sld, syb, syh, syn, syd,
    n_heads, N, m, D, E, tiles_per_split,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Partial (this split's tokens) of K1ᵀY [m, E] into P[bh, split, 0:m·E] (fp32).
    Y = v in the forward (W = K1ᵀV), dO in the backward (dW2 = K1ᵀdO)."""
    pid_bh, Q, offs_l, offs_d, dmask, lt, ll = _landmark_side(
        Q, L, sqb, sqh, slb, slh, sln, sld, n_heads, m, D, BLOCK_L, BLOCK_D)
    Y += bh_offset(pid_bh, n_heads, syb, syh)
    offs_e, emask = lanes(BLOCK_E, E)
    acc = tl.zeros([BLOCK_L, BLOCK_E], tl.float32)
    t0, t1 = token_chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows, valid = tile_rows(t, N, BLOCK_M)
        qf, k1 = _soft_k1(Q, rows, valid, offs_d, dmask, (sqn, sqd), lt, ll, offs_l < m,
                          DOT_PRECISION, False)
        y = load_rows(Y, rows, offs_e, valid, emask, (syn, syd))
        # K1 in [0, ~1]: cast to the token dtype like a softmax P tile
        acc += mma(tl.trans(k1.to(y.dtype)), y, DOT_PRECISION)
    store_mat(partial_slot(P, pid_bh, m * E), offs_l, offs_e, m, E, acc)


@triton.jit
def soft_apply_kernel(
    Q, L, W2, O,
    sqb, sqh, sqn, sqd, slb, slh, sln, sld, sob, soh, son, sod,
    n_heads, N, m, D, E, tiles_per_split,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """o = K1·W2 for this split's tokens; W2[bh] = Ainv·K1ᵀV [m, E] fp32 (kept fp32: a tf32
    dot for 16-bit inputs, Ainv's entries can be large)."""
    pid_bh, Q, offs_l, offs_d, dmask, lt, ll = _landmark_side(
        Q, L, sqb, sqh, slb, slh, sln, sld, n_heads, m, D, BLOCK_L, BLOCK_D)
    O += bh_offset(pid_bh, n_heads, sob, soh)
    offs_e, emask = lanes(BLOCK_E, E)
    w2 = load_mat(W2 + pid_bh * m * E, offs_l, offs_e, m, E)
    t0, t1 = token_chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows, valid = tile_rows(t, N, BLOCK_M)
        qf, k1 = _soft_k1(Q, rows, valid, offs_d, dmask, (sqn, sqd), lt, ll, offs_l < m,
                          DOT_PRECISION, False)
        store_rows(O, rows, offs_e, valid, emask, (son, sod), mma(k1, w2, DOT_PRECISION))


@triton.jit
def soft_bwd_kernel(
    Q, L, V, DO, W2, DW, DQ, P,
    sqb, sqh, sqn, sqd, slb, slh, sln, sld, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd,
    n_heads, N, m, D, E, tiles_per_split,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, DO_Q: tl.constexpr, DO_L: tl.constexpr,
    FMA: tl.constexpr,
):
    """dq (DO_Q) for this split's tokens and the landmark partials (dSᵀq [m, D] | Σ_n dS [m])
    (DO_L).

    With W2 = Ainv·W, dW = Ainvᵀ·dW2 (host, m×E each): dK1 = dO·W2ᵀ + V·dWᵀ,
    dS = −½·dK1·K1 (∂ of the squared distance), dq = 2q·Σ_j dS − 2·dS·L; the host finishes
    dl = 2l·Σ_n dS − 2·dSᵀq. dv = K1·dW is ``soft_apply_kernel`` with dW for W2 (a separate
    pass: holding dW in a second register layout here spills). fp32 (tf32x3 dots hold split
    operands) runs this twice, DO_Q then DO_L, for the same reason.
    """
    pid_bh, Q, offs_l, offs_d, dmask, lt, ll = _landmark_side(
        Q, L, sqb, sqh, slb, slh, sln, sld, n_heads, m, D, BLOCK_L, BLOCK_D)
    V += bh_offset(pid_bh, n_heads, svb, svh)
    DO += bh_offset(pid_bh, n_heads, sdob, sdoh)
    DQ += bh_offset(pid_bh, n_heads, sdqb, sdqh)
    offs_e, emask = lanes(BLOCK_E, E)
    w2 = load_mat(W2 + pid_bh * m * E, offs_l, offs_e, m, E)
    dw = load_mat(DW + pid_bh * m * E, offs_l, offs_e, m, E)
    acc_l = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    acc_s = tl.zeros([BLOCK_L], tl.float32)
    t0, t1 = token_chunk(N, tiles_per_split, BLOCK_M)
    for t in range(t0, t1):
        rows, valid = tile_rows(t, N, BLOCK_M)
        qf, k1 = _soft_k1(Q, rows, valid, offs_d, dmask, (sqn, sqd), lt, ll, offs_l < m,
                          DOT_PRECISION, FMA)
        do = load_rows(DO, rows, offs_e, valid, emask, (sdon, sdod)).to(tl.float32)
        v = load_rows(V, rows, offs_e, valid, emask, (svn, svd)).to(tl.float32)
        dk1 = (_sdot(do, tl.trans(w2), DOT_PRECISION, FMA)
               + _sdot(v, tl.trans(dw), DOT_PRECISION, FMA))
        ds = -0.5 * dk1 * k1  # 0 at pad rows / landmarks (k1 = 0 there)
        # dS·L and dSᵀq in the token dtype (FlashAttention's dS·K convention): a 16-bit copy
        # of L held across the loop instead of an fp32 one keeps the tile spill-free
        ds_lp = ds.to(lt.dtype)
        if DO_Q:
            dq = 2.0 * qf * tl.sum(ds, 1)[:, None] - 2.0 * mma(ds_lp, tl.trans(lt), DOT_PRECISION)
            store_rows(DQ, rows, offs_d, valid, dmask, (sdqn, sdqd), dq)
        if DO_L:
            acc_l += _sdot(tl.trans(ds_lp), qf.to(lt.dtype), DOT_PRECISION, FMA)
            acc_s += tl.sum(ds, 0)
    if DO_L:
        P = partial_slot(P, pid_bh, m * D + m)
        store_mat(P, offs_l, offs_d, m, D, acc_l)
        tl.store(P + m * D + offs_l, acc_s, mask=offs_l < m)


# --------------------------------------------------------------------------------------------
# tile candidates (pure tuning) and the declared capability
# --------------------------------------------------------------------------------------------

# Preferred tiles as common.TILES, per kernel and (max(32, BLOCK_L, BLOCK_D, BLOCK_E), fp32?),
# swept with BLOCK_L = BLOCK_D = BLOCK_E = the key (the largest tiles of the class). SOFT's
# shapes (m = 49, d = 32) are class 64. The backward is one pass in 16-bit ("soft_bwd"); in fp32
# the tf32x3 operand copies spill it at every tile size, so fp32 runs a dq pass ("soft_bwd_q")
# and a landmark-gradient pass ("soft_bwd_l") whose dots are exact fp32 FMA dots (tf32x3 spills
# there too).
TILES = {
    "soft_reduce": {(32, False): (128, 4, 2), (64, False): (64, 4, 2),
                    (32, True): (64, 8, 2), (64, True): (32, 4, 1)},
    "soft_apply": {(32, False): (128, 4, 2), (64, False): (128, 4, 2),
                   (32, True): (64, 4, 2), (64, True): (32, 4, 2)},
    "soft_bwd": {(32, False): (128, 4, 2), (64, False): (32, 8, 2)},
    "soft_bwd_q": {(32, True): (64, 4, 2), (64, True): (32, 8, 2)},
    "soft_bwd_l": {(32, True): (32, 8, 2), (64, True): (16, 4, 1)},  # FMA dots
}
#: soft_bwd_kernel's passes: table name -> its flags.
BWD_PASSES = {"soft_bwd": dict(DO_Q=True, DO_L=True, FMA=False),
              "soft_bwd_q": dict(DO_Q=True, DO_L=False, FMA=False),
              "soft_bwd_l": dict(DO_Q=False, DO_L=True, FMA=True)}

#: The largest landmark count and head dims (each), per pass and fp32?; in fp32 the query /
#: landmark head dim stops at FP32_MAX_HEAD_DIM: with more than 32 landmarks and d above 32
#: (BLOCK_L = BLOCK_D = 64) no soft_reduce tile fits sm_80 with triton 3.8. SOFT's own shapes
#: (m = 49, d = 32) are within both.
MAX_SIZE = {("forward", False): 64, ("forward", True): 64,
            ("backward", False): 64, ("backward", True): 64}
FP32_MAX_HEAD_DIM = 32


def unsupported(m: int, head_dim: int, v_dim: int, fp32: bool, backward: bool = True):
    """Why the SOFT kernels refuse these sizes (None when they are within the declared
    capability)."""
    dtype = "float32" if fp32 else "16-bit"
    if fp32 and (why := capability_reason("SOFT", head_dim, fp32, FP32_MAX_HEAD_DIM)):
        return why
    for pass_, hint in (("forward", ""), ("backward", FORWARD_RUNS))[:1 + backward]:
        cap = MAX_SIZE[pass_, fp32]
        if max(m, head_dim, v_dim) > cap:
            what = "SOFT" if pass_ == "forward" else "SOFT backward"
            return (f"{dtype} landmarks {m}, head_dim {head_dim}, v head_dim {v_dim} are outside "
                    f"the declared capability of triton {what} (up to {cap} each: larger tiles "
                    f"spill registers){hint}")
    return None


def _bwd_pass(**flags) -> str:
    return next(name for name, f in BWD_PASSES.items() if f == flags)


soft_reduce = tile_launcher(soft_reduce_kernel, token_tiles(TILES, "soft_reduce", 32))
soft_apply = tile_launcher(soft_apply_kernel, token_tiles(TILES, "soft_apply", 32))
soft_bwd = tile_launcher(soft_bwd_kernel, token_tiles(TILES, _bwd_pass, 32))


# --------------------------------------------------------------------------------------------
# host entry points (called by vitkern.ops.linear on validated inputs)
# --------------------------------------------------------------------------------------------


def _setup(q, landmarks, e: int, **tensors):
    """``setup`` of a SOFT launch (see :func:`.common.split_launch`) on q, the landmarks and
    the (B, h, N, e) ``tensors`` given by name: (runtime arguments but tensors, constexprs)."""
    m, d = landmarks.shape[2], q.shape[3]
    return lambda **flags: (
        dict(stride_args(q=q, l=landmarks, **tensors), **head_args(q), m=m, D=d, E=e),
        dict(DOT_PRECISION=dots(q), BLOCK_L=block_d(m), BLOCK_D=block_d(d),
             BLOCK_E=block_d(e), **flags))


def _soft_reduce(q, landmarks, y) -> torch.Tensor:
    """K1ᵀy (B·h, m, e) fp32, a deterministic split-N reduction."""
    m, e = landmarks.shape[2], y.shape[3]
    part = split_launch(soft_reduce, q, launch_key(q, landmarks, y), dict(Q=q, L=landmarks, Y=y),
                        _setup(q, landmarks, e, y=y), part_len=m * e)
    return fold_partials(part).view(q.shape[0] * q.shape[1], m, e)


def _soft_apply(q, landmarks, w, out) -> None:
    """out = K1·w for the tokens of q; w (B·h, m, e) fp32."""
    split_launch(soft_apply, q, launch_key(q, landmarks, w, out),
                 dict(Q=q, L=landmarks, O=out, W2=w), _setup(q, landmarks, out.shape[3], o=out))


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
    b, h, _, d = q.shape
    m = landmarks.shape[2]
    w, w2 = state[:, 0], state[:, 1]
    a = ainv.reshape(b * h, m, m).float()
    dw2 = _soft_reduce(q, landmarks, do)                       # K1ᵀ dO
    dainv = torch.bmm(dw2, w.transpose(1, 2))                  # dW2 Wᵀ
    dw = torch.bmm(a.transpose(1, 2), dw2).contiguous()        # Ainvᵀ dW2
    setup = _setup(q, landmarks, v.shape[3], v=v, do=do, dq=dq)
    tensors = dict(Q=q, L=landmarks, V=v, DO=do, DQ=dq, W2=w2.contiguous(), DW=dw, P=None)
    key = launch_key(q, landmarks, v, do, dq)
    # 16-bit: one pass for dq and the landmark partials; fp32: a dq pass and a partials pass
    passes = ("soft_bwd",) if dots(q) == "native" else ("soft_bwd_q", "soft_bwd_l")
    for kname in passes:
        flags = BWD_PASSES[kname]
        if flags["DO_L"]:
            del tensors["P"]  # the partials: allocated by the launch
        p = split_launch(soft_bwd, q, (kname, *key), tensors,
                         lambda flags=flags: setup(**flags),
                         part_len=m * d + m if flags["DO_L"] else None)
        if flags["DO_L"]:
            part = p
    _soft_apply(q, landmarks, dw, dv)                          # dv = K1·dW
    g = fold_partials(part)
    dsq, dsum = g[:, : m * d].view(b * h, m, d), g[:, m * d:]
    lf = landmarks.reshape(b * h, m, d).float()
    dl = 2.0 * lf * dsum[:, :, None] - 2.0 * dsq
    return dl.view(b, h, m, d), dainv.view(b, h, m, m)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specialisations (tests/test_aot_compile.py: one candidate of each fits)
# --------------------------------------------------------------------------------------------


def aot_specs():
    """SOFT's kernels at their largest declared blocks (fp16: L = D = E = 64; fp32:
    D = FP32_MAX_HEAD_DIM), each backward pass with its flags."""
    soft16 = dict(BLOCK_L=64, BLOCK_D=64, BLOCK_E=64)
    soft32 = dict(soft16, BLOCK_D=FP32_MAX_HEAD_DIM)
    launchers = {"soft_reduce": soft_reduce, "soft_apply": soft_apply,
                 **{k: soft_bwd for k in BWD_PASSES}}
    selection = [(k, "fp16", soft16) for k in ("soft_reduce", "soft_apply", "soft_bwd")]
    selection += [(k, "fp32", soft32) for k in ("soft_reduce", "soft_apply", "soft_bwd_q",
                                                "soft_bwd_l")]
    return [aot_spec(k, launchers[k], dtype, sizes, BWD_PASSES.get(k))
            for k, dtype, sizes in selection]
