"""Token attention op (EViT / ToMe / token dropping): checks, backend dispatch, ``torch.library``
registration and autograd.

:func:`token_attention` attends among the kept tokens of (B, heads, N, d) maps (``keep_idx``),
with an optional per-key logit bias (``key_bias``) and EViT's CLS importance. The exact math is
:mod:`vitkern.reference.token`. The Triton backend is one pair of custom ops,
``vitkern::token_fwd`` / ``vitkern::token_bwd``; the kernels read kept tokens in place (no gathered
copy). Outputs are stored (B, K, heads, d) and returned as a (B, heads, K, d) view, so
``o.transpose(1, 2).reshape(B, K, heads * d)`` is free.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vitkern import backends
from vitkern.reference import token as ref

from ._common import (bhnd_empty, check_qkv, check_scale, lse_empty, on_device,
                      triton_dtype_reason)

__all__ = ["token_attention"]

MAX_TRITON_HEAD_DIM = 128
INDEX_DTYPES = (torch.int64, torch.int32)

# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _check(op, q, k, v, keep_idx, key_bias, return_importance, scale):
    """Validate the arguments; returns (keep_idx as int64 or None, scale)."""
    check_qkv(op, q, k, v)
    B, h, N, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have the shape of q {tuple(q.shape)}, got "
                             f"{tuple(t.shape)}")
    if return_importance not in (None, "cls"):
        raise ValueError(f"{op}: return_importance must be None or 'cls', got "
                         f"{return_importance!r}")
    scale = check_scale(op, scale, d)

    if keep_idx is not None:
        if not isinstance(keep_idx, Tensor):
            raise TypeError(f"{op}: keep_idx must be a torch.Tensor or None, got "
                            f"{type(keep_idx).__name__}")
        if keep_idx.dtype not in INDEX_DTYPES:
            raise TypeError(f"{op}: keep_idx must be an int64 (or int32) tensor, got "
                            f"{keep_idx.dtype}")
        if keep_idx.dim() != 2 or keep_idx.shape[0] != B:
            raise ValueError(f"{op}: keep_idx must have shape (B={B}, K), got "
                             f"{tuple(keep_idx.shape)}")
        K = keep_idx.shape[1]
        if not 1 <= K <= N:
            raise ValueError(f"{op}: keep_idx keeps K={K} tokens; need 1 <= K <= N={N}")
        if keep_idx.device != q.device:
            raise ValueError(f"{op}: keep_idx is on {keep_idx.device}, q on {q.device}")
        keep_idx = keep_idx.long()
        if B and not torch.compiler.is_compiling():
            _check_index_values(op, keep_idx, N)

    if key_bias is not None:
        if not isinstance(key_bias, Tensor):
            raise TypeError(f"{op}: key_bias must be a torch.Tensor or None, got "
                            f"{type(key_bias).__name__}")
        if not key_bias.is_floating_point():
            raise TypeError(f"{op}: key_bias must be a floating-point tensor, got "
                            f"{key_bias.dtype}")
        if tuple(key_bias.shape) not in ((B, N), (B, h, N)):
            raise ValueError(f"{op}: key_bias must have shape (B, N)={(B, N)} or "
                             f"(B, heads, N)={(B, h, N)} (indexed by the original token), got "
                             f"{tuple(key_bias.shape)}")
        if key_bias.device != q.device:
            raise ValueError(f"{op}: key_bias is on {key_bias.device}, q on {q.device}")
    return keep_idx, float(scale)


def _check_index_values(op, keep_idx: Tensor, N: int):
    """Range and uniqueness of keep_idx (one device sync; skipped inside torch.compile)."""
    lo, hi = keep_idx.min().item(), keep_idx.max().item()
    if lo < 0 or hi >= N:
        raise ValueError(f"{op}: keep_idx has out-of-range indices (min {lo}, max {hi}); "
                         f"they must lie in [0, N={N})")
    srt = keep_idx.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
    if dup.any().item():
        row = int(dup.nonzero()[0, 0])
        val = int(srt[row, 1:][srt[row, 1:] == srt[row, :-1]][0])
        raise ValueError(f"{op}: keep_idx has duplicate indices in row {row} (token {val} kept "
                         "twice); each row must list distinct tokens")


def _backend(op, backend, q, key_bias, needs_grad=False):
    d = q.shape[-1]

    def reason(name: str, explicit: bool) -> Optional[str]:
        why = backends.device_reason(name, q.device, explicit)
        if why is not None or name == "reference":
            return why
        if name == "triton":
            if why := triton_dtype_reason(q.dtype):
                return why
            if d % 8 or d > MAX_TRITON_HEAD_DIM:
                return (f"head_dim {d} not supported by triton (multiples of 8 up to "
                        f"{MAX_TRITON_HEAD_DIM})")
            if key_bias is not None and (why := triton_dtype_reason(key_bias.dtype,
                                                                    "key_bias dtype")):
                return why
            from vitkern.triton_kernels import token as tk

            return tk.unsupported(d, q.dtype == torch.float32, backward=needs_grad)
        return "no token-attention kernel in vitkern._C yet"

    return backends.select(op, backend, reason)


# --------------------------------------------------------------------------------------------
# Triton custom ops
# --------------------------------------------------------------------------------------------


def _n_keep(q: Tensor, keep_idx: Optional[Tensor]) -> int:
    return q.shape[2] if keep_idx is None else keep_idx.shape[1]


@torch.library.custom_op("vitkern::token_fwd", mutates_args=())
def _token_fwd(q: Tensor, k: Tensor, v: Tensor, keep_idx: Optional[Tensor],
               key_bias: Optional[Tensor], scale: float,
               want_cls: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Triton token-attention forward: (o, lse2, p0).

    lse2: base-2 log-sum-exp, fp32 (B, heads, K). p0: fp32 (B, heads, K) row 0 of the attention
    probabilities per head when ``want_cls``, else an empty (B, heads, 0) tensor.
    """
    from vitkern.triton_kernels import token as tk

    n = _n_keep(q, keep_idx)
    o, lse = bhnd_empty(q, n), lse_empty(q, n)
    p0 = lse_empty(q, n if want_cls else 0)
    with on_device(q):
        tk.forward(q, k, v, keep_idx, key_bias, o, lse, scale)
        if want_cls:
            tk.cls_probs(q, k, keep_idx, key_bias, lse, p0, scale)
    return o, lse, p0


