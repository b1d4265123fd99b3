"""Drop-in linear / softmax-free attention modules on vitkern's fused ops.

* :class:`XCA` — XCiT's cross-covariance attention (facebookresearch/xcit and timm
  ``timm.models.xcit.XCA``): same parameters (``temperature`` (heads, 1, 1), ``qkv``, ``proj``).
* :class:`LinearAttention` — L2ViT's ReLU linear attention (``temperature`` (heads, 1, 1)
  initialised to head_dim**-0.5 on the numerator only, denominator clamped at 100).
* :class:`SoftAttention` — SOFT's softmax-free attention (``SoftmaxFreeAttention``: ``W_q``,
  ``W_v``, ``attn.Qlandmark_op``, ``attn.Qnorm_act``, ``attn.conv``, ``ff``).

All load the original checkpoints with ``strict=True``; ``XCA.from_timm`` builds one from a timm
XCA reusing its parameter objects (the adapter lives in :mod:`vitkern.integrations.timm.xcit`,
which ``patch_model`` uses; this module imports no timm).
"""
from __future__ import annotations

from typing import Optional

import math

import torch
from torch import Tensor, nn

from vitkern.ops import linear as linear_ops

__all__ = ["XCA", "LinearAttention", "SoftAttention", "SoftAttentionKernel"]


def _split_qkv(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3·C) packed projection -> q, k, v (B, heads, N, d) strided views, no copy."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _merge_heads(o: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads·d) (a view for the ops' (B, N, heads, d) outputs)."""
    B, h, N, d = o.shape
    return o.transpose(1, 2).reshape(B, N, h * d)


class XCA(nn.Module):
    """Cross-covariance attention (XCiT), loadable from XCiT / timm checkpoints.

    Same constructor as XCiT's ``XCA`` (``qk_scale`` is accepted and unused, as there).
    ``attn_drop`` (dropout on the d×d map) is not supported by the fused op: a value > 0 raises.
    ``forward(x)``: x (B, N, C) -> (B, N, C); N any (a CLS token included).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"XCA: dim {dim} should be divisible by num_heads {num_heads}")
        if attn_drop:
            raise ValueError("XCA: attn_drop > 0 (dropout on the attention map) is not supported "
                             "by the fused op")
        self.num_heads = num_heads
        self.backend = backend
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module: nn.Module, *, backend: str = "auto") -> "XCA":
        """From timm's ``XCA``, sharing its parameters (no copies; ``attn_drop > 0`` refused):
        :func:`vitkern.integrations.timm.xcit.xca_from_timm`."""
        from vitkern.integrations.timm.xcit import xca_from_timm
        return xca_from_timm(module, backend=backend, cls=cls)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, backend={self.backend!r}"

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = _split_qkv(self.qkv(x), self.num_heads)
        o = linear_ops.xca_attention(q, k, v, temperature=self.temperature, backend=self.backend)
        return self.proj_drop(self.proj(_merge_heads(o)))

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"temperature"}


class LinearAttention(nn.Module):
    """L2ViT's linear global attention, loadable from L2ViT checkpoints with ``strict=True``.

    ``out = (ReLU(q)·(ReLU(k)ᵀV)·τ_h) / max(ReLU(q)·ΣReLU(k), 100)`` per head, then ``proj``.
    Same constructor and parameters (``temperature`` initialised to ``qk_scale or
    head_dim**-0.5``); ``attn_drop`` is accepted and, as in L2ViT, never applied.
    ``forward(x)``: x (B, N, C) -> (B, N, C).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"LinearAttention: dim {dim} should be divisible by num_heads "
                             f"{num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.backend = backend
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1) * self.scale)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, backend={self.backend!r}"

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = _split_qkv(self.qkv(x), self.num_heads)
        o = linear_ops.linear_attention(q, k, v, temperature=self.temperature,
                                        backend=self.backend, **linear_ops.PRESETS["l2vit"])
        return self.proj_drop(self.proj(_merge_heads(o)))


