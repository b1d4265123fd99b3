"""Linear / softmax-free attention, the definitions: pure PyTorch, differentiable, any float dtype.

Layout: q, k, v are (B, heads, N, d) like ``F.scaled_dot_product_attention``.

* :func:`linear_attention` — non-causal kernelized linear attention
  ``out_n = t_h · scale · φ(q_n)ᵀ (Σ_s φ(k_s) v_sᵀ) / D_n`` with
  ``D_n = φ(q_n) · Σ_s φ(k_s)`` plus ``eps`` (``denom="add"``) or ``max(·, eps)``
  (``denom="clamp"``). The presets of the papers it serves are in :data:`PRESETS`.
* :func:`xca_attention` — XCiT's cross-covariance attention: every channel of q and k is
  L2-normalised over the tokens, ``A = softmax_j(τ_h q̂_iᵀ k̂_j)`` is a d×d map per head and
  ``out = V Aᵀ`` (timm's ``XCA`` math, in the (B, heads, N, d) layout).
* :func:`soft_attention` — SOFT's Gaussian-kernel Nyström attention
  ``out = K1·Ainv·(K1ᵀV)`` with ``K1 = exp(-½‖q_n − l_j‖²)`` against m landmarks and
  ``Ainv = newton_schulz_inverse(exp(-½‖l_i − l_j‖²))`` (:func:`gaussian_kernel`,
  :func:`newton_schulz_inverse`: SOFT's shipped iteration and custom backward).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear_attention", "xca_attention", "feature_map_fn", "FEATURE_MAPS", "PRESETS",
           "gaussian_kernel", "newton_schulz_inverse", "soft_attention"]

#: Feature maps φ: "elu1" = elu(x) + 1 ("Transformers are RNNs"), "relu" (L2ViT, EfficientViT),
#: "identity" (FLA's normalised linear attention on features the caller already mapped).
FEATURE_MAPS = ("elu1", "relu", "identity")

#: Keyword presets of the published models (pass as ``linear_attention(q, k, v, **PRESETS[x])``).
#: L2ViT additionally passes its per-head ``temperature`` (initialised to d**-0.5, numerator only).
PRESETS = {
    "katharopoulos": dict(feature_map="elu1", denom="add", eps=1e-6),   # fast-transformers
    "l2vit": dict(feature_map="relu", denom="clamp", eps=100.0),          # hard floor of 100
    "efficientvit": dict(feature_map="relu", denom="add", eps=1e-15),    # LiteMLA
}


def feature_map_fn(name: str):
    """φ as a PyTorch function."""
    if name == "elu1":
        return lambda x: F.elu(x) + 1.0
    if name == "relu":
        return F.relu
    if name == "identity":
        return lambda x: x
    raise ValueError(f"unknown feature_map {name!r}; choose one of {FEATURE_MAPS}")


def _per_head(t: Tensor, heads: int) -> Tensor:
    """A per-head tensor of ``heads`` elements (any shape, e.g. (heads, 1, 1)) -> (1, heads, 1, 1),
    in the dtype of the math (an fp32 parameter with 16-bit activations computes in 16 bits)."""
    return t.reshape(1, heads, 1, 1)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: str = "elu1",
                     scale: float = 1.0, temperature: Optional[Tensor] = None,
                     denom: str = "add", eps: float = 1e-6,
                     key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Non-causal linear attention.

    q: (B, h, N, d); k: (B, h, M, d); v: (B, h, M, e); temperature: ``h`` elements or None;
    key_padding_mask: (B, M) bool, True marks a padding key that takes no part (the
    ``nn.MultiheadAttention`` convention) — needed for elu+1, whose φ(0) = 1.
    Returns (B, h, N, e).
    """
    phi = feature_map_fn(feature_map)
    fq, fk = phi(q), phi(k)
    if key_padding_mask is not None:
        fk = fk.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    kv = fk.transpose(-1, -2) @ v                       # (B, h, d, e)
    z = fk.sum(dim=-2, keepdim=True)                    # (B, h, 1, d)
    den = (fq * z).sum(dim=-1, keepdim=True)            # (B, h, N, 1)
    if denom == "add":
        den = den + eps
    elif denom == "clamp":
        den = den.clamp_min(eps)
    else:
        raise ValueError(f"denom must be 'add' or 'clamp', got {denom!r}")
    num = fq @ kv
    c = scale if temperature is None else _per_head(temperature, q.shape[1]).to(num.dtype) * scale
    return num * c / den


