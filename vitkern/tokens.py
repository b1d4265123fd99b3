"""Token selection, fusion and merging helpers for token-dropping ViTs (EViT, ToMe, TinyDrop).

Everything here is plain PyTorch on (B, N, C) token tensors (channels last, token 0 the CLS token
when there is one) and differentiable where the method trains through it. They pair with
:func:`vitkern.ops.token_attention`, which gives the importance scores (``"cls"`` for EViT,
``"colsum"`` for GTP-ViT) without materialising the attention matrix, takes ToMe's ``log(size)``
as ``key_bias``, and runs ragged batches from :func:`ragged_keep`.

Token order. Methods disagree on the order of the kept tokens: EViT, PPT, GTP-ViT and Cropr keep
them **by score** (most important first), ToMe and timm's PatchDropout by **original position**.
For a plain ViT after the position embedding the order does not change the result (attention is
permutation-equivariant), but it matters for bit-exact comparisons and for anything spatial.
The selection helpers take ``order="score"`` (default, EViT) or ``order="index"``; prefix tokens
(CLS, distillation) always come first, in their original order.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "keep_count", "topk_tokens", "gather_tokens", "scatter_tokens", "evit_fuse", "evit_select",
    "bipartite_soft_matching", "merge_wavg", "tome_merge", "ragged_keep", "pad_tokens",
]

ORDERS = ("score", "index")


def keep_count(n_tokens: int, keep: Union[int, float]) -> int:
    """Tokens kept out of ``n_tokens``: an int is a count (clamped to [0, n]); a float in (0, 1]
    is a keep rate, rounded up as EViT does (``ceil(rate · n)``)."""
    if isinstance(keep, bool):
        raise TypeError("keep must be an int count or a float rate, got a bool")
    if isinstance(keep, int):
        if keep < 0:
            raise ValueError(f"keep count must be >= 0, got {keep}")
        return min(keep, n_tokens)
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep rate must lie in (0, 1], got {keep}")
    return min(n_tokens, math.ceil(float(keep) * n_tokens))


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be 'score' (by importance, EViT) or 'index' (original "
                         f"position, ToMe), got {order!r}")


def topk_tokens(scores: Tensor, keep: Union[int, float], *, num_prefix: int = 1,
                order: str = "score") -> tuple[Tensor, Tensor]:
    """Select the most important tokens, keeping the ``num_prefix`` prefix tokens (CLS) first.

    Args:
        scores: (B, N) importance of every token (the prefix columns are ignored), e.g. the
            ``"cls"`` importance of :func:`vitkern.ops.token_attention`.
        keep: how many of the N - num_prefix other tokens to keep (int), or a keep rate (float).
        order: "score" (kept tokens by decreasing score, EViT) or "index" (original order).

    Returns:
        keep_idx (B, num_prefix + k) int64 — prefix indices, then the k kept tokens — and
        drop_idx (B, N - num_prefix - k), the others (same order rule).
    """
    _check_order(order)
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    B, N = scores.shape
    if not 0 <= num_prefix <= N:
        raise ValueError(f"num_prefix={num_prefix} out of range for N={N}")
    k = keep_count(N - num_prefix, keep)
    ranked = scores[:, num_prefix:].argsort(dim=1, descending=True, stable=True) + num_prefix
    kept, dropped = ranked[:, :k], ranked[:, k:]
    if order == "index":
        kept, dropped = kept.sort(dim=1).values, dropped.sort(dim=1).values
    prefix = torch.arange(num_prefix, device=scores.device).expand(B, num_prefix)
    return torch.cat([prefix, kept], dim=1), dropped


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """(B, N, C) -> (B, K, C): rows ``idx`` (B, K) in the order given."""
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


def scatter_tokens(x: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """A copy of ``x`` (B, N, C) whose rows ``idx`` (B, K) (distinct) are replaced by ``src``
    (B, K, C): puts processed kept tokens back at their original positions (dense prediction,
    Cropr's last-layer fusion). Differentiable in ``x`` (rows not overwritten) and ``src``."""
    return x.scatter(1, idx[..., None].expand(*idx.shape, x.shape[-1]), src)


def evit_fuse(x: Tensor, scores: Tensor, drop_idx: Tensor) -> Tensor:
    """EViT's fused token: sum over the dropped tokens j of scores[j] · x[j] -> (B, 1, C).

    ``scores`` (B, N) are EViT's CLS attention weights (unnormalised: the sum is not divided by
    them); the result is differentiable through them (EViT trains through the CLS attention)."""
    w = scores.gather(1, drop_idx).to(x.dtype)
    return (gather_tokens(x, drop_idx) * w[..., None]).sum(dim=1, keepdim=True)


def evit_select(x: Tensor, scores: Tensor, keep: Union[int, float], *, fuse: bool = True,
                order: str = "score", num_prefix: int = 1) -> tuple[Tensor, Tensor]:
    """EViT's token reorganisation after a block's attention residual.

    Keeps the ``num_prefix`` prefix tokens (CLS first, then e.g. a distillation token or
    register tokens) and the ``keep`` most attended image tokens (count or rate of the
    N - num_prefix image tokens, ``ceil(rate · (N - num_prefix))``); with ``fuse`` the rest are
    summed into one extra token appended last, weighted by their CLS attention
    (:func:`evit_fuse`).

    Args:
        x: (B, N, C) tokens, the prefix tokens first.
        scores: (B, N) CLS attention of every token (the prefix columns are ignored), e.g.
            ``token_attention(..., return_importance="cls")[1]``.

    Returns:
        (x_new (B, num_prefix + k (+ 1), C), keep_idx (B, num_prefix + k)). When every image
        token is kept (keep rate 1) x is returned unchanged (no fused token), as EViT does.
    """
    N = x.shape[1]
    keep_idx, drop_idx = topk_tokens(scores, keep, num_prefix=num_prefix, order=order)
    if drop_idx.shape[1] == 0:
        return x, keep_idx
    out = gather_tokens(x, keep_idx)
    if fuse:
        out = torch.cat([out, evit_fuse(x, scores, drop_idx)], dim=1)
    assert out.shape[1] == keep_idx.shape[1] + int(fuse) <= N + 1
    return out, keep_idx


# --------------------------------------------------------------------------------------------
# ToMe: bipartite soft matching with size tracking
# --------------------------------------------------------------------------------------------


def _identity_merge(x: Tensor, mode: str = "mean") -> Tensor:
    return x


def bipartite_soft_matching(metric: Tensor, r: int, *, class_token: bool = True,
                            num_prefix: Optional[int] = None) -> Callable[..., Tensor]:
    """ToMe's bipartite soft matching: a function that merges ``r`` tokens away.

    Tokens alternate between set A (even positions) and set B (odd positions). Each A token is
    matched to its most similar B token (cosine similarity of ``metric``); the ``r`` A tokens
    with the most similar match are merged into their partners, the other A tokens are kept.
    The ``num_prefix`` prefix tokens (default ``int(class_token)``: ToMe's CLS token; more for
    register or distillation tokens) are never merged and stay first, in order; the others keep
    the A / B split of their positions, so one prefix token is exactly ToMe's class-token rule.
    At most half of the other tokens can go: r is clamped to (N - num_prefix) // 2.

    Args:
        metric: (B, N, c) similarity features (ToMe: the keys averaged over heads).
        r: tokens to remove.

    Returns:
        ``merge(x, mode="mean") -> (B, N - r, C)`` for any (B, N, C) tensor: output order is
        [prefix tokens, kept A tokens (by position with a prefix, else by decreasing match
        score), then all B tokens in order], each B token reduced with the A tokens merged into
        it (``mode`` as in ``Tensor.scatter_reduce``: "sum", "mean", "amax", ...).
    """
    B, N, _ = metric.shape
    p = int(class_token) if num_prefix is None else int(num_prefix)
    if not 0 <= p <= N:
        raise ValueError(f"num_prefix={p} out of range for N={N}")
    r = min(int(r), (N - p) // 2)
    if r <= 0:
        return _identity_merge
    a_first = p % 2  # A = even positions: the first token after the prefix is in A iff p is even

    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        rest = x[:, p:]
        return (rest[:, 1::2], rest[:, ::2]) if a_first else (rest[:, ::2], rest[:, 1::2])

    with torch.no_grad():
        unit_a, unit_b = split(metric / metric.norm(dim=-1, keepdim=True))
        best, partner = (unit_a @ unit_b.transpose(1, 2)).max(dim=-1)  # over B, for each A
        rank = best.argsort(dim=-1, descending=True, stable=True)[..., None]
        merged, kept = rank[:, :r], rank[:, r:]
        target = partner[..., None].gather(1, merged)
        if p:
            kept = kept.sort(dim=1).values

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        a, b = split(x)
        c = x.shape[-1]
        keep_a = a.gather(1, kept.expand(-1, -1, c))
        src = a.gather(1, merged.expand(-1, -1, c))
        b = b.scatter_reduce(1, target.expand(-1, -1, c), src, reduce=mode)
        return torch.cat([x[:, :p], keep_a, b], dim=1)

    return merge


def merge_wavg(merge: Callable[..., Tensor], x: Tensor,
               size: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge (ToMe): x <- sum(size · x) / sum(size) over each merged group.

    ``size`` (B, N, 1) counts the patches each token stands for (ones when None). Returns
    (x (B, N - r, C), size (B, N - r, 1)); pass ``size.log()[..., 0]`` to the next attention as
    ``key_bias`` for proportional attention."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_merge(x: Tensor, metric: Tensor, r: int, size: Optional[Tensor] = None, *,
               class_token: bool = True,
               num_prefix: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """One ToMe step: match on ``metric`` (B, N, c), merge ``r`` tokens of x (B, N, C) with
    size-weighted averages, the prefix tokens untouched. Returns (x, size)."""
    merge = bipartite_soft_matching(metric, r, class_token=class_token, num_prefix=num_prefix)
    return merge_wavg(merge, x, size)


# --------------------------------------------------------------------------------------------
# ragged batches (threshold-based dropping: a different token count per image)
# --------------------------------------------------------------------------------------------


def ragged_keep(mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """Kept tokens of a (B, N) boolean mask as the packed rows of a ragged batch.

    Returns (keep_idx (R,) int64 indices b·N + j into the (B·N, ...) flattened map, in original
    order; cu_seqlens (B + 1,) int32; max_seqlen int (one device sync)). Feed them to
    ``token_attention(q.flatten(0, 1), ..., keep_idx=keep_idx, cu_seqlens=cu_seqlens,
    max_seqlen=max_seqlen)`` with q as a (B·N, heads, d) view (e.g. of the qkv projection)."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, N) bool tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    counts = mask.sum(dim=1)
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = counts.cumsum(0)
    keep_idx = mask.flatten().nonzero().flatten()
    return keep_idx, cu, int(counts.max()) if mask.shape[0] else 0


def pad_tokens(packed: Tensor, keep_idx: Tensor, batch: int, n_tokens: int,
               fill: float = 0.0) -> Tensor:
    """Inverse of :func:`ragged_keep`: packed rows (R, ...) back to (B, N, ...) with ``fill``
    at the dropped tokens."""
    out = packed.new_full((batch * n_tokens, *packed.shape[1:]), fill)
    return out.index_copy(0, keep_idx, packed).view(batch, n_tokens, *packed.shape[1:])