class SoftAttentionKernel(nn.Module):
    """SOFT's attention core with its parameters (``SoftmaxFreeAttentionKernel``, ``ratio > 1``):
    the landmark conv ``Qlandmark_op`` (d→d, kernel = stride = ratio, no bias, shared by the
    heads), ``Qnorm_act`` (LayerNorm(d), GELU) and the depthwise ``conv`` skip on V (one
    ``use_conv``×``use_conv`` filter per head, shared by the d features).

    ``forward(q, v, H, W)``: q, v (B, heads, N = H·W, d) -> (B, heads, N, d).
    """

    def __init__(self, dim: int, num_heads: int, ratio: int, use_conv: int, max_iter: int = 20,
                 kernel_method: str = "cuda", backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SoftAttention: dim {dim} should be divisible by num_heads "
                             f"{num_heads}")
        if not isinstance(ratio, int) or ratio < 2:
            # SOFT's ratio == 1 branch reads attributes it never defines (dead code)
            raise ValueError(f"SoftAttention: ratio must be an int >= 2, got {ratio!r}")
        if kernel_method not in ("torch", "cuda"):
            raise ValueError("SoftAttention: kernel_method must be 'torch' or 'cuda' (both run "
                             f"the same fused op), got {kernel_method!r}")
        self.head_dim = dim // num_heads
        self.num_head = num_heads
        self.ratio = ratio
        self.max_iter = max_iter
        self.backend = backend
        d = self.head_dim
        self.Qlandmark_op = nn.Conv2d(d, d, kernel_size=ratio, stride=ratio, bias=False)
        self.Qnorm_act = nn.Sequential(nn.LayerNorm(d), nn.GELU())
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(num_heads, num_heads, kernel_size=(use_conv, use_conv),
                                  padding=(use_conv // 2, use_conv // 2), bias=False,
                                  groups=num_heads)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, max_iter={self.max_iter}, backend={self.backend!r}"

    def forward(self, q: Tensor, v: Tensor, H: int, W: int) -> Tensor:
        b, h, n, d = q.shape
        if n != H * W:
            raise ValueError(f"SoftAttention: N={n} tokens but H*W={H * W}")
        if H < self.ratio or W < self.ratio:
            raise ValueError(f"SoftAttention: a {H}x{W} map has no {self.ratio}x{self.ratio} "
                             "landmark cell")
        qs = q / math.sqrt(math.sqrt(d))  # SOFT's scaling (K = Q), same rounding
        lm = self.Qlandmark_op(qs.reshape(b * h, H, W, d).permute(0, 3, 1, 2))
        lm = self.Qnorm_act(lm.flatten(2).transpose(1, 2).reshape(b, h, -1, d))
        x = linear_ops.soft_attention(qs, lm, v, iters=self.max_iter, reg=0.01,
                                      backend=self.backend)
        if self.use_conv:
            vc = v.reshape(b, h, H, W, d).permute(0, 4, 1, 2, 3).reshape(b * d, h, H, W)
            x = x + self.conv(vc).reshape(b, d, h, H, W).flatten(3).permute(0, 2, 3, 1)
        return x


class SoftAttention(nn.Module):
    """SOFT's softmax-free attention (``SoftmaxFreeAttention``), loadable from SOFT checkpoints
    with ``strict=True``: ``W_q``, ``W_v`` (Q = K shared, no ``W_k``), the core ``attn``
    (:class:`SoftAttentionKernel`) and the output ``ff``. Same constructor; ``kernel_method``
    ("torch" / "cuda") is accepted and both run vitkern's fused op.

    ``forward(X, H, W)``: X (B, N = H·W, dim) -> (B, N, dim) (no cls token).
    """

    def __init__(self, dim: int, num_heads: int, ratio: int, conv_size: int, max_iter: int = 20,
                 kernel_method: str = "cuda", backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.head_dim = dim // num_heads
        self.num_head = num_heads
        self.attn = SoftAttentionKernel(dim, num_heads, ratio, conv_size, max_iter,
                                        kernel_method, backend)
        self.W_q = nn.Linear(dim, num_heads * self.head_dim)
        self.W_v = nn.Linear(dim, num_heads * self.head_dim)
        self.ff = nn.Linear(num_heads * self.head_dim, dim)

    def forward(self, X: Tensor, H: int, W: int) -> Tensor:
        B, N, _ = X.shape
        q = self.W_q(X).view(B, N, self.num_head, self.head_dim).transpose(1, 2)
        v = self.W_v(X).view(B, N, self.num_head, self.head_dim).transpose(1, 2)
        return self.ff(_merge_heads(self.attn(q, v, H, W)))
