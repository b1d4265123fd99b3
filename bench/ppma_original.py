"""PPMA's attention layers written out in plain PyTorch: the benchmark baseline and the parity oracle.

A from-the-spec rewrite (``specs/hilo-ppma.md`` part 2, sections 2.2-2.6) of the two attention
classes of zhongchenzhao/PPMA (NeurIPS 2025), keeping what a checkpoint or a benchmark observes:

* the parameter names and shapes (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``lepe.conv``,
  ``path_embed.dt_linear``, ``path_embed.dt_bias``, ``path_embed.A_log``);
* the op sequence and memory behaviour of the original forward: the decays through a shared
  Linear(d, 2) + softplus, 1D log-masks from cumulative sums and triangle masks, and — for the full
  layer — the (B, heads, N, N) log-mask assembled by broadcasting the row and column masks to
  (B, heads, H, H, W, W) and permuting, two softmaxes over the masked logits averaged, the matmul
  with v; for the criss-cross layer per-row and per-column attention maps applied in both orders.
  k is scaled by d^-0.5 before RoPE, as in PPMA.

``PPMAFullAttention`` is ``MambaAttentionAllDouble``, ``PPMACrissCrossAttention`` is
``MambaAttentionChunkDouble``; ``ppma_rotary(hw, head_dim)`` returns the ``(sin, cos)`` PPMA's
``RotaryPositionEmbedding2D`` builds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PPMAFullAttention", "PPMACrissCrossAttention", "ppma_rotary", "randomize_",
           "ppma_original_attention", "ppma_original_criss_cross"]


def ppma_rotary(hw, head_dim: int, device=None, dtype=torch.float32):
    """(sin, cos), each (H, W, head_dim): 1D RoPE over the raster index, interleaved pairs."""
    H, W = hw
    freq = (1.0 / 10000 ** torch.linspace(0, 1, head_dim // 2)).repeat_interleave(2)
    freq = freq.to(device=device, dtype=dtype)
    ang = torch.arange(H * W, device=device, dtype=dtype)[:, None] * freq
    return ang.sin().view(H, W, head_dim), ang.cos().view(H, W, head_dim)


def _rotate(x, sin, cos):
    pairs = x.unflatten(-1, (-1, 2))
    rot = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
    return x * cos + rot * sin


def _segment_sums(z):
    """(..., n) -> (..., n, n) log-mask: sums of z over (min, max] via cumulative sums."""
    n = z.shape[-1]
    c = z.cumsum(-1)
    down = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool, device=z.device).tril(), 0.0)
    up = (c.unsqueeze(-2) - c.unsqueeze(-1)).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool, device=z.device).triu(1), 0.0)
    return down + up


class _DW(nn.Module):
    def __init__(self, dim, k):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)

    def forward(self, x):  # channels-last
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class _PathEmbed(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.dt_linear = nn.Linear(dim // heads, 2, bias=False)
        dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 1.1).log())

    def masks(self, x):
        """Row masks (B, H, heads, W, W) and column masks (B, W, heads, H, H)."""
        B, H, W, C = x.shape
        dt = self.dt_linear(x.reshape(B, H, W, self.heads, C // self.heads))  # (B,H,W,heads,2)
        A = -torch.exp(self.A_log)
        horiz = F.softplus(dt[..., 0] + self.dt_bias) * A  # (B, H, W, heads)
        vert = F.softplus(dt[..., 1] + self.dt_bias) * A
        return (_segment_sums(horiz.permute(0, 1, 3, 2).contiguous()),
                _segment_sums(vert.permute(0, 2, 3, 1).contiguous()))

    def full_mask(self, x):
        """(B, heads, N, N) log-mask of the V2H path (query rows, key columns)."""
        B, H, W, _ = x.shape
        sw, sh = self.masks(x)
        sw = sw.permute(0, 2, 1, 3, 4).unsqueeze(3).expand(-1, -1, -1, H, -1, -1)  # b n r1 r2 c1 c2
        sh = sh.permute(0, 2, 3, 4, 1).unsqueeze(-2).expand(-1, -1, -1, -1, W, -1)  # same
        full = (sw + sh).permute(0, 1, 2, 4, 3, 5).contiguous()
        return full.view(B, self.heads, H * W, H * W)


class _PPMABase(nn.Module):
    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.lepe = _DW(embed_dim, 5)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.path_embed = _PathEmbed(embed_dim, num_heads)

    def _qkv(self, x, rel_pos):
        B, H, W, C = x.shape
        sin, cos = rel_pos
        v = self.v_proj(x)
        split = lambda t: t.view(B, H, W, self.num_heads, -1).permute(0, 3, 1, 2, 4)  # noqa: E731
        q = _rotate(split(self.q_proj(x)), sin, cos)
        k = _rotate(split(self.k_proj(x) * self.scaling), sin, cos)
        return q, k, split(v), self.lepe(v)


class PPMAFullAttention(_PPMABase):
    """``MambaAttentionAllDouble``: full attention with the materialised N×N polyline mask."""

    def forward(self, x, rel_pos):
        B, H, W, C = x.shape
        mask = self.path_embed.full_mask(x)
        q, k, v, lepe = self._qkv(x, rel_pos)
        logits = q.flatten(2, 3) @ k.flatten(2, 3).transpose(-1, -2)
        attn = 0.5 * torch.softmax(logits + mask, -1) + 0.5 * torch.softmax(
            logits + mask.transpose(-1, -2), -1)
        out = (attn @ v.flatten(2, 3)).transpose(1, 2).reshape(B, H, W, C)
        return self.out_proj(out + lepe)


class PPMACrissCrossAttention(_PPMABase):
    """``MambaAttentionChunkDouble``: per-row and per-column masked attention, both orders."""

    def forward(self, x, rel_pos):
        B, H, W, C = x.shape
        sw, sh = self.path_embed.masks(x)  # (B, H, n, W, W), (B, W, n, H, H)
        q, k, v, lepe = self._qkv(x, rel_pos)  # (B, n, H, W, d)
        rows = lambda t: t.transpose(1, 2)  # (B, H, n, W, d)  # noqa: E731
        cols = lambda t: t.permute(0, 3, 1, 2, 4)  # (B, W, n, H, d)  # noqa: E731
        aw = torch.softmax(rows(q) @ rows(k).transpose(-1, -2) + sw, -1)
        ah = torch.softmax(cols(q) @ cols(k).transpose(-1, -2) + sh, -1)
        a = ah @ (aw @ rows(v)).permute(0, 3, 2, 1, 4)  # row then column: (B, W, n, H, d)
        b = aw @ (ah @ cols(v)).permute(0, 3, 2, 1, 4)  # column then row: (B, H, n, W, d)
        out = 0.5 * a.permute(0, 3, 1, 2, 4) + 0.5 * b.transpose(2, 3)
        return self.out_proj(out.reshape(B, H, W, C) + lepe)


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Random parameters (deterministic) so that parity tests exercise every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def ppma_original_attention(q, k, v, log_decay_h, log_decay_v, *, hw, scale=None):
    """The core of ``MambaAttentionAllDouble`` as an op on (B, heads, N, d) inputs and
    (B, heads, N) log-decays: the fp32 (B, heads, N, N) mask assembled by broadcasting as PPMA
    does, two softmaxes over the masked logits, averaged, times v. The benchmark's "original"."""
    H, W = hw
    B, h, N, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    sw = _segment_sums(log_decay_h.float().reshape(B, h, H, W))                  # b n r1 c1 c2
    sh = _segment_sums(log_decay_v.float().reshape(B, h, H, W).transpose(-1, -2))  # b n c2 r1 r2
    sw = sw.unsqueeze(3).expand(-1, -1, -1, H, -1, -1)                    # b n r1 r2 c1 c2
    sh = sh.permute(0, 1, 3, 4, 2).unsqueeze(-2).expand(-1, -1, -1, -1, W, -1)  # b n r1 r2 c1 c2
    mask = (sw + sh).permute(0, 1, 2, 4, 3, 5).reshape(B, h, N, N)
    logits = q @ (k * scale).transpose(-1, -2)
    attn = 0.5 * torch.softmax(logits + mask, -1) + 0.5 * torch.softmax(
        logits + mask.transpose(-1, -2), -1)
    return attn.to(v.dtype) @ v


def ppma_original_criss_cross(q, k, v, log_decay_h, log_decay_v, *, hw, scale=None):
    """The core of ``MambaAttentionChunkDouble`` as an op: per-row (B, heads, H, W, W) and
    per-column (B, heads, W, H, H) masked softmax maps materialised, applied in both orders."""
    H, W = hw
    B, h, N, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    sw = _segment_sums(log_decay_h.float().reshape(B, h, H, W))
    sh = _segment_sums(log_decay_v.float().reshape(B, h, H, W).transpose(-1, -2))
    qm, km, vm = (t.reshape(B, h, H, W, d) for t in (q, k, v))
    aw = torch.softmax(qm @ (km * scale).transpose(-1, -2) + sw, -1).to(v.dtype)
    qc, kc, vc = (t.transpose(2, 3) for t in (qm, km, vm))
    ah = torch.softmax(qc @ (kc * scale).transpose(-1, -2) + sh, -1).to(v.dtype)
    a = ah @ (aw @ vm).transpose(2, 3)
    b = aw @ (ah @ vc).transpose(2, 3)
    return (0.5 * a.transpose(2, 3) + 0.5 * b).reshape(B, h, N, d)
