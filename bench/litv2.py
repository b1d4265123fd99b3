"""LITv2's HiLo attention written out in plain PyTorch: the benchmark baseline and the parity oracle.

This is a from-the-spec rewrite of the ``HiLo`` module of ziplab/LITv2 (NeurIPS 2022), following
``specs/hilo-ppma.md`` part 1 (sections 1.2-1.5 and 1.7). It keeps everything a checkpoint or a
parity test can observe:

* the constructor signature (plus ``pad``), the derived head split
  ``l_heads = int(num_heads * alpha)`` (float product, truncated) with the ``window_size == 1``
  override (all heads Lo-Fi, no pooling), ``scale = qk_scale or head_dim ** -0.5``;
* the submodule names ``h_qkv``, ``h_proj``, ``l_q``, ``l_kv``, ``l_proj``, ``sr`` and which of
  them exist, so state_dicts load with ``strict=True`` in both directions against LITv2 and
  ``vitkern.nn.HiLo``;
* the op sequence of the original forward (window partition by reshape/transpose, the fused
  projections split by reshape/permute, ``AvgPool2d`` on the input map *before* ``l_kv``,
  ``matmul`` / ``softmax`` / ``matmul``, per-branch projections, ``[Hi-Fi | Lo-Fi]`` concat, no
  joint projection, no dropout even when ``attn_drop`` / ``proj_drop`` are given);
* ``flops(H, W)``: LITv2's multiply-accumulate count (section 1.7).

``pad`` picks which of LITv2's copies is reproduced (the spec's section 1.5):

* ``pad=False`` -- the classification / ``hilo.py`` demo copy: no padding. A map whose H or W is
  not a multiple of the window size makes the Hi-Fi window reshape raise ``RuntimeError``; with no
  Hi-Fi heads (``alpha`` = 1) Lo-Fi still runs and ``AvgPool2d`` (floor mode) drops the last
  partial row/column of keys and values.
* ``pad=True`` -- the detection / segmentation copy: the (B, H, W, C) input is zero-padded on the
  right and bottom to multiples of the window size, both branches run on the padded map without
  any mask (pad tokens are real keys/values, ``k = b_k``, ``v = b_v``), and each branch's output is
  cropped back to (H, W) before the concat.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LITv2HiLo", "litv2_head_split", "litv2_hilo_flops", "init_like_litv2", "randomize_",
    "litv2_pool_kv", "litv2_hifi_attention", "litv2_lofi_attention", "litv2_hilo_attention",
]


def litv2_head_split(num_heads: int, alpha: float, window_size: int) -> tuple[int, int]:
    """``(h_heads, l_heads)`` exactly as LITv2 derives them.

    ``l_heads = int(num_heads * alpha)`` (plain float product, truncation toward zero, never
    ``round``); the rest are Hi-Fi heads; ``window_size == 1`` overrides alpha: every head is Lo-Fi.
    """
    l_heads = int(num_heads * alpha)
    h_heads = num_heads - l_heads
    if window_size == 1:
        h_heads, l_heads = 0, num_heads
    return h_heads, l_heads


def litv2_hilo_flops(H: int, W: int, dim: int, num_heads: int, window_size: int, alpha: float) -> int:
    """LITv2's ``HiLo.flops(H, W)``: multiply-accumulates of projections and attention matmuls.

    Counted on the padded map (``Hp = s * ceil(H / s)``, same for W), ``Np = Hp * Wp``,
    ``nW = (Hp / s) * (Wp / s)``; softmax and pooling are not counted::

        hifi = Np*dim*3*h_dim + nW*(s^2)^2*2*h_dim + Np*h_dim^2
        lofi = Np*dim*l_dim + nW*dim*2*l_dim + Np*l_dim*nW*2 + Np*l_dim^2

    (For ``s == 1``, ``nW = Np``: Lo-Fi is plain global attention.)
    """
    head_dim = dim // num_heads
    h_heads, l_heads = litv2_head_split(num_heads, alpha, window_size)
    h_dim, l_dim = h_heads * head_dim, l_heads * head_dim
    s = window_size
    Hp, Wp = s * math.ceil(H / s), s * math.ceil(W / s)
    Np = Hp * Wp
    nW = (Hp // s) * (Wp // s)
    hifi = Np * dim * 3 * h_dim + nW * (s * s) ** 2 * 2 * h_dim + Np * h_dim * h_dim
    lofi = Np * dim * l_dim + nW * dim * 2 * l_dim + Np * l_dim * nW * 2 + Np * l_dim * l_dim
    return int(hifi + lofi)


class LITv2HiLo(nn.Module):
    """HiLo attention as in ziplab/LITv2, in plain PyTorch (see the module docstring).

    Args mirror LITv2's ``HiLo`` (``attn_drop`` / ``proj_drop`` are accepted and ignored, like the
    original); ``pad`` selects the detection copy's zero-pad-and-crop behaviour.
    ``forward(x, H, W)``: x is (B, N, C) with N = H*W tokens in raster order; returns (B, N, C).
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                 window_size=2, alpha=0.5, pad=False):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} should be divided by num_heads {num_heads}."
        head_dim = int(dim / num_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.alpha = alpha

        self.l_heads = int(num_heads * alpha)
        self.l_dim = self.l_heads * head_dim
        self.h_heads = num_heads - self.l_heads
        self.h_dim = self.h_heads * head_dim
        self.ws = window_size
        if self.ws == 1:
            # s = 1: windows of one token are pointless; LITv2 turns the layer into global MHSA.
            self.h_heads = 0
            self.h_dim = 0
            self.l_heads = num_heads
            self.l_dim = dim
        self.scale = qk_scale or head_dim ** -0.5
        self.pad = bool(pad)

        if self.l_heads > 0:
            if self.ws != 1:
                self.sr = nn.AvgPool2d(kernel_size=window_size, stride=window_size)
            self.l_q = nn.Linear(self.dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(self.dim, self.l_dim * 2, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)

        if self.h_heads > 0:
            self.h_qkv = nn.Linear(self.dim, self.h_dim * 3, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, h_heads={self.h_heads}, "
                f"l_heads={self.l_heads}, window_size={self.ws}, pad={self.pad}")

    # -- Hi-Fi: softmax attention inside non-overlapping ws x ws windows ---------------------------
    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        s = self.ws
        h_group, w_group = H // s, W // s
        total_groups = h_group * w_group
        # (B, H, W, C) -> (B, H/s, W/s, s, s, C); raises RuntimeError when s does not divide H, W.
        x = x.reshape(B, h_group, s, w_group, s, C).transpose(2, 3)
        # h_qkv channel = part * h_dim + head * d + j, part in (q, k, v)
        qkv = self.h_qkv(x).reshape(B, total_groups, -1, 3, self.h_heads, self.h_dim // self.h_heads)
        qkv = qkv.permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h_heads, s*s, d)
        q, k, v = qkv[0], qkv[1], qkv[2]

        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = (attn @ v).transpose(2, 3).reshape(B, h_group, w_group, s, s, self.h_dim)
        x = attn.transpose(2, 3).reshape(B, h_group * s, w_group * s, self.h_dim)
        return self.h_proj(x)

    # -- Lo-Fi: every query attends to the ws x ws average-pooled map ------------------------------
    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        d = self.l_dim // self.l_heads
        q = self.l_q(x).reshape(B, H * W, self.l_heads, d).permute(0, 2, 1, 3)
        if self.ws > 1:
            # pool the input (channels-first), then project: k, v of (H/s)*(W/s) pooled tokens
            x_ = x.permute(0, 3, 1, 2)
            x_ = self.sr(x_).reshape(B, C, -1).permute(0, 2, 1)
            kv = self.l_kv(x_).reshape(B, -1, 2, self.l_heads, d).permute(2, 0, 3, 1, 4)
        else:
            kv = self.l_kv(x).reshape(B, -1, 2, self.l_heads, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]

        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, H, W, self.l_dim)
        return self.l_proj(x)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = x.reshape(B, H, W, C)

        if self.pad:
            # detection / segmentation copy: zero-pad right and bottom (no mask), crop afterwards
            pad_r = (self.ws - W % self.ws) % self.ws
            pad_b = (self.ws - H % self.ws) % self.ws
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))

        if self.h_heads == 0:
            x = self.lofi(x)
            if self.pad:
                x = x[:, :H, :W, :]
            return x.reshape(B, N, C)

        if self.l_heads == 0:
            x = self.hifi(x)
            if self.pad:
                x = x[:, :H, :W, :]
            return x.reshape(B, N, C)

        hifi_out = self.hifi(x)
        lofi_out = self.lofi(x)
        if self.pad:
            hifi_out = hifi_out[:, :H, :W, :]
            lofi_out = lofi_out[:, :H, :W, :]

        x = torch.cat((hifi_out, lofi_out), dim=-1)
        return x.reshape(B, N, C)

    def flops(self, H: int, W: int) -> int:
        """Multiply-accumulates of one forward on an H x W map (LITv2's count, spec section 1.7)."""
        s = self.ws
        Hp, Wp = s * math.ceil(H / s), s * math.ceil(W / s)
        Np = Hp * Wp
        nW = (Hp // s) * (Wp // s)
        hifi = Np * self.dim * 3 * self.h_dim + nW * (s * s) ** 2 * 2 * self.h_dim + Np * self.h_dim ** 2
        lofi = (Np * self.dim * self.l_dim + nW * self.dim * 2 * self.l_dim
                + Np * self.l_dim * nW * 2 + Np * self.l_dim ** 2)
        return int(hifi + lofi)


def init_like_litv2(module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> nn.Module:
    """LITv2's init (section 1.6): every Linear gets trunc_normal(std 0.02), zero bias.

    Benchmarks use random non-zero biases instead (``randomize_``) so that a bias bug shows up.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


@torch.no_grad()
def randomize_(module: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Fill every parameter with seeded N(0, std) values (weights and biases), for parity checks."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p) * std)
    return module


# -------------------------------------------------------------------------------------------------
# LITv2's attention math at the op level: q, k, v of shape (B, heads, N, d), N = H*W in raster order
# -------------------------------------------------------------------------------------------------
# These functions are the "original PyTorch" baseline of the op benchmarks: the same
# matmul / softmax / matmul and AvgPool2d that LITv2's HiLo runs, but taking already projected
# q, k, v (the layout of ``vitkern.ops.hilo_attention``). Two differences from the module are
# inherent to the op layout and documented here:
#   * LITv2 partitions x into windows *before* ``h_qkv``, so its q, k, v come out windowed for free;
#     from raster-order q, k, v the window partition is an explicit copy (reshape/permute).
#   * LITv2 pools x before ``l_kv``; here k and v are pooled (exactly equal in real arithmetic since
#     the projection is affine, spec section 1.3).
# ``pad=True`` zero-pads q, k, v on the right/bottom (pad keys are unmasked zeros at the op level:
# at the module level a zero *input* gives k = b_k, v = b_v) and crops the output.

def _as_map(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    B, h, N, d = t.shape
    if N != H * W:
        raise ValueError(f"N = {N} does not match hw = ({H}, {W})")
    return t.reshape(B, h, H, W, d)


def _pad_map(t: torch.Tensor, s: int, pad: bool) -> torch.Tensor:
    """(B, h, H, W, d) -> zero-padded right/bottom to multiples of s when ``pad``."""
    if not pad:
        return t
    H, W = t.shape[2], t.shape[3]
    pad_b, pad_r = (s - H % s) % s, (s - W % s) % s
    if pad_b or pad_r:
        t = F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
    return t


def litv2_pool_kv(t: torch.Tensor, hw: tuple[int, int], window_size: int, pad: bool = False) -> torch.Tensor:
    """AvgPool2d(s, s) of a (B, h, N, d) raster map -> (B, h, M, d), M = (Hp/s)*(Wp/s).

    With ``pad`` the map is zero-padded first (a border pooled token averages over all s*s slots);
    without it AvgPool2d's floor mode drops a partial last row/column, as in LITv2's classification copy.
    """
    H, W = hw
    B, h, N, d = t.shape
    s = window_size
    m = _pad_map(_as_map(t, H, W), s, pad)                     # (B, h, Hp, Wp, d)
    Hp, Wp = m.shape[2], m.shape[3]
    m = m.permute(0, 1, 4, 2, 3).reshape(B * h, d, Hp, Wp)     # channels-first, like LITv2's sr
    m = F.avg_pool2d(m, kernel_size=s, stride=s)
    return m.reshape(B, h, d, -1).transpose(-2, -1)


def litv2_hifi_attention(q, k, v, *, hw, window_size, scale=None, pad=False):
    """LITv2 Hi-Fi math on every head: softmax(scale q k^T) v inside non-overlapping s x s windows."""
    H, W = hw
    B, h, N, d = q.shape
    s = window_size
    scale = scale or d ** -0.5
    qm, km, vm = (_pad_map(_as_map(t, H, W), s, pad) for t in (q, k, v))
    Hp, Wp = qm.shape[2], qm.shape[3]
    hg, wg = Hp // s, Wp // s

    def part(t):  # (B, h, Hp, Wp, d) -> (B, h, nW, s*s, d); raises when s does not divide Hp, Wp
        return t.reshape(B, h, hg, s, wg, s, d).transpose(3, 4).reshape(B, h, hg * wg, s * s, d)

    qw, kw, vw = part(qm), part(km), part(vm)
    attn = (qw @ kw.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    o = (attn @ vw).reshape(B, h, hg, wg, s, s, d).transpose(3, 4).reshape(B, h, Hp, Wp, d)
    if pad:
        o = o[:, :, :H, :W]
    return o.reshape(B, h, H * W, d)


def litv2_lofi_attention(q, k, v, *, hw, window_size, scale=None, pad=False, kv_pooled=False):
    """LITv2 Lo-Fi math on every head: queries of all N tokens attend to the s x s pooled k, v."""
    d = q.shape[-1]
    scale = scale or d ** -0.5
    if not kv_pooled and window_size > 1:
        k = litv2_pool_kv(k, hw, window_size, pad)
        v = litv2_pool_kv(v, hw, window_size, pad)
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return attn @ v


def litv2_hilo_attention(q, k, v, *, hw, window_size, num_lo_heads, scale=None, pad=False):
    """LITv2 HiLo attention math: heads [0, heads - num_lo_heads) Hi-Fi, the rest Lo-Fi."""
    heads = q.shape[1]
    nh = heads - num_lo_heads
    outs = []
    if nh > 0:
        outs.append(litv2_hifi_attention(q[:, :nh], k[:, :nh], v[:, :nh], hw=hw, window_size=window_size,
                                         scale=scale, pad=pad))
    if num_lo_heads > 0:
        outs.append(litv2_lofi_attention(q[:, nh:], k[:, nh:], v[:, nh:], hw=hw, window_size=window_size,
                                         scale=scale, pad=pad))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
