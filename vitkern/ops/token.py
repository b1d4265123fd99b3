"""Token attention op (EViT / ToMe / TinyDrop token dropping): checks, backend dispatch,
``torch.library`` registration and autograd.

:func:`token_attention` attends among the kept tokens of (B, heads, N, d) maps (``keep_idx``) or
within the ragged sequences of packed (T, heads, d) tokens (``cu_seqlens``), with an optional
per-key logit bias (``key_bias``) and EViT's CLS importance or GTP-ViT's column-sum importance.
The exact math is :mod:`vitkern.reference.token`. The Triton backend is one pair of custom ops,
``vitkern::token_fwd`` / ``vitkern::token_bwd``; the kernels read kept tokens in place (no
gathered copy) through any strides. Dense outputs are stored (B, K, heads, d) and returned as a
(B, heads, K, d) view, so ``o.transpose(1, 2).reshape(B, K, heads * d)`` is free; varlen outputs
are contiguous (R, heads, d).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vitkern.eager import token as eager
from vitkern.reference import token as ref

from ._common import (autocast_inputs, autocast_off, bhnd_empty, check_qkv, check_scale,
                      check_values, index_value_problem, is_int, kernel_op, lse_empty, needs_grad,
                      on_device)
from ._dispatch import CallCache, Capability, Family, HeadDims, dispatch, inputs

__all__ = ["token_attention"]

MAX_TRITON_HEAD_DIM = 128
INDEX_DTYPES = (torch.int64, torch.int32)
IMPORTANCE = ref.IMPORTANCE

# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _check_tensor(op, name, t, device):
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, q on {device}")


def _check_index(op, keep_idx, shape_ok, want: str):
    if keep_idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: keep_idx must be an int64 (or int32) tensor, got "
                        f"{keep_idx.dtype}")
    if not shape_ok:
        raise ValueError(f"{op}: keep_idx must have shape {want}, got {tuple(keep_idx.shape)}")


def _check_bias(op, key_bias, device, shapes, want: str):
    _check_tensor(op, "key_bias", key_bias, device)
    if not key_bias.is_floating_point():
        raise TypeError(f"{op}: key_bias must be a floating-point tensor, got "
                        f"{key_bias.dtype}")
    if tuple(key_bias.shape) not in shapes:
        raise ValueError(f"{op}: key_bias must have shape {want} (indexed by the original "
                         f"token), got {tuple(key_bias.shape)}")


def _check(op, q, k, v, keep_idx, cu_seqlens, max_seqlen, key_bias, return_importance, scale):
    """Validate the arguments; returns (keep_idx as int64 or None, cu_seqlens as int32 or None,
    max_seqlen (0 when dense), scale)."""
    if return_importance not in IMPORTANCE:
        raise ValueError(f"{op}: return_importance must be None, 'cls' or 'colsum', got "
                         f"{return_importance!r}")
    if cu_seqlens is not None:
        return _check_varlen(op, q, k, v, keep_idx, cu_seqlens, max_seqlen, key_bias, scale)
    if max_seqlen is not None:
        raise ValueError(f"{op}: max_seqlen is only used with cu_seqlens")
    check_qkv(op, q, k, v)
    B, h, N, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have the shape of q {tuple(q.shape)}, got "
                             f"{tuple(t.shape)}")
    scale = check_scale(op, scale, d)

    if keep_idx is not None:
        _check_tensor(op, "keep_idx", keep_idx, q.device)
        _check_index(op, keep_idx, keep_idx.dim() == 2 and keep_idx.shape[0] == B,
                     f"(B={B}, K)")
        K = keep_idx.shape[1]
        if not 1 <= K <= N:
            raise ValueError(f"{op}: keep_idx keeps K={K} tokens; need 1 <= K <= N={N}")
        keep_idx = keep_idx.long()
        if B and check_values(keep_idx):
            _check_index_values(op, keep_idx, N)

    if key_bias is not None:
        _check_bias(op, key_bias, q.device, ((B, N), (B, h, N)),
                    f"(B, N)={(B, N)} or (B, heads, N)={(B, h, N)}")
    return keep_idx, None, 0, float(scale)


def _check_varlen(op, q, k, v, keep_idx, cu, max_seqlen, key_bias, scale):
    check_qkv(op, q, k, v, "packed 3-D (T, heads, head_dim) with cu_seqlens")
    T, h, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have the shape of q {tuple(q.shape)}, got "
                             f"{tuple(t.shape)}")
    scale = check_scale(op, scale, d)
    _check_tensor(op, "cu_seqlens", cu, q.device)
    if cu.dtype not in INDEX_DTYPES or cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D int32 (or int64) tensor of S + 1 >= 2 "
                         f"prefix sums, got {cu.dtype} of shape {tuple(cu.shape)}")
    if keep_idx is not None:
        _check_tensor(op, "keep_idx", keep_idx, q.device)
        _check_index(op, keep_idx, keep_idx.dim() == 1, "(R,) with cu_seqlens (packed rows)")
        keep_idx = keep_idx.long()
    if key_bias is not None:
        _check_bias(op, key_bias, q.device, ((T,), (T, h)),
                    f"(T,)={(T,)} or (T, heads)={(T, h)} with cu_seqlens")
    if max_seqlen is not None and (not is_int(max_seqlen) or max_seqlen < 0):
        raise ValueError(f"{op}: max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if check_values(cu):
        max_seqlen = _check_varlen_values(op, cu, keep_idx, T, max_seqlen)
    elif max_seqlen is None:
        if torch.compiler.is_compiling():
            raise ValueError(f"{op}: inside torch.compile pass max_seqlen (an int) with "
                             f"cu_seqlens")
        max_seqlen = int((cu[1:] - cu[:-1]).max())  # a device sync: pass max_seqlen to avoid it
    return keep_idx, cu.to(torch.int32), int(max_seqlen), float(scale)


def _check_varlen_values(op, cu: Tensor, keep_idx: Optional[Tensor], T: int,
                         max_seqlen: Optional[int]) -> int:
    """The values of a varlen call's cu_seqlens (and keep_idx); returns max_seqlen (computed
    when None). Reads values back: see ``check_values``."""
    n_rows = T if keep_idx is None else keep_idx.shape[0]
    lens = cu[1:] - cu[:-1]
    first, last = int(cu[0]), int(cu[-1])
    longest = int(lens.max())
    if first != 0 or int(lens.min()) < 0 or last != n_rows:
        what = "keep_idx.shape[0]" if keep_idx is not None else "T = q.shape[0]"
        raise ValueError(f"{op}: cu_seqlens must start at 0, never decrease and end at "
                         f"{what} = {n_rows}; got first {first}, last {last}, smallest "
                         f"step {int(lens.min())}")
    if max_seqlen is None:
        max_seqlen = longest
    elif max_seqlen < longest:
        raise ValueError(f"{op}: max_seqlen={max_seqlen} is shorter than the longest "
                         f"sequence in cu_seqlens ({longest})")
    if keep_idx is not None and n_rows:
        _check_index_values(op, keep_idx[None], T)
    return max_seqlen


def _check_values_again(op, q: Tensor, keep_idx: Optional[Tensor], cu: Optional[Tensor],
                        max_seqlen: int) -> None:
    """The value checks of a call whose metadata a cached call of its signature passed (CPU
    index tensors: every call; see ``check_values``)."""
    if cu is not None:
        if check_values(cu):
            _check_varlen_values(op, cu, keep_idx, q.shape[0], max_seqlen)
    elif keep_idx is not None and q.shape[0] and check_values(keep_idx):
        _check_index_values(op, keep_idx, q.shape[2])


def _check_index_values(op, keep_idx: Tensor, N: int):
    """Range and uniqueness of keep_idx (reads values back: see ``check_values``)."""
    problem = index_value_problem(keep_idx, N)
    if problem is None:
        return
    kind, x, y = problem
    if kind == "range":
        raise ValueError(f"{op}: keep_idx has out-of-range indices (min {x}, max {y}); "
                         f"they must lie in [0, N={N})")
    raise ValueError(f"{op}: keep_idx has duplicate indices in row {x} (token {y} kept "
                     "twice); each row must list distinct tokens")


# --------------------------------------------------------------------------------------------
# backend declarations: the TOKEN descriptor (dispatch: vitkern.ops._dispatch)
# --------------------------------------------------------------------------------------------


def _triton_check(inp) -> Optional[str]:
    """vitkern.triton_kernels.token's declared capability (forward; backward when training)."""
    from vitkern.triton_kernels import token as tk

    return tk.unsupported(inp.head_dim, inp.dtype == torch.float32, backward=inp.needs_grad)


