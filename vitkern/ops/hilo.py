"""HiLo attention ops: checks, backend dispatch, ``torch.library`` registration and autograd.

Public ops (q, k, v are (B, heads, N, d), N = H·W in raster order, strided views welcome):

* :func:`hilo_attention` — the first ``heads - num_lo_heads`` heads Hi-Fi, the rest Lo-Fi;
* :func:`hifi_attention` — every head Hi-Fi (e.g. q, k, v read straight out of ``h_qkv``);
* :func:`lofi_attention` — every head Lo-Fi; ``kv_pooled=True`` takes already-pooled k, v.

The Triton backend is one pair of custom ops, ``vitkern::hilo_fwd`` / ``vitkern::hilo_bwd``, that
serves all three (one output buffer; the Hi-Fi and Lo-Fi kernels write their own heads of it).
The CUDA C++ backend (``backend="cuda"``; ``auto`` only where :mod:`vitkern.cuda_auto` approves) is
``vitkern::hifi_cuda_fwd`` / ``vitkern::hifi_cuda_bwd`` for Hi-Fi heads with s <= 4, and the
forward-only ``vitkern::hilo_cuda_fwd`` when Lo-Fi heads are present (inference; csrc/hilo/).
Outputs are stored (B, N, heads, d) and returned as a (B, heads, N, d) view, so
``o.transpose(1, 2).reshape(B, N, heads * d)`` is free.

Head dims the triton backend declares (``triton_kernels/hilo.py``: ``MAX_HEAD_DIM``; within them
every kernel has a tile candidate that compiles without spills, beyond them the input is refused
with the reason and ``auto`` falls back to the reference):

=================================  ============  ============  ===============
heads                              fp16 / bf16   fp32 forward  fp32 training
=================================  ============  ============  ===============
Hi-Fi                              d <= 256      d <= 128      d <= 128
Lo-Fi, pooling in the kernel       d <= 128      d <= 64       d <= 64
Lo-Fi on pooled k, v (or s = 1)    d <= 256      d <= 128      d <= 64
=================================  ============  ============  ===============
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from vitkern.reference import hilo as ref

from ._common import (autocast_inputs, autocast_off, bhnd_empty, check_hw, check_qkv,
                      check_scale, is_int, kernel_op, lse_empty, needs_grad, on_device)
from ._dispatch import CallCache, Capability, Family, HeadDims, dispatch, inputs

__all__ = ["hilo_attention", "hifi_attention", "lofi_attention"]

MAX_POOL_IN_KERNEL = 8  # in-kernel pooling unrolls s² loads per key tile


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _check(op, q, k, v, hw, window_size, scale, pad, *, kv_pooled=False):
    """Validate the arguments; returns (H, W, s, scale)."""
    check_qkv(op, q, k, v)
    H, W = check_hw(op, hw, q.shape[2])
    if not is_int(window_size) or window_size < 1:
        raise ValueError(f"{op}: window_size must be an int >= 1, got {window_size!r}")
    if pad not in (None, "zero"):
        raise ValueError(f"{op}: pad must be None or 'zero', got {pad!r}")
    s = window_size
    B, h, N, d = q.shape
    if (H % s or W % s) and pad is None:
        raise ValueError(f"{op}: hw={tuple(hw)} is not divisible by window_size={s}; pass "
                         "pad='zero' for LITv2's zero padding (detection / segmentation HiLo)")
    Hp, Wp = ref.padded_hw((H, W), s)
    n_kv = (Hp // s) * (Wp // s) if kv_pooled else N
    what = f"the {Hp // s}x{Wp // s} pooled map" if kv_pooled else "q"
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (B, h, n_kv, d):
            raise ValueError(f"{op}: {name} must have shape {(B, h, n_kv, d)} to match {what}, "
                             f"got {tuple(t.shape)}")
    return H, W, s, check_scale(op, scale, d)


# --------------------------------------------------------------------------------------------
# backend declarations: the HILO descriptor (dispatch: vitkern.ops._dispatch)
# --------------------------------------------------------------------------------------------


def _triton_check(inp) -> Optional[str]:
    """vitkern.triton_kernels.hilo's declared capability for each head group of the call (Hi-Fi
    heads in window mode, Lo-Fi heads pooling in the kernel or on keys as given)."""
    s, n_lo, kv_pooled = inp.args
    if n_lo and s > MAX_POOL_IN_KERNEL and not kv_pooled:
        return (f"window_size {s} > {MAX_POOL_IN_KERNEL} for in-kernel pooling; "
                "pool k, v first and pass kv_pooled=True")
    from vitkern.triton_kernels import hilo as tk

    fp32 = inp.dtype == torch.float32
    groups = ((inp.x.shape[1] - n_lo, dict(window=s, pool=1)),
              (n_lo, dict(window=0, pool=1 if kv_pooled else s)))
    for n_heads, mode in groups:
        why = n_heads and tk.unsupported(inp.head_dim, fp32, **mode, backward=inp.needs_grad)
        if why:
            return why
    return None


_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_reason(q, s, n_lo, kv_pooled, needs_grad) -> Optional[str]:
    """Why the CUDA C++ kernels refuse these inputs (None when they take them)."""
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}; the cuda backend needs CUDA tensors"
    return _cuda_shape_reason(q.dtype, q.shape[-1], s, q.shape[1] - n_lo, n_lo, kv_pooled,
                              needs_grad)


def _cuda_shape_reason(dtype, d, s, n_hi, n_lo, kv_pooled, needs_grad) -> Optional[str]:
    if dtype not in _CUDA_DTYPES:
        return f"dtype {dtype} not supported by cuda (float32, float16, bfloat16)"
    if n_lo and needs_grad:
        return (f"{n_lo} Lo-Fi head(s) need gradients: the CUDA Lo-Fi kernel is forward-only "
                "(inference); use triton for training")
    from vitkern import _cext

    code = _cext.DTYPE_CODES[str(dtype)[len("torch."):]]
    if n_hi:
        for backward in (False, True) if needs_grad else (False,):
            why = _kernel_reason("hifi_supported", code, d, s, backward)
            if why:
                return why
    if n_lo:
        why = _kernel_reason("lofi_supported", code, d, 1 if kv_pooled else s)
        if why:
            return why
    return None


@torch.compiler.assume_constant_result
def _kernel_reason(entry: str, *args) -> str:
    """vitkern._C's shape check ``entry(*args)`` -> reason ('' when supported). A pure function
    of its arguments: torch.compile evaluates it once while tracing instead of breaking the graph
    on the extension call."""
    from vitkern import _cext

    mod, why = _cext.load()
    if mod is None:
        return why
    fn = getattr(mod, entry, None)
    if fn is None:
        return "vitkern._C has no HiLo kernels: a stale build, rebuild it (VITKERN_CUDA=1)"
    status, why = fn(*args)
    return why if status else ""


def _cuda_check(inp) -> Optional[str]:
    """The cuda declaration's check: the CUDA glue's own reason (device, dtype, vitkern._C)."""
    s, n_lo, kv_pooled = inp.args
    return _cuda_reason(inp.x, s, n_lo, kv_pooled, inp.needs_grad)


def _cuda_kernels(inp) -> tuple[str, ...]:
    """The vitkern._C kernels a call runs (what :mod:`vitkern.cuda_auto` must approve)."""
    n_lo = inp.args[1]
    hifi = ("hifi_fwd", "hifi_bwd") if inp.needs_grad else ("hifi_fwd",)
    return (hifi if inp.x.shape[1] > n_lo else ()) + (("lofi_fwd",) if n_lo else ())


#: The HiLo family (hilo / hifi / lofi_attention). cuda: Hi-Fi forward + backward, Lo-Fi forward
#: only; its dtypes, head dims and windows are vitkern._C's (``_cuda_reason``). triton: the
#: kernel module's per-mode, per-pass head-dim limits (the table in this module's docstring).
HILO = Family("hilo", ref.hilo_attention, (
    Capability("cuda", check=_cuda_check, kernels=_cuda_kernels),
    Capability.triton(head_dim=HeadDims(256), check=_triton_check),
))


def _backend(op, backend, q, s, n_lo, kv_pooled, needs_grad=False):
    """The backend that runs ``op`` (:func:`~vitkern.ops._dispatch.dispatch` over HILO)."""
    return dispatch(HILO, op, backend, inputs(q, s, n_lo, kv_pooled, needs_grad=needs_grad))


# --------------------------------------------------------------------------------------------
# Triton custom ops
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _head_groups(n_heads: int, num_lo_heads: int) -> tuple:
    """(head slice, Hi-Fi?) of the non-empty head groups: Hi-Fi heads first, then Lo-Fi."""
    n_hi = n_heads - num_lo_heads
    groups = ((slice(0, n_hi), True), (slice(n_hi, n_heads), False))
    return tuple((heads, window) for heads, window in groups if heads.stop > heads.start)


@kernel_op("hilo_fwd")
def _hilo_fwd(q: Tensor, k: Tensor, v: Tensor, H: int, W: int, window_size: int,
              num_lo_heads: int, scale: float, kv_pooled: bool) -> tuple[Tensor, Tensor]:
    """Triton HiLo forward: (o, lse2); lse2 is the base-2 log-sum-exp, fp32 (B, heads, N)."""
    from vitkern.triton_kernels import hilo as tk

    o, lse = bhnd_empty(q, q.shape[2]), lse_empty(q)
    with on_device(q):
        for heads, window in _head_groups(q.shape[1], num_lo_heads):
            tk.forward(q, k, v, o, lse, H, W, window_size, scale, window=window,
                       kv_pooled=kv_pooled, heads=heads)
    return o, lse


@_hilo_fwd.register_fake
def _(q, k, v, H, W, window_size, num_lo_heads, scale, kv_pooled):
    return bhnd_empty(q, q.shape[2]), lse_empty(q)


@kernel_op("hilo_bwd")
def _hilo_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, H: int,
              W: int, window_size: int, num_lo_heads: int, scale: float,
              kv_pooled: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Triton HiLo backward: (dq, dk, dv)."""
    from vitkern.triton_kernels import hilo as tk

    dq, dk, dv = bhnd_empty(q, q.shape[2]), bhnd_empty(k, k.shape[2]), bhnd_empty(v, v.shape[2])
    groups = _head_groups(q.shape[1], num_lo_heads)
    # one rowsum(dO·O) buffer, whose heads the packed groups' dQ kernels fill for their dK/dV
    # kernels (per-window Hi-Fi kernels recompute P exactly and need none)
    delta = torch.empty_like(lse) if any(tk.needs_delta(w, window_size) for _, w in groups) \
        else None
    with on_device(q):
        for heads, window in groups:
            tk.backward(do, q, k, v, o, lse, dq, dk, dv, H, W, window_size, scale,
                        window=window, kv_pooled=kv_pooled, heads=heads, delta=delta)
    return dq, dk, dv


