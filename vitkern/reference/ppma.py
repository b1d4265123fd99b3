"""Polyline path masked attention (PPMA, NeurIPS 2025), the definition: pure PyTorch, any float dtype.

Layout: q, k, v are (B, heads, N, d) with N = H·W tokens in raster order (n = r·W + c); the
per-token log-decays ``log_decay_h`` (a, horizontal) and ``log_decay_v`` (g, vertical) are
(B, heads, N). PPMA's decays are negative (a = -exp(A_log)·softplus(·)), but nothing here needs it.

1D structured log-mask of a sequence z (``structured_mask_1d``):
``S[i, j] = Σ_{k = min(i,j)+1}^{max(i,j)} z_k`` (0 on the diagonal), i.e. with prefix sums
``c = cumsum(z)``: ``S[i, j] = c[max] - c[min]``.

2D polyline path log-mask for query t = (r1, c1) and key s = (r2, c2) (``ppma_log_mask``)::

    log L[t, s] = S^W_{r1}[c1, c2] + S^H_{c2}[r1, r2]

S^W_r built from the a's of row r, S^H_c from the g's of column c: a horizontal segment along the
query's row, then a vertical one along the key's column. Its transpose L~ = Lᵀ is the other
direction (corner at (r2, c1)).

Full ("vanilla") attention (``ppma_attention``, PPMA's ``MambaAttentionAllDouble``)::

    O = ½·softmax(scale·q kᵀ + log L)·v + ½·softmax(scale·q kᵀ + log Lᵀ)·v

Criss-cross attention (``ppma_criss_cross_attention``, ``MambaAttentionChunkDouble``): one
softmax inside every row (with S^W) and one inside every column (with S^H), both two-hop orders
(row then column, column then row) averaged.

This module materialises the N×N mask: it is the definition the kernels are tested against and
the CPU path, not a fast implementation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ppma_decays", "structured_mask_1d", "ppma_log_mask", "ppma_attention",
           "ppma_criss_cross_attention", "ppma_rel_pos", "ppma_rope"]


def ppma_decays(x: Tensor, dt_weight: Tensor, dt_bias: Tensor, A_log: Tensor,
                num_heads: int) -> tuple[Tensor, Tensor]:
    """Per-token, per-head log-decays of PPMA's ``PathEmbeding2D``.

    x: (B, ..., C) channels-last (e.g. (B, H, W, C)), C = heads·d, the head-h slice is channels
    [h·d, (h+1)·d); dt_weight: (2, d) (``dt_linear.weight``, shared by the heads); dt_bias,
    A_log: (heads,). Returns (a, g), each (B, heads, N) with N the product of the middle dims::

        u = dt_weight · x_{t,h};  a = -exp(A_log_h)·softplus(u_0 + dt_bias_h);
                                  g = -exp(A_log_h)·softplus(u_1 + dt_bias_h)
    """
    B, C = x.shape[0], x.shape[-1]
    u = x.reshape(B, -1, num_heads, C // num_heads) @ dt_weight.t()  # (B, N, heads, 2)
    A = -torch.exp(A_log)
    a = F.softplus(u[..., 0] + dt_bias) * A
    g = F.softplus(u[..., 1] + dt_bias) * A
    return a.transpose(1, 2), g.transpose(1, 2)


def structured_mask_1d(z: Tensor) -> Tensor:
    """(..., n) -> (..., n, n): S[i, j] = cumsum(z)[max(i, j)] - cumsum(z)[min(i, j)]."""
    c = torch.cumsum(z, dim=-1)
    diff = c[..., :, None] - c[..., None, :]  # c_i - c_j
    n = z.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=z.device).tril()
    return torch.where(lower, diff, -diff)  # i >= j: c_i - c_j; i < j: c_j - c_i


def _row_col_masks(log_decay_h: Tensor, log_decay_v: Tensor, hw) -> tuple[Tensor, Tensor]:
    """S^W (B, h, H, W, W) from the a's of every row, S^H (B, h, W, H, H) from the g's of every
    column."""
    H, W = hw
    a = log_decay_h.unflatten(-1, (H, W))
    g = log_decay_v.unflatten(-1, (H, W))
    return structured_mask_1d(a), structured_mask_1d(g.transpose(-1, -2))


def ppma_log_mask(log_decay_h: Tensor, log_decay_v: Tensor, *, hw) -> Tensor:
    """log L of the V2H polyline path mask, (B, heads, N, N) (query rows, key columns)."""
    H, W = hw
    sw, sh = _row_col_masks(log_decay_h, log_decay_v, hw)
    # L[(r1, c1), (r2, c2)] = S^W[r1, c1, c2] + S^H[c2, r1, r2]
    full = sw[:, :, :, :, None, :] + sh.permute(0, 1, 3, 4, 2)[:, :, :, None, :, :]
    return full.reshape(*full.shape[:2], H * W, H * W)


def _scale(scale: Optional[float], d: int) -> float:
    return d ** -0.5 if scale is None else scale


def ppma_attention(q: Tensor, k: Tensor, v: Tensor, log_decay_h: Tensor, log_decay_v: Tensor,
                   *, hw, scale: Optional[float] = None) -> Tensor:
    """Full polyline-path-masked attention, (B, heads, N, d): both mask directions, each
    softmax renormalised separately, averaged 50/50."""
    logits = (q @ k.transpose(-1, -2)) * _scale(scale, q.shape[-1])
    mask = ppma_log_mask(log_decay_h, log_decay_v, hw=hw).to(logits.dtype)
    p = (0.5 * torch.softmax(logits + mask, -1)
         + 0.5 * torch.softmax(logits + mask.transpose(-1, -2), -1))
    return p @ v


def ppma_criss_cross_attention(q: Tensor, k: Tensor, v: Tensor, log_decay_h: Tensor,
                               log_decay_v: Tensor, *, hw, scale: Optional[float] = None) -> Tensor:
    """Criss-cross (decomposed) polyline-path-masked attention, (B, heads, N, d).

    Aw_r = softmax(scale·q_row kᵀ_row + S^W_r) inside each row r, Ah_c likewise inside each
    column c with S^H_c; O = ½·Ah(Aw v) + ½·Aw(Ah v).
    """
    H, W = hw
    B, h, N, d = q.shape
    sc = _scale(scale, d)
    sw, sh = _row_col_masks(log_decay_h, log_decay_v, hw)
    qm, km, vm = (t.unflatten(2, (H, W)) for t in (q, k, v))  # (B, h, H, W, d)
    aw = torch.softmax((qm @ km.transpose(-1, -2)) * sc + sw.to(q.dtype), -1)  # (B, h, H, W, W)
    qc, kc, vc = (t.transpose(2, 3) for t in (qm, km, vm))  # (B, h, W, H, d)
    ah = torch.softmax((qc @ kc.transpose(-1, -2)) * sc + sh.to(q.dtype), -1)  # (B, h, W, H, H)
    row_then_col = ah @ (aw @ vm).transpose(2, 3)  # (B, h, W, H, d)
    col_then_row = aw @ (ah @ vc).transpose(2, 3)  # (B, h, H, W, d)
    out = 0.5 * row_then_col.transpose(2, 3) + 0.5 * col_then_row
    return out.reshape(B, h, N, d)


def ppma_rel_pos(hw, head_dim: int, *, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """PPMA's RoPE tables ``(sin, cos)``, each (H, W, head_dim).

    A 1D rotary embedding over the raster index p = r·W + c (despite the 2D map), frequencies
    θ_m = 10000^(-m / (d/2 - 1)), m < d/2 (``linspace(0, 1, d/2)``), each used by one interleaved
    pair of channels (2m, 2m+1).
    """
    H, W = hw
    if head_dim % 2:
        raise ValueError(f"ppma_rel_pos: head_dim must be even, got {head_dim}")
    # As PPMA: the frequencies are an fp32 buffer (later cast with the module), the angles are
    # computed in the module's dtype.
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2, device=device))
    angle = angle.repeat_interleave(2).to(dtype)
    pos = torch.arange(H * W, device=device).to(angle)[:, None] * angle[None, :]
    return torch.sin(pos).reshape(H, W, head_dim), torch.cos(pos).reshape(H, W, head_dim)


def ppma_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """PPMA's ``theta_shift``: x·cos + rot(x)·sin, rot pairing (x_2m, x_2m+1) -> (-x_2m+1, x_2m).

    x: (B, heads, N, d); sin, cos: (H, W, d) or (N, d).
    """
    d = x.shape[-1]
    sin, cos = sin.reshape(-1, d), cos.reshape(-1, d)
    rot = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * cos + rot * sin

