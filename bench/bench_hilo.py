"""HiLo (LITv2) benchmarks: vitkern ops and module vs LITv2's PyTorch, SDPA and FlexAttention.

For every case of ``shapes.HILO_CASES`` and every dtype, five comparison groups are timed; in each
group the vitkern provider(s) are compared with the baselines measured in the same run:

==============  ============================================  ============================================
group           vitkern provider                              baselines
==============  ============================================  ============================================
``hilo``        ``ops.hilo_attention`` (all heads; Hi-Fi       ``litv2`` (LITv2's math on q, k, v:
                heads first, Lo-Fi pooled in-kernel)           window partition + matmul/softmax, AvgPool2d
                                                               + matmul/softmax), ``sdpa`` (same partition /
                                                               pooling, attention by SDPA)
``hifi``        ``ops.hifi_attention`` on the Hi-Fi heads      ``litv2``, ``sdpa`` (windows as batch),
                                                               ``flex`` (FlexAttention + window BlockMask,
                                                               CUDA only)
``lofi``        ``ops.lofi_attention`` on the Lo-Fi heads,     ``litv2`` (AvgPool2d + matmul/softmax),
                full-resolution k, v pooled in-kernel          ``sdpa`` (AvgPool2d + SDPA)
``lofi_pooled`` ``ops.lofi_attention(kv_pooled=True)``        ``litv2`` (matmul/softmax), ``sdpa``
``layer``       ``nn.HiLo`` (whole layer)                      ``litv2_module`` (``LITv2HiLo`` with the
                                                               same weights); with ``--compile`` also
                                                               ``litv2_module_compiled`` (torch.compile)
==============  ============================================  ============================================

vitkern op providers are named ``vitkern[<backend>]``: on CUDA every compiled backend that
``vitkern.backends.backend_status()`` reports available (``--backends`` overrides), on CPU
``vitkern[auto:reference]`` (what ``auto`` resolves to). ``vitkern[cuda]`` is the CUDA C++ backend
(vitkern._C): Hi-Fi heads (s <= 4) forward and backward, Lo-Fi heads forward only (its
``fwd+bwd`` records of the ``hilo`` / ``lofi`` groups are ``skipped`` with the reason); where it
refuses a case by design the record says ``skipped`` with its reason rather than failing the run.
Every vitkern record also carries ``speedup_vs_vitkern`` (the other vitkern providers' ms / its
ms, same task and mode): the ``vitkern[cuda]`` / ``vitkern[triton]`` ratio that decides whether
``auto`` may prefer CUDA. Groups without work for a case are left out
(``hifi`` without Hi-Fi heads, ``lofi_pooled`` when s = 1). Non-divisible maps use LITv2's detection
semantics everywhere (``pad="zero"`` for vitkern, zero padding + crop in the baselines).

Correctness (``harness.run_entry``): outputs and gradients against ``vitkern.reference.hilo`` in
fp64 (``LITv2HiLo`` in fp64 for the layer, its parameter gradients included) under the
flash-attention rule, error floors ``harness.ERR_FLOOR`` (fp32 allows TF32 tensor-core dots).

Useful FLOPs (forward; only the attention math that the op needs)::

    Hi-Fi:  4 * s^2 * d   per query per head  (q k^T over the s^2 keys of its window, then A v)
    Lo-Fi:  4 * M   * d   per query per head  (M = (Hp/s)*(Wp/s) pooled keys; M = N when s = 1)
    flops_fwd = B * N * (h_hi * 4 * s^2 * d + h_lo * 4 * M * d)     N = H*W real queries

Padded queries, the pooling (s^2 - 1 adds per pooled element), the softmax and any partition
copies are not counted. fwd+bwd = 3.5 x forward (backward = 2 x forward for the four gradient
matmuls + 0.5 x for recomputing the scores; the flash-attention convention). The ``layer`` group
counts ``2 * B * LITv2HiLo.flops(H, W)`` (LITv2's multiply-accumulates of projections and
attention matmuls, times 2), and 3 x that for fwd+bwd.

Byte model (``e`` = bytes per element of the dtype; the ideal, each tensor moved once)::

    forward, full-resolution k, v:  e * B * h * d * (3N + N)     read q, k, v once, write o once;
                                    the Lo-Fi keys are pooled on the fly from that one read of k, v
                                    (re-reads of pooled tiles by other query tiles are assumed to hit
                                    L2 and are not counted)
    forward, pooled k, v:           e * B * h * d * (N + 2M + N)  read q, pooled k, v, write o
    backward adds:                  read q, k, v, o, dO and write dQ, dK, dV (pooled: k, v, dK, dV
                                    are M-sized): e * B * h * d * (8N) full, (4N + 4M) pooled;
                                    the fp32 log-sum-exp / delta (8 * B * h * N bytes) is added too.
    layer:                          e * (2 * B * N * C + P)   read x and the P parameters, write y;
                                    fwd+bwd: e * (4 * B * N * C + 3 * P) (+ dy, dx, dW)

The same FLOP and byte counts are used for the baselines, so TFLOP/s and GB/s compare directly.
"""
from __future__ import annotations

