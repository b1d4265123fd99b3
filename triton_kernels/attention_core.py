"""The attention engine shared by every softmax family (HiLo, window, token; PPMA uses its parts).

Each family decides *which* query rows and key columns a tile holds (windows, pooled keys, kept
tokens, ...), how keys are loaded and how scores are biased and masked; it says so in
``@triton.jit`` hooks (see "the engine" below). The bodies here run the math, the same for all:

* forward (:func:`attention_fwd`): online softmax in base 2 (scores pre-multiplied by
  ``scale * log2(e)``), fp32 running max / sum / accumulator, log-sum-exp (base 2) saved per query
  row for the backward;
* backward (FlashAttention-2; :func:`attention_dq`, :func:`attention_dkdv`): P is recomputed from
  q, k and the saved log-sum-exp, with ``delta = rowsum(dO * O)`` computed once by
  :func:`attn_bwd_delta_kernel`; every backward ends in :func:`softmax_p_ds`.

Dots go through :func:`mma` at the launch's ``DOT_PRECISION`` (:func:`dot_precision`). Host
helpers name strides for keyword launches (:func:`strides_of`). Tile candidates and their choice
(autotuning, spill checks) live in ``tuning.py``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .compat import patch_interpreter_scalar_index
from .tuning import Launcher, launch_key

patch_interpreter_scalar_index()  # older interpreters under NumPy >= 2.4 (see compat.py)

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr):
    """``tl.dot`` at the launch's ``DOT_PRECISION`` (see :func:`dot_precision`): ``"native"``
    for 16-bit operands, else the ``input_precision`` of fp32 ones (``"tf32x3"``, ``"tf32"``,
    ``"ieee"``)."""
    if DOT_PRECISION == "native":
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def program_coords(n_rows, BLOCK: tl.constexpr):
    """(batch*head, row block) of this program in a flat 1D grid (no 65535 limit on axis 1)."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n_rows, BLOCK)
    return (pid // n_blocks).to(tl.int64), pid % n_blocks


@triton.jit
def bh_offset(pid_bh, n_heads, sb, sh):
    """Element offset of (batch, head) ``pid_bh`` (int64, from :func:`program_coords`) in a
    tensor with batch / head strides ``sb`` / ``sh``."""
    return (pid_bh // n_heads) * sb + (pid_bh % n_heads) * sh


@triton.jit
def window_span(start, n_virt, NS: tl.constexpr, BLOCK: tl.constexpr):
    """Virtual range [lo, hi) of the windows (NS slots each) that rows [start, start + BLOCK)
    belong to: the only keys a block-diagonal (windowed) tile meets."""
    lo = (start // NS) * NS
    hi = tl.minimum(((start + BLOCK - 1) // NS + 1) * NS, n_virt)
    return lo, hi


@triton.jit
def tile_ptrs(base, tok, offs_d, stride_n, stride_d):
    """[len(tok), len(offs_d)] pointers of a (token, channel) tile; int64 token offsets."""
    return base + tok.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d


@triton.jit
def softmax_rescale(m_i, l_i, s):
    """The statistics half of :func:`softmax_step`, for kernels that do the P·V product themselves
    (e.g. several softmax states over one score tile, or their own dot precision).

    Returns (m_new, l_new, alpha, p): the caller updates ``acc = acc * alpha[:, None] + p @ v``.
    Same conventions as :func:`softmax_step` (base-2 scores, masked entries -inf).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with every key masked so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), alpha, p


@triton.jit
def softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION: tl.constexpr):
    """One online-softmax step.

    m_i, l_i: [BM] fp32 running max / sum (base-2 units); acc: [BM, BD] fp32;
    s: [BM, BN] fp32 scores already scaled by scale*log2(e), masked entries = -inf;
    v: [BN, BD] value tile in the input dtype.
    """
    m_new, l_i, alpha, p = softmax_rescale(m_i, l_i, s)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def softmax_finish(m_i, l_i, acc):
    """Normalised output [BM, BD] (fp32) and base-2 log-sum-exp [BM]; empty rows give 0 / -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    return out, lse2


@triton.jit
def softmax_p_ds(s, dp, lse2, delta, mask):
    """P and dS of one (query tile, key tile) pair from its logits and dO·vᵀ.

    s: [BM, BN] fp32 logits in base-2 units (scale·log2(e) and any bias·log2(e) applied);
    dp: [BM, BN] fp32 = dO·vᵀ; lse2, delta: [BM] fp32; mask: [BM, BN] bool (False = the pair does
    not attend). Masked pairs get P = dS = 0 even where s or lse2 is -inf (rows with no key).
    Returns (P, dS), dS = P·(dP − delta) being the gradient w.r.t. the natural-unit logits
    (multiply by ``scale`` for dQ / dK; it is the bias gradient as it is).
    """
    lse_safe = tl.where(lse2 == float("-inf"), 0.0, lse2)  # empty rows: no -inf - -inf
    p = tl.where(mask, tl.exp2(s - lse_safe[:, None]), 0.0)
    return p, p * (dp - delta[:, None])


@triton.jit
def softmax_bwd_scores(s, v, do, lse2, delta, mask, DOT_PRECISION: tl.constexpr):
    """:func:`softmax_p_ds` computing dO·vᵀ itself (v: [BN, BD], do: [BM, BD])."""
    return softmax_p_ds(s, mma(do, tl.trans(v), DOT_PRECISION), lse2, delta, mask)


@triton.jit
def softmax_bwd_ds(qk, dp, lse2, delta, qk_scale_log2, bias2, mask):
    """:func:`softmax_p_ds` from dots qk = q·kᵀ and dp = dO·vᵀ the caller accumulated itself
    (e.g. over head-dim chunks to save registers); bias2 in base-2 units, 0.0 for none."""
    return softmax_p_ds(qk * qk_scale_log2 + bias2, dp, lse2, delta, mask)


# --------------------------------------------------------------------------------------------
# the engine: the softmax attention bodies every family kernel runs, with the family's hooks
#
# A family kernel offsets its pointers to the program's (batch, head), packs what its hooks need
# into a runtime tuple ``ctx`` and a constexpr tuple ``CFG`` (constexprs inside ``ctx`` would
# lose their constness), and calls a body with its hooks, ``@triton.jit`` functions passed as
# constexprs (inlined like any call: the generated code is the family's own):
#
#   ROWS(ctx, CFG, idx) -> (tok, row, valid, rtag)
#       query positions ``idx``: q and dq at token ``tok``, o, dO, lse and delta at ``row``
#       (token stride 1 for lse / delta); ``valid``: a real query; ``rtag``: what SCORE needs.
#   KEYS(ctx, CFG, idx, offs_d, dmask) -> (k, v, ktag)
#       the key and value tiles of key positions ``idx`` (zero where absent) and their tag.
#   SCORE(ctx, CFG, s, rtag, ktag, valid_m) -> (s, attend)
#       s = q·kᵀ·scale·log2(e) plus the family's logit bias (base-2 units), and the pairs that
#       attend (the others get P = 0).
#   SPAN(ctx, CFG, start, BLOCK, OVER_KEYS) -> (lo, hi)
#       the positions of the other side (keys if OVER_KEYS, else queries) that a tile of BLOCK
#       positions from ``start`` meets.
#   DSCORE(ctx, CFG, ds, p, rtag, ktag) -> ds
#       extra terms of the logit gradient (:func:`no_dscore`: none).
#   PUT_KV(ctx, CFG, ktag, offs_d, dmask, dk, dv, dbias)
#       stores the key side's gradients: dk (already scaled), dv and, with KEY_BIAS_GRAD,
#       dbias = Σ_rows dS per key (the gradient of a per-key logit bias).
# --------------------------------------------------------------------------------------------


@triton.jit
def no_dscore(ctx, CFG: tl.constexpr, ds, p, rtag, ktag):
    """The DSCORE hook of a family whose logits get no extra gradient term."""
    return ds


@triton.jit
def load_rows(X, tok, offs_d, valid, dmask, sx):
    """[len(tok), BLOCK_D] tile of X at tokens ``tok`` (zero where not ``valid``); sx = (token
    stride, channel stride)."""
    return tl.load(tile_ptrs(X, tok, offs_d, sx[0], sx[1]), mask=valid[:, None] & dmask[None, :],
                   other=0.0)


@triton.jit
def store_rows(X, tok, offs_d, valid, dmask, sx, x):
    """Stores tile ``x`` (cast to X's type) at tokens ``tok`` where ``valid``."""
    tl.store(tile_ptrs(X, tok, offs_d, sx[0], sx[1]), x.to(X.dtype.element_ty),
             mask=valid[:, None] & dmask[None, :])


@triton.jit
def load_row_grads(Q, DO, LSE, DELTA, tok, row, valid, offs_d, dmask, sq, sdo):
    """What the backward needs of query rows: q (at ``tok``), dO, lse and delta (at ``row``)."""
    q = load_rows(Q, tok, offs_d, valid, dmask, sq)
    do = load_rows(DO, row, offs_d, valid, dmask, sdo)
    lse2 = tl.load(LSE + row, mask=valid, other=0.0)
    delta = tl.load(DELTA + row, mask=valid, other=0.0)
    return q, do, lse2, delta


@triton.jit
def rows_delta(O, DELTA, do, row, valid, offs_d, dmask, so):
    """delta = rowsum(dO∘O) of the rows at ``row`` (fp32; ``do`` their dO tile), also stored to
    DELTA: a dQ pass launched before the dK/dV pass computes it there, instead of a pre-pass
    (:func:`launch_delta`) that reads O and dO once more."""
    o = load_rows(O, row, offs_d, valid, dmask, so)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row, delta, mask=valid)
    return delta


@triton.jit
def key_tile_scores(q, start_n, rtag, valid_m, offs_d, dmask, ctx, CFG: tl.constexpr,
                    KEYS: tl.constexpr, SCORE: tl.constexpr, qk_scale_log2,
                    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tile from ``start_n`` (k, v, ktag) and the scores of q against it (s, attend)."""
    k, v, ktag = KEYS(ctx, CFG, start_n + tl.arange(0, BLOCK_N), offs_d, dmask)
    s, attend = SCORE(ctx, CFG, mma(q, tl.trans(k), DOT_PRECISION) * qk_scale_log2, rtag, ktag,
                      valid_m)
    return k, v, ktag, s, attend


@triton.jit
def attention_fwd(Q, O, LSE, sq, so, pid_m, ctx, CFG: tl.constexpr, ROWS: tl.constexpr,
                  KEYS: tl.constexpr, SCORE: tl.constexpr, SPAN: tl.constexpr, HEAD_DIM,
                  qk_scale_log2, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward of query tile ``pid_m``: o and the base-2 log-sum-exp of its rows (online softmax
    over the key tiles of SPAN). Q, O, LSE point at this (batch, head); sq, so: (token, channel)
    strides."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    start = pid_m * BLOCK_M
    tok_m, row_m, valid_m, rtag = ROWS(ctx, CFG, start + tl.arange(0, BLOCK_M))
    q = load_rows(Q, tok_m, offs_d, valid_m, dmask, sq)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = SPAN(ctx, CFG, start, BLOCK_M, True)
    for start_n in range(lo, hi, BLOCK_N):
        k, v, ktag, s, attend = key_tile_scores(q, start_n, rtag, valid_m, offs_d, dmask, ctx, CFG,
                                                KEYS, SCORE, qk_scale_log2, DOT_PRECISION,
                                                BLOCK_N)
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, tl.where(attend, s, float("-inf")), v,
                                     DOT_PRECISION)

    out, lse2 = softmax_finish(m_i, l_i, acc)
    store_rows(O, row_m, offs_d, valid_m, dmask, so, out)
    tl.store(LSE + row_m, lse2, mask=valid_m)


@triton.jit
def attention_dq(Q, DO, DQ, LSE, DELTA, O, sq, sdo, sdq, so, pid_m, ctx, CFG: tl.constexpr,
                 ROWS: tl.constexpr, KEYS: tl.constexpr, SCORE: tl.constexpr,
                 DSCORE: tl.constexpr, SPAN: tl.constexpr, HEAD_DIM, scale, qk_scale_log2,
                 DELTA_FROM_O: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of query tile ``pid_m`` (FlashAttention-2: P recomputed from the saved lse); delta =
    rowsum(dO·O) read from DELTA (:func:`launch_delta`'s), or with ``DELTA_FROM_O`` computed
    from O (strides ``so``) and stored there for a dK/dV pass launched after this one
    (:func:`rows_delta`); pointers at this (batch, head)."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    start = pid_m * BLOCK_M
    tok_m, row_m, valid_m, rtag = ROWS(ctx, CFG, start + tl.arange(0, BLOCK_M))
    if DELTA_FROM_O:
        q = load_rows(Q, tok_m, offs_d, valid_m, dmask, sq)
        do = load_rows(DO, row_m, offs_d, valid_m, dmask, sdo)
        lse2 = tl.load(LSE + row_m, mask=valid_m, other=0.0)
        delta = rows_delta(O, DELTA, do, row_m, valid_m, offs_d, dmask, so)
    else:
        q, do, lse2, delta = load_row_grads(Q, DO, LSE, DELTA, tok_m, row_m, valid_m, offs_d,
                                            dmask, sq, sdo)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = SPAN(ctx, CFG, start, BLOCK_M, True)
    for start_n in range(lo, hi, BLOCK_N):
        k, v, ktag, s, attend = key_tile_scores(q, start_n, rtag, valid_m, offs_d, dmask, ctx, CFG,
                                                KEYS, SCORE, qk_scale_log2, DOT_PRECISION,
                                                BLOCK_N)
        p, ds = softmax_bwd_scores(s, v, do, lse2, delta, attend, DOT_PRECISION)
        ds = DSCORE(ctx, CFG, ds, p, rtag, ktag)
        dq += mma(ds.to(k.dtype), k, DOT_PRECISION)

    store_rows(DQ, tok_m, offs_d, valid_m, dmask, sdq, dq * scale)


@triton.jit
def attention_dkdv(Q, DO, LSE, DELTA, sq, sdo, pid_n, ctx, CFG: tl.constexpr,
                   ROWS: tl.constexpr, KEYS: tl.constexpr, SCORE: tl.constexpr,
                   DSCORE: tl.constexpr, SPAN: tl.constexpr, PUT_KV: tl.constexpr, HEAD_DIM,
                   scale, qk_scale_log2, KEY_BIAS_GRAD: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """dK, dV (and with KEY_BIAS_GRAD the per-key bias gradient) of key tile ``pid_n``, one
    program per key tile, no atomics; pointers at this (batch, head)."""
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    start = pid_n * BLOCK_N
    k, v, ktag = KEYS(ctx, CFG, start + tl.arange(0, BLOCK_N), offs_d, dmask)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    lo, hi = SPAN(ctx, CFG, start, BLOCK_N, False)
    for start_m in range(lo, hi, BLOCK_M):
        tok_m, row_m, valid_m, rtag = ROWS(ctx, CFG, start_m + tl.arange(0, BLOCK_M))
        q, do, lse2, delta = load_row_grads(Q, DO, LSE, DELTA, tok_m, row_m, valid_m, offs_d,
                                            dmask, sq, sdo)
        s, attend = SCORE(ctx, CFG, mma(q, tl.trans(k), DOT_PRECISION) * qk_scale_log2, rtag,
                          ktag, valid_m)
        p, ds = softmax_bwd_scores(s, v, do, lse2, delta, attend, DOT_PRECISION)
        ds = DSCORE(ctx, CFG, ds, p, rtag, ktag)
        dv += mma(tl.trans(p).to(do.dtype), do, DOT_PRECISION)
        dk += mma(tl.trans(ds).to(q.dtype), q, DOT_PRECISION)
        if KEY_BIAS_GRAD:
            dbias += tl.sum(ds, 0)

    PUT_KV(ctx, CFG, ktag, offs_d, dmask, dk * scale, dv, dbias)


@triton.jit
def attn_bwd_delta_kernel(
    O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, slb, slh, n_heads, N, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, n] = sum_d dO[b, h, n, d] * O[b, h, n, d] (fp32); DELTA (B, h, N), n-stride 1."""
    pid_bh, pid_m = program_coords(N, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    valid = rows < N
    o = load_rows(O + bh_offset(pid_bh, n_heads, sob, soh), rows, offs_d, valid, dmask, (son, sod))
    do = load_rows(DO + bh_offset(pid_bh, n_heads, sdob, sdoh), rows, offs_d, valid, dmask,
                   (sdon, sdod))
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh_offset(pid_bh, n_heads, slb, slh) + rows.to(tl.int64), delta, mask=valid)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(head_dim))


def strides_of(name: str, t: torch.Tensor, dims: str = "bhnd") -> dict:
    """``t``'s strides as the kernels name them, for keyword launches: ``strides_of("q", q)``
    is ``{"sqb": .., "sqh": .., "sqn": .., "sqd": ..}`` (``dims`` the leading axes' letters)."""
    return {f"s{name}{a}": st for a, st in zip(dims, t.stride())}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_precision(dtype: torch.dtype, exact: str = "tf32x3", follow_torch: bool = True) -> str:
    """The ``DOT_PRECISION`` constexpr of a launch on ``dtype`` inputs: ``"native"`` for 16-bit
    ones; for fp32 the family's ``exact`` precision (``"tf32x3"``: 3-pass TF32, or ``"ieee"``),
    so fp32 results keep fp32 accuracy, unless the user chose speed with
    ``torch.set_float32_matmul_precision("high")`` or ``"medium"``
    (``torch.backends.cuda.matmul.allow_tf32 = True`` sets "high"), which ``torch.matmul`` and
    SDPA follow too: then one TF32 pass, about 1e-3 relative (``follow_torch=False``: never).
    Tile candidates key on fp32 operands (``DOT_PRECISION != "native"``) whatever the pass."""
    if dtype != torch.float32:
        return "native"
    if follow_torch and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return exact


def aot_precision(dtype: str, exact: str = "tf32x3") -> str:
    """:func:`dot_precision` of an ahead-of-time case's dtype name ("fp16", "bf16", "fp32")."""
    return exact if dtype == "fp32" else "native"


def row_grid(bh: int, n: int, block: str):
    """Launch grid of one program per (batch·head, ``block``-row tile of n rows), the tile
    size read from the chosen config (``meta[block]``)."""
    return lambda meta: (bh * cdiv(n, meta[block]),)


def qk_scale_log2(scale: float) -> float:
    return float(scale) * LOG2E


#: the delta pre-pass: one tile (a row reduction; nothing to tune)
attn_bwd_delta = Launcher(attn_bwd_delta_kernel,
                          lambda **_: [triton.Config({"BLOCK_M": 64}, num_warps=4)], [])


def launch_delta(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O), fp32, laid out like ``lse`` so kernels index both alike."""
    b, h, n, d = o.shape
    delta = torch.empty_strided(lse.shape, lse.stride(), device=o.device, dtype=torch.float32)
    attn_bwd_delta.launch(
        launch_key(o, do, delta), row_grid(b * h, n, "BLOCK_M"), dict(O=o, DO=do, DELTA=delta),
        lambda: dict(**strides_of("o", o), **strides_of("do", do),
                     **strides_of("l", delta, "bh"), n_heads=h, N=n, HEAD_DIM=d,
                     BLOCK_D=block_d(d)))
    return delta


assert math.isclose(LOG2E, 1.0 / math.log(2.0))
