"""PPMA benchmarks: polyline-path-masked attention at the PPMA-T/S/B stage shapes.

Groups: ``full`` (``vitkern.ops.ppma_attention``, PPMA's ``MambaAttentionAllDouble`` core) and
``criss_cross`` (``vitkern.ops.ppma_criss_cross_attention``, ``MambaAttentionChunkDouble``).
Providers of one (case, dtype, group) task, all on the same inputs (q, k, v (B, heads, N, d) and
the two log-decays (B, heads, N)):

* ``vitkern`` — the vitkern op (``triton`` on CUDA; ``auto`` = ``vitkern.eager`` on a CPU run), and
  any other backend asked for with ``--backends``;
* ``ppma_original`` — PPMA's own formulation in plain PyTorch (``bench/ppma_original.py``): for
  ``full`` the fp32 N×N mask built by broadcasting, two softmaxes, averaged; for
  ``criss_cross`` the materialised per-row and per-column maps;
* ``sdpa_unmasked`` — ``F.scaled_dot_product_attention`` without any mask at the same shape: the
  floor that the mask's cost is measured against (full group only).

Records: ms (``do_bench`` median on CUDA), useful TFLOP/s (full: 4·B·h·N²·d forward; criss-cross:
4·B·h·N·(H+W)·d for the two maps plus 4·B·h·N·(H+W)·d for the four applications; ×3.5 for
forward+backward; mask arithmetic not counted), GB/s by the byte model of :func:`attention_bytes`,
peak memory of one call (CUDA), speedups vs the baselines of the same run, and a correctness check
of every provider (``sdpa_unmasked`` is another op: timed only) against the fp64 reference on a
batch-1 slice (``harness.run_entry``; floors ``TOLERANCE``).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

import vitkern.ops.ppma as ops
from vitkern.reference import ppma as ref

from . import registry
from .harness import Provider
from .ppma_original import ppma_original_attention, ppma_original_criss_cross
from .shapes import PPMACase, ppma_cases

FAMILY = "ppma"
#: max error / max(1, max|ref|) a provider may show against the fp64 reference
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def attention_flops(c: PPMACase, B: int, mode: str, group: str = "full") -> float:
    if group == "full":
        fwd = 4.0 * B * c.heads * c.N * c.N * c.head_dim
    else:  # row and column maps (2·N·(H+W)·d each way) and four map-times-values products
        fwd = 8.0 * B * c.heads * c.N * (c.H + c.W) * c.head_dim
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def attention_bytes(c: PPMACase, B: int, elem: int, mode: str) -> float:
    """Compulsory traffic: forward reads q, k, v and the decays, writes o; the backward also reads
    q, k, v, o, dO and the decays and writes dq, dk, dv and the decay gradients."""
    bh = B * c.heads
    fwd = bh * (4 * c.N * c.head_dim * elem + 2 * c.N * elem)
    bwd = bh * (8 * c.N * c.head_dim * elem + 4 * c.N * elem)
    return fwd + (bwd if mode == "fwd+bwd" else 0)


PPMA = registry.Family(
    FAMILY, ppma_cases, tol=TOLERANCE, eager=True, check_batch=1,
    fields=lambda c: {"shape": c.describe(), "H": c.H, "W": c.W, "heads": c.heads,
                      "head_dim": c.head_dim})


def _inputs(r, gen):
    """q, k, v (B, heads, N, d) and the two log-decays (B, heads, N)."""
    c = r.case
    qkv = [r.randn((r.B, c.heads, c.N, c.head_dim), gen) for _ in range(3)]
    decays = [(-torch.rand(r.B, c.heads, c.N, generator=gen) * 0.5).to(r.device, r.dtype) for _ in range(2)]
    return qkv + decays, r.randn((r.B, c.heads, c.N, c.head_dim), gen)


def hw(r) -> dict:
    return {"hw": (r.case.H, r.case.W)}


def _register(group: str, op: str, original, **baselines) -> None:
    """``op`` names the function of ``vitkern.ops.ppma`` and ``vitkern.reference.ppma``."""
    PPMA.register(
        group, inputs=_inputs, name="vitkern", arg_names=("q", "k", "v", "a", "g"),
        vitkern=lambda r, b: partial(getattr(ops, op), backend=b, **hw(r)),
        baselines={"ppma_original": lambda r: partial(original, **hw(r)), **baselines},
        reference=lambda r, dtype: partial(getattr(ref, op), **hw(r)),
        flops=lambda r, mode: attention_flops(r.case, r.B, mode, group),
        bytes=lambda r, mode: attention_bytes(r.case, r.B, r.elem, mode))


_register("full", "ppma_attention", ppma_original_attention, sdpa_unmasked=lambda r: Provider(
    fn=lambda q, k, v, a, g: F.scaled_dot_product_attention(q, k, v), check=False))
_register("criss_cross", "ppma_criss_cross_attention", ppma_original_criss_cross)

GROUPS = PPMA.groups
plan, run_task, cases_for = PPMA.plan, PPMA.run_task, PPMA.cases_for
