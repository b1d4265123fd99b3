"""Linear / softmax-free attention, eager backend: :mod:`vitkern.reference.linear`'s three ops
(``linear_attention``, ``xca_attention``, ``soft_attention``) recomposed so that each (N, ·)
tensor is read and written as few times as the math allows, through batched matmuls.

Where the reference loses time on the CPU, and what this module does instead (measured on one
core, fp32 forward, the shapes of ``bench/bench_linear.py`` at their CPU batch; speed-ups are
over the reference, which is also the benchmark's "pytorch" baseline):

* linear attention, 1.07-1.4x (least on L2ViT's 49- and 196-token stages: op-overhead bound,
  and the reference is already two batched matmuls there): the denominator ``φ(q_n)·z`` is an
  (N, d) product then a sum (two passes over φ(Q)) and the output ``num * c / den`` two more
  passes. Here the denominator is one batched matrix-vector product, the per-head factor ``c``
  scales the (d, e) state ``φ(K)ᵀV`` instead of the output, and the division is in place.
  Little else is left: the two (N, d) x (d, e) products dominate, and for elu + 1 the two ELU
  passes cost about as much as both (ATen's ELU is about three ``exp`` passes;
  ``max(x + 1, exp(min(x, 0)))`` in four passes measured no faster). Folding a ones column
  into V (EfficientViT's one-GEMM trick) or ``Σφ(K)`` into the state measured slower at every
  shape (the extra column and the strided division cost more than the matrix-vector product).
* XCA, 1.3-1.8x (timm's fused path, normalise + SDPA with channels as the sequence, is slower
  than the reference on the CPU): ``F.normalize`` of q and k costs a norm pass and a division
  pass each, together as slow as the Gram matmul. The channel norms only scale the rows and
  columns of the d x d Gram matrix, so ``QᵀK`` is taken on the raw inputs and divided by
  ``‖q_i‖ ‖k_j‖`` afterwards (d² work instead of 2·N·d). The sums of squares are one
  ``linalg.vecdot`` each: 1.7-4.5x faster than ``linalg.vector_norm`` over the token dim on
  the 784- and 196-token maps (equal at 16384 tokens, where both are memory-bound).
* SOFT, 1.3-1.5x: 20 Newton–Schulz steps on the m x m landmark matrices are most of the
  small stages. Each step is one ``bmm`` and one ``baddbmm`` (``2V - (VP)V``: beta 2, alpha -1)
  written into two reused buffers, instead of two matmuls, a multiplication and a subtraction
  with fresh results: the same iterate (bit-identical in the CPU tests), 1.3-1.7x faster (the
  m = 49 products themselves are compute-bound). The Gaussian kernel
  ``K1 = exp(q·l - ½‖q‖² - ½‖l‖²)`` is one ``baddbmm`` on the (N, m) sum of squared norms and
  an in-place ``exp_``, and the products are grouped ``K1·(Ainv·(K1ᵀV))`` (as the Triton
  kernel; the reference keeps SOFT's ``(K1·Ainv)·(K1ᵀV)``), which skips the N·m² product and
  its (N, m) result: the core alone, Ainv given, is 1.5-1.6x the reference's.

Same signatures, arguments, dtypes, output layout and gradients as the reference; differentiable
through autograd (forward + backward measured 1.0-1.9x the reference's on the same shapes).
In-place steps touch only tensors created here, and only where autograd keeps nothing of them
(see :func:`_tracking`); accumulation is as the reference's (16-bit inputs multiply and sum in
16 bits with PyTorch's fp32 accumulation inside each op, Newton–Schulz in fp32). 16-bit XCA runs
the reference: the raw Gram matrix and sums of squares overflow fp16 (N·|q|·|k| > 65504) where
the reference normalises first and keeps every intermediate <= 1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern.reference import linear as ref

__all__ = ["linear_attention", "xca_attention", "soft_attention", "gaussian_kernel",
           "newton_schulz_inverse"]


def _tracking(*tensors) -> bool:
    """True when autograd records this call: in-place updates of intermediates are then avoided
    where a backward formula would need the overwritten values."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                           for t in tensors)


# --------------------------------------------------------------------------------------------
# linear attention
# --------------------------------------------------------------------------------------------


