"""Polyline path masked attention (PPMA) ops: checks, backend dispatch, registration, autograd.

Public ops (q, k, v are (B, heads, N, d), N = H·W in raster order, strided views welcome; the
log-decays are (B, heads, N)):

* :func:`ppma_attention` — full polyline-path-masked softmax attention (both mask directions,
  averaged). Triton backend: ``vitkern::ppma_fwd`` / ``vitkern::ppma_bwd`` (training),
  ``vitkern::ppma_infer`` (no gradients: nothing saved); the mask is evaluated
  per (query, key) pair from prefix sums of the log-decays, never materialised.
* :func:`ppma_decays` — PPMA's per-token, per-head horizontal / vertical log-decays from the
  attention input (``PathEmbeding2D``), one fused Triton pass (``vitkern::ppma_decays_fwd`` /
  ``_bwd``), differentiable in x, dt_weight, dt_bias and A_log.
* :func:`ppma_criss_cross_attention` — the row / column decomposed variant; Triton backend
  ``vitkern::ppma_cc_fwd`` / ``_bwd`` (per-row / per-column maps recomputed in registers).
* :func:`ppma_rope` — PPMA's RoPE (``theta_shift``): a separate fused op (one Triton pass per
  tensor, forward and backward) applied to q and k before the attention — not fused into the
  attention kernels' loads. Its output is stored (B, N, heads, d) like the attention outputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vitkern.eager import ppma as eager
from vitkern.reference import ppma as ref

from ._common import (autocast_inputs, autocast_off, bhnd_empty, check_hw, check_qkv,
                      check_scale, kernel_op, needs_grad, on_device)
from ._dispatch import CallCache, Capability, Family, HeadDims, dispatch, inputs

__all__ = ["ppma_attention", "ppma_criss_cross_attention", "ppma_decays", "ppma_rope",
           "ppma_rel_pos"]

ppma_rel_pos = ref.ppma_rel_pos


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _check(op, q, k, v, log_decay_h, log_decay_v, hw, scale):
    """Validate the arguments; returns (H, W, scale)."""
    check_qkv(op, q, k, v)
    H, W = check_hw(op, hw, q.shape[2])
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have q's shape {tuple(q.shape)}, got "
                             f"{tuple(t.shape)}")
    for name, t in (("log_decay_h", log_decay_h), ("log_decay_v", log_decay_v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != tuple(q.shape[:3]):
            raise ValueError(f"{op}: {name} must have shape (B, heads, N) = "
                             f"{tuple(q.shape[:3])}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    return H, W, check_scale(op, scale, q.shape[-1])


# --------------------------------------------------------------------------------------------
# backend declarations: the PPMA, PPMA_CC, PPMA_DECAYS and PPMA_ROPE descriptors (dispatch:
# vitkern.ops._dispatch). No CUDA C++ kernels.
# --------------------------------------------------------------------------------------------


def _triton_check(inp) -> Optional[str]:
    """vitkern.triton_kernels.ppma's declared capability (args: the map width W): the forward
    alone takes any width; the backward needs whole image rows per tile."""
    from vitkern.triton_kernels import ppma as tk

    return tk.unsupported(inp.head_dim, inp.dtype == torch.float32, inp.args[0],
                          backward=inp.needs_grad)


def _cc_check(inp) -> Optional[str]:
    """vitkern.triton_kernels.ppma's declared criss-cross capability (args: H, W)."""
    from vitkern.triton_kernels import ppma as tk

    H, W = inp.args
    return tk.cc_unsupported(H, W, inp.head_dim, inp.dtype == torch.float32)


#: Full PPMA (ppma_attention); eager (log-masks per block of query rows) is auto's CPU path.
PPMA = Family("ppma", ref.ppma_attention, (
    Capability.triton(head_dim=HeadDims(256), check=_triton_check),
), eager=eager.ppma_attention)
#: The criss-cross variant (ppma_criss_cross_attention): rows / columns up to 64 tokens (32 fp32).
PPMA_CC = Family("ppma_criss_cross", ref.ppma_criss_cross_attention, (
    Capability.triton(head_dim=HeadDims(256), check=_cc_check),))
