"""PPMA full attention, eager backend: :func:`vitkern.reference.ppma.ppma_attention` computed one
block of query rows at a time, with each direction's mask built once per (batch, head) block.

The reference materialises the (B, heads, N, N) mask, its transposed sum with the logits, two
softmaxes and their average (about ten passes over N² elements, several hundred MiB at 56²).
Here the 1D row / column structured masks S^W, S^H (O(H·W² + W·H²)) are built once per
(batch, head), and each direction's N² log-mask is formed one block of query rows at a time
(~2 MiB), by broadcasting, while the block is still in cache. Maps up to 1024 tokens compute the
block's logits once (one matmul) and add both masks to them; larger maps hand each block's masks
to ``F.scaled_dot_product_attention`` (PyTorch's fused CPU kernel: no logits or probabilities
kept), which measured faster there. Memory stays at a few MiB per block whatever the map size.
Tiny maps (<= 256 tokens: PPMA's 7² and 14² stages) run the reference's own code, which is
cache-resident there and measured as fast as either.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern.reference import ppma as ref

__all__ = ["ppma_attention"]

#: mask elements per block and direction (~2 MiB in fp32: the block's work stays in cache)
_BLOCK = 1 << 19
#: up to this many tokens (7², 14² maps) everything is cache-resident and the reference's own
#: formulation measured as fast as any re-composition (the calls are op-overhead bound): use it
_SMALL = 256
#: up to this many tokens, logits once per block + two softmaxes beat two masked SDPA calls
#: (measured on one CPU core at 28²); above it SDPA's fused kernel wins (56²)
_SDPA_FROM = 1024


def _broadcast_sum(a: Tensor, b: Tensor, shape) -> Tensor:
    """``a + b`` broadcast to ``shape``, in contiguous layout (a plain ``a + b`` of two permuted
    views comes out permuted, and the (N, N) view SDPA needs would then copy it again)."""
    return a.expand(shape).clone(memory_format=torch.contiguous_format).add_(b)


def ppma_attention(q: Tensor, k: Tensor, v: Tensor, log_decay_h: Tensor, log_decay_v: Tensor,
                   *, hw, scale: Optional[float] = None) -> Tensor:
    """Full polyline-path-masked attention, (B, heads, N, d): the reference's math (both mask
    directions, each softmax normalised separately, averaged 50/50).

    log L[(r1, c1), (r2, c2)] = S^W_{r1}[c1, c2] + S^H_{c2}[r1, r2] and its transpose
    S^W_{r2}[c2, c1] + S^H_{c1}[r2, r1] = S^W_{r2}[c1, c2] + S^H_{c1}[r1, r2] (each 1D mask is
    exactly symmetric: c_i - c_j is the negation of c_j - c_i in IEEE arithmetic).
    """
    B, h, N, d = q.shape
    H, W = hw
    if N <= _SMALL:
        return ref.ppma_attention(q, k, v, log_decay_h, log_decay_v, hw=hw, scale=scale)
    scale = d ** -0.5 if scale is None else scale
    # the 1D masks in the decays' dtype, as the reference (it casts the N² sum to q's dtype)
    sw = ref.structured_mask_1d(log_decay_h.unflatten(-1, (H, W)))  # (B, h, H, W, W) [r, c1, c2]
    sh = ref.structured_mask_1d(log_decay_v.unflatten(-1, (H, W)).transpose(-1, -2))  # [c, r1, r2]
    sh_f = sh.permute(0, 1, 3, 4, 2)  # [r1, r2, c2]
    sh_b = sh.permute(0, 1, 3, 2, 4)  # [r1, c1, r2]
    sw_b = sw.permute(0, 1, 3, 2, 4)  # [c1, r2, c2]
    per_row = h * W * N  # mask elements of one query row of the map, one batch item
    rows = max(1, min(H, _BLOCK // per_row))
    batch = max(1, min(B, _BLOCK // (per_row * rows)))
    use_sdpa = N > _SDPA_FROM
    kt = k.transpose(-1, -2)
    out_b = []
    for b0 in range(0, B, batch):
        bs = slice(b0, b0 + batch)
        nb = min(B, b0 + batch) - b0
        out_r = []
        for r0 in range(0, H, rows):
            rs = slice(r0, r0 + rows)
            nr = min(H, r0 + rows) - r0
            qs = q[bs, :, r0 * W:(r0 + nr) * W]
            shape = (nb, h, nr, W, H, W)  # [r1, c1, r2, c2]: query rows r0.., every key
            # direction 1: S^W_{r1}[c1, c2] + S^H_{c2}[r1, r2]; direction 2 (the transpose):
            # S^W_{r2}[c1, c2] + S^H_{c1}[r1, r2]
            fw_terms = (sh_f[bs, :, rs, None], sw[bs, :, rs, :, None])
            bw_terms = (sw_b[bs, :, None], sh_b[bs, :, rs, :, :, None])
            if use_sdpa:
                fwd, bwd = (_broadcast_sum(*t, shape).view(nb, h, nr * W, N).to(q.dtype)
                            for t in (fw_terms, bw_terms))
                o = (F.scaled_dot_product_attention(qs, k[bs], v[bs], attn_mask=fwd, scale=scale)
                     + F.scaled_dot_product_attention(qs, k[bs], v[bs], attn_mask=bwd,
                                                      scale=scale))
            else:
                # the block's logits once; each direction's two mask terms added to them in
                # place (one pass each, no mask tensor)
                s = torch.matmul(qs * scale, kt[bs]).view(shape)
                l1, l2 = ((s + a.to(q.dtype)).add_(b.to(q.dtype)).view(nb, h, nr * W, N)
                          for a, b in (fw_terms, bw_terms))
                p = torch.softmax(l1, dim=-1) + torch.softmax(l2, dim=-1)
                o = torch.matmul(p, v[bs])
            out_r.append(o)
        out_b.append(out_r[0] if len(out_r) == 1 else torch.cat(out_r, dim=2))
    o = out_b[0] if len(out_b) == 1 else torch.cat(out_b)
    return 0.5 * o
