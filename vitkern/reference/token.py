"""Token attention (EViT / ToMe / token dropping), the definition: pure PyTorch, differentiable,
any float dtype (fp64 included).

q, k, v are (B, heads, N, d) token maps.

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

This is also vitkern's CPU path (it materialises the K×K probabilities).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["token_attention", "gather_tokens"]


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


def token_attention(q: Tensor, k: Tensor, v: Tensor, *, keep_idx: Optional[Tensor] = None,
                    key_bias: Optional[Tensor] = None, return_importance: Optional[str] = None,
                    scale: Optional[float] = None):
    """Softmax attention among kept tokens with an optional per-key bias. See the module doc.

    Returns o (B, heads, K, d), or (o, importance (B, K)) with ``return_importance="cls"``.
    """
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
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
    if return_importance != "cls":
        raise ValueError(f"token_attention: return_importance must be None or 'cls', got "
                         f"{return_importance!r}")
    return o, p[:, :, 0, :].mean(1)
