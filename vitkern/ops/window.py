"""Swin window attention op: checks, backend dispatch, ``torch.library`` registration and autograd.

Public op: :func:`window_attention` (q, k, v are (B, heads, N, d), N = H·W in raster order,
strided views welcome). The Triton backend is one pair of custom ops, ``vitkern::window_fwd`` /
``vitkern::window_bwd``; the bias (table or dense) is passed to the kernels in fp32 and its
gradient is returned in the bias's dtype. The CUDA C++ backend (inference only; ``auto`` only where
:mod:`vitkern.cuda_auto` approves) is
``vitkern::window_cuda_fwd`` (csrc/window/). Outputs are stored (B, N, heads, d) and returned as a
(B, heads, N, d) view, so ``o.transpose(1, 2).reshape(B, N, heads * d)`` is free.

``active_windows`` (SparseViT): the kernels walk only the listed windows (a (B, K) int32 id list
read in the kernel, no gathered copy); the other tokens' outputs are zeros, or, with ``out=``,
left as they are in ``out`` (``vitkern::window_fwd_out``, an in-place op without autograd, like
every PyTorch ``out=`` function). ``out`` must not share memory with an input or overlap itself
(a ``ValueError`` says which): the kernel writes it while it still reads them.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from vitkern.eager import window as eager
from vitkern.reference import window as ref

from ._common import (autocast_inputs, autocast_off, bhnd_empty, check_hw, check_out_overlap,
                      check_qkv, check_scale, check_values, index_value_problem, is_int, kernel_op,
                      lse_empty, needs_grad, on_device)
from ._dispatch import CallCache, Capability, Family, dispatch, inputs

__all__ = ["window_attention"]



# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


INDEX_DTYPES = (torch.int64, torch.int32)


def _check_window(op, window_size, shift):
    """``window_size`` / ``shift`` as pairs: ints >= 1 / shifts in [0, window side)."""
    ok = is_int(window_size) or (isinstance(window_size, (tuple, list)) and len(window_size) == 2
                                 and all(is_int(x) for x in window_size))
    if not ok or min(ref.pair(window_size)) < 1:
        raise ValueError(f"{op}: window_size must be an int >= 1 or a pair of them, got "
                         f"{window_size!r}")
    ws = ref.pair(window_size)
    ok = is_int(shift) or (isinstance(shift, (tuple, list)) and len(shift) == 2
                           and all(is_int(x) for x in shift))
    if not ok or not all(0 <= s < w for s, w in zip(ref.pair(shift), ws)):
        raise ValueError(f"{op}: shift must be an int (or a pair) in [0, window_size="
                         f"{window_size}), got {shift!r}")
    return ws, ref.pair(shift)


def _check(op, q, k, v, hw, window_size, shift, rel_pos_bias, mask_value, scale, pad_order,
           active_windows=None, out=None, clamp="swin"):
    """Validate the arguments; returns (H, W, (wh, ww), (sh, sw), scale, mask_value, active)
    with the effective (clamped) window and shift, ``active`` as contiguous int32 or None."""
    check_qkv(op, q, k, v)
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        raise ValueError(f"{op}: q, k, v must have one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    H, W = check_hw(op, hw, q.shape[2])
    win, sft = _check_window(op, window_size, shift)
    if clamp not in ref.CLAMPS:
        raise ValueError(f"{op}: clamp must be one of {ref.CLAMPS}, got {clamp!r}")
    if clamp == "swin" and win[0] != win[1]:
        raise ValueError(f"{op}: clamp='swin' takes a square window, got {win}; use "
                         "clamp='per_axis' (timm) or None")
    if pad_order not in ref.PAD_ORDERS:
        raise ValueError(f"{op}: pad_order must be one of {ref.PAD_ORDERS}, got {pad_order!r}")
    if not isinstance(mask_value, (int, float)) or isinstance(mask_value, bool) or math.isnan(
            mask_value) or mask_value > 0:
        raise ValueError(f"{op}: mask_value must be a float <= 0 (Swin uses -100.0), got "
                         f"{mask_value!r}")
    B, h, N, d = q.shape
    (wh, ww), (sh, sw) = ref.effective_window((H, W), win, sft, clamp)
    if rel_pos_bias is not None:
        if not isinstance(rel_pos_bias, Tensor):
            raise TypeError(f"{op}: rel_pos_bias must be a torch.Tensor or None, got "
                            f"{type(rel_pos_bias).__name__}")
        if not rel_pos_bias.is_floating_point():
            raise TypeError(f"{op}: rel_pos_bias must be floating-point, got "
                            f"{rel_pos_bias.dtype}")
        if rel_pos_bias.device != q.device:
            raise ValueError(f"{op}: rel_pos_bias is on {rel_pos_bias.device}, q on {q.device}")
        table, dense = ((2 * wh - 1) * (2 * ww - 1), h), (h, wh * ww, wh * ww)
        if tuple(rel_pos_bias.shape) not in (table, dense):
            given = window_size if is_int(window_size) else tuple(window_size)
            name = f"{wh}" if wh == ww and is_int(window_size) else f"{wh}x{ww}"
            clamped = (f" (window clamped to the {H}x{W} map: {given} -> {name})"
                       if (wh, ww) != win else "")
            raise ValueError(f"{op}: rel_pos_bias must be the table {table} or a dense bias "
                             f"{dense} for window {name}{clamped}, got "
                             f"{tuple(rel_pos_bias.shape)}")
    active = None
    if active_windows is not None:
        active = _check_active(op, active_windows, B, (H, W), (wh, ww), q.device)
    if out is not None:
        _check_out(op, out, q, k, v, rel_pos_bias)
        check_out_overlap(op, out, q=q, k=k, v=v, rel_pos_bias=rel_pos_bias,
                          active_windows=active_windows)
    return H, W, (wh, ww), (sh, sw), check_scale(op, scale, d), float(mask_value), active


def _check_active(op, active_windows, B, hw, ws, device) -> Tensor:
    if not isinstance(active_windows, Tensor):
        raise TypeError(f"{op}: active_windows must be a torch.Tensor or None, got "
                        f"{type(active_windows).__name__}")
    if active_windows.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: active_windows must be an int64 (or int32) tensor, got "
                        f"{active_windows.dtype}")
    gh, gw = ref.window_grid(hw, ws, clamp=None)
    n_win = gh * gw
    if active_windows.dim() != 2 or active_windows.shape[0] != B:
        raise ValueError(f"{op}: active_windows must have shape (B={B}, K), got "
                         f"{tuple(active_windows.shape)}")
    K = active_windows.shape[1]
    if K > n_win:
        raise ValueError(f"{op}: active_windows keeps K={K} windows, but the {hw[0]}x{hw[1]} map "
                         f"has only {n_win} ({gh}x{gw}) windows of {ws[0]}x{ws[1]}")
    if active_windows.device != device:
        raise ValueError(f"{op}: active_windows is on {active_windows.device}, q on {device}")
    _check_active_values(op, active_windows, (gh, gw))
    return _active32(active_windows)


def _check_active_values(op, active_windows: Tensor, grid) -> None:
    """Range and uniqueness of the window ids, where ``check_values`` says so (CPU tensors);
    ``grid``: the (gh, gw) window grid."""
    B, K = active_windows.shape
    if not (B and K and check_values(active_windows)):
        return
    gh, gw = grid
    problem = index_value_problem(active_windows, gh * gw)
    if problem is None:
        return
    kind, x, y = problem
    if kind == "range":
        raise ValueError(f"{op}: active_windows has out-of-range ids (min {x}, max {y}); "
                         f"they must lie in [0, {gh * gw}) ({gh}x{gw} windows, raster order)")
    raise ValueError(f"{op}: active_windows lists a window twice in row {x} (window {y}); each "
                     "row must list distinct windows")


def _active32(active_windows: Tensor) -> Tensor:
    return active_windows.to(torch.int32).contiguous()


def _check_out(op, out, q, *inputs):
    if not isinstance(out, Tensor):
        raise TypeError(f"{op}: out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"{op}: out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (out, q, *inputs)):
        raise RuntimeError(f"{op}: out= does not support automatic differentiation (as every "
                           "PyTorch out= function); call it under torch.no_grad() or drop out=")


# --------------------------------------------------------------------------------------------
# CUDA C++ custom op (vitkern._C, csrc/window/): Swin forward for inference
# --------------------------------------------------------------------------------------------


PAD_ORDER_CODES = {"shift_then_pad": 0, "pad_then_shift": 1}
_CUDA_FORWARD_ONLY = "the CUDA window kernel is forward-only (inference); use triton for training"


def _cuda_reason(q: Tensor, win, sft, active_windows: Optional[Tensor], needs_grad: bool,
                 out: Optional[Tensor] = None) -> Optional[str]:
    """Why the CUDA window kernel refuses these inputs (None when it takes them); ``win`` /
    ``sft`` are the effective (clamped) window and shift pairs."""
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}; the cuda backend needs CUDA tensors"
    if win[0] != win[1] or sft[0] != sft[1]:
        return (f"window {tuple(win)} / shift {tuple(sft)} not square: the CUDA window kernel "
                "takes square 7x7 / 12x12 windows")
    return _cuda_shape_reason(q.dtype, q.shape[-1], win[0], active_windows, needs_grad, out)


def _cuda_shape_reason(dtype, d: int, ws: int, active_windows, needs_grad: bool,
                       out=None) -> Optional[str]:
    """The device-independent part of :func:`_cuda_reason` (square window ``ws``)."""
    if needs_grad:
        return _CUDA_FORWARD_ONLY
    if active_windows is not None:
        return "active_windows is not supported by the CUDA window kernel"
    if out is not None:
        return "out= is not supported by the CUDA window kernel"
    from vitkern import _cext

    return _cuda_kernel_reason(_cext.DTYPE_CODES.get(str(dtype)[len("torch."):], -1), d,
                               ws) or None


@torch.compiler.assume_constant_result
def _cuda_kernel_reason(code: int, d: int, ws: int) -> str:
    """vitkern._C's shape check -> reason ('' when supported); constant under torch.compile."""
    from vitkern import _cext

    mod, why = _cext.load()
    if mod is None:
        return why
    if not hasattr(mod, "window_supported"):
        return "vitkern._C has no window kernel: a stale build, rebuild it (VITKERN_CUDA=1)"
    status, why = mod.window_supported(code, d, ws)
    return why if status else ""