import copy
import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

import vitkern.ops as ops
import vitkern.reference.hilo as ref
from vitkern.nn import HiLo

from . import harness, registry
from .harness import Provider, flex_attention
from .litv2 import (LITv2HiLo, litv2_hifi_attention, litv2_hilo_attention, litv2_lofi_attention,
                    litv2_pool_kv, randomize_)
from .shapes import HiLoCase, hilo_cases

FAMILY = "hilo"
# the harness's pieces under the names tests/test_csrc_hilo.py uses
_add_speedups, _is_refusal, _refusal_reason = harness.add_speedups, harness.is_refusal, harness.refusal_reason
# what vitkern.ops / vitkern.nn.HiLo take for LITv2's detection zero padding (None = strict)
PAD_ARG = "zero"


# ---------------------------------------------------------------------------------------------
# FLOP and byte models
# ---------------------------------------------------------------------------------------------
def attention_flops(case: HiLoCase, B: int, *, hi_heads: int, lo_heads: int, mode: str) -> float:
    s, d, N = case.window_size, case.head_dim, case.N
    f = B * N * (hi_heads * 4 * s * s * d + lo_heads * 4 * case.M * d)
    return 3.5 * f if mode == "fwd+bwd" else float(f)


def attention_bytes(case: HiLoCase, B: int, heads: int, elem: int, *, mode: str, pooled: bool = False) -> float:
    N, M, d = case.N, case.M, case.head_dim
    kv = M if pooled else N
    fwd = elem * B * heads * d * (N + 2 * kv + N)
    if mode != "fwd+bwd":
        return float(fwd)
    bwd = elem * B * heads * d * (3 * N + 2 * kv + 2 * kv + N) + 8 * B * heads * N
    return float(fwd + bwd)


def layer_flops(case: HiLoCase, B: int, mode: str) -> float:
    f = 2.0 * B * LITv2HiLo(case.dim, case.heads, window_size=case.window_size, alpha=case.alpha,
                            qkv_bias=case.qkv_bias, pad=True).flops(case.H, case.W)
    return 3 * f if mode == "fwd+bwd" else f


def layer_bytes(case: HiLoCase, B: int, n_params: int, elem: int, mode: str) -> float:
    act = B * case.N * case.dim
    if mode == "fwd+bwd":
        return float(elem * (4 * act + 3 * n_params))
    return float(elem * (2 * act + n_params))


# ---------------------------------------------------------------------------------------------
# Baselines beside LITv2's own math (bench/litv2.py): SDPA composites, FlexAttention
# ---------------------------------------------------------------------------------------------
def sdpa_hifi(q, k, v, *, hw, window_size, scale, pad):
    """Window partition (copy) -> SDPA over (B, h * nW, s^2, d) -> un-partition."""
    H, W = hw
    B, h, N, d = q.shape
    s = window_size
    maps = [t.reshape(B, h, H, W, d) for t in (q, k, v)]
    if pad:
        Hp, Wp = s * math.ceil(H / s), s * math.ceil(W / s)
        maps = [F.pad(m, (0, 0, 0, Wp - W, 0, Hp - H)) for m in maps]
    else:
        Hp, Wp = H, W
    hg, wg = Hp // s, Wp // s
    qw, kw, vw = (m.reshape(B, h, hg, s, wg, s, d).transpose(3, 4).reshape(B, h * hg * wg, s * s, d)
                  for m in maps)
    o = F.scaled_dot_product_attention(qw, kw, vw, scale=scale)
    o = o.reshape(B, h, hg, wg, s, s, d).transpose(3, 4).reshape(B, h, Hp, Wp, d)
    if pad:
        o = o[:, :, :H, :W]
    return o.reshape(B, h, H * W, d)