@_token_fwd.register_fake
def _(q, k, v, keep_idx, key_bias, scale, want_cls):
    n = _n_keep(q, keep_idx)
    return bhnd_empty(q, n), lse_empty(q, n), lse_empty(q, n if want_cls else 0)


def _bias_grad_empty(q: Tensor, key_bias: Optional[Tensor]) -> Tensor:
    return q.new_empty((0,)) if key_bias is None else torch.empty_like(
        key_bias, memory_format=torch.contiguous_format)


@torch.library.custom_op("vitkern::token_bwd", mutates_args=())
def _token_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, p0: Tensor,
               dp0: Optional[Tensor], keep_idx: Optional[Tensor], key_bias: Optional[Tensor],
               scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton token-attention backward: (dq, dk, dv, dkey_bias); dkey_bias is empty without a
    bias. ``dp0`` is the gradient of the per-head CLS-row probabilities ``p0`` (or None)."""
    from vitkern.triton_kernels import token as tk

    b, h, n, _ = q.shape
    partial = keep_idx is not None  # tokens that are not kept get zero gradients
    dq, dk, dv = (bhnd_empty(t, n, zero=partial) for t in (q, k, v))
    db = None
    if key_bias is not None:
        db = (torch.zeros if partial else torch.empty)((b, h, n), device=q.device,
                                                      dtype=torch.float32)
    g0 = None if dp0 is None or dp0.numel() == 0 else dp0.float().contiguous()
    with on_device(q):
        tk.backward(do, q, k, v, o, lse, keep_idx, key_bias, p0, g0, dq, dk, dv, db, scale)
    if db is None:
        dbias = q.new_empty((0,))
    else:
        dbias = (db.sum(1) if key_bias.dim() == 2 else db).to(key_bias.dtype)
    return dq, dk, dv, dbias


@_token_bwd.register_fake
def _(do, q, k, v, o, lse, p0, dp0, keep_idx, key_bias, scale):
    return (bhnd_empty(q, q.shape[2]), bhnd_empty(k, k.shape[2]), bhnd_empty(v, v.shape[2]),
            _bias_grad_empty(q, key_bias))


def _setup_context(ctx, inputs, output):
    q, k, v, keep_idx, key_bias, scale, want_cls = inputs
    o, lse, p0 = output
    ctx.save_for_backward(q, k, v, o, lse, p0, keep_idx, key_bias)
    ctx.scale = scale
    ctx.want_cls = want_cls
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse, dp0):
    q, k, v, o, lse, p0, keep_idx, key_bias = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, dbias = torch.ops.vitkern.token_bwd(
        do, q, k, v, o, lse, p0, dp0 if ctx.want_cls else None, keep_idx, key_bias, ctx.scale)
    return dq, dk, dv, None, (dbias if key_bias is not None else None), None, None


torch.library.register_autograd("vitkern::token_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------------


def token_attention(q: Tensor, k: Tensor, v: Tensor, *, keep_idx: Optional[Tensor] = None,
                    key_bias: Optional[Tensor] = None, return_importance: Optional[str] = None,
                    scale: Optional[float] = None, backend: str = "auto"):
    """Softmax attention among kept tokens, with a per-key bias and EViT's CLS importance.

    Args:
        q, k, v: (B, heads, N, d) token maps; any strides.
        keep_idx: (B, K) int64 (or int32) indices of the kept tokens, distinct and in [0, N),
            in the order the output rows take (EViT orders by score; that is fine). Attention is
            among the kept tokens only. None keeps all N in order. The kernels read the kept
            tokens in place (no gathered copy). Range and uniqueness are checked eagerly (one
            device sync); inside ``torch.compile`` the check is skipped.
        key_bias: (B, N) or (B, heads, N) additive logit bias per key, indexed by the original
            token index (it follows keep_idx): ToMe's log(size), or -inf to drop a key.
            Differentiable. A query whose keys are all -inf gets output 0 and zero gradients.
        return_importance: None, or "cls": also return the CLS importance (B, K) = the
            attention probabilities of the first kept query (row 0) averaged over heads,
            column j for kept key j (column 0 is the CLS token itself; EViT uses [:, 1:]).
            Differentiable: its gradient flows to q, k and key_bias.
        scale: logit scale, default d**-0.5.
        backend: "auto", "triton", "cuda" or "reference" (see :mod:`vitkern.backends`).

    Returns:
        o (B, heads, K, d) in the input dtype, or (o, importance) with importance (B, K) in the
        input dtype.
    """
    op = "token_attention"
    keep_idx, scale = _check(op, q, k, v, keep_idx, key_bias, return_importance, scale)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, key_bias))
    name = _backend(op, backend, q, key_bias, needs_grad)
    if name == "reference" or q.numel() == 0:
        return ref.token_attention(q, k, v, keep_idx=keep_idx, key_bias=key_bias,
                                   return_importance=return_importance, scale=scale)
    want_cls = return_importance == "cls"
    o, _, p0 = torch.ops.vitkern.token_fwd(q, k, v, keep_idx, key_bias, scale, want_cls)
    if not want_cls:
        return o
    return o, p0.mean(1).to(q.dtype)
