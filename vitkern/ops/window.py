"""Swin window attention op: checks, backend dispatch, ``torch.library`` registration and autograd.

Public op: :func:`window_attention` (q, k, v are (B, heads, N, d), N = H·W in raster order,
strided views welcome). The Triton backend is one pair of custom ops, ``vitkern::window_fwd`` /
``vitkern::window_bwd``; the bias (table or dense) is passed to the kernels in fp32 and its
gradient is returned in the bias's dtype. Outputs are stored (B, N, heads, d) and returned as a
(B, heads, N, d) view, so ``o.transpose(1, 2).reshape(B, N, heads * d)`` is free.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vitkern import backends
from vitkern.reference import window as ref

from ._common import (bhnd_empty, check_hw, check_qkv, check_scale, is_int, lse_empty, on_device,
                      triton_dtype_reason)

__all__ = ["window_attention"]



# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _check(op, q, k, v, hw, window_size, shift, rel_pos_bias, mask_value, scale, pad_order):
    """Validate the arguments; returns (H, W, ws, shift, scale, mask_value) with the effective
    (Swin-clamped) window size and shift."""
    check_qkv(op, q, k, v)
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        raise ValueError(f"{op}: q, k, v must have one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    H, W = check_hw(op, hw, q.shape[2])
    if not is_int(window_size) or window_size < 1:
        raise ValueError(f"{op}: window_size must be an int >= 1, got {window_size!r}")
    if not is_int(shift) or not (0 <= shift < window_size):
        raise ValueError(f"{op}: shift must be an int in [0, window_size={window_size}), got "
                         f"{shift!r}")
    if pad_order not in ref.PAD_ORDERS:
        raise ValueError(f"{op}: pad_order must be one of {ref.PAD_ORDERS}, got {pad_order!r}")
    if not isinstance(mask_value, (int, float)) or isinstance(mask_value, bool) or math.isnan(
            mask_value) or mask_value > 0:
        raise ValueError(f"{op}: mask_value must be a float <= 0 (Swin uses -100.0), got "
                         f"{mask_value!r}")
    B, h, N, d = q.shape
    ws, s = ref.effective_window((H, W), window_size, shift)
    if rel_pos_bias is not None:
        if not isinstance(rel_pos_bias, Tensor):
            raise TypeError(f"{op}: rel_pos_bias must be a torch.Tensor or None, got "
                            f"{type(rel_pos_bias).__name__}")
        if not rel_pos_bias.is_floating_point():
            raise TypeError(f"{op}: rel_pos_bias must be floating-point, got "
                            f"{rel_pos_bias.dtype}")
        if rel_pos_bias.device != q.device:
            raise ValueError(f"{op}: rel_pos_bias is on {rel_pos_bias.device}, q on {q.device}")
        table, dense = ((2 * ws - 1) ** 2, h), (h, ws * ws, ws * ws)
        if tuple(rel_pos_bias.shape) not in (table, dense):
            clamp = (f" (window clamped to the {H}x{W} map: {window_size} -> {ws})"
                     if ws != window_size else "")
            raise ValueError(f"{op}: rel_pos_bias must be the table {table} or a dense bias "
                             f"{dense} for window {ws}{clamp}, got "
                             f"{tuple(rel_pos_bias.shape)}")
    return H, W, ws, s, check_scale(op, scale, d), float(mask_value)


def _backend(op, backend, q, ws):
    d = q.shape[-1]

    def reason(name: str, explicit: bool) -> Optional[str]:
        why = backends.device_reason(name, q.device, explicit)
        if why is not None or name == "reference":
            return why
        if name == "triton":
            if why := triton_dtype_reason(q.dtype):
                return why
            from vitkern.triton_kernels import window as tk

            return tk.unsupported(d, q.dtype == torch.float32, ws)
        return "no window-attention kernel in vitkern._C yet"

    return backends.select(op, backend, reason)


# --------------------------------------------------------------------------------------------
# Triton custom ops
# --------------------------------------------------------------------------------------------


def _bias32(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.to(torch.float32)


@torch.library.custom_op("vitkern::window_fwd", mutates_args=())
def _window_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], H: int, W: int,
                ws: int, shift: int, scale: float, mask_value: float,
                pad_then_shift: bool) -> tuple[Tensor, Tensor]:
    """Triton window-attention forward (effective ws / shift): (o, lse2), lse2 base-2 fp32."""
    from vitkern.triton_kernels import window as tk

    o, lse = bhnd_empty(q, q.shape[2]), lse_empty(q)
    with on_device(q):
        tk.forward(q, k, v, o, lse, _bias32(bias), tk.geometry(H, W, ws, shift, pad_then_shift),
                   ws, scale, mask_value)
    return o, lse


@_window_fwd.register_fake
def _(q, k, v, bias, H, W, ws, shift, scale, mask_value, pad_then_shift):
    return bhnd_empty(q, q.shape[2]), lse_empty(q)


@torch.library.custom_op("vitkern::window_bwd", mutates_args=())
def _window_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                bias: Optional[Tensor], H: int, W: int, ws: int, shift: int, scale: float,
                mask_value: float, pad_then_shift: bool,
                need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton window-attention backward: (dq, dk, dv, dbias); dbias is empty (0 elements)
    unless ``need_dbias``, else shaped and typed like ``bias``."""
    from vitkern.triton_kernels import window as tk

    dq, dk, dv = bhnd_empty(q, q.shape[2]), bhnd_empty(k, k.shape[2]), bhnd_empty(v, v.shape[2])
    with on_device(q):
        dense = tk.backward(do, q, k, v, o, lse, dq, dk, dv, _bias32(bias),
                            tk.geometry(H, W, ws, shift, pad_then_shift), ws, scale, mask_value,
                            need_dbias and bias is not None)
    if dense is None:
        dbias = q.new_zeros((0,))
    elif bias.dim() == 2:
        dbias = tk.fold_to_table(dense, ws).to(bias.dtype)
    else:
        dbias = dense.to(bias.dtype)
    return dq, dk, dv, dbias