def sdpa_lofi(q, k, v, *, hw, window_size, scale, pad, kv_pooled=False):
    if not kv_pooled and window_size > 1:
        k = litv2_pool_kv(k, hw, window_size, pad)
        v = litv2_pool_kv(v, hw, window_size, pad)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def sdpa_hilo(q, k, v, *, hw, window_size, num_lo_heads, scale, pad):
    nh = q.shape[1] - num_lo_heads
    outs = []
    if nh > 0:
        outs.append(sdpa_hifi(q[:, :nh], k[:, :nh], v[:, :nh], hw=hw, window_size=window_size, scale=scale, pad=pad))
    if num_lo_heads > 0:
        outs.append(sdpa_lofi(q[:, nh:], k[:, nh:], v[:, nh:], hw=hw, window_size=window_size, scale=scale, pad=pad))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def flex_hifi(r) -> Callable:
    """FlexAttention on the (padded) raster map with a same-window BlockMask (Hi-Fi)."""
    from torch.nn.attention.flex_attention import create_block_mask

    flex, c = flex_attention(r.ctx), r.case
    s, H, W, scale = c.window_size, c.H, c.W, c.head_dim ** -0.5
    Hp, Wp = c.Hp, c.Wp
    Np = Hp * Wp

    def same_window(b, h, q_idx, kv_idx):
        return ((q_idx // Wp) // s == (kv_idx // Wp) // s) & ((q_idx % Wp) // s == (kv_idx % Wp) // s)

    block_mask = create_block_mask(same_window, B=None, H=None, Q_LEN=Np, KV_LEN=Np, device=r.device)

    def run(q, k, v):
        if (Hp, Wp) == (H, W):
            return flex(q, k, v, block_mask=block_mask, scale=scale)
        B, h, _, d = q.shape
        q, k, v = (F.pad(t.reshape(B, h, H, W, d), (0, 0, 0, Wp - W, 0, Hp - H)).reshape(B, h, Np, d)
                   for t in (q, k, v))
        o = flex(q, k, v, block_mask=block_mask, scale=scale)
        return o.reshape(B, h, Hp, Wp, d)[:, :, :H, :W].reshape(B, h, H * W, d)

    return run


# ---------------------------------------------------------------------------------------------
# Registry entries
# ---------------------------------------------------------------------------------------------
HILO = registry.Family(
    FAMILY, hilo_cases, backends=("triton", "cuda"), quick_cpu_batch=2,
    fields=lambda c: {"shape": c.describe(), "H": c.H, "W": c.W, "dim": c.dim, "heads": c.heads,
                      "head_dim": c.head_dim, "window_size": c.window_size,
                      "num_lo_heads": c.num_lo_heads, "num_hi_heads": c.num_hi_heads,
                      "padded": c.needs_pad})


def _geo(r, **kw) -> dict:
    """vitkern's keyword arguments of the case (LITv2's detection padding as ``pad="zero"``)."""
    c = r.case
    return dict(hw=c.hw, window_size=c.window_size, **({"pad": PAD_ARG} if c.needs_pad else {}), **kw)


def _lit(r, **kw) -> dict:
    """The baselines' keyword arguments (the scale; zero padding + crop as ``pad=True``)."""
    c = r.case
    return dict(hw=c.hw, window_size=c.window_size, scale=c.head_dim ** -0.5, pad=c.needs_pad, **kw)


def _register_op(group, heads, hi_heads, op, litv2, sdpa, reference, kw=lambda c: {},
                 pooled=False, applies=lambda c: True, **more):
    """An op group on (B, heads(case), N, d) q, k, v (k, v pooled with ``pooled``): ``op`` names
    the ``vitkern.ops`` function, ``kw(case)`` its own keyword arguments (the same for the
    baselines and the reference)."""

    def inputs(r, gen):
        c = r.case
        shape = (r.B, heads(c), c.N, c.head_dim)
        q, k, v = (r.randn(shape, gen) for _ in range(3))
        if pooled:
            k, v = (litv2_pool_kv(t, c.hw, c.window_size, c.needs_pad).contiguous() for t in (k, v))
        return [q, k, v], r.randn(shape, gen)

    HILO.register(
        group, inputs=inputs, applies=applies, name="vitkern[{label}]", arg_names=("q", "k", "v"),
        vitkern=lambda r, b: partial(getattr(ops, op), backend=b, **_geo(r, **kw(r.case))),
        baselines={"litv2": lambda r: partial(litv2, **_lit(r, **kw(r.case))),
                   "sdpa": lambda r: partial(sdpa, **_lit(r, **kw(r.case))), **more},
        reference=lambda r, dtype: partial(reference, **_geo(r, **kw(r.case))),
        flops=lambda r, mode: attention_flops(r.case, r.B, hi_heads=hi_heads(r.case),
                                              lo_heads=heads(r.case) - hi_heads(r.case), mode=mode),
        bytes=lambda r, mode: attention_bytes(r.case, r.B, heads(r.case), r.elem, mode=mode,
                                              pooled=pooled))


def _n_lo(c):
    return c.num_lo_heads


def _n_hi(c):
    return c.num_hi_heads


_register_op("hilo", lambda c: c.heads, _n_hi, "hilo_attention", litv2_hilo_attention, sdpa_hilo,
             ref.hilo_attention, kw=lambda c: {"num_lo_heads": c.num_lo_heads})
_register_op("hifi", _n_hi, _n_hi, "hifi_attention", litv2_hifi_attention, sdpa_hifi,
             ref.hifi_attention, applies=lambda c: c.num_hi_heads > 0, flex=flex_hifi)
_register_op("lofi", _n_lo, lambda c: 0, "lofi_attention", litv2_lofi_attention, sdpa_lofi,
             ref.lofi_attention, applies=lambda c: c.num_lo_heads > 0)
_register_op("lofi_pooled", _n_lo, lambda c: 0, "lofi_attention", litv2_lofi_attention, sdpa_lofi,
             ref.lofi_attention, kw=lambda c: {"kv_pooled": True}, pooled=True,
             applies=lambda c: c.num_lo_heads > 0 and c.window_size > 1)


# the whole layer: vitkern.nn.HiLo vs LITv2HiLo with the same weights (fp64 LITv2HiLo: reference)
def _layer_prepare(r) -> None:
    c = r.case
    lit = randomize_(LITv2HiLo(c.dim, c.heads, qkv_bias=c.qkv_bias, window_size=c.window_size,
                               alpha=c.alpha, pad=c.needs_pad), std=0.02, seed=r.ctx.seed)
    r.lit64 = copy.deepcopy(lit).to(r.device, torch.float64).eval()
    r.lit = lit.to(r.device, r.dtype).eval()


def _module(m, c) -> Provider:
    return Provider(fn=lambda x: m(x, c.H, c.W), module=m)


def _vitkern_layer(r, backend) -> Provider:
    c = r.case
    m = HiLo(c.dim, c.heads, qkv_bias=c.qkv_bias, window_size=c.window_size, alpha=c.alpha,
             **({"pad": PAD_ARG} if c.needs_pad else {}))
    m.load_state_dict(r.lit.state_dict(), strict=True)
    return _module(m.to(r.device, r.dtype).eval(), c)


HILO.register(
    "layer", prepare=_layer_prepare, vitkern=_vitkern_layer, name="vitkern.nn.HiLo", per_backend=False,
    inputs=lambda r, gen: ([r.randn((r.B, r.case.N, r.case.dim), gen)],
                           r.randn((r.B, r.case.N, r.case.dim), gen)),
    baselines={"litv2_module": lambda r: _module(r.lit, r.case),
               "litv2_module_compiled": lambda r: (_module(torch.compile(r.lit, dynamic=False), r.case)
                                                   if r.ctx.compile_baselines else None)},
    reference=lambda r, dtype: _module(r.lit64 if dtype == torch.float64 else r.lit, r.case),
    flops=lambda r, mode: layer_flops(r.case, r.B, mode),
    bytes=lambda r, mode: layer_bytes(r.case, r.B, sum(p.numel() for p in r.lit.parameters()), r.elem,
                                      mode),
    arg_names=("x",))

GROUPS = HILO.groups
plan, run_task, cases_for = HILO.plan, HILO.run_task, HILO.cases_for