def _phi(x: Tensor, name: str) -> Tensor:
    """φ(x) as the reference's :func:`~vitkern.reference.linear.feature_map_fn`. elu + 1 adds
    the 1 in place: elu's backward reads its input, not its output (ELU itself is the slow part:
    about three times an ``exp`` pass; ``max(x + 1, exp(min(x, 0)))`` in four passes measured no
    faster)."""
    if name == "elu1":
        return F.elu(x).add_(1.0)
    if name == "relu":
        return F.relu(x)
    if name == "identity":
        return x
    raise ValueError(f"unknown feature_map {name!r}; choose one of {ref.FEATURE_MAPS}")


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: str = "elu1",
                     scale: float = 1.0, temperature: Optional[Tensor] = None,
                     denom: str = "add", eps: float = 1e-6,
                     key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """:func:`vitkern.reference.linear.linear_attention`, fast: (B, h, N, e)."""
    if feature_map not in ref.FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; choose one of {ref.FEATURE_MAPS}")
    if denom not in ("add", "clamp"):
        raise ValueError(f"denom must be 'add' or 'clamp', got {denom!r}")
    B, h, N, d = q.shape
    M, e = k.shape[2], v.shape[-1]
    track = _tracking(q, k, v, temperature)
    fk = _phi(k, feature_map)
    if key_padding_mask is not None:
        keep_out = key_padding_mask[:, None, :, None]
        # relu saves its output for the backward and identity's φ(k) is k itself: copy then
        fk = (fk.masked_fill(keep_out, 0.0) if track or feature_map == "identity"
              else fk.masked_fill_(keep_out, 0.0))
    # (Bh, ·, ·) views for contiguous inputs; strided ones are copied here, as a 4D matmul would
    fk = fk.reshape(B * h, M, d)
    fq = _phi(q, feature_map).reshape(B * h, N, d)
    kv = torch.bmm(fk.transpose(1, 2), v.reshape(B * h, M, e))  # (Bh, d, e)
    z = fk.sum(1).unsqueeze(-1)                                  # (Bh, d, 1)
    if temperature is not None or scale != 1.0:
        # the numerator's factor on the (d, e) state instead of the (N, e) output: one pass less
        # (the reference's (num * c) / den rounds the same way up to an ulp; the (N, 1)
        # reciprocal c / den would overflow fp16 where the reference does not)
        c = scale
        if temperature is not None:
            c = temperature.reshape(1, h, 1, 1).to(kv.dtype)  # 16-bit math in 16 bits, as ref.
            c = c * scale if scale != 1.0 else c
        kv = kv.view(B, h, d, e)
        kv = (kv * c if track else kv.mul_(c)).view(B * h, d, e)
    num = torch.bmm(fq, kv).view(B, h, N, e)
    # the denominator as a matrix-vector product: one read of φ(Q), no (N, d) temporary
    den = torch.bmm(fq, z).view(B, h, N, 1)
    if denom == "add":
        den = den + eps if track else den.add_(eps)
    else:  # clamp_min: no gradient through the floor, as the reference
        den = den.clamp_min(eps) if track else den.clamp_min_(eps)
    return num / den if track else num.div_(den)


# --------------------------------------------------------------------------------------------
# XCA
# --------------------------------------------------------------------------------------------


def _channel_norms(x: Tensor, eps: float, track: bool) -> Tensor:
    """max(‖x_:,i‖, eps) over the tokens, (B, h, d): ``F.normalize``'s divisor."""
    if track:
        # vector_norm's backward is 0 at a zero channel; sqrt(vecdot) would give 0 / 0 there
        return torch.linalg.vector_norm(x, dim=-2).clamp_min(eps)
    # one fused multiply-and-sum pass; vector_norm over the token dim measured 1.7-4.5x slower on
    # the 196- and 784-token maps (equal at 16384 tokens, where both are memory-bound)
    return torch.linalg.vecdot(x, x, dim=-2).sqrt_().clamp_min_(eps)


def xca_attention(q: Tensor, k: Tensor, v: Tensor, *, temperature, eps: float = 1e-12) -> Tensor:
    """:func:`vitkern.reference.linear.xca_attention`, fast: (B, h, N, d).

    ``softmax_j(τ q̂_i·k̂_j) = softmax_j(τ (QᵀK)_ij / (‖q_i‖ ‖k_j‖))``: the normalisation is
    applied to the d x d Gram matrix, not to the (N, d) inputs.
    """
    if q.dtype not in (torch.float32, torch.float64):
        # fp16: the raw Gram matrix (N·|q|·|k|) and the sums of squares overflow 65504 on
        # ordinary inputs; bf16 would round the raw Gram matrix, then the division, then the
        # temperature product, where the reference rounds q̂ᵀk̂ once. The reference normalises
        # first: every intermediate is <= 1
        return ref.xca_attention(q, k, v, temperature=temperature, eps=eps)
    B, h, N, d = q.shape
    track = _tracking(q, k, v, temperature)
    nq, nk = _channel_norms(q, eps, track), _channel_norms(k, eps, track)
    g = torch.bmm(q.reshape(B * h, N, d).transpose(1, 2), k.reshape(B * h, N, d))
    g = g.view(B, h, d, d)
    outer = torch.mul(nq.unsqueeze(-1), nk.unsqueeze(-2))  # (B, h, d, d)
    if isinstance(temperature, Tensor):
        t = temperature.reshape(1, h, 1, 1).to(q.dtype)
        logits = g / outer * t if track else g.div_(outer).mul_(t)
    else:
        logits = g / outer * temperature if track else g.div_(outer).mul_(temperature)
    attn = logits.softmax(dim=-1).view(B * h, d, d)
    return torch.bmm(v.reshape(B * h, N, d), attn.transpose(1, 2)).view(B, h, N, d)