#: The token family (token_attention): dense and varlen, key bias, CLS / column-sum importance
#: on every backend; eager (SDPA on the kept tokens) is auto's CPU path. No CUDA C++ kernel.
TOKEN = Family("token", ref.token_attention, (
    Capability.triton(head_dim=HeadDims(MAX_TRITON_HEAD_DIM), check=_triton_check),
), eager=eager.token_attention)


def _backend(op, backend, q, key_bias, needs_grad=False):
    """The backend that runs ``op`` (:func:`~vitkern.ops._dispatch.dispatch` over TOKEN)."""
    other = () if key_bias is None else (("key_bias dtype", key_bias.dtype),)
    return dispatch(TOKEN, op, backend, inputs(q, needs_grad=needs_grad, other_dtypes=other))


# --------------------------------------------------------------------------------------------
# Triton custom ops
#
# Dense: o (B, h, K, d) [stored (B, K, h, d)], lse / per-head importance (B, h, K) fp32.
# Varlen: o (R, h, d) contiguous, lse / per-head importance (h, R) fp32. The kernels see varlen
# tensors as (S, h, ...) views with batch stride 0 (one "batch" per sequence): `_seq_views`.
# --------------------------------------------------------------------------------------------


def _n_keep(q: Tensor, keep_idx: Optional[Tensor], varlen: bool) -> int:
    if varlen:
        return q.shape[0] if keep_idx is None else keep_idx.shape[0]
    return q.shape[2] if keep_idx is None else keep_idx.shape[1]


