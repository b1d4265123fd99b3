"""Drop-in HiLo module: LITv2's ``HiLo`` parameters and semantics on vitkern's fused ops."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern import ops

__all__ = ["HiLo"]


def _square_side(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"HiLo: without H and W the map must be square, but N={n} tokens is not "
                         f"a perfect square; pass H and W")
    return side


class HiLo(nn.Module):
    """HiLo attention (LITv2), loadable from LITv2 checkpoints with ``strict=True``.

    Same constructor, submodules (``h_qkv``, ``h_proj``, ``l_q``, ``l_kv``, ``l_proj``), head split
    (``int(num_heads * alpha)`` Lo-Fi heads, all heads Lo-Fi when ``window_size == 1``) and output
    channel order ``[Hi-Fi | Lo-Fi]`` as LITv2. ``attn_drop`` / ``proj_drop`` are accepted and, as in
    LITv2, never applied.

    ``pad=None`` (LITv2 classification) needs H and W divisible by ``window_size`` and raises
    otherwise; ``pad="zero"`` is LITv2's detection / segmentation HiLo (zero-pad right / bottom,
    unmasked, crop). ``backend`` is passed to the ops.

    ``forward(x, H, W)``: x (B, N, C) with N = H·W in raster order -> (B, N, C).
    ``forward(x)`` without H and W takes a square map H = W = sqrt(N), as LITv2's classification
    HiLo does (a ValueError when N is not a perfect square).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, window_size: int = 2, alpha: float = 0.5,
                 pad: Optional[str] = None, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"HiLo: dim {dim} should be divisible by num_heads {num_heads}")
        if pad not in (None, "zero"):
            raise ValueError(f"HiLo: pad must be None or 'zero', got {pad!r}")
        head_dim = int(dim / num_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.l_heads = int(num_heads * alpha)  # LITv2 truncates the float product
        self.l_dim = self.l_heads * head_dim
        self.h_heads = num_heads - self.l_heads
        self.h_dim = self.h_heads * head_dim
        self.ws = window_size
        if self.ws == 1:  # plain global attention: every head Lo-Fi, no pooling
            self.h_heads, self.h_dim = 0, 0
            self.l_heads, self.l_dim = num_heads, dim
        self.scale = qk_scale or head_dim ** -0.5
        self.pad = pad
        self.backend = backend
        if self.l_heads > 0:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads > 0:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hi_heads={self.h_heads}, lo_heads={self.l_heads}, "
                f"window_size={self.ws}, pad={self.pad}")

    def forward(self, x: Tensor, H: Optional[int] = None, W: Optional[int] = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"HiLo: x must be (B, N, {self.dim}), got {tuple(x.shape)}")
        if H is None and W is None:  # LITv2 classification: forward(x) on a square map
            H = W = _square_side(x.shape[1])
        elif H is None or W is None:
            raise ValueError("HiLo: pass both H and W, or neither for a square map")
        if x.shape[1] != H * W:
            raise ValueError(f"HiLo: x has N={x.shape[1]} tokens but H*W={H * W}")
        parts = []
        if self.h_heads > 0:
            parts.append(self._hifi(x, H, W))
        if self.l_heads > 0:
            parts.append(self._lofi(x, H, W))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _hifi(self, x: Tensor, H: int, W: int) -> Tensor:
        B, N, _ = x.shape
        weight, bias = self.h_qkv.weight, self.h_qkv.bias
        proj_bias = self.h_proj.bias
        padded = H % self.ws or W % self.ws
        if padded and self.pad == "zero" and bias is not None:
            # LITv2 pads x, so its pad tokens hold k = b_k, v = b_v, while the op pads k, v with
            # zeros. Drop b_k, b_v from the projection instead: b_k only shifts each query's
            # logits by q·b_k (softmax-invariant) and b_v adds b_v to every output row (the
            # weights sum to 1), which folds into h_proj's bias. Exact, and no padded copy of x.
            b_q, b_k, b_v = bias.split(self.h_dim)
            bias = torch.cat([b_q, torch.zeros_like(b_k), torch.zeros_like(b_v)])
            proj_bias = proj_bias + self.h_proj.weight @ b_v
        qkv = F.linear(x, weight, bias).unflatten(-1, (3, self.h_heads, self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, no copy
        o = ops.hifi_attention(q, k, v, hw=(H, W), window_size=self.ws, scale=self.scale,
                               pad=self.pad, backend=self.backend)
        return F.linear(o.transpose(1, 2).reshape(B, N, self.h_dim), self.h_proj.weight,
                        proj_bias)

    def _lofi(self, x: Tensor, H: int, W: int) -> Tensor:
        B, N, C = x.shape
        q = self.l_q(x).unflatten(-1, (self.l_heads, self.head_dim)).transpose(1, 2)
        if self.ws > 1:
            # Pool x before the kv projection, as LITv2 does (s² fewer tokens to project).
            # ceil_mode + divisor s² = zero padding to a multiple of s, without a padded copy.
            x_map = x.view(B, H, W, C).permute(0, 3, 1, 2)
            pooled = F.avg_pool2d(x_map, self.ws, self.ws, ceil_mode=True,
                                  divisor_override=self.ws * self.ws)
            x_kv = pooled.flatten(2).transpose(1, 2)
        else:
            x_kv = x
        kv = self.l_kv(x_kv).unflatten(-1, (2, self.l_heads, self.head_dim))
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        o = ops.lofi_attention(q, k, v, hw=(H, W), window_size=self.ws, scale=self.scale,
                               pad=self.pad, kv_pooled=self.ws > 1, backend=self.backend)
        return self.l_proj(o.transpose(1, 2).reshape(B, N, self.l_dim))

    def flops(self, H: int, W: Optional[int] = None) -> int:
        """Multiply-accumulates of projections and attention matmuls, as LITv2's helper counts.

        ``flops(H, W)`` for an H×W map; ``flops(N)`` (one argument) for a square map of N
        tokens, the signature of LITv2's own ``HiLo.flops(N)`` (its blocks call it that way)."""
        if W is None:
            H = W = _square_side(H)
        s = self.ws
        Hp, Wp = -(-H // s) * s, -(-W // s) * s
        Np = Hp * Wp
        n_win = (Hp // s) * (Wp // s)
        hifi = Np * self.dim * 3 * self.h_dim + n_win * (s * s) ** 2 * 2 * self.h_dim \
            + Np * self.h_dim ** 2
        lofi = Np * self.dim * self.l_dim + n_win * self.dim * 2 * self.l_dim \
            + Np * self.l_dim * n_win * 2 + Np * self.l_dim ** 2
        return hifi + lofi  # each term is 0 when its branch has no heads