@kernel_op("window_cuda_fwd")
def _window_cuda_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], H: int, W: int,
                     window_size: int, shift: int, mask_value: float, scale: float,
                     pad_order: str) -> Tensor:
    """o (B, heads, N, d), stored (B, N, heads, d); ``window_size`` / ``shift`` effective ones."""
    from vitkern import _cext

    o = bhnd_empty(q, q.shape[2])
    with on_device(q):
        _cext.launch("window_fwd", q, k, v, o, _bias32(bias), H, W, window_size, shift,
                     PAD_ORDER_CODES[pad_order], mask_value, scale, device=q.device)
    return o


@_window_cuda_fwd.register_fake
def _(q, k, v, bias, H, W, window_size, shift, mask_value, scale, pad_order):
    return bhnd_empty(q, q.shape[2])


# --------------------------------------------------------------------------------------------
# backend declarations: the WINDOW descriptor (dispatch: vitkern.ops._dispatch)
# --------------------------------------------------------------------------------------------


def _cuda_check(inp) -> Optional[str]:
    """The cuda declaration's check: the CUDA glue's own reason (device, square window,
    active_windows / out=, then vitkern._C's dtype / head-dim / window check)."""
    win, sft, active, out = inp.args
    return _cuda_reason(inp.x, win, sft, active, inp.needs_grad, out)


