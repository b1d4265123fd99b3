"""CUDA C++ Swin window attention forward (``vitkern._C``, csrc/window/): the custom op and the
dispatch reason, for the ``"cuda"`` backend of :func:`vitkern.ops.window_attention`.

Covers inference (no autograd) with the effective window ws = 7 or 12, head_dim 32, fp16 / bf16
(tensor cores), any shift, both pad orders, a Swin table / dense / no relative-position bias,
any mask_value <= 0, no ``active_windows`` and no ``out=``. Everything else is refused with a
reason by :func:`cuda_reason`, so the op falls back to triton.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import bhnd_empty, on_device

__all__ = ["cuda_reason", "window_cuda_forward"]

PAD_ORDER_CODES = {"shift_then_pad": 0, "pad_then_shift": 1}


def cuda_reason(q: Tensor, ws: int, active_windows: Optional[Tensor], needs_grad: bool,
                out: Optional[Tensor] = None) -> Optional[str]:
    """Why the CUDA window kernel refuses these inputs (None when it takes them); ``ws`` is the
    effective (clamped) window."""
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}; the cuda backend needs CUDA tensors"
    return shape_reason(q.dtype, q.shape[-1], ws, active_windows, needs_grad, out)


def shape_reason(dtype, d: int, ws: int, active_windows, needs_grad: bool, out=None) -> Optional[str]:
    """The device-independent part of :func:`cuda_reason`."""
    if needs_grad:
        return "the CUDA window kernel is forward-only (inference); use triton for training"
    if active_windows is not None:
        return "active_windows is not supported by the CUDA window kernel"
    if out is not None:
        return "out= is not supported by the CUDA window kernel"
    from vitkern import _cext

    return _kernel_reason(_cext.DTYPE_CODES.get(str(dtype)[len("torch."):], -1), d, ws) or None


@torch.compiler.assume_constant_result
def _kernel_reason(code: int, d: int, ws: int) -> str:
    """vitkern._C's shape check -> reason ('' when supported); constant under torch.compile."""
    from vitkern import _cext

    mod, why = _cext.load()
    if mod is None:
        return why
    if not hasattr(mod, "window_supported"):
        return "vitkern._C has no window kernel: a stale build, rebuild it (VITKERN_CUDA=1)"
    status, why = mod.window_supported(code, d, ws)
    return why if status else ""


@torch.library.custom_op("vitkern::window_cuda_fwd", mutates_args=())
def _window_cuda_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], H: int, W: int,
                     window_size: int, shift: int, mask_value: float, scale: float,
                     pad_order: str) -> Tensor:
    """o (B, heads, N, d), stored (B, N, heads, d); ``window_size`` / ``shift`` effective ones."""
    from vitkern import _cext

    o = bhnd_empty(q, q.shape[2])
    b = None if bias is None else bias.to(torch.float32)
    with on_device(q):
        _cext.launch("window_fwd", q, k, v, o, b, H, W, window_size, shift,
                     PAD_ORDER_CODES[pad_order], mask_value, scale, device=q.device)
    return o


@_window_cuda_fwd.register_fake
def _(q, k, v, bias, H, W, window_size, shift, mask_value, scale, pad_order):
    return bhnd_empty(q, q.shape[2])


def window_cuda_forward(q: Tensor, k: Tensor, v: Tensor, H: int, W: int, window_size: int,
                        shift: int, rel_pos_bias: Optional[Tensor], mask_value: float,
                        scale: float, pad_order: str) -> Tensor:
    """Run the kernel (inputs validated by the op; ``window_size`` / ``shift`` effective)."""
    return torch.ops.vitkern.window_cuda_fwd(q, k, v, rel_pos_bias, H, W, window_size, shift,
                                             float(mask_value), float(scale), pad_order)