@_window_bwd.register_fake
def _(do, q, k, v, o, lse, bias, H, W, ws, shift, scale, mask_value, pad_then_shift, need_dbias):
    if need_dbias and bias is not None:
        dbias = torch.empty_like(bias, memory_format=torch.contiguous_format)
    else:
        dbias = q.new_empty((0,))
    return bhnd_empty(q, q.shape[2]), bhnd_empty(k, k.shape[2]), bhnd_empty(v, v.shape[2]), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, H, W, ws, shift, scale, mask_value, pad_then_shift = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, bias)
    ctx.args = (H, W, ws, shift, scale, mask_value, pad_then_shift)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.vitkern.window_bwd(do, q, k, v, o, lse, bias, *ctx.args,
                                                     need_dbias)
    return dq, dk, dv, (dbias if need_dbias else None), None, None, None, None, None, None, None


torch.library.register_autograd("vitkern::window_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------------


def window_attention(q: Tensor, k: Tensor, v: Tensor, *, hw: tuple[int, int], window_size: int,
                     shift: int = 0, rel_pos_bias: Optional[Tensor] = None,
                     mask_value: float = -100.0, scale: Optional[float] = None,
                     pad_order: str = "shift_then_pad", backend: str = "auto") -> Tensor:
    """Swin window attention (W-MSA, or SW-MSA with ``shift > 0``).

    Args:
        q, k, v: (B, heads, N, d), N = H·W tokens in raster order; any strides.
        hw: the map size (H, W).
        window_size: ws. If min(H, W) <= ws the window becomes global (ws = min(H, W)) and the
            shift 0, Swin's rule.
        shift: cyclic shift s in [0, ws) (Swin: ws // 2 in every second block); pairs of tokens
            from different regions of the rolled map get ``mask_value`` added (Swin: -100).
        rel_pos_bias: None, Swin's relative-position table ((2ws-1)², heads) (indexed the Swin
            way), or a dense (heads, ws², ws²) bias; ws is the effective window. Differentiable.
        mask_value: the additive shift mask (<= 0; -100 as in every reference, -inf for a hard
            mask).
        scale: logit scale, default d**-0.5.
        pad_order: for maps not divisible by ws, "shift_then_pad" (timm: roll the map, then pad
            right / bottom) or "pad_then_shift" (mmdet / SparseViT: pad, then roll). Pad tokens
            are unmasked zero keys / values; pad queries are dropped.
        backend: "auto", "triton", "cuda" or "reference" (see :mod:`vitkern.backends`).

    Returns:
        (B, heads, N, d) in the input dtype.
    """
    op = "window_attention"
    H, W, ws, s, scale, mask_value = _check(op, q, k, v, hw, window_size, shift, rel_pos_bias,
                                            mask_value, scale, pad_order)
    name = _backend(op, backend, q, ws)
    if name == "reference" or q.numel() == 0:
        return ref.window_attention(q, k, v, hw=(H, W), window_size=ws, shift=s,
                                    rel_pos_bias=rel_pos_bias, mask_value=mask_value,
                                    scale=scale, pad_order=pad_order)
    return torch.ops.vitkern.window_fwd(q, k, v, rel_pos_bias, H, W, ws, s, scale, mask_value,
                                        pad_order == "pad_then_shift")[0]
