"""The softmax-attention core shared by every vitkern family (HiLo, window, token, PPMA).

Each family's kernel decides *which* query rows and key columns a tile holds (windows, pooled
keys, kept tokens, ...) and masks the score tile; the math below is the same for all of them:

* forward: online softmax in base 2 (scores pre-multiplied by ``scale * log2(e)``), fp32 running
  max / sum / accumulator, log-sum-exp (base 2) saved per query row for the backward;
* backward (FlashAttention-2): P is recomputed from q, k and the saved log-sum-exp, with
  ``delta = rowsum(dO * O)`` computed once by :func:`attn_bwd_delta_kernel`; every family's
  backward ends in :func:`softmax_p_ds` (through one of its wrappers).

Tile candidates and their choice (autotuning, spill checks) live in ``tuning.py``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .compat import patch_interpreter_scalar_index

patch_interpreter_scalar_index()  # older interpreters under NumPy >= 2.4 (see compat.py)

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    """``tl.dot`` that keeps full fp32 precision for fp32 inputs (IEEE) instead of tf32."""
    if IEEE:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


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
def softmax_step(m_i, l_i, acc, s, v, IEEE: tl.constexpr):
    """One online-softmax step.

    m_i, l_i: [BM] fp32 running max / sum (base-2 units); acc: [BM, BD] fp32;
    s: [BM, BN] fp32 scores already scaled by scale*log2(e), masked entries = -inf;
    v: [BN, BD] value tile in the input dtype.
    """
    m_new, l_i, alpha, p = softmax_rescale(m_i, l_i, s)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, IEEE)
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
def softmax_bwd_scores(s, v, do, lse2, delta, mask, IEEE: tl.constexpr):
    """:func:`softmax_p_ds` computing dO·vᵀ itself (v: [BN, BD], do: [BM, BD])."""
    return softmax_p_ds(s, mma(do, tl.trans(v), IEEE), lse2, delta, mask)


@triton.jit
def softmax_bwd_tile(q, k, v, do, lse2, delta, qk_scale_log2, mask, IEEE: tl.constexpr):
    """:func:`softmax_p_ds` for plain scaled dot-product logits (q, do: [BM, BD]; k, v: [BN, BD])."""
    s = mma(q, tl.trans(k), IEEE) * qk_scale_log2
    return softmax_bwd_scores(s, v, do, lse2, delta, mask, IEEE)


@triton.jit
def softmax_bwd_ds(qk, dp, lse2, delta, qk_scale_log2, bias2, mask):
    """:func:`softmax_p_ds` from dots qk = q·kᵀ and dp = dO·vᵀ the caller accumulated itself
    (e.g. over head-dim chunks to save registers); bias2 in base-2 units, 0.0 for none."""
    return softmax_p_ds(qk * qk_scale_log2 + bias2, dp, lse2, delta, mask)


@triton.jit
def attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh,
    n_heads, N, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, n] = sum_d dO[b, h, n, d] * O[b, h, n, d] (fp32); DELTA (B, h, N), n-stride 1."""
    pid_bh, pid_m = program_coords(N, BLOCK_M)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows64[:, None] * stride_on
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows64[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b * stride_lb + h * stride_lh + rows64, tl.sum(o * do, 1), mask=rows < N)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(head_dim))


def strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def exact_fp32(dtype: torch.dtype) -> bool:
    """The ``IEEE`` constexpr of a launch: fp32 inputs keep fp32 accuracy (3-pass TF32 / IEEE
    dots) unless the user chose speed with ``torch.set_float32_matmul_precision("high")`` or
    ``"medium"`` (``torch.backends.cuda.matmul.allow_tf32 = True`` sets "high"), which
    ``torch.matmul`` and SDPA follow too; then fp32 dots take one TF32 pass (about 1e-3
    relative; the fp32 tile candidates, sized for tf32x3's three passes, hold one pass too).
    16-bit inputs are unaffected."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def row_grid(bh: int, n: int, block: str):
    """Launch grid of one program per (batch·head, ``block``-row tile of n rows), the tile
    size read from the chosen config (``meta[block]``)."""
    return lambda meta: (bh * cdiv(n, meta[block]),)


def qk_scale_log2(scale: float) -> float:
    return float(scale) * LOG2E


def launch_delta(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O), fp32, laid out like ``lse`` so kernels index both alike."""
    b, h, n, d = o.shape
    delta = torch.empty_strided(lse.shape, lse.stride(), device=o.device, dtype=torch.float32)
    block_m = 64
    attn_bwd_delta_kernel[(cdiv(n, block_m) * b * h,)](
        o, do, delta, *strides4(o), *strides4(do), *delta.stride()[:2], h, n, d,
        BLOCK_M=block_m, BLOCK_D=block_d(d),
    )
    return delta


assert math.isclose(LOG2E, 1.0 / math.log(2.0))