def _outputs_empty(q, keep_idx, varlen, n_imp: bool):
    n = _n_keep(q, keep_idx, varlen)
    if varlen:
        h = q.shape[1]
        stat = q.new_empty((h, n), dtype=torch.float32)
        return (q.new_empty((n, h, q.shape[2])), stat,
                q.new_empty((h, n if n_imp else 0), dtype=torch.float32))
    return bhnd_empty(q, n), lse_empty(q, n), lse_empty(q, n if n_imp else 0)


def _seq_views(n_seq: int, *ts):
    """Varlen tensors as per-sequence views with batch stride 0: (T, h, d) -> (S, h, T, d);
    (h, R) statistics -> (S, h, R); keep_idx (R,) / key_bias (T,) -> (S, ·); key_bias (T, h) ->
    (S, h, T). None stays None."""
    out = []
    for t in ts:
        if t is None:
            out.append(None)
        elif t.dim() == 3:
            out.append(t.permute(1, 0, 2)[None].expand(n_seq, -1, -1, -1))
        else:
            out.append(t[None].expand(n_seq, *t.shape))
    return out


def _bias_view(key_bias):
    """Varlen key_bias (T,) stays; (T, h) becomes (h, T) so that _seq_views gives (S, h, T)."""
    return key_bias if key_bias is None or key_bias.dim() == 1 else key_bias.t()