#: The fused log-decays (ppma_decays) and RoPE (ppma_rope): one elementwise pass, any head dim
#: up to 1024 (x and the decay parameters in a Triton dtype).
PPMA_DECAYS = Family("ppma_decays", ref.ppma_decays, (
    Capability.triton(head_dim=HeadDims(1024, multiple=1)),))
PPMA_ROPE = Family("ppma_rope", ref.ppma_rope, (
    Capability.triton(head_dim=HeadDims(1024, multiple=1)),))


def _backend(op, backend, q, W, backward):
    """The backend that runs ``op`` (:func:`~vitkern.ops._dispatch.dispatch` over PPMA);
    ``backward``: inputs need gradients."""
    return dispatch(PPMA, op, backend, inputs(q, W, needs_grad=backward))


# --------------------------------------------------------------------------------------------
# Triton custom ops
# --------------------------------------------------------------------------------------------


def _saved_empty(q: Tensor) -> tuple[Tensor, Tensor]:
    """What a training forward saves for the backward besides its packed prefix table (int64
    (B, heads, N)): the direction-1 output o1 (fp32, stored (B, N, h, d) like o) and the
    base-2 log-sum-exp of both directions, fp32 (B, heads, 2, N)."""
    b, h, n, d = q.shape
    o1 = q.new_empty((b, n, h, d), dtype=torch.float32).transpose(1, 2)
    return o1, q.new_empty((b, h, 2, n), dtype=torch.float32)