# --------------------------------------------------------------------------------------------
# SOFT
# --------------------------------------------------------------------------------------------


def gaussian_kernel(x: Tensor, y: Tensor) -> Tensor:
    """:func:`vitkern.reference.linear.gaussian_kernel`, x (..., N, d), y (..., m, d):
    ``exp(x·y - ½‖x‖² - ½‖y‖²)``, (..., N, m) — the reference's squared distance (no clamp at
    0), summed in another order. One ``baddbmm`` (beta = -½ on the (N, m) sum of squared norms) and
    an in-place ``exp_`` (its backward reads the result, which it keeps), instead of a product,
    a scaling, two broadcast additions, a multiplication and an exp with fresh (N, m) results."""
    lead, (N, d), m = x.shape[:-2], x.shape[-2:], y.shape[-2]
    if y.shape[:-2] != lead:  # leading dims that broadcast: the reference's matmul does that
        return ref.gaussian_kernel(x, y)
    b = lead.numel()
    sq = torch.linalg.vecdot(x, x).unsqueeze(-1) + torch.linalg.vecdot(y, y).unsqueeze(-2)
    s = torch.baddbmm(sq.view(b, N, m), x.reshape(b, N, d), y.reshape(b, m, d).transpose(1, 2),
                      beta=-0.5)
    return s.exp_().view(*lead, N, m)


def _newton_schulz(a: Tensor, iters: int, reg: float, alpha_scale: float) -> Tensor:
    """The reference's ``_newton_schulz`` (same α, shift and step count) on a (..., m, m) batch:
    each step ``V = 2V - (V P) V`` as one bmm and one baddbmm (beta 2, alpha -1) written into
    two buffers reused across the steps. Bit-identical to the reference's four ops per step in
    the CPU tests, fp32 and fp64 (the product is accumulated in the working dtype either way and
    2V is exact), 1.3-1.7x faster: the m = 49 products are compute-bound, the saving is the
    elementwise passes and allocations."""
    shape, m = a.shape, a.shape[-1]
    a = a.reshape(shape[:-2].numel(), m, m)
    p = a + reg * torch.eye(m, dtype=a.dtype, device=a.device)
    alpha = alpha_scale * 2 / a.sum(-1).amax(-1) ** 2
    v = alpha[:, None, None] * p
    if iters:
        vp, nxt = torch.empty_like(v), torch.empty_like(v)
        for _ in range(iters):
            torch.bmm(v, p, out=vp)
            torch.baddbmm(v, vp, v, beta=2, alpha=-1, out=nxt)
            v, nxt = nxt, v
    return v.view(shape)


def newton_schulz_inverse(a: Tensor, iters: int = 20, reg: float = 0.01,
                          alpha_scale: float = 0.9) -> Tensor:
    """:func:`vitkern.reference.linear.newton_schulz_inverse`, fast (same result and backward:
    the reference's autograd function with this module's iteration)."""
    return ref._NewtonSchulzInverse.apply(a, iters, reg, alpha_scale, _newton_schulz)


def soft_attention(q: Tensor, landmarks: Tensor, v: Tensor, ainv: Optional[Tensor] = None, *,
                   iters: int = 20, reg: float = 0.01) -> Tensor:
    """:func:`vitkern.reference.linear.soft_attention`, fast: (B, h, N, e), grouped
    ``K1·(Ainv·(K1ᵀV))`` (equal math, other rounding: the reference keeps SOFT's
    ``(K1·Ainv)·(K1ᵀV)``; this grouping skips the N·m² product and its (N, m) result)."""
    if ainv is None:
        lm = landmarks if landmarks.dtype == torch.float64 else landmarks.float()
        ainv = newton_schulz_inverse(gaussian_kernel(lm, lm), iters, reg)
    B, h, N, _ = q.shape
    m, e = landmarks.shape[2], v.shape[-1]
    k1 = gaussian_kernel(q, landmarks).view(B * h, N, m)
    kv = torch.bmm(k1.transpose(1, 2), v.reshape(B * h, N, e))        # (Bh, m, e)
    ai = ainv.to(k1.dtype).expand(B, h, m, m)  # the reference's matmul broadcasts Ainv too
    w = torch.bmm(ai.reshape(B * h, m, m), kv)                          # (Bh, m, e)
    return torch.bmm(k1, w).view(B, h, N, e)