def _triton_check(inp) -> Optional[str]:
    """vitkern.triton_kernels.window's declared capability (head dims, window sizes)."""
    from vitkern.triton_kernels import window as tk

    return tk.unsupported(inp.head_dim, inp.dtype == torch.float32, inp.args[0])


#: The window family (window_attention). cuda: Swin forward for inference, square 7 / 12
#: windows, fp16 / bf16, head_dim 32 (vitkern._C declares them); triton: every mode, trains;
#: eager (SDPA per shift-mask pattern on gathered windows) is auto's CPU path.
WINDOW = Family("window", ref.window_attention, (
    Capability("cuda", training=False, forward_only=_CUDA_FORWARD_ONLY, check=_cuda_check,
               kernels=lambda inp: ("window_fwd",)),
    Capability.triton(check=_triton_check),
), eager=eager.window_attention)


def _backend(op, backend, q, win, sft=(0, 0), active=None, needs_grad=False, out=None):
    """The backend that runs ``op`` (:func:`~vitkern.ops._dispatch.dispatch` over WINDOW);
    ``win`` / ``sft`` the effective window and shift."""
    return dispatch(WINDOW, op, backend, inputs(q, win, sft, active, out, needs_grad=needs_grad))


# --------------------------------------------------------------------------------------------
# Triton custom ops
# --------------------------------------------------------------------------------------------


