"""Linear / softmax-free attention benchmarks: vitkern's XCA, linear and SOFT attention vs PyTorch.

For every case of ``shapes.LINEAR_CASES`` (XCiT, L2ViT and SOFT stage shapes, plus N = 4096 /
16384)
and every dtype, one comparison group per op:

=========  =====================================  ==============================================
group      vitkern provider                       baselines (same q, k, v, same run)
=========  =====================================  ==============================================
``xca``    ``ops.xca_attention``                  ``timm_xca`` (timm's fused XCA path:
                                                  F.normalize + SDPA with the roles of tokens and
                                                  channels swapped), ``pytorch`` (XCiT's
                                                  matmul / softmax / matmul), ``sdpa`` (softmax
                                                  attention over the tokens, the alternative)
``linear`` ``ops.linear_attention`` with the      ``pytorch`` (the paper's PyTorch math: L2ViT /
           case's preset                          fast-transformers / EfficientViT), ``sdpa``,
                                                  ``fla`` (flash-linear-attention's causal
                                                  ``chunk_linear_attn``, where installed; causal,
                                                  so timed only, not checked)
``soft``   ``ops.soft_attention`` (landmark Gram     ``pytorch`` (SOFT's PyTorch math: distances by
           matrix, 20 Newton–Schulz steps, fused   matmul expansion, the same Newton–Schulz,
           K1·(Ainv·(K1ᵀV)))                       ``(K1 Ainv)(K1ᵀV)`` with K1 in HBM), ``sdpa``
                                                  (softmax attention over the tokens with K = Q)
=========  =====================================  ==============================================

Correctness first (``harness.run_entry``): a vitkern provider's output (and, in fwd+bwd, the
gradients of q, k, v and the temperature) must be within ``max(floor, 4 × e_ref)`` of the fp64
reference, e_ref being the error of the reference math in the benchmark dtype (errors normalised
by max(1, max|ref|)); ``sdpa`` and ``fla_causal`` compute other ops: timed, not checked.

Byte model (e = bytes per element; each tensor moved once, the fp32 d×d states are ignored)::

    forward:   e·B·h·(N·d + M·d + M·e_v + N·e_v)            read q, k, v, write o
    backward:  linear + e·B·h·(2·N·d + N·e_v + 2·M·d + 2·M·e_v)
                        (read q, dO, k, v; write dq, dk, dv)
               XCA    + e·B·h·8·N·d  (read dO, v for dA; q, k, dO; write dq, dk, dv)
    (M = N and e_v = d in every case here: 7·N·d and 8·N·d elements per head.)

SOFT (m landmarks, tiny next to the tokens): forward ``e·B·h·(N·d + 2·N·e_v)`` (read q, v,
write o); backward adds ``e·B·h·(N·d + 3·N·e_v)`` (read dO, q, v; write dq, dv; counted once
although the kernels read q and dO twice). Useful FLOPs per head: forward
``2·N·m·d + 4·N·m·e_v + 2·m²·e_v + 4·iters·m³`` (K1, K1ᵀV, K1·W2, Ainv·W, Newton), fwd+bwd 3×.

Useful FLOPs: linear 2·B·h·d·e_v·(N + M) + 2·B·h·N·d; XCA 4·B·h·N·d²; fwd+bwd = 3 × forward.
This op family is memory-bound: the GB/s column against the device's peak is the figure of merit.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

import vitkern.ops.linear as ops
from vitkern.reference import linear as ref

from . import registry
from .harness import Provider, Skip
from .shapes import LinearCase, linear_cases

FAMILY = "linear"
SOFT_ITERS = 20
ERR_FLOOR = {torch.float32: 5e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# ---------------------------------------------------------------------------------------------
# byte / flop models
# ---------------------------------------------------------------------------------------------
def op_bytes(c: LinearCase, B: int, elem: int, mode: str) -> float:
    n, d = c.N, c.head_dim
    if c.op == "soft":
        return float(elem * B * c.heads * (3 * n * d + (4 * n * d if mode == "fwd+bwd" else 0)))
    fwd = 4 * n * d
    bwd = 7 * n * d if c.op == "linear" else 8 * n * d
    return float(elem * B * c.heads * (fwd + (bwd if mode == "fwd+bwd" else 0)))


def op_flops(c: LinearCase, B: int, mode: str) -> float:
    n, d = c.N, c.head_dim
    if c.op == "soft":
        m = c.landmarks
        fwd = 2 * n * m * d + 4 * n * m * d + 2 * m * m * d + 4 * SOFT_ITERS * m ** 3
        return float(B * c.heads * fwd * (3 if mode == "fwd+bwd" else 1))
    fwd = (2 * d * d * (2 * n) + 2 * n * d) if c.op == "linear" else 4 * n * d * d
    return float(B * c.heads * fwd * (3 if mode == "fwd+bwd" else 1))


# ---------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------
def _timm_xca(q, k, v, t):
    """timm's fused XCA path on (B, h, N, d) q, k, v: channels become the sequence of SDPA."""
    qt = F.normalize(q.transpose(-1, -2), dim=-1) * t.reshape(1, -1, 1, 1).to(q.dtype)
    kt = F.normalize(k.transpose(-1, -2), dim=-1)
    return F.scaled_dot_product_attention(qt, kt, v.transpose(-1, -2), scale=1.0).transpose(-1, -2)


