"""Token attention (EViT / ToMe / token dropping), the definition: pure PyTorch, differentiable,
any float dtype (fp64 included).

Dense layout: q, k, v are (B, heads, N, d) token maps.

* ``keep_idx`` (B, K) integer: attention runs among the kept tokens only, in the order given
  (query i and key j of batch b are token ``keep_idx[b, i]`` / ``keep_idx[b, j]``); the output is
  (B, heads, K, d), row i belonging to token ``keep_idx[b, i]``. Indices must be distinct and in
  [0, N). ``None`` keeps every token in order (K = N).
* ``key_bias`` (B, N) (shared by the heads) or (B, heads, N): an additive logit bias per key,
  indexed by the *original* token index, so it follows ``keep_idx``
  (ToMe's proportional attention passes log(size); -inf removes a key).
  logits[b, h, i, j] = scale · q_i · k_j + key_bias[b, (h,) j].
* A query whose logits are all -inf (every kept key biased to -inf) has **output 0** and zero
  gradients, not NaN (the kernels' empty-row rule: softmax over an empty set is taken as all-zero
  probabilities).
* ``return_importance="cls"`` (EViT): also return importance[b, j] = mean over heads of
  P[b, h, 0, j], the attention the first kept query (the CLS token when it is kept first) pays
  to kept key j, for every j in 0..K-1 (column 0 is CLS itself; EViT uses ``importance[:, 1:]``).
  It is differentiable (EViT's token fusion trains through it). Shape (B, K), input dtype.
* ``return_importance="colsum"`` (GTP-ViT): importance[b, j] = mean over heads of
  sum_i P[b, h, i, j], the attention key j receives from all kept queries. It carries **no
  gradient** (it is returned detached: GTP-ViT only ranks tokens with it). Shape (B, K).

Ragged (varlen) layout, ``cu_seqlens`` given (flash-attn's packed convention):

* q, k, v are (T, heads, d): the tokens of all sequences packed along dim 0.
* ``cu_seqlens`` (S + 1,) int32/int64: 0 = cu[0] <= cu[1] <= ... <= cu[S] = R; sequence s owns
  the rows cu[s]..cu[s+1]-1 (empty and single-token sequences allowed).
* Without ``keep_idx`` row r is token r (R = T). With ``keep_idx`` (R,) integer, row r is token
  ``keep_idx[r]`` of the packed tensors (distinct, in [0, T)): e.g. images keeping different
  numbers of tokens of a dense (B·N, heads, d) map, indices b·N + j.
* ``key_bias`` (T,) or (T, heads), indexed by token. Attention runs within each sequence; the
  first row of a sequence is its CLS query for ``"cls"``.
* Output (R, heads, d); importance (R,).

This is also vitkern's CPU path (it materialises each sequence's K×K probabilities).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["token_attention", "gather_tokens"]

IMPORTANCE = (None, "cls", "colsum")


def gather_tokens(t: Tensor, keep_idx: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, heads, K, d): the kept tokens, in keep_idx order."""
    B, h, _, d = t.shape
    return t.gather(2, keep_idx[:, None, :, None].expand(B, h, keep_idx.shape[1], d))


def _bias_logits(key_bias: Tensor, keep_idx: Optional[Tensor]) -> Tensor:
    """key_bias as a (B, 1 or heads, 1, K) addend of the logits."""
    if key_bias.dim() == 2:
        key_bias = key_bias[:, None, :]
    if keep_idx is not None:
        key_bias = key_bias.gather(2, keep_idx[:, None, :].expand(
            key_bias.shape[0], key_bias.shape[1], keep_idx.shape[1]))
    return key_bias[:, :, None, :]


def _dense(q, k, v, keep_idx, key_bias, return_importance, scale):
    if keep_idx is not None:
        keep_idx = keep_idx.long()
        q, k, v = (gather_tokens(t, keep_idx) for t in (q, k, v))
    logits = (q @ k.transpose(-1, -2)) * scale
    if key_bias is not None:
        logits = logits + _bias_logits(key_bias, keep_idx).to(logits.dtype)
    # Rows with every key at -inf: softmax over nothing := all-zero probabilities. Replace the
    # logits of those rows by a constant first so neither the forward nor the backward sees NaN.
    dead = torch.isneginf(logits).all(-1, keepdim=True)
    p = torch.softmax(torch.where(dead, torch.zeros_like(logits), logits), dim=-1)
    p = torch.where(dead, torch.zeros_like(p), p)
    o = p @ v
    if return_importance is None:
        return o
    if return_importance == "cls":
        return o, p[:, :, 0, :].mean(1)
    return o, p.detach().sum(-2).mean(1)


def _varlen(q, k, v, keep_idx, cu_seqlens, key_bias, return_importance, scale):
    T, h, d = q.shape
    bounds = cu_seqlens.tolist()
    n_rows = bounds[-1]
    outs, imps = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        rows = (torch.arange(start, end, device=q.device) if keep_idx is None
                else keep_idx[start:end].long())
        qs, ks, vs = (t[rows].transpose(0, 1)[None] for t in (q, k, v))  # (1, h, L, d)
        kb = None
        if key_bias is not None:
            kb = key_bias[rows][None] if key_bias.dim() == 1 else key_bias[rows].t()[None]
        res = _dense(qs, ks, vs, None, kb, return_importance, scale)
        o, imp = res if return_importance is not None else (res, None)
        outs.append(o[0].transpose(0, 1))
        imps.append(imp)
    o = torch.cat(outs) if outs else q.new_zeros((0, h, d)) + 0 * q.sum()
    assert o.shape[0] == n_rows
    if return_importance is None:
        return o
    imp = torch.cat([i[0] for i in imps]) if imps else q.new_zeros((0,))
    return o, imp


def token_attention(q: Tensor, k: Tensor, v: Tensor, *, keep_idx: Optional[Tensor] = None,
                    cu_seqlens: Optional[Tensor] = None, key_bias: Optional[Tensor] = None,
                    return_importance: Optional[str] = None, scale: Optional[float] = None):
    """Softmax attention among kept tokens with an optional per-key bias. See the module doc.

    Returns o (B, heads, K, d) — (R, heads, d) with ``cu_seqlens`` — or (o, importance) with
    ``return_importance`` "cls" / "colsum" (importance (B, K), or (R,) with ``cu_seqlens``).
    """
    if return_importance not in IMPORTANCE:
        raise ValueError(f"token_attention: return_importance must be None, 'cls' or 'colsum', "
                         f"got {return_importance!r}")
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        return _varlen(q, k, v, keep_idx, cu_seqlens, key_bias, return_importance, scale)
    return _dense(q, k, v, keep_idx, key_bias, return_importance, scale)