@kernel_op("ppma_fwd")
def _ppma_fwd(q: Tensor, k: Tensor, v: Tensor, log_decay_h: Tensor, log_decay_v: Tensor,
              H: int, W: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton PPMA training forward: (o, o1, lse, pq), see :func:`_saved_empty`; pq is
    :func:`~vitkern.triton_kernels.ppma.prefix_table`'s."""
    from vitkern.triton_kernels import ppma as tk

    o = bhnd_empty(q, q.shape[2])
    o1, lse = _saved_empty(q)
    with on_device(q):
        pq = tk.prefix_table(log_decay_h, log_decay_v, H, W)
        tk.forward(q, k, v, pq, o, o1, lse, H, W, scale)
    return o, o1, lse, pq


@_ppma_fwd.register_fake
def _(q, k, v, log_decay_h, log_decay_v, H, W, scale):
    return (bhnd_empty(q, q.shape[2]), *_saved_empty(q),
            q.new_empty(q.shape[:3], dtype=torch.int64))


@kernel_op("ppma_infer")
def _ppma_infer(q: Tensor, k: Tensor, v: Tensor, log_decay_h: Tensor, log_decay_v: Tensor,
                H: int, W: int, scale: float) -> Tensor:
    """Triton PPMA inference forward: o alone (nothing saved: no O1 stored, no LSE)."""
    from vitkern.triton_kernels import ppma as tk

    o = bhnd_empty(q, q.shape[2])
    with on_device(q):
        tk.forward(q, k, v, tk.prefix_table(log_decay_h, log_decay_v, H, W), o, None, None, H,
                   W, scale)
    return o


@_ppma_infer.register_fake
def _(q, k, v, log_decay_h, log_decay_v, H, W, scale):
    return bhnd_empty(q, q.shape[2])


@kernel_op("ppma_bwd")
def _ppma_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, log_decay_h: Tensor,
              log_decay_v: Tensor, o: Tensor, o1: Tensor, lse: Tensor, pq: Tensor, H: int,
              W: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton PPMA backward: (dq, dk, dv, d_log_decay_h, d_log_decay_v); the log-decays give
    their gradients' dtypes (their values are in the forward's prefix table ``pq``)."""
    from vitkern.triton_kernels import ppma as tk

    n = q.shape[2]
    dq, dk, dv = bhnd_empty(q, n), bhnd_empty(k, n), bhnd_empty(v, n)
    with on_device(q):
        dp_q, dq_q, dp_k, dq_k = tk.backward(do, q, k, v, o, o1, lse, pq, dq, dk, dv, H, W,
                                             scale)
        da, dg = tk.decay_grads(dp_q, dq_q, H, W, (log_decay_h.dtype, log_decay_v.dtype),
                                dp_k, dq_k)
    return dq, dk, dv, da, dg


@_ppma_bwd.register_fake
def _(do, q, k, v, log_decay_h, log_decay_v, o, o1, lse, pq, H, W, scale):
    n = q.shape[2]
    return (bhnd_empty(q, n), bhnd_empty(k, n), bhnd_empty(v, n),
            torch.empty_like(log_decay_h, memory_format=torch.contiguous_format),
            torch.empty_like(log_decay_v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, a, g, H, W, scale = inputs
    o, o1, lse, pq = output
    ctx.save_for_backward(q, k, v, a, g, o, o1, lse, pq)
    ctx.args = (H, W, scale)
    ctx.mark_non_differentiable(o1, lse, pq)


def _backward(ctx, do, _do1, _dlse, _dpq):
    from vitkern.triton_kernels import ppma as tk

    q, k, v, a, g, o, o1, lse, pq = ctx.saved_tensors
    H, W, _ = ctx.args
    # a forward run without grad enabled may have taken a map too wide for the backward
    if why := tk.unsupported(q.shape[-1], q.dtype == torch.float32, W, backward=True):
        raise RuntimeError(f"ppma_attention backward: {why}; run with backend='reference'")
    grads = _ppma_bwd(do, q, k, v, a, g, o, o1, lse, pq, *ctx.args)
    return (*grads, None, None, None)


_ppma_fwd.register_autograd(_backward, _setup_context)


# --------------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------------


_CALLS = CallCache()


def ppma_attention(q: Tensor, k: Tensor, v: Tensor, log_decay_h: Tensor, log_decay_v: Tensor,
                   *, hw: tuple[int, int], scale: Optional[float] = None,
                   backend: str = "auto") -> Tensor:
    """Full polyline-path-masked softmax attention (PPMA's ``MambaAttentionAllDouble`` core).

    Args:
        q, k, v: (B, heads, N, d), N = H·W tokens in raster order; any strides. RoPE, if any,
            is already applied (:func:`ppma_rope`).
        log_decay_h, log_decay_v: (B, heads, N) per-token log-decays a (horizontal) and g
            (vertical), e.g. from :func:`ppma_decays`. Differentiable.
        hw: the map size (H, W).
        scale: logit scale, default d**-0.5.
        backend: "auto", "triton", "cuda", "eager" or "reference" (``auto`` runs "eager",
            :mod:`vitkern.eager.ppma`, for CPU tensors).

    Returns (B, heads, N, d):
    ½·softmax(scale·qkᵀ + log L)·v + ½·softmax(scale·qkᵀ + log Lᵀ)·v,
    log L[(r1,c1),(r2,c2)] = Σ a along row r1 between c1 and c2 + Σ g along column c2 between
    r1 and r2 (start excluded, end included). The triton backend trains on maps up to 32
    wide (16 for fp32 head_dim > 32); forward-only calls take any width.

    Under ``torch.autocast`` (both PPMA attention ops) q, k, v are cast to the autocast dtype
    as ``F.scaled_dot_product_attention`` does; the log-decays keep their dtype.
    """
    op = "ppma_attention"
    q, k, v = autocast_inputs(q, k, v)  # SDPA's rule; log-decays keep their dtype
    grad = needs_grad(q, k, v, log_decay_h, log_decay_v)
    key = _CALLS.key(op, q, k, v, log_decay_h, log_decay_v, hw, scale, backend, grad)
    plan = _CALLS.get(key)
    if plan is None:
        H, W, scale = _check(op, q, k, v, log_decay_h, log_decay_v, hw, scale)
        plan = _CALLS.put(key, (H, W, scale, _backend(op, backend, q, W, grad)))
    H, W, scale, name = plan
    if name == "eager" and q.numel():
        with autocast_off(q):
            return PPMA.eager(q, k, v, log_decay_h, log_decay_v, hw=(H, W), scale=scale)
    if name == "reference" or q.numel() == 0:
        with autocast_off(q):
            return PPMA.reference(q, k, v, log_decay_h, log_decay_v, hw=(H, W), scale=scale)
    if grad:
        return _ppma_fwd(q, k, v, log_decay_h, log_decay_v, H, W, scale)[0]
    return _ppma_infer(q, k, v, log_decay_h, log_decay_v, H, W, scale)


def _f32_empty(q: Tensor) -> Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)  # contiguous (B, h, N, d)


@kernel_op("ppma_cc_fwd")
def _cc_fwd(q: Tensor, k: Tensor, v: Tensor, log_decay_h: Tensor, log_decay_v: Tensor,
            H: int, W: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Triton criss-cross forward: (o, y, z); y = Aw·v, z = Ah·v (fp32, kept for the backward)."""
    from vitkern.triton_kernels import ppma as tk

    o, y, z, oa = bhnd_empty(q, q.shape[2]), _f32_empty(q), _f32_empty(q), _f32_empty(q)
    with on_device(q):
        pq = tk.prefix_table(log_decay_h, log_decay_v, H, W)
        tk.cc_forward(q, k, v, pq, o, y, z, oa, H, W, scale)
    return o, y, z


@_cc_fwd.register_fake
def _(q, k, v, log_decay_h, log_decay_v, H, W, scale):
    return bhnd_empty(q, q.shape[2]), _f32_empty(q), _f32_empty(q)


@kernel_op("ppma_cc_bwd")
def _cc_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, log_decay_h: Tensor,
            log_decay_v: Tensor, y: Tensor, z: Tensor, H: int, W: int,
            scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton criss-cross backward: (dq, dk, dv, d_log_decay_h, d_log_decay_v)."""
    from vitkern.triton_kernels import ppma as tk

    n = q.shape[2]
    dq, dk, dv = bhnd_empty(q, n), bhnd_empty(q, n), bhnd_empty(q, n)
    with on_device(q):
        pq = tk.prefix_table(log_decay_h, log_decay_v, H, W)
        d_p, d_q = tk.cc_backward(do, q, k, v, pq, y, z, dq, dk, dv, H, W, scale)
        da, dg = tk.decay_grads(d_p, d_q, H, W, (log_decay_h.dtype, log_decay_v.dtype))
    return dq, dk, dv, da, dg


@_cc_bwd.register_fake
def _(do, q, k, v, log_decay_h, log_decay_v, y, z, H, W, scale):
    n = q.shape[2]
    return (bhnd_empty(q, n), bhnd_empty(q, n), bhnd_empty(q, n),
            torch.empty_like(log_decay_h, memory_format=torch.contiguous_format),
            torch.empty_like(log_decay_v, memory_format=torch.contiguous_format))


def _cc_setup(ctx, inputs, output):
    q, k, v, a, g, H, W, scale = inputs
    _, y, z = output
    ctx.save_for_backward(q, k, v, a, g, y, z)
    ctx.args = (H, W, scale)
    ctx.mark_non_differentiable(y, z)


def _cc_backward(ctx, do, _dy, _dz):
    grads = _cc_bwd(do, *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None)


_cc_fwd.register_autograd(_cc_backward, _cc_setup)


def ppma_criss_cross_attention(q: Tensor, k: Tensor, v: Tensor, log_decay_h: Tensor,
                               log_decay_v: Tensor, *, hw: tuple[int, int],
                               scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Criss-cross (row / column decomposed) polyline-path-masked attention
    (``MambaAttentionChunkDouble`` core). Same arguments as :func:`ppma_attention`.

    Aw_r = softmax(scale·q kᵀ + S^W_r) inside every row, Ah_c likewise inside every column;
    O = ½·Ah·(Aw·v) + ½·Aw·(Ah·v). Triton backend: one program per row / column recomputes its
    map in registers (rows and columns up to 64 tokens, 32 in fp32; head_dim up to 32); only
    O(N·d) intermediates reach memory, never a per-row or per-column attention map.
    """
    op = "ppma_criss_cross_attention"
    q, k, v = autocast_inputs(q, k, v)  # SDPA's rule; log-decays keep their dtype
    H, W, scale = _check(op, q, k, v, log_decay_h, log_decay_v, hw, scale)
    name = dispatch(PPMA_CC, op, backend, inputs(q, H, W, needs_grad=needs_grad(
        q, k, v, log_decay_h, log_decay_v)))
    if name == "reference" or q.numel() == 0:
        with autocast_off(q):
            return ref.ppma_criss_cross_attention(q, k, v, log_decay_h, log_decay_v,
                                                  hw=(H, W), scale=scale)
    return _cc_fwd(q, k, v, log_decay_h, log_decay_v, H, W, scale)[0]


@kernel_op("ppma_decays_fwd")
def _decays_fwd(x: Tensor, dt_weight: Tensor, dt_bias: Tensor, A_log: Tensor,
                num_heads: int) -> tuple[Tensor, Tensor]:
    """Triton decays: x (B, N, C) -> a, g (B, heads, N) contiguous."""
    from vitkern.triton_kernels import ppma as tk

    B, N, _ = x.shape
    a, g = (x.new_empty((B, num_heads, N), dtype=_decay_dtype(x, A_log)) for _ in range(2))
    with on_device(x):
        tk.decays_forward(x, dt_weight, dt_bias, A_log, a, g)
    return a, g


def _decay_dtype(x: Tensor, A_log: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, A_log.dtype)


@_decays_fwd.register_fake
def _(x, dt_weight, dt_bias, A_log, num_heads):
    B, N, _ = x.shape
    return tuple(x.new_empty((B, num_heads, N), dtype=_decay_dtype(x, A_log)) for _ in range(2))


@kernel_op("ppma_decays_bwd")
def _decays_bwd(da: Tensor, dg: Tensor, x: Tensor, dt_weight: Tensor, dt_bias: Tensor,
                A_log: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton decays backward: (dx, d dt_weight, d dt_bias, d A_log)."""
    from vitkern.triton_kernels import ppma as tk

    dx = x.new_empty(x.shape)
    with on_device(x):
        dw, db, dA = tk.decays_backward(x, dt_weight, dt_bias, A_log, da, dg, dx)
    return dx, dw.to(dt_weight.dtype), db.to(dt_bias.dtype), dA.to(A_log.dtype)


@_decays_bwd.register_fake
def _(da, dg, x, dt_weight, dt_bias, A_log):
    return (x.new_empty(x.shape), torch.empty_like(dt_weight), torch.empty_like(dt_bias),
            torch.empty_like(A_log))


def _decays_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])


def _decays_backward(ctx, da, dg):
    grads = _decays_bwd(da, dg, *ctx.saved_tensors)
    return (*grads, None)


_decays_fwd.register_autograd(_decays_backward, _decays_setup)


def ppma_decays(x: Tensor, dt_weight: Tensor, dt_bias: Tensor, A_log: Tensor,
                num_heads: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """PPMA's per-token log-decays (``PathEmbeding2D``), fused, differentiable in every input.

    x: (B, ..., C) channels-last (e.g. (B, H, W, C)), C = heads·d; dt_weight (2, d) (shared by
    the heads); dt_bias, A_log (heads,). Returns (log_decay_h, log_decay_v), each
    (B, heads, N) with N the product of the middle dims::

        a = -exp(A_log)·softplus(x_h·dt_weight[0] + dt_bias),  g = … dt_weight[1] …

    Triton backend: one pass over x (fp32 math), parameter gradients reduced from per-program
    partial sums (deterministic).
    """
    op = "ppma_decays"
    for name, t in (("x", x), ("dt_weight", dt_weight), ("dt_bias", dt_bias), ("A_log", A_log)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point torch.Tensor")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if (not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1
            or x.dim() < 2 or x.shape[-1] % num_heads):
        raise ValueError(f"{op}: x (B, ..., C) needs C divisible by num_heads, got x "
                         f"{tuple(x.shape)} and num_heads={num_heads!r}")
    d = x.shape[-1] // num_heads
    if tuple(dt_weight.shape) != (2, d):
        raise ValueError(f"{op}: dt_weight must be (2, {d}), got {tuple(dt_weight.shape)}")
    for name, t in (("dt_bias", dt_bias), ("A_log", A_log)):
        if tuple(t.shape) != (num_heads,):
            raise ValueError(f"{op}: {name} must be ({num_heads},), got {tuple(t.shape)}")

    params = (("dt_weight dtype", dt_weight.dtype), ("dt_bias dtype", dt_bias.dtype),
              ("A_log dtype", A_log.dtype))
    name = dispatch(PPMA_DECAYS, op, backend, inputs(
        x, head_dim=d, other_dtypes=params, needs_grad=needs_grad(x, dt_weight, dt_bias, A_log)))
    if name == "reference" or x.numel() == 0:
        return ref.ppma_decays(x, dt_weight, dt_bias, A_log, num_heads)
    return _decays_fwd(x.reshape(x.shape[0], -1, x.shape[-1]), dt_weight, dt_bias, A_log,
                       num_heads)


@kernel_op("ppma_rope")
def _rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Triton RoPE: x (B, heads, N, d), sin / cos fp32 (N, d) contiguous."""
    from vitkern.triton_kernels import ppma as tk

    y = bhnd_empty(x, x.shape[2])
    with on_device(x):
        tk.rope(x, sin, cos, y)
    return y


@_rope.register_fake
def _(x, sin, cos):
    return bhnd_empty(x, x.shape[2])


@kernel_op("ppma_rope_bwd")
def _rope_bwd(dy: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    from vitkern.triton_kernels import ppma as tk

    dx = bhnd_empty(dy, dy.shape[2])
    with on_device(dy):
        tk.rope(dy, sin, cos, dx, backward=True)
    return dx


@_rope_bwd.register_fake
def _(dy, sin, cos):
    return bhnd_empty(dy, dy.shape[2])


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _rope_backward(ctx, dy):
    sin, cos = ctx.saved_tensors
    return _rope_bwd(dy, sin, cos), None, None


_rope.register_autograd(_rope_backward, _rope_setup)


def ppma_rope(x: Tensor, sin: Tensor, cos: Tensor, *, backend: str = "auto") -> Tensor:
    """PPMA's rotary embedding (``theta_shift``): x·cos + rot(x)·sin with interleaved pairs,
    rot(x)_2m = -x_2m+1, rot(x)_2m+1 = x_2m.

    x: (B, heads, N, d), any strides; sin, cos: (H, W, d) or (N, d) as :func:`ppma_rel_pos`
    builds them (constants: no gradient flows into them on the triton backend). Returns
    (B, heads, N, d) in x's dtype (triton: stored (B, N, heads, d)).
    """
    op = "ppma_rope"
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{op}: x must be a 4-D floating-point tensor (B, heads, N, d)")
    B, h, N, d = x.shape
    for name, t in (("sin", sin), ("cos", cos)):
        if not isinstance(t, Tensor) or t.numel() != N * d or t.shape[-1] != d:
            raise ValueError(f"{op}: {name} must be (H, W, {d}) or ({N}, {d}) for x of shape "
                             f"{tuple(x.shape)}, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if d % 2:
        raise ValueError(f"{op}: head_dim must be even, got {d}")

    name = dispatch(PPMA_ROPE, op, backend, inputs(x, needs_grad=needs_grad(x)))
    if name == "reference" or x.numel() == 0 or sin.requires_grad or cos.requires_grad:
        return ref.ppma_rope(x, sin, cos)
    tables = [t.detach().reshape(N, d).to(torch.float32).contiguous() for t in (sin, cos)]
    return _rope(x, *tables)