@kernel_op("token_fwd")
def _token_fwd(q: Tensor, k: Tensor, v: Tensor, keep_idx: Optional[Tensor],
               key_bias: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float,
               importance: str, max_seqlen: int) -> tuple[Tensor, Tensor, Tensor]:
    """Triton token-attention forward: (o, lse2, imp).

    lse2: base-2 log-sum-exp, fp32. imp: fp32 per-head importance ("cls": row 0 of the attention
    probabilities, "colsum": their column sums), an empty tensor for importance "".
    """
    from vitkern.triton_kernels import token as tk

    varlen = cu_seqlens is not None
    o, lse, imp = _outputs_empty(q, keep_idx, varlen, importance != "")
    if varlen:
        n_seq, n_rows = cu_seqlens.shape[0] - 1, max_seqlen
        q4, k4, v4, o4, lse4, imp4, idx, bias = _seq_views(
            n_seq, q, k, v, o, lse, imp, keep_idx, _bias_view(key_bias))
    else:
        n_rows = o.shape[2]
        q4, k4, v4, o4, lse4, imp4, idx, bias = q, k, v, o, lse, imp, keep_idx, key_bias
    with on_device(q):
        tk.forward(q4, k4, v4, idx, bias, cu_seqlens, o4, lse4, scale, n_rows)
        if importance == "cls":
            tk.cls_probs(q4, k4, idx, bias, cu_seqlens, lse4, imp4, scale, n_rows)
        elif importance == "colsum":
            tk.colsum(q4, k4, idx, bias, cu_seqlens, lse4, imp4, scale, n_rows)
    return o, lse, imp


@_token_fwd.register_fake
def _(q, k, v, keep_idx, key_bias, cu_seqlens, scale, importance, max_seqlen):
    return _outputs_empty(q, keep_idx, cu_seqlens is not None, importance != "")


def _bias_grad_empty(q: Tensor, key_bias: Optional[Tensor]) -> Tensor:
    return q.new_empty((0,)) if key_bias is None else torch.empty_like(
        key_bias, memory_format=torch.contiguous_format)