def _fla(r) -> Provider:
    """flash-linear-attention's causal chunked linear attention: another op, timed only."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"flash-linear-attention not installed ({type(exc).__name__})") from None
    if r.device.type != "cuda":
        raise Skip("CUDA only")
    return Provider(fn=lambda q, k, v, t: chunk_linear_attn(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2), normalize=True)[0],
                    check=False)


def _sdpa(r) -> Provider:
    """Softmax attention over the tokens (SOFT: with K = Q), the alternative: timed only."""
    if r.case.op == "soft":
        return Provider(fn=lambda q, lm, v: F.scaled_dot_product_attention(q, q, v), check=False)
    return Provider(fn=lambda q, k, v, t: F.scaled_dot_product_attention(q, k, v), check=False)


# ---------------------------------------------------------------------------------------------
# Registry entries
# ---------------------------------------------------------------------------------------------
LINEAR = registry.Family(
    FAMILY, linear_cases, tol=ERR_FLOOR, quick_cpu_batch=1, eager=True,
    fields=lambda c: {"shape": c.describe(), "N": c.N, "heads": c.heads, "head_dim": c.head_dim,
                      "preset": c.preset or None})


def _qkv(r, gen):
    """q, k, v (|q|, |k| ~ 0.25 for L2ViT: the denominators around the clamp floor of 100 at
    N ~ 200) and the per-head temperature (fp32)."""
    c = r.case
    amp = 0.25 if c.preset == "l2vit" else 1.0
    shape = (r.B, c.heads, c.N, c.head_dim)
    q, k, v = r.randn(shape, gen, amp), r.randn(shape, gen, amp), r.randn(shape, gen)
    t = (torch.rand(c.heads, generator=gen) + 0.5).to(r.device)
    return [q, k, v, t], r.randn(shape, gen)


def _landmarks(r, gen):
    """SOFT's scales: q = W_q x / d**¼, landmarks after LayerNorm + GELU (≈ unit entries shrunk
    here so that K1 is not all underflow on random data)."""
    c = r.case
    shape, s = (r.B, c.heads, c.N, c.head_dim), c.head_dim ** -0.25
    q, lm = r.randn(shape, gen, s), r.randn((r.B, c.heads, c.landmarks, c.head_dim), gen, s)
    return [q, lm, r.randn(shape, gen)], r.randn(shape, gen)


def _preset(r) -> dict:
    return ops.PRESETS.get(r.case.preset, {})


def _with_t(f, **kw):
    """``f(q, k, v, temperature=t, **kw)`` as ``fn(q, k, v, t)``."""
    return lambda q, k, v, t: f(q, k, v, temperature=t, **kw)


def _register(op: str, inputs, vitkern, reference, baselines, arg_names):
    LINEAR.register(op, inputs=inputs, vitkern=vitkern, reference=reference,
                    baselines={**baselines, "sdpa": _sdpa}, applies=lambda c: c.op == op,
                    flops=lambda r, mode: op_flops(r.case, r.B, mode),
                    bytes=lambda r, mode: op_bytes(r.case, r.B, r.elem, mode), arg_names=arg_names)


QKVT = ("q", "k", "v", "temperature")
_register("xca", _qkv, lambda r, b: _with_t(ops.xca_attention, backend=b),
          lambda r, dtype: _with_t(ref.xca_attention),
          {"timm_xca": lambda r: _timm_xca, "pytorch": lambda r: _with_t(ref.xca_attention)}, QKVT)
_register("linear", _qkv, lambda r, b: _with_t(ops.linear_attention, backend=b, **_preset(r)),
          lambda r, dtype: _with_t(ref.linear_attention, **_preset(r)),
          {"pytorch": lambda r: _with_t(ref.linear_attention, **_preset(r)), "fla_causal": _fla}, QKVT)
_register("soft", _landmarks, lambda r, b: partial(ops.soft_attention, iters=SOFT_ITERS, backend=b),
          lambda r, dtype: partial(ref.soft_attention, iters=SOFT_ITERS),
          {"pytorch": lambda r: partial(ref.soft_attention, iters=SOFT_ITERS)}, ("q", "landmarks", "v"))

GROUPS = LINEAR.groups
plan, run_task, cases_for = LINEAR.plan, LINEAR.run_task, LINEAR.cases_for