def xca_attention(q: Tensor, k: Tensor, v: Tensor, *, temperature, eps: float = 1e-12) -> Tensor:
    """Cross-covariance attention. q, k, v: (B, h, N, d); temperature: ``h`` elements (or a
    float). Returns (B, h, N, d): ``out[n, i] = Σ_j A_ij v[n, j]``."""
    qn = F.normalize(q, dim=-2, eps=eps)                # each channel over the N tokens
    kn = F.normalize(k, dim=-2, eps=eps)
    logits = qn.transpose(-1, -2) @ kn                  # (B, h, d, d)
    if isinstance(temperature, Tensor):
        logits = logits * _per_head(temperature, q.shape[1]).to(logits.dtype)
    else:
        logits = logits * temperature
    attn = logits.softmax(dim=-1)
    return v @ attn.transpose(-1, -2)


# --------------------------------------------------------------------------------------------
# SOFT (softmax-free transformer, Gaussian-kernel Nyström attention)
# --------------------------------------------------------------------------------------------


def gaussian_kernel(x: Tensor, y: Tensor) -> Tensor:
    """``exp(-½‖x_i − y_j‖²)``: x (..., N, d), y (..., m, d) -> (..., N, m).

    The squared distance is SOFT's "torch" form ``‖x‖² + ‖y‖² − 2·x·y`` with **no clamp at 0**
    (the form of its plain configs; the exact ``Σ(x − y)²`` of its CUDA extension differs only
    by rounding). A slightly negative distance gives a kernel value slightly above 1.
    """
    sq = (x * x).sum(-1, keepdim=True) + (y * y).sum(-1).unsqueeze(-2) - 2.0 * (
        x @ y.transpose(-1, -2))
    return torch.exp(-0.5 * sq)


def _newton_schulz(a: Tensor, iters: int, reg: float, alpha_scale: float) -> Tensor:
    """SOFT's ``newton_inv``: V0 = α·(A + reg·I) with α = alpha_scale·2 / (max row sum of A)²
    (one scalar per matrix, from the un-shifted A), then ``iters`` times V = 2V − (V P) V."""
    p = a + reg * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    alpha = alpha_scale * 2 / a.sum(-1).amax(-1) ** 2
    v = alpha[..., None, None] * p
    for _ in range(iters):
        v = 2 * v - v @ p @ v
    return v


class _NewtonSchulzInverse(torch.autograd.Function):
    """Forward: the iteration without autograd; backward: ``dA = −Vᵀ G Vᵀ`` (the gradient of an
    exact inverse evaluated at the approximate one, computed once — SOFT's custom backward).
    ``iterate``: the iteration, this module's :func:`_newton_schulz` (vitkern.eager.linear
    passes a faster one with the same iterates)."""

    @staticmethod
    def forward(ctx, a, iters, reg, alpha_scale, iterate):
        math_dtype = a.dtype if a.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            v = iterate(a.to(math_dtype), iters, reg, alpha_scale)
        ctx.save_for_backward(v)
        ctx.in_dtype = a.dtype
        return v

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        vt = v.transpose(-1, -2)
        return -(vt @ g.to(v.dtype) @ vt).to(ctx.in_dtype), None, None, None, None


def newton_schulz_inverse(a: Tensor, iters: int = 20, reg: float = 0.01,
                          alpha_scale: float = 0.9) -> Tensor:
    """SOFT's approximate inverse of ``A + reg·I`` (a (..., m, m) batch; one α per matrix).

    Reproduces the shipped iteration exactly (initialisation, shift, count): with clustered
    landmarks 20 steps do not converge, so the result depends on ``iters`` and is **not**
    ``torch.linalg.inv``. Math in fp32 for 16-bit inputs (SOFT's fp32 identity promotes them)
    and the result is returned in fp32 then; fp64 stays fp64. The backward is SOFT's
    ``−Vᵀ G Vᵀ``, the exact gradient only once the iteration has converged.
    """
    return _NewtonSchulzInverse.apply(a, iters, reg, alpha_scale, _newton_schulz)


def soft_attention(q: Tensor, landmarks: Tensor, v: Tensor, ainv: Optional[Tensor] = None, *,
                   iters: int = 20, reg: float = 0.01) -> Tensor:
    """SOFT attention core. q: (B, h, N, d) (already scaled by d**-¼); landmarks: (B, h, m, d);
    v: (B, h, N, e); ainv: (B, h, m, m) or None for
    ``newton_schulz_inverse(gaussian_kernel(landmarks, landmarks), iters, reg)``.
    Returns ``(K1 @ Ainv) @ (K1ᵀ @ v)`` (SOFT's grouping), (B, h, N, e)."""
    if ainv is None:
        lm = landmarks if landmarks.dtype == torch.float64 else landmarks.float()
        ainv = newton_schulz_inverse(gaussian_kernel(lm, lm), iters, reg)
    k1 = gaussian_kernel(q, landmarks)
    return (k1 @ ainv.to(k1.dtype)) @ (k1.transpose(-1, -2) @ v)