@kernel_op("token_bwd")
def _token_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, p0: Tensor,
               dp0: Optional[Tensor], keep_idx: Optional[Tensor], key_bias: Optional[Tensor],
               cu_seqlens: Optional[Tensor], scale: float,
               max_seqlen: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton token-attention backward: (dq, dk, dv, dkey_bias); dkey_bias is empty without a
    bias. ``dp0`` is the gradient of the per-head CLS-row probabilities ``p0`` (or None)."""
    from vitkern.triton_kernels import token as tk

    varlen = cu_seqlens is not None
    partial = keep_idx is not None  # tokens that are not kept get zero gradients
    g0 = None if dp0 is None or dp0.numel() == 0 else dp0.float().contiguous()
    if varlen:
        T, h, _ = q.shape
        dq, dk, dv = ((torch.zeros if partial else torch.empty)(q.shape, device=q.device,
                                                                dtype=q.dtype) for _ in range(3))
        db = None if key_bias is None else (torch.zeros if partial else torch.empty)(
            (h, T), device=q.device, dtype=torch.float32)
        n_seq, n_rows = cu_seqlens.shape[0] - 1, max_seqlen
        args = _seq_views(n_seq, do, q, k, v, o, lse, keep_idx, _bias_view(key_bias), p0, g0,
                          dq, dk, dv, db)
    else:
        b, h, n, _ = q.shape
        dq, dk, dv = (bhnd_empty(t, n, zero=partial) for t in (q, k, v))
        db = None if key_bias is None else (torch.zeros if partial else torch.empty)(
            (b, h, n), device=q.device, dtype=torch.float32)
        n_rows = o.shape[2]
        args = (do, q, k, v, o, lse, keep_idx, key_bias, p0, g0, dq, dk, dv, db)
    do_, q_, k_, v_, o_, lse_, idx_, bias_, p0_, g0_, dq_, dk_, dv_, db_ = args
    with on_device(q):
        tk.backward(do_, q_, k_, v_, o_, lse_, idx_, bias_, cu_seqlens, p0_, g0_, dq_, dk_, dv_,
                    db_, scale, n_rows)
    if db is None:
        dbias = q.new_empty((0,))
    elif varlen:
        dbias = (db.sum(0) if key_bias.dim() == 1 else db.t().contiguous()).to(key_bias.dtype)
    else:
        dbias = (db.sum(1) if key_bias.dim() == 2 else db).to(key_bias.dtype)
    return dq, dk, dv, dbias


@_token_bwd.register_fake
def _(do, q, k, v, o, lse, p0, dp0, keep_idx, key_bias, cu_seqlens, scale, max_seqlen):
    if cu_seqlens is not None:
        grads = tuple(q.new_empty(q.shape) for _ in range(3))
    else:
        grads = tuple(bhnd_empty(t, t.shape[2]) for t in (q, k, v))
    return (*grads, _bias_grad_empty(q, key_bias))


def _setup_context(ctx, inputs, output):
    q, k, v, keep_idx, key_bias, cu_seqlens, scale, importance, max_seqlen = inputs
    o, lse, imp = output
    want_cls = importance == "cls"
    # the CLS probabilities are only needed (and saved) when their gradient is supported
    ctx.save_for_backward(q, k, v, o, lse, imp if want_cls else None, keep_idx, key_bias,
                          cu_seqlens)
    ctx.scale = scale
    ctx.want_cls = want_cls
    ctx.max_seqlen = max_seqlen
    ctx.mark_non_differentiable(lse)
    if importance == "colsum":  # documented: the column-sum importance carries no gradient
        ctx.mark_non_differentiable(imp)


def _backward(ctx, do, _dlse, dimp):
    q, k, v, o, lse, p0, keep_idx, key_bias, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    if p0 is None:
        p0 = lse.new_empty((0,))
    dq, dk, dv, dbias = _token_bwd(
        do, q, k, v, o, lse, p0, dimp if ctx.want_cls else None, keep_idx, key_bias,
        cu_seqlens, ctx.scale, ctx.max_seqlen)
    return (dq, dk, dv, None, (dbias if key_bias is not None else None), None, None, None,
            None)


_token_fwd.register_autograd(_backward, _setup_context)


# --------------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------------


_CALLS = CallCache()


def token_attention(q: Tensor, k: Tensor, v: Tensor, *, keep_idx: Optional[Tensor] = None,
                    cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                    key_bias: Optional[Tensor] = None, return_importance: Optional[str] = None,
                    scale: Optional[float] = None, backend: str = "auto"):
    """Softmax attention among kept tokens, with a per-key bias and token importance.

    Args:
        q, k, v: (B, heads, N, d) token maps; any strides (read in place). With ``cu_seqlens``:
            packed (T, heads, d) tokens of all sequences (flash-attn's varlen layout), any
            strides, e.g. ``qkv.view(T, 3, heads, d).unbind(1)`` of a packed projection.
        keep_idx: dense: (B, K) int64 (or int32) indices of the kept tokens, distinct and in
            [0, N), in the order the output rows take (EViT orders by score; that is fine).
            Attention is among the kept tokens only. None keeps all N in order. Varlen: (R,)
            indices into the T packed tokens (distinct), row r of the output being token
            ``keep_idx[r]``; a ragged drop from a dense (B, N) map passes q as (B·N, heads, d)
            and indices b·N + j. The kernels read the kept tokens in place (no gathered copy).
            Range and uniqueness are checked for CPU tensors; on a GPU only with
            ``VITKERN_DEBUG=1`` (reading values back is a device sync, which no op call does
            by default), never inside ``torch.compile``.
        cu_seqlens: None, or (S + 1,) int32 (or int64) prefix sums over the output rows
            (flash-attn convention): sequence s owns rows cu[s]..cu[s+1]-1 and attends only
            within itself; cu[0] = 0, cu[S] = R (= T without keep_idx). Empty and single-token
            sequences are allowed (TinyDrop-style threshold dropping keeps a different number
            of tokens per image). Checked as keep_idx is.
        max_seqlen: with cu_seqlens, the longest sequence (an int; it sizes the launch grid).
            Computed from cu_seqlens when None (on a GPU a device sync: pass it to avoid one);
            required inside torch.compile.
        key_bias: dense (B, N) or (B, heads, N); varlen (T,) or (T, heads): additive logit bias
            per key, indexed by the original token (it follows keep_idx): ToMe's log(size), or
            -inf to drop a key. Differentiable. A query whose keys are all -inf gets output 0
            and zero gradients.
        return_importance: None; "cls": also return the CLS importance, the attention
            probabilities of the first row of each sequence (row 0: the CLS token when kept
            first) averaged over heads, column j for kept key j (column 0 is the CLS token
            itself; EViT uses [:, 1:]); computed from the forward's softmax statistics (one
            extra q0·K pass, O(K·d)); differentiable (gradient to q, k and key_bias: EViT's
            token fusion trains through it). "colsum": the column sums sum_i P[i, j] averaged
            over heads (GTP-ViT), which costs a second QKᵀ pass over the kept tokens; returned
            without gradient (like ``.detach()``: it is a ranking signal).
        scale: logit scale, default d**-0.5.
        backend: "auto", "triton", "cuda", "eager" or "reference" (see :mod:`vitkern.backends`;
            ``auto`` runs "eager", :mod:`vitkern.eager.token`, for CPU tensors).

    Returns:
        o in the input dtype — dense (B, heads, K, d), varlen (R, heads, d) — or (o, importance)
        with importance (B, K) / (R,) in the input dtype.

    Under ``torch.autocast`` it follows ``F.scaled_dot_product_attention``: q, k, v (fp32 / fp16 /
    bf16, mixed allowed, e.g. q, k after an fp32 ``q_norm`` / ``k_norm``) are cast to the autocast
    dtype, which is then "the input dtype" above; ``key_bias`` keeps its dtype and gets its
    gradient in it.
    """
    op = "token_attention"
    q, k, v = autocast_inputs(q, k, v)
    grad = needs_grad(q, k, v, key_bias)
    # checked arguments and backend, per call signature (not when max_seqlen is computed from
    # cu_seqlens' values); the values of CPU index tensors are checked on every call
    key = None if cu_seqlens is not None and max_seqlen is None else _CALLS.key(
        q, k, v, keep_idx, cu_seqlens, max_seqlen, key_bias, return_importance, scale, backend,
        grad)
    plan = _CALLS.get(key)
    if plan is None:
        keep_idx, cu, max_seqlen, scale = _check(op, q, k, v, keep_idx, cu_seqlens, max_seqlen,
                                                 key_bias, return_importance, scale)
        name = _backend(op, backend, q, key_bias, grad)
        _CALLS.put(key, (max_seqlen, scale, name))
    else:
        max_seqlen, scale, name = plan
        keep_idx = None if keep_idx is None else keep_idx.long()
        cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32)
        _check_values_again(op, q, keep_idx, cu, max_seqlen)
    varlen = cu is not None
    if name == "eager" and q.numel() and _n_keep(q, keep_idx, varlen):
        with autocast_off(q):
            return TOKEN.eager(q, k, v, keep_idx=keep_idx, cu_seqlens=cu_seqlens,
                               key_bias=key_bias, return_importance=return_importance,
                               scale=scale)
    if name == "reference" or q.numel() == 0 or _n_keep(q, keep_idx, varlen) == 0:
        with autocast_off(q):
            return TOKEN.reference(q, k, v, keep_idx=keep_idx, cu_seqlens=cu_seqlens,
                                   key_bias=key_bias, return_importance=return_importance,
                                   scale=scale)
    o, _, imp = _token_fwd(q, k, v, keep_idx, key_bias, cu, scale, return_importance or "",
                           max_seqlen)
    if return_importance is None:
        return o
    return o, imp.mean(0 if varlen else 1).to(q.dtype)