def _bias32(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.to(torch.float32)


def _geo(H, W, wh, ww, sh, sw, pad_then_shift, active):
    from vitkern.triton_kernels import window as tk

    return tk.geometry(H, W, wh, ww, sh, sw, pad_then_shift,
                       None if active is None else active.shape[1])


@kernel_op("window_fwd")
def _window_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], active: Optional[Tensor],
                H: int, W: int, wh: int, ww: int, sh: int, sw: int, scale: float,
                mask_value: float, pad_then_shift: bool) -> tuple[Tensor, Tensor]:
    """Triton window-attention forward (effective wh × ww window, shift (sh, sw)): (o, lse2),
    lse2 base-2 fp32. With ``active`` (int32 (B, K) window ids) the other tokens get o = 0,
    lse2 = -inf."""
    from vitkern.triton_kernels import window as tk

    o, lse = bhnd_empty(q, q.shape[2], zero=active is not None), lse_empty(q)
    if active is not None:
        lse.fill_(float("-inf"))
    with on_device(q):
        tk.forward(q, k, v, o, lse, _bias32(bias),
                   _geo(H, W, wh, ww, sh, sw, pad_then_shift, active), scale, mask_value, active)
    return o, lse


@_window_fwd.register_fake
def _(q, k, v, bias, active, H, W, wh, ww, sh, sw, scale, mask_value, pad_then_shift):
    return bhnd_empty(q, q.shape[2]), lse_empty(q)


@kernel_op("window_fwd_out", mutates_args=("out",))
def _window_fwd_out(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                    active: Optional[Tensor], out: Tensor, H: int, W: int, wh: int, ww: int,
                    sh: int, sw: int, scale: float, mask_value: float,
                    pad_then_shift: bool) -> None:
    """Triton window-attention forward into ``out`` in place: only the tokens of the computed
    windows are written (no autograd)."""
    from vitkern.triton_kernels import window as tk

    lse = lse_empty(q)
    with on_device(q):
        tk.forward(q, k, v, out, lse, _bias32(bias),
                   _geo(H, W, wh, ww, sh, sw, pad_then_shift, active), scale, mask_value, active)


@_window_fwd_out.register_fake
def _(q, k, v, bias, active, out, H, W, wh, ww, sh, sw, scale, mask_value, pad_then_shift):
    return None


