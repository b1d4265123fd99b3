"""Token attention, eager backend: :func:`vitkern.reference.token.token_attention` computed with
``F.scaled_dot_product_attention`` on the gathered kept tokens (PyTorch's fused CPU attention:
no K×K probability matrix), the CLS importance from one (B, heads, 1, K) softmax of the first
query row, and varlen batches as one SDPA call per group of equal-length sequences.

Same arguments, outputs, dtypes and empty-row rule as the reference (see its module docstring).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern.reference import token as ref

__all__ = ["token_attention"]

#: logits elements per chunk of the column-sum pass (bounds its memory, ~16 MiB in fp32)
_COLSUM_CHUNK = 1 << 22


def _take_tokens(t: Tensor, keep_idx: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, heads, K, d) kept tokens in keep_idx order (a strided view of a
    (B, K, heads, d) copy). Indexing whole (heads, d) token rows copies about 2x faster than an
    element-wise ``gather`` from a permuted qkv projection."""
    rows = torch.arange(t.shape[0], device=t.device)[:, None]
    return t.transpose(1, 2)[rows, keep_idx].transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], importance: Optional[str],
            scale: float):
    """Attention of (B, heads, L, d) q, k, v with a per-key logit bias (B, 1 or heads, L).

    Returns o (B, heads, L, d), and importance (B, L) when asked.
    """
    mask = dead = None
    if bias is not None:
        bias = bias.to(q.dtype)  # the reference adds the bias in the logits' dtype
        # A row whose keys are all -inf has output 0 and zero gradients. The bias is per key, so
        # that is a property of the (batch, head) pair: zero its bias (no NaN in the softmax or
        # its backward) and zero its outputs.
        dead = torch.isneginf(bias).all(-1, keepdim=True)  # (B, hb, 1)
        bias = bias.masked_fill(dead, 0.0)
        dead = dead[..., None]  # (B, hb, 1, 1)
        mask = bias[:, :, None, :]  # (B, hb, 1, L): an additive mask broadcast over queries
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if dead is not None:
        o = o.masked_fill(dead, 0.0)
    if importance is None:
        return o
    if importance == "cls":
        # only the first query's probabilities are needed: one (B, heads, 1, L) softmax
        logits = (q[:, :, :1] @ k.transpose(-1, -2)) * scale
        p0 = torch.softmax(logits if mask is None else logits + mask, dim=-1)
        if dead is not None:
            p0 = p0.masked_fill(dead, 0.0)
        return o, p0[:, :, 0].mean(1)
    return o, _colsum(q, k, mask, dead, scale)


@torch.no_grad()
def _colsum(q: Tensor, k: Tensor, mask: Optional[Tensor], dead: Optional[Tensor],
            scale: float) -> Tensor:
    """GTP-ViT's column sums, (B, L), without gradient (as the reference returns them): the
    probabilities of a chunk of query rows at a time, never the whole (B, heads, L, L)."""
    B, h, L, _ = q.shape
    step = max(1, _COLSUM_CHUNK // max(1, B * h * L))
    kt = k.transpose(-1, -2)
    total = q.new_zeros((B, h, L))
    for i in range(0, L, step):
        logits = (q[:, :, i:i + step] @ kt) * scale
        total += torch.softmax(logits if mask is None else logits + mask, dim=-1).sum(-2)
    if dead is not None:
        total = total.masked_fill(dead[..., 0], 0.0)
    return total.mean(1)


def _bias_of(key_bias: Tensor, keep_idx: Optional[Tensor]) -> Tensor:
    """Dense key_bias (B, N) / (B, heads, N) -> (B, 1 or heads, K) at the kept tokens."""
    if key_bias.dim() == 2:
        key_bias = key_bias[:, None, :]
    if keep_idx is None:
        return key_bias
    rows = torch.arange(key_bias.shape[0], device=key_bias.device)[:, None]
    return key_bias.transpose(1, 2)[rows, keep_idx].transpose(1, 2)


def _dense(q, k, v, keep_idx, key_bias, importance, scale):
    if keep_idx is not None:
        keep_idx = keep_idx.long()
        q, k, v = (_take_tokens(t, keep_idx) for t in (q, k, v))
    bias = None if key_bias is None else _bias_of(key_bias, keep_idx)
    return _attend(q, k, v, bias, importance, scale)


def _varlen(q, k, v, keep_idx, cu_seqlens, key_bias, importance, scale):
    """Sequences of equal length are stacked into one (m, heads, L, d) batch (one SDPA call per
    distinct length); the rows are put back in packed order at the end."""
    T, h, d = q.shape
    bounds = cu_seqlens.tolist()
    n_rows = bounds[-1]
    if n_rows == 0:  # as the reference: empty outputs still connected to q's graph
        o = q.new_zeros((0, h, d)) + 0 * q.sum()
        return o if importance is None else (o, q.new_zeros((0,)))
    by_len: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_len.setdefault(end - start, []).append(start)
    rows = keep_idx.long() if keep_idx is not None else None
    outs, imps, where = [], [], []
    for L, starts in by_len.items():
        pos = (torch.tensor(starts, device=q.device)[:, None]
               + torch.arange(L, device=q.device))  # (m, L) output rows
        tok = pos if rows is None else rows[pos]  # (m, L) packed tokens
        qs, ks, vs = (t[tok].transpose(1, 2) for t in (q, k, v))  # (m, h, L, d)
        kb = None
        if key_bias is not None:
            kb = key_bias[tok][:, None, :] if key_bias.dim() == 1 else key_bias[tok].transpose(1, 2)
        res = _attend(qs, ks, vs, kb, importance, scale)
        o, imp = res if importance is not None else (res, None)
        outs.append(o.transpose(1, 2).reshape(-1, h, d))
        imps.append(None if imp is None else imp.reshape(-1))
        where.append(pos.reshape(-1))
    o = torch.cat(outs) if len(outs) > 1 else outs[0]
    imp = None if importance is None else (torch.cat(imps) if len(imps) > 1 else imps[0])
    if len(outs) > 1:  # one length group covers the rows in order already
        order = torch.argsort(torch.cat(where))
        o = o[order]
        imp = None if imp is None else imp[order]
    return o if importance is None else (o, imp)


def token_attention(q: Tensor, k: Tensor, v: Tensor, *, keep_idx: Optional[Tensor] = None,
                    cu_seqlens: Optional[Tensor] = None, key_bias: Optional[Tensor] = None,
                    return_importance: Optional[str] = None, scale: Optional[float] = None):
    """:func:`vitkern.reference.token.token_attention`, fast: o (B, heads, K, d) — (R, heads, d)
    with ``cu_seqlens`` — or (o, importance (B, K) / (R,))."""
    if return_importance not in ref.IMPORTANCE:
        raise ValueError(f"token_attention: return_importance must be None, 'cls' or 'colsum', "
                         f"got {return_importance!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        return _varlen(q, k, v, keep_idx, cu_seqlens, key_bias, return_importance, scale)
    return _dense(q, k, v, keep_idx, key_bias, return_importance, scale)