@_hilo_bwd.register_fake
def _(do, q, k, v, o, lse, H, W, window_size, num_lo_heads, scale, kv_pooled):
    return bhnd_empty(q, q.shape[2]), bhnd_empty(k, k.shape[2]), bhnd_empty(v, v.shape[2])


def _setup_context(ctx, inputs, output):
    q, k, v, H, W, window_size, num_lo_heads, scale, kv_pooled = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.args = (H, W, window_size, num_lo_heads, scale, kv_pooled)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _hilo_bwd(do, q, k, v, o, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_hilo_fwd.register_autograd(_backward, _setup_context)


# --------------------------------------------------------------------------------------------
# CUDA C++ custom ops (vitkern._C, csrc/hilo/hifi.cu): Hi-Fi heads, s <= 4
# --------------------------------------------------------------------------------------------


@kernel_op("hifi_cuda_fwd")
def _hifi_cuda_fwd(q: Tensor, k: Tensor, v: Tensor, H: int, W: int, window_size: int,
                   scale: float) -> Tensor:
    """CUDA C++ Hi-Fi forward: o (B, heads, N, d), stored (B, N, heads, d)."""
    from vitkern import _cext

    o = bhnd_empty(q, q.shape[2])
    with on_device(q):
        _cext.launch("hifi_fwd", q, k, v, o, H, W, window_size, scale, device=q.device)
    return o


@_hifi_cuda_fwd.register_fake
def _(q, k, v, H, W, window_size, scale):
    return bhnd_empty(q, q.shape[2])


@kernel_op("hifi_cuda_bwd")
def _hifi_cuda_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, H: int, W: int,
                   window_size: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """CUDA C++ Hi-Fi backward: (dq, dk, dv); the window scores are recomputed from q, k (no
    saved output or log-sum-exp: a window's softmax costs less than reading them)."""
    from vitkern import _cext

    dq, dk, dv = (bhnd_empty(t, t.shape[2]) for t in (q, k, v))
    with on_device(q):
        _cext.launch("hifi_bwd", q, k, v, do, dq, dk, dv, H, W, window_size, scale,
                     device=q.device)
    return dq, dk, dv


@_hifi_cuda_bwd.register_fake
def _(do, q, k, v, H, W, window_size, scale):
    return tuple(bhnd_empty(t, t.shape[2]) for t in (q, k, v))


@kernel_op("hilo_cuda_fwd")
def _hilo_cuda_fwd(q: Tensor, k: Tensor, v: Tensor, H: int, W: int, window_size: int,
                   num_lo_heads: int, scale: float, kv_pooled: bool) -> Tensor:
    """CUDA C++ HiLo forward with Lo-Fi heads (inference only: the Lo-Fi kernel has no backward;
    dispatch never sends inputs that need gradients here). One output buffer, each kernel writes
    its own heads: Hi-Fi heads first, then Lo-Fi (pooled in the kernel unless ``kv_pooled``)."""
    from vitkern import _cext

    o = bhnd_empty(q, q.shape[2])
    n_hi = q.shape[1] - num_lo_heads
    hi, lo = slice(0, n_hi), slice(n_hi, q.shape[1])
    with on_device(q):
        if n_hi:
            _cext.launch("hifi_fwd", q[:, hi], k[:, hi], v[:, hi], o[:, hi], H, W, window_size,
                         scale, device=q.device)
        if num_lo_heads:
            _cext.launch("lofi_fwd", q[:, lo], k[:, lo], v[:, lo], o[:, lo], H, W, window_size,
                         kv_pooled, scale, device=q.device)
    return o


@_hilo_cuda_fwd.register_fake
def _(q, k, v, H, W, window_size, num_lo_heads, scale, kv_pooled):
    return bhnd_empty(q, q.shape[2])


def _hifi_cuda_setup_context(ctx, inputs, output):
    q, k, v, H, W, window_size, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = (H, W, window_size, scale)


def _hifi_cuda_backward(ctx, do):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = _hifi_cuda_bwd(do, q, k, v, *ctx.args)
    return dq, dk, dv, None, None, None, None


_hifi_cuda_fwd.register_autograd(_hifi_cuda_backward, _hifi_cuda_setup_context)


# --------------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------------


def hilo_attention(q: Tensor, k: Tensor, v: Tensor, *, hw: tuple[int, int], window_size: int,
                   num_lo_heads: int, scale: Optional[float] = None, pad: Optional[str] = None,
                   backend: str = "auto") -> Tensor:
    """HiLo attention (LITv2): Hi-Fi window heads first, then ``num_lo_heads`` Lo-Fi heads.

    Args:
        q, k, v: (B, heads, N, d), N = H·W tokens in raster order; any strides.
        hw: the map size (H, W).
        window_size: s. Hi-Fi heads attend inside non-overlapping s×s windows; Lo-Fi heads attend
            to the s×s average-pooled k, v (pooled inside the kernel). s = 1 with
            ``num_lo_heads = heads`` is plain global attention.
        num_lo_heads: how many of the last heads are Lo-Fi (0 … heads).
        scale: logit scale, default d**-0.5.
        pad: None (H and W must be multiples of s) or "zero": LITv2's detection HiLo, zero-pad
            right / bottom, pad tokens are unmasked zero keys / values, output cropped.
        backend: "auto", "triton", "cuda" or "reference" (see :mod:`vitkern.backends`).

    Returns:
        (B, heads, N, d) in the input dtype.

    Under ``torch.autocast`` every op of this family follows ``F.scaled_dot_product_attention``:
    q, k, v (fp32 / fp16 / bf16, mixed allowed) are cast to the autocast dtype, which is then
    the input dtype.
    """
    q, k, v = autocast_inputs(q, k, v)
    return _run("hilo_attention", backend, q, k, v, hw, window_size, num_lo_heads, scale, pad,
                False)


def hifi_attention(q: Tensor, k: Tensor, v: Tensor, *, hw: tuple[int, int], window_size: int,
                   scale: Optional[float] = None, pad: Optional[str] = None,
                   backend: str = "auto") -> Tensor:
    """Hi-Fi heads only: softmax attention inside s×s windows. Shapes as :func:`hilo_attention`."""
    q, k, v = autocast_inputs(q, k, v)
    return _run("hifi_attention", backend, q, k, v, hw, window_size, 0, scale, pad, False)


def lofi_attention(q: Tensor, k: Tensor, v: Tensor, *, hw: tuple[int, int], window_size: int,
                   scale: Optional[float] = None, pad: Optional[str] = None,
                   kv_pooled: bool = False, backend: str = "auto") -> Tensor:
    """Lo-Fi heads only: every query attends to s×s average-pooled keys and values.

    With ``kv_pooled=True``, k and v are already pooled: (B, heads, M, d) with
    M = ceil(H/s)·ceil(W/s) in raster order of the pooled map (LITv2 pools x before its kv
    projection, s² cheaper than projecting every token).
    """
    op = "lofi_attention"
    q, k, v = autocast_inputs(q, k, v)
    if not isinstance(kv_pooled, bool):
        raise TypeError(f"{op}: kv_pooled must be a bool, got {type(kv_pooled).__name__}")
    return _run(op, backend, q, k, v, hw, window_size, None, scale, pad, kv_pooled)


_CALLS = CallCache()


def _plan(op, backend, q, k, v, hw, window_size, n_lo, scale, pad, kv_pooled):
    """(H, W, s, n_lo, scale, backend) of a call (``n_lo`` None: every head is Lo-Fi), checked
    and dispatched once per call signature."""
    grad = needs_grad(q, k, v)
    key = _CALLS.key(op, q, k, v, hw, window_size, n_lo, scale, pad, kv_pooled, backend, grad)
    plan = _CALLS.get(key)
    if plan is None:
        H, W, s, scale = _check(op, q, k, v, hw, window_size, scale, pad, kv_pooled=kv_pooled)
        heads = q.shape[1]
        n_lo = heads if n_lo is None else n_lo
        if not is_int(n_lo) or not 0 <= n_lo <= heads:
            raise ValueError(f"{op}: num_lo_heads must be an int in [0, {heads}], got {n_lo!r}")
        name = _backend(op, backend, q, s, n_lo, kv_pooled, grad)
        plan = _CALLS.put(key, (H, W, s, n_lo, scale, name))
    return plan


def _run(op, backend, q, k, v, hw, window_size, n_lo, scale, pad, kv_pooled):
    H, W, s, n_lo, scale, name = _plan(op, backend, q, k, v, hw, window_size, n_lo, scale, pad,
                                       kv_pooled)
    if name == "reference" or q.numel() == 0:
        kw = dict(hw=(H, W), window_size=s, scale=scale, pad=pad)
        with autocast_off(q):
            if n_lo == 0:
                return ref.hifi_attention(q, k, v, **kw)
            if n_lo == q.shape[1]:
                return ref.lofi_attention(q, k, v, kv_pooled=kv_pooled, **kw)
            return ref.hilo_attention(q, k, v, num_lo_heads=n_lo, **kw)
    if name == "cuda":
        if n_lo == 0:  # differentiable
            return _hifi_cuda_fwd(q, k, v, H, W, s, scale)
        return _hilo_cuda_fwd(q, k, v, H, W, s, n_lo, scale, kv_pooled)
    return _hilo_fwd(q, k, v, H, W, s, n_lo, scale, kv_pooled)[0]
