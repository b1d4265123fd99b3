"""HiLo attention (LITv2), the definition: pure PyTorch, differentiable, any float dtype.

Layout: q, k, v are (B, heads, N, d) with N = H·W tokens in raster order (n = r·W + c).

* Hi-Fi heads: softmax attention inside each non-overlapping s×s window (s = ``window_size``).
* Lo-Fi heads: every query attends to the s×s average-pooled keys and values
  (M = (H/s)·(W/s) of them).
* ``pad="zero"`` (LITv2's detection/segmentation HiLo): a map whose H or W is not a multiple of
  s is zero-padded on the right and bottom; pad tokens are ordinary (unmasked) keys and values
  equal to zero, border pooled keys divide by s² including the zeros, pad queries are dropped.

This is also vitkern's CPU path: windows are a reshape, Lo-Fi pools with ``avg_pool2d`` and uses
``F.scaled_dot_product_attention`` (fused on the CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hilo_attention", "hifi_attention", "lofi_attention", "pool_kv", "padded_hw"]


def padded_hw(hw: tuple[int, int], window_size: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of the window size."""
    s = window_size
    return -(-hw[0] // s) * s, -(-hw[1] // s) * s


def _pad_map(t: torch.Tensor, hw, hw_padded) -> torch.Tensor:
    """(B, h, N, d) -> (B, h, Hp, Wp, d), zero-padded right / bottom."""
    (H, W), (Hp, Wp) = hw, hw_padded
    t = t.unflatten(2, (H, W))
    if (Hp, Wp) != (H, W):
        t = F.pad(t, (0, 0, 0, Wp - W, 0, Hp - H))
    return t


def hifi_attention(q, k, v, *, hw, window_size, scale=None, pad=None):
    """Softmax attention inside s×s windows for every head. Returns (B, heads, N, d)."""
    B, h, N, d = q.shape
    s = window_size
    H, W = hw
    Hp, Wp = padded_hw(hw, s)

    def windows(t):  # (B, h, N, d) -> (B, h, nWh, nWw, s*s, d)
        t = _pad_map(t, hw, (Hp, Wp)).reshape(B, h, Hp // s, s, Wp // s, s, d)
        return t.transpose(3, 4).reshape(B, h, Hp // s, Wp // s, s * s, d)

    # Plain matmul-softmax-matmul: for windows of 4 or 16 tokens it beats SDPA's per-problem
    # overhead on the CPU.
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = torch.softmax((windows(q) @ windows(k).transpose(-1, -2)) * scale, dim=-1)
    o = (attn @ windows(v)).reshape(B, h, Hp // s, Wp // s, s, s, d)
    o = o.transpose(3, 4).reshape(B, h, Hp, Wp, d)
    return o[:, :, :H, :W].reshape(B, h, N, d)


def pool_kv(t: torch.Tensor, *, hw, window_size) -> torch.Tensor:
    """s×s average pooling of a (B, h, N, d) map -> (B, h, M, d); zero-padded, divisor s².

    ``ceil_mode`` with ``divisor_override = s²`` is exactly "zero-pad to a multiple of s, then
    average", without the padded copy.
    """
    B, h, _, d = t.shape
    s = window_size
    maps = t.reshape(B * h, hw[0], hw[1], d).permute(0, 3, 1, 2)  # channels-last view
    pooled = F.avg_pool2d(maps, s, s, ceil_mode=True, divisor_override=s * s)
    m = pooled.shape[2] * pooled.shape[3]
    return pooled.permute(0, 2, 3, 1).reshape(B, h, m, d)


def lofi_attention(q, k, v, *, hw, window_size, scale=None, pad=None, kv_pooled=False):
    """Every query attends to s×s-pooled k, v (or to k, v as given if ``kv_pooled``)."""
    if not kv_pooled and window_size > 1:
        k = pool_kv(k, hw=hw, window_size=window_size)
        v = pool_kv(v, hw=hw, window_size=window_size)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def hilo_attention(q, k, v, *, hw, window_size, num_lo_heads, scale=None, pad=None):
    """Heads [0, heads - num_lo_heads) are Hi-Fi, the last ``num_lo_heads`` are Lo-Fi."""
    n_hi = q.shape[1] - num_lo_heads
    parts = []
    if n_hi > 0:
        parts.append(hifi_attention(q[:, :n_hi], k[:, :n_hi], v[:, :n_hi], hw=hw,
                                    window_size=window_size, scale=scale, pad=pad))
    if num_lo_heads > 0:
        parts.append(lofi_attention(q[:, n_hi:], k[:, n_hi:], v[:, n_hi:], hw=hw,
                                    window_size=window_size, scale=scale, pad=pad))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