@kernel_op("window_bwd")
def _window_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                bias: Optional[Tensor], active: Optional[Tensor], H: int, W: int, wh: int,
                ww: int, sh: int, sw: int, scale: float, mask_value: float, pad_then_shift: bool,
                need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton window-attention backward: (dq, dk, dv, dbias); dbias is empty (0 elements)
    unless ``need_dbias``, else shaped and typed like ``bias``. With ``active`` the tokens of
    the other windows get zero gradients."""
    from vitkern.triton_kernels import window as tk

    zero = active is not None
    dq, dk, dv = (bhnd_empty(t, t.shape[2], zero=zero) for t in (q, k, v))
    want = need_dbias and bias is not None
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if want else \
        q.new_zeros((0,))
    with on_device(q):
        tk.backward(do, q, k, v, o, lse, dq, dk, dv, _bias32(bias),
                    _geo(H, W, wh, ww, sh, sw, pad_then_shift, active), scale, mask_value,
                    dbias if want else None, active)
    return dq, dk, dv, dbias


@_window_bwd.register_fake
def _(do, q, k, v, o, lse, bias, active, H, W, wh, ww, sh, sw, scale, mask_value,
      pad_then_shift, need_dbias):
    if need_dbias and bias is not None:
        dbias = torch.empty_like(bias, memory_format=torch.contiguous_format)
    else:
        dbias = q.new_empty((0,))
    return bhnd_empty(q, q.shape[2]), bhnd_empty(k, k.shape[2]), bhnd_empty(v, v.shape[2]), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, active, *args = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, bias, active)
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, bias, active = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _window_bwd(do, q, k, v, o, lse, bias, active, *ctx.args, need_dbias)
    return (dq, dk, dv, (dbias if need_dbias else None)) + (None,) * (1 + len(ctx.args))


_window_fwd.register_autograd(_backward, _setup_context)


# --------------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------------


_CALLS = CallCache()


def window_attention(q: Tensor, k: Tensor, v: Tensor, *, hw: tuple[int, int],
                     window_size: Union[int, tuple[int, int]],
                     shift: Union[int, tuple[int, int]] = 0, rel_pos_bias: Optional[Tensor] = None,
                     active_windows: Optional[Tensor] = None, mask_value: float = -100.0,
                     scale: Optional[float] = None, pad_order: str = "shift_then_pad",
                     clamp: Optional[str] = "swin", out: Optional[Tensor] = None,
                     backend: str = "auto") -> Tensor:
    """Swin window attention (W-MSA, or SW-MSA with a shift), optionally on a subset of the
    windows (SparseViT).

    Args:
        q, k, v: (B, heads, N, d), N = H·W tokens in raster order; any strides.
        hw: the map size (H, W).
        window_size: ws, or (wh, ww) for non-square windows.
        shift: cyclic shift s in [0, ws) (Swin: ws // 2 in every second block), or (sh, sw);
            pairs of tokens from different regions of the rolled map get ``mask_value`` added
            (Swin: -100).
        rel_pos_bias: None, Swin's relative-position table ((2wh-1)(2ww-1), heads) (indexed the
            Swin way), or a dense (heads, wh·ww, wh·ww) bias, for the effective window.
            Differentiable.
        active_windows: None (every window), or a (B, K) int64 / int32 tensor of distinct window
            ids per image (the same K for every image, as SparseViT keeps), 0 <= K <= nW. Ids
            number the windows of the shifted, padded frame in raster order over its
            ceil(H/wh) × ceil(W/ww) window grid (the order of Swin's window_partition after the
            roll; see :func:`vitkern.reference.window.window_token_ids`). Only those windows are
            computed; the tokens of the others get zeros, or keep ``out``'s values when ``out``
            is given. Gradients flow only through the kept windows (zero elsewhere). Range and
            uniqueness are checked for CPU tensors; on a GPU only with ``VITKERN_DEBUG=1`` (a
            device sync otherwise avoided).
        mask_value: the additive shift mask (<= 0; -100 as in every reference, -inf for a hard
            mask).
        scale: logit scale, default d**-0.5.
        pad_order: for maps not divisible by the window, "shift_then_pad" (timm: roll the map,
            then pad right / bottom) or "pad_then_shift" (mmdet / SparseViT: pad, then roll). Pad
            tokens are unmasked zero keys / values; pad queries are dropped.
        clamp: the window actually used on a small map. "swin" (square windows): if
            min(H, W) <= ws the window becomes global (min(H, W)) and the shift 0, Swin's rule.
            "per_axis": timm's rule, per axis (a side not smaller than the map's extent becomes
            the extent, its shift 0). None: the window and shift as given (timm's
            ``always_partition``; a window larger than the map is padded).
        out: optional (B, heads, N, d) tensor of q's dtype and device to write into, in place
            (any strides; it must not overlap q, k, v). Like every PyTorch ``out=`` function it
            does not support autograd (use it under ``torch.no_grad()``).
        backend: "auto", "triton", "cuda" or "reference" (see :mod:`vitkern.backends`).

    Returns:
        (B, heads, N, d) in the input dtype (``out`` itself when given).

    Under ``torch.autocast`` it follows ``F.scaled_dot_product_attention``: q, k, v (fp32 / fp16 /
    bf16, mixed allowed) are cast to the autocast dtype and the output has that dtype;
    ``rel_pos_bias`` keeps its dtype (an fp32 table is read in fp32 by the kernels) and gets its
    gradient in it. A call with ``out=`` is not autocast-eligible (PyTorch's rule): it runs in
    the inputs' own dtype.
    """
    op = "window_attention"
    if out is None:  # out= calls are not autocast-eligible (PyTorch's rule for out= functions)
        q, k, v = autocast_inputs(q, k, v)
    grad = needs_grad(q, k, v, rel_pos_bias)
    # checked arguments and backend, per call signature (not out=: its overlap check reads
    # addresses); the values of CPU window ids are checked on every call
    key = None if out is not None else _CALLS.key(
        q, k, v, rel_pos_bias, active_windows, hw, window_size, shift, mask_value, scale,
        pad_order, clamp, backend, grad)
    plan = _CALLS.get(key)
    if plan is None:
        H, W, win, sft, scale, mask_value, active = _check(
            op, q, k, v, hw, window_size, shift, rel_pos_bias, mask_value, scale, pad_order,
            active_windows, out, clamp)
        name = _backend(op, backend, q, win, sft, active, grad, out)
        _CALLS.put(key, (H, W, win, sft, scale, mask_value, name))
    else:
        H, W, win, sft, scale, mask_value, name = plan
        active = None
        if active_windows is not None:
            _check_active_values(op, active_windows, ref.window_grid((H, W), win, clamp=None))
            active = _active32(active_windows)
    if name in ("reference", "eager") or q.numel() == 0:
        # eager builds its gather plan from index values: torch.compile traces the reference
        fast = name == "eager" and q.numel() and not torch.compiler.is_compiling()
        fn = WINDOW.eager if fast else ref.window_attention
        with autocast_off(q):
            o = fn(q, k, v, hw=(H, W), window_size=win, shift=sft, rel_pos_bias=rel_pos_bias,
                   mask_value=mask_value, scale=scale, pad_order=pad_order,
                   active_windows=active, clamp=None)
        if out is None:
            return o
        if active is None:
            return out.copy_(o)
        keep = ref.active_token_mask((H, W), win, sft, active, pad_order, None)
        return out.copy_(torch.where(keep[:, None, :, None], o, out))
    if name == "cuda":
        return _window_cuda_fwd(q, k, v, rel_pos_bias, H, W, win[0], sft[0], mask_value, scale,
                                pad_order)
    geo = (H, W, *win, *sft, scale, mask_value, pad_order == "pad_then_shift")
    if out is not None:
        _window_fwd_out(q, k, v, rel_pos_bias, active, out, *geo)
        return out
    return _window_fwd(q, k, v, rel_pos_bias, active, *geo)[0]
