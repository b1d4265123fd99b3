"""Drop-in PPMA attention: the parameters and semantics of PPMA's ``MambaAttentionAllDouble``
(``mode="full"``) and ``MambaAttentionChunkDouble`` (``mode="criss_cross"``) on vitkern's ops."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vitkern.ops import ppma as ppma_ops

__all__ = ["PolylinePathAttention", "PathEmbedding2D", "ppma_rel_pos"]

ppma_rel_pos = ppma_ops.ppma_rel_pos


class _DWConv2d(nn.Module):
    """Depthwise conv on a channels-last (B, H, W, C) map (PPMA's ``DWConv2d``, key ``conv``)."""

    def __init__(self, dim: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PathEmbedding2D(nn.Module):
    """The decay parameters of PPMA's ``PathEmbeding2D``: ``dt_linear`` (Linear(d, 2), no bias,
    shared by the heads), ``dt_bias`` and ``A_log`` (heads,), with PPMA's Mamba2-style inits.

    ``forward(x, backend="auto")``: (B, H, W, C) -> (log_decay_h, log_decay_v), each
    (B, heads, H·W) (:func:`vitkern.ops.ppma.ppma_decays`).
    """

    def __init__(self, embed_dim: int, num_heads: int, A_init_range=(1.0, 1.1), dt_min=0.001,
                 dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        self.num_heads = num_heads
        self.dt_linear = nn.Linear(embed_dim // num_heads, 2, bias=False)
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(*A_init_range).log())
        self.dt_bias._no_weight_decay = True
        self.A_log._no_weight_decay = True

    def forward(self, x: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
        return ppma_ops.ppma_decays(x, self.dt_linear.weight, self.dt_bias, self.A_log,
                                    self.num_heads, backend=backend)


class PolylinePathAttention(nn.Module):
    """Polyline path masked attention (PPMA), loadable from PPMA checkpoints with ``strict=True``.

    Submodules as PPMA: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (Linear with bias),
    ``lepe.conv`` (5×5 depthwise), ``path_embed.{dt_linear, dt_bias, A_log}``.
    ``mode="full"`` is ``MambaAttentionAllDouble`` (N×N attention, both mask directions averaged),
    ``mode="criss_cross"`` is ``MambaAttentionChunkDouble`` (row / column decomposition).

    ``forward(x, rel_pos)``: x (B, H, W, C), rel_pos = (sin, cos) each (H, W, d) as built by
    :meth:`rel_pos` (or PPMA's ``RotaryPositionEmbedding2D``) -> (B, H, W, C).

    Every step runs on vitkern ops: the decays (one fused pass), RoPE on q and k (one fused pass
    each, its own op: not fused into the attention loads), the attention (no N×N mask, no
    per-row / per-column maps in memory). ``backend`` is passed to all of them. The logit scale
    d^-0.5 is applied in the attention instead of to k before RoPE (equal up to rounding).
    """

    def __init__(self, embed_dim: int, num_heads: int, mode: str = "full",
                 backend: str = "auto"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"PolylinePathAttention: embed_dim {embed_dim} is not divisible by "
                             f"num_heads {num_heads}")
        if mode not in ("full", "criss_cross"):
            raise ValueError(f"PolylinePathAttention: mode must be 'full' or 'criss_cross', got "
                             f"{mode!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.mode, self.backend = mode, backend
        self.head_dim = embed_dim // num_heads
        if self.head_dim % 2:
            raise ValueError(f"PolylinePathAttention: head_dim {self.head_dim} must be even (RoPE)")
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.lepe = _DWConv2d(embed_dim, 5, 1, 2)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.path_embed = PathEmbedding2D(embed_dim, num_heads)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, mode={self.mode!r}"

    def rel_pos(self, hw, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """PPMA's RoPE tables (sin, cos) for an (H, W) map, each (H, W, head_dim)."""
        return ppma_rel_pos(hw, self.head_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, rel_pos) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"PolylinePathAttention: x must be (B, H, W, {self.embed_dim}), got "
                             f"{tuple(x.shape)}")
        B, H, W, C = x.shape
        sin, cos = rel_pos
        want = (H, W, self.head_dim)
        if tuple(sin.shape) != want or tuple(cos.shape) != want:
            raise ValueError(f"PolylinePathAttention: rel_pos (sin, cos) must be {want} each, got "
                             f"{tuple(sin.shape)}, {tuple(cos.shape)}")
        a, g = self.path_embed(x, self.backend)
        v = self.v_proj(x)
        lepe = self.lepe(v)

        def heads(t):  # (B, H, W, C) -> (B, heads, N, d) view, no copy
            return t.reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)

        q = ppma_ops.ppma_rope(heads(self.q_proj(x)), sin, cos, backend=self.backend)
        k = ppma_ops.ppma_rope(heads(self.k_proj(x)), sin, cos, backend=self.backend)
        attn = (ppma_ops.ppma_attention if self.mode == "full"
                else ppma_ops.ppma_criss_cross_attention)
        o = attn(q, k, heads(v), a, g, hw=(H, W), scale=self.scaling, backend=self.backend)
        return self.out_proj(o.transpose(1, 2).reshape(B, H, W, C) + lepe)
