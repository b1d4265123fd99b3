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

Correctness first: before a vitkern provider is timed, its output (and in fwd+bwd mode the
gradients of q, k, v / x) is compared with an fp64 reference: ``vitkern.reference.hilo`` for the
op groups, the exact softmax of the pooled keys for ``lofi_pooled``, ``LITv2HiLo`` in fp64 for the
layer. The error must be at most ``max(floor[dtype], 4 * e_ref)`` where ``e_ref`` is the error of
the reference math itself run in the benchmark dtype (the flash-attention rule); errors are
normalised by ``max(1, max|ref|)``. The max abs error is recorded in every record; a provider
that is off is not timed and makes the run fail (``status: "wrong"``).

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

import math
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import harness
from .litv2 import (LITv2HiLo, litv2_hifi_attention, litv2_hilo_attention, litv2_lofi_attention,
                    litv2_pool_kv, randomize_)
from .shapes import HiLoCase, hilo_cases

FAMILY = "hilo"
GROUPS = ("hilo", "hifi", "lofi", "lofi_pooled", "layer")

# error floors per dtype (normalised max abs error); fp32 allows TF32 tensor-core dots (Triton's default)
ERR_FLOOR = {torch.float64: 1e-9, torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
ERR_MULT = 4.0
# what vitkern.ops / vitkern.nn.HiLo take for LITv2's detection zero padding (None = strict)
PAD_ARG = "zero"


class CorrectnessError(AssertionError):
    pass


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
# Optional pieces: vitkern ops / nn / reference, FlexAttention
# ---------------------------------------------------------------------------------------------
def _vitkern_ops():
    try:
        import vitkern.ops as ops
    except Exception as exc:  # noqa: BLE001
        return None, f"vitkern.ops not importable: {type(exc).__name__}: {exc}"
    missing = [n for n in ("hilo_attention", "hifi_attention", "lofi_attention") if not hasattr(ops, n)]
    if "hilo_attention" in missing:
        return None, "vitkern.ops.hilo_attention does not exist (yet)"
    return ops, (f"missing: {', '.join(missing)}" if missing else "")


def _vitkern_nn():
    try:
        from vitkern.nn import HiLo
        return HiLo, ""
    except Exception as exc:  # noqa: BLE001
        return None, f"vitkern.nn.HiLo not importable: {type(exc).__name__}: {exc}"


def _reference():
    try:
        import vitkern.reference.hilo as ref
        if hasattr(ref, "hilo_attention"):
            return ref, ""
        return None, "vitkern.reference.hilo.hilo_attention does not exist (yet)"
    except Exception as exc:  # noqa: BLE001
        return None, f"vitkern.reference.hilo not importable: {type(exc).__name__}: {exc}"


def backend_availability() -> dict[str, tuple[bool, str]] | None:
    try:
        from vitkern.backends import backend_status
        return {k: (bool(v[0]), str(v[1])) for k, v in backend_status().items()}
    except Exception:  # noqa: BLE001 - the module may not exist yet
        return None


def default_backends(device: torch.device) -> list[str]:
    """``auto`` on CPU (the reference); on CUDA every compiled backend that is available."""
    if device.type != "cuda":
        return ["auto"]
    status = backend_availability()
    if status is None:
        return ["triton", "cuda"]
    got = [b for b in ("triton", "cuda") if status.get(b, (False, ""))[0]]
    return got or ["auto"]


def _flex_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "FlexAttention baseline runs on CUDA only (compiled Triton kernels)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"torch.nn.attention.flex_attention unavailable: {exc}"
    return True, ""


_FLEX_COMPILED: dict[str, Any] = {}


def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention
    if "fn" not in _FLEX_COMPILED:
        _FLEX_COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED["fn"]


def make_flex_hifi(case: HiLoCase, device: torch.device, pad: bool, scale: float) -> Callable:
    """FlexAttention on the (padded) raster map with a same-window BlockMask (Hi-Fi)."""
    from torch.nn.attention.flex_attention import create_block_mask

    s = case.window_size
    H, W = case.H, case.W
    Hp, Wp = (case.Hp, case.Wp) if pad else (H, W)
    Np = Hp * Wp

    def same_window(b, h, q_idx, kv_idx):
        return ((q_idx // Wp) // s == (kv_idx // Wp) // s) & ((q_idx % Wp) // s == (kv_idx % Wp) // s)

    block_mask = create_block_mask(same_window, B=None, H=None, Q_LEN=Np, KV_LEN=Np, device=device)
    flex = _flex_fn()

    def run(q, k, v):
        if pad and (Hp, Wp) != (H, W):
            B, h, _, d = q.shape
            q, k, v = (F.pad(t.reshape(B, h, H, W, d), (0, 0, 0, Wp - W, 0, Hp - H)).reshape(B, h, Np, d)
                       for t in (q, k, v))
            o = flex(q, k, v, block_mask=block_mask, scale=scale)
            return o.reshape(B, h, Hp, Wp, d)[:, :, :H, :W].reshape(B, h, H * W, d)
        return flex(q, k, v, block_mask=block_mask, scale=scale)

    return run


# ---------------------------------------------------------------------------------------------
# SDPA composites
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


# ---------------------------------------------------------------------------------------------
# Run context and tasks
# ---------------------------------------------------------------------------------------------
def available() -> tuple[bool, str]:
    return True, ""  # the LITv2 / SDPA baselines always run; vitkern providers report their own status


def plan(cases: list[HiLoCase], dtypes: list[torch.dtype], groups: tuple[str, ...] = GROUPS) -> list[harness.Task]:
    tasks = []
    for case in cases:
        for dtype in dtypes:
            for g in groups:
                if g == "hifi" and case.num_hi_heads == 0:
                    continue
                if g == "lofi" and case.num_lo_heads == 0:
                    continue
                if g == "lofi_pooled" and (case.num_lo_heads == 0 or case.window_size == 1):
                    continue
                tasks.append(harness.Task("hilo", case, dtype, g))
    return tasks


def _seeded(seed: int, *parts: Any) -> torch.Generator:
    h = seed
    for p in parts:
        for ch in str(p):
            h = (h * 131 + ord(ch)) % (2 ** 31)
    return torch.Generator().manual_seed(h)


def _randn(shape, gen, dtype, device, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def _norm_err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max(1, max|ref|)); NaN/inf -> inf."""
    a64, r64 = a.detach().to(torch.float64), ref.detach().to(torch.float64)
    if a64.shape != r64.shape:
        raise CorrectnessError(f"shape {tuple(a64.shape)} != reference {tuple(r64.shape)}")
    if not torch.isfinite(a64).all():
        return math.inf, math.inf
    e = (a64 - r64).abs().max().item() if a64.numel() else 0.0
    return e, e / max(1.0, r64.abs().max().item() if r64.numel() else 0.0)


def _grads(fn: Callable, inputs: list[torch.Tensor], dout: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, dout.to(out.dtype)))


# ---------------------------------------------------------------------------------------------
# Providers of one task
# ---------------------------------------------------------------------------------------------
@dataclass
class Provider:
    name: str
    kind: str                           # "vitkern" | "baseline"
    fn: Callable | None                 # fn(*inputs) -> output
    skip: str = ""                      # reason when not runnable
    backend: str | None = None
    module: torch.nn.Module | None = None
    fwd_only: str = ""                  # reason when only the forward can be timed (inference kernel)


def _op_providers(task: harness.Task, ctx: harness.Context, ops, ops_reason: str, pad_arg) -> list[Provider]:
    c, g = task.case, task.group
    s, hw, scale = c.window_size, c.hw, c.head_dim ** -0.5
    pad_bool = bool(pad_arg)
    provs: list[Provider] = []
    backends = list(ctx.backends) if ctx.backends else default_backends(ctx.device)
    status = backend_availability()

    for b in backends:
        resolved = _resolve_backend(ctx.device) if b == "auto" else None
        name = f"vitkern[auto:{resolved}]" if resolved else f"vitkern[{b}]"
        if ops is None:
            provs.append(Provider(name, "vitkern", None, skip=ops_reason, backend=b))
            continue
        if status is not None and b in status and not status[b][0]:
            provs.append(Provider(name, "vitkern", None, skip=f"backend {b} unavailable: {status[b][1]}", backend=b))
            continue
        kw: dict[str, Any] = dict(hw=hw, window_size=s, backend=b)
        if pad_arg is not None:
            kw["pad"] = pad_arg
        if g == "hilo":
            fn = (lambda q, k, v, kw=kw: ops.hilo_attention(q, k, v, num_lo_heads=c.num_lo_heads, **kw))
        elif g == "hifi":
            fn = None if not hasattr(ops, "hifi_attention") else (
                lambda q, k, v, kw=kw: ops.hifi_attention(q, k, v, **kw))
        elif g == "lofi":
            fn = None if not hasattr(ops, "lofi_attention") else (
                lambda q, k, v, kw=kw: ops.lofi_attention(q, k, v, **kw))
        else:  # lofi_pooled
            fn = None if not hasattr(ops, "lofi_attention") else (
                lambda q, k, v, kw=kw: ops.lofi_attention(q, k, v, kv_pooled=True, **kw))
        provs.append(Provider(name, "vitkern", fn, skip="" if fn else f"vitkern.ops has no {g} op", backend=b))

    if g == "hilo":
        provs.append(Provider("litv2", "baseline", lambda q, k, v: litv2_hilo_attention(
            q, k, v, hw=hw, window_size=s, num_lo_heads=c.num_lo_heads, scale=scale, pad=pad_bool)))
        provs.append(Provider("sdpa", "baseline", lambda q, k, v: sdpa_hilo(
            q, k, v, hw=hw, window_size=s, num_lo_heads=c.num_lo_heads, scale=scale, pad=pad_bool)))
    elif g == "hifi":
        provs.append(Provider("litv2", "baseline", lambda q, k, v: litv2_hifi_attention(
            q, k, v, hw=hw, window_size=s, scale=scale, pad=pad_bool)))
        provs.append(Provider("sdpa", "baseline", lambda q, k, v: sdpa_hifi(
            q, k, v, hw=hw, window_size=s, scale=scale, pad=pad_bool)))
        ok, why = _flex_available(ctx.device)
        if ok and not ctx.flex:
            ok, why = False, "disabled (--no-flex)"
        if ok:
            try:
                provs.append(Provider("flex", "baseline", make_flex_hifi(c, ctx.device, pad_bool, scale)))
            except Exception as exc:  # noqa: BLE001
                provs.append(Provider("flex", "baseline", None, skip=f"FlexAttention setup failed: {exc}"))
        else:
            provs.append(Provider("flex", "baseline", None, skip=why))
    elif g == "lofi":
        provs.append(Provider("litv2", "baseline", lambda q, k, v: litv2_lofi_attention(
            q, k, v, hw=hw, window_size=s, scale=scale, pad=pad_bool)))
        provs.append(Provider("sdpa", "baseline", lambda q, k, v: sdpa_lofi(
            q, k, v, hw=hw, window_size=s, scale=scale, pad=pad_bool)))
    else:
        provs.append(Provider("litv2", "baseline", lambda q, k, v: litv2_lofi_attention(
            q, k, v, hw=hw, window_size=s, scale=scale, kv_pooled=True)))
        provs.append(Provider("sdpa", "baseline", lambda q, k, v: sdpa_lofi(
            q, k, v, hw=hw, window_size=s, scale=scale, pad=pad_bool, kv_pooled=True)))
    return provs


def _op_inputs(task: harness.Task, ctx: harness.Context, B: int, copy: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """q, k, v (B, h, N, d) (k, v pooled for ``lofi_pooled``) and a dO, on the device, in the dtype."""
    c, g = task.case, task.group
    h = {"hilo": c.heads, "hifi": c.num_hi_heads}.get(g, c.num_lo_heads)
    gen = _seeded(ctx.seed, c.name, g, copy)
    shape = (B, h, c.N, c.head_dim)
    q, k, v = (_randn(shape, gen, task.dtype, ctx.device) for _ in range(3))
    if g == "lofi_pooled":
        pad = c.needs_pad
        k = litv2_pool_kv(k, c.hw, c.window_size, pad).contiguous()
        v = litv2_pool_kv(v, c.hw, c.window_size, pad).contiguous()
    dout = _randn(shape, gen, task.dtype, ctx.device)
    return [q, k, v], dout


def _op_reference(task: harness.Task, ref_mod, pad_arg) -> Callable:
    """An fp64-capable reference callable for the task's op."""
    c, g = task.case, task.group
    kw: dict[str, Any] = dict(hw=c.hw, window_size=c.window_size)
    if pad_arg is not None:
        kw["pad"] = pad_arg
    if g == "lofi_pooled":
        # the op's definition given pooled k, v: exact softmax attention
        scale = c.head_dim ** -0.5
        return lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v
    if g == "hilo":
        return lambda q, k, v: ref_mod.hilo_attention(q, k, v, num_lo_heads=c.num_lo_heads, **kw)
    if g == "hifi":
        if hasattr(ref_mod, "hifi_attention"):
            return lambda q, k, v: ref_mod.hifi_attention(q, k, v, **kw)
        return lambda q, k, v: ref_mod.hilo_attention(q, k, v, num_lo_heads=0, **kw)
    if hasattr(ref_mod, "lofi_attention"):
        return lambda q, k, v: ref_mod.lofi_attention(q, k, v, **kw)
    return lambda q, k, v: ref_mod.hilo_attention(q, k, v, num_lo_heads=q.shape[1], **kw)


def _check(name: str, fn: Callable, ref_fn: Callable, inputs: list[torch.Tensor], dout: torch.Tensor,
           dtype: torch.dtype, with_grad: bool) -> dict:
    """Compare ``fn`` in ``dtype`` with ``ref_fn`` in fp64; tolerance from ``ref_fn`` run in ``dtype``."""
    names = ["out"] + [f"d{i}" for i in range(len(inputs))]
    hi = [t.detach().to(torch.float64) for t in inputs]
    if with_grad:
        ref64 = _grads(ref_fn, hi, dout.to(torch.float64))
        try:
            ref_lp = _grads(ref_fn, inputs, dout)
        except Exception:  # noqa: BLE001 - e.g. a reference without low-precision CPU kernels
            ref_lp = None
        got = _grads(fn, inputs, dout)
    else:
        with torch.no_grad():
            ref64 = [ref_fn(*hi)]
            try:
                ref_lp = [ref_fn(*inputs)]
            except Exception:  # noqa: BLE001
                ref_lp = None
            got = [fn(*inputs)]
    info: dict[str, Any] = {"max_abs_err": {}, "norm_err": {}, "tol": {}, "ref_err": {}}
    bad = []
    for nm, g, r, rl in zip(names, got, ref64, ref_lp or [None] * len(got)):
        e_abs, e_norm = _norm_err(g, r)
        e_ref = _norm_err(rl, r)[1] if rl is not None else 0.0
        tol = max(ERR_FLOOR.get(dtype, 1e-2), ERR_MULT * e_ref)
        info["max_abs_err"][nm] = e_abs
        info["norm_err"][nm] = e_norm
        info["ref_err"][nm] = e_ref
        info["tol"][nm] = tol
        if not (e_norm <= tol):
            bad.append(f"{nm}: normalised error {e_norm:.3g} > tol {tol:.3g} (max abs {e_abs:.3g})")
    info["ok"] = not bad
    info["message"] = "; ".join(bad)
    return info


def _timed_callable(fn: Callable, arg_sets: list[list[torch.Tensor]], douts: list[torch.Tensor], mode: str,
                    device: torch.device, params: list[torch.Tensor] | None = None
                    ) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """The zero-argument callable to time (rotating over the input copies) and its grad_to_none."""
    if mode == "fwd":
        def call(*args):
            with torch.no_grad():
                return fn(*args)
        return harness.rotating(call, [tuple(a) for a in arg_sets]), []

    leaves = [[t.detach().clone().requires_grad_(True) for t in args] for args in arg_sets]
    grad_none = [t for ls in leaves for t in ls] + list(params or [])
    on_cuda = device.type == "cuda"

    def call_bwd(*args):
        if not on_cuda:  # do_bench resets grad_to_none itself on CUDA
            for t in grad_none:
                t.grad = None
        *xs, dout = args
        fn(*xs).backward(dout)

    sets = [tuple(ls) + (d,) for ls, d in zip(leaves, douts)]
    return harness.rotating(call_bwd, sets), grad_none


def time_providers(task: harness.Task, B: int, provs: list["Provider"], checks: dict[str, dict],
                   ctx: harness.Context, arg_sets, douts, copies: int, flops_fn: Callable[[str], float],
                   bytes_fn: Callable[[str], float], extra: Callable[["Provider"], dict] | None = None,
                   record: Callable[..., dict] | None = None) -> list[dict]:
    """Time every runnable provider of a task (interleaved on CPU) per mode; one record each,
    started by ``record(task, B, provider, mode)`` (this family's by default)."""
    record = record or _base_record
    records = []
    for mode in ctx.modes:
        fns, g2n, recs = {}, {}, {}
        for p in provs:
            rec = record(task, B, p, mode)
            if extra is not None:
                rec.update(extra(p))
            chk = checks.get(p.name)
            if chk is not None:
                rec["check"] = chk
                rec["max_abs_err"] = max(chk.get("max_abs_err", {}).values(), default=None)
            recs[p.name] = rec
            if p.fn is None:
                if chk is not None and not chk.get("ok", True):
                    rec.update(status="error" if chk.get("error") else "wrong", reason=chk.get("message"))
                else:
                    rec.update(status="skipped", reason=p.skip)
                continue
            if p.fwd_only and mode != "fwd":
                rec.update(status="skipped", reason=p.fwd_only)
                continue
            params = []
            if p.module is not None and mode != "fwd":
                params = [prm for prm in p.module.parameters() if prm.requires_grad]
            fns[p.name], g2n[p.name] = _timed_callable(p.fn, arg_sets, douts, mode, ctx.device, params)
        timings = harness.bench_many(fns, ctx.device, quick=ctx.quick, grad_to_none=g2n) if fns else {}
        kinds = {p.name: p.kind for p in provs}
        for name, t in timings.items():
            rec = recs[name]
            if isinstance(t, Exception):
                msg = f"{type(t).__name__}: {t}"
                if kinds[name] == "vitkern":
                    ctx.failures.append(f"{task.label} {name} [{mode}]: {msg}")
                    if ctx.strict:
                        raise t
                rec.update(status="error" if kinds[name] == "vitkern" else "skipped", reason=msg)
                continue
            flops, nbytes = flops_fn(mode), bytes_fn(mode)
            rec.update(harness.metrics(t.ms, flops, nbytes, ctx.dev, task.dtype))
            rec.update(status="ok", ms_p20=t.ms_p20, ms_p80=t.ms_p80, reps=t.reps, timer=t.timer,
                       flops=flops, bytes=nbytes, rotated_copies=copies)
        records.extend(recs.values())
    _add_speedups(records)
    return records


def _base_record(task: harness.Task, B: int, prov: Provider, mode: str) -> dict:
    c = task.case
    return {
        "family": FAMILY, "case": c.name, "group": task.group, "provider": prov.name, "kind": prov.kind,
        "backend": prov.backend, "mode": mode, "dtype": harness.dtype_name(task.dtype), "batch": B,
        "shape": c.describe(), "H": c.H, "W": c.W, "dim": c.dim, "heads": c.heads,
        "head_dim": c.head_dim, "window_size": c.window_size, "num_lo_heads": c.num_lo_heads,
        "num_hi_heads": c.num_hi_heads, "padded": c.needs_pad,
    }


def _resolve_backend(device: torch.device, eager: bool = False) -> str | None:
    """The backend ``auto`` picks for tensors on ``device`` (by device only, as
    ``vitkern.backends.select`` decides before any shape-specific refusal); ``eager``: whether
    the op has a ``vitkern.eager`` module (HiLo has none: auto runs its reference on a CPU).
    None if unknown."""
    try:
        from vitkern import backends
        return backends.select("bench", "auto", lambda name, explicit: (
            "no eager module" if name == "eager" and not eager
            else backends.device_reason(name, device, explicit)))
    except Exception:  # noqa: BLE001 - older / newer backends module
        return None


def run_task(task: harness.Task, ctx: harness.Context) -> list[dict]:
    """Check and time every provider of one (case, dtype, group); returns result records."""
    c = task.case
    B = ctx.batch or (min(c.cpu_batch, 2) if (ctx.quick and ctx.device.type != "cuda") else c.batch_for(ctx.device))
    pad_arg = PAD_ARG if c.needs_pad else None
    if task.group == "layer":
        return _run_layer(task, ctx, B)

    ops, ops_reason = _vitkern_ops()
    ref_mod, ref_reason = _reference()
    provs = _op_providers(task, ctx, ops, ops_reason, pad_arg)
    heads = {"hilo": c.heads, "hifi": c.num_hi_heads}.get(task.group, c.num_lo_heads)
    elem = torch.empty((), dtype=task.dtype).element_size()
    hi_heads = {"hilo": c.num_hi_heads, "hifi": c.num_hi_heads}.get(task.group, 0)
    lo_heads = heads - hi_heads
    pooled = task.group == "lofi_pooled"

    copies = harness.n_rotations(int(attention_bytes(c, B, heads, elem, mode="fwd", pooled=pooled)), ctx.dev)
    inputs = [_op_inputs(task, ctx, B, i) for i in range(copies)]
    arg_sets, douts = [x[0] for x in inputs], [x[1] for x in inputs]
    ref_fn = None
    if ref_mod is not None or pooled:
        ref_fn = _op_reference(task, ref_mod, pad_arg)
    # correctness first: a vitkern provider that cannot be checked is not timed
    if ref_fn is None:
        checks: dict[str, dict] = {}
        for p in provs:
            if p.kind == "vitkern" and p.fn is not None:
                p.fn, p.skip = None, f"no reference to check against ({ref_reason})"
    else:
        checks = check_providers(task, ctx, provs, ref_fn, arg_sets[0], douts[0])

    def extra(p: Provider) -> dict:
        if p.backend == "auto" and ops is not None:
            return {"resolved_backend": _resolve_backend(ctx.device)}
        return {}

    return time_providers(
        task, B, provs, checks, ctx, arg_sets, douts, copies,
        flops_fn=lambda mode: attention_flops(c, B, hi_heads=hi_heads, lo_heads=lo_heads, mode=mode),
        bytes_fn=lambda mode: attention_bytes(c, B, heads, elem, mode=mode, pooled=pooled), extra=extra)


def check_providers(task: harness.Task, ctx: harness.Context, provs: list[Provider], ref_fn: Callable,
                    inputs: list[torch.Tensor], dout: torch.Tensor) -> dict[str, dict]:
    """Check every runnable provider against ``ref_fn`` (:func:`_check`) before anything is timed.

    A wrong or raising vitkern provider is recorded in ``ctx.failures`` and not timed; a baseline
    that raises is skipped with the reason. The CUDA C++ backend covers part of each op family by
    design: where it refuses a case (a ``BackendError``) it is skipped with the reason, and where it
    refuses only the gradients (an inference kernel) its forward alone is checked and timed (the
    same for a vitkern op on the CUDA backend used as a baseline, like bench_window's ``dense``).
    """
    checks: dict[str, dict] = {}
    with_grad = "fwd+bwd" in ctx.modes
    for p in provs:
        if p.fn is None:
            continue
        try:
            try:
                info = _check(p.name, p.fn, ref_fn, inputs, dout, task.dtype, with_grad)
            except Exception as exc:  # noqa: BLE001
                if not (p.backend == "cuda" and with_grad and _is_refusal(exc)):
                    raise
                p.fwd_only = f"refused by design: {_refusal_reason(exc, 'cuda')}"
                info = _check(p.name, p.fn, ref_fn, inputs, dout, task.dtype, False)
        except Exception as exc:  # noqa: BLE001
            if p.backend == "cuda" and _is_refusal(exc):
                p.skip = f"refused by design: {_refusal_reason(exc, 'cuda')}"
                p.fn = None
                continue
            if p.kind == "vitkern":
                msg = f"{task.label} {p.name}: raised {type(exc).__name__}: {exc}"
                if p.backend not in (None, "auto") and backend_availability() is None:
                    p.skip = msg  # an explicitly requested backend we could not confirm is available
                    continue
                if ctx.strict:
                    raise
                ctx.failures.append(msg)
                checks[p.name] = {"ok": False, "error": True, "message": msg,
                                  "traceback": traceback.format_exc(limit=4)}
                p.fn = None
                continue
            p.skip = f"raised {type(exc).__name__}: {exc}"
            p.fn = None
            continue
        checks[p.name] = info
        if p.kind == "baseline" and not info["ok"]:
            ctx.log(f"note: {task.label} baseline {p.name} differs from the reference: {info['message']}")
        if p.kind == "vitkern" and not info["ok"]:
            msg = f"{task.label} {p.name}: WRONG vs reference: {info['message']}"
            ctx.log("!!! " + msg)
            if ctx.strict:
                raise CorrectnessError(msg)
            ctx.failures.append(msg)
            p.fn = None
    return checks


def _is_refusal(exc: Exception) -> bool:
    try:
        from vitkern.backends import BackendError
    except Exception:  # noqa: BLE001
        return False
    return isinstance(exc, BackendError)


def _refusal_reason(exc: Exception, backend: str) -> str:
    """The ``<backend>: reason`` line of a BackendError (the whole message if absent)."""
    for line in str(exc).splitlines():
        if line.strip().startswith(f"{backend}:"):
            return line.strip()[len(backend) + 1:].strip()
    return str(exc)


def _add_speedups(records: list[dict]) -> None:
    """speedup[baseline] = baseline ms / vitkern ms, same task and mode; speedup_vs_vitkern the
    same against the other vitkern providers (e.g. cuda vs triton)."""
    for r in records:
        if r.get("kind") != "vitkern" or r.get("status") != "ok":
            continue
        sp, vs = {}, {}
        for b in records:
            if b.get("status") != "ok" or b["mode"] != r["mode"] or b is r:
                continue
            ratio = b["ms"] / r["ms"] if r["ms"] > 0 else None
            if b.get("kind") == "baseline":
                sp[b["provider"]] = ratio
            elif b.get("kind") == "vitkern":
                vs[b["provider"]] = ratio
        r["speedup"] = sp
        r["speedup_vs_vitkern"] = vs


# ---------------------------------------------------------------------------------------------
# Whole layer: vitkern.nn.HiLo vs LITv2HiLo (same weights)
# ---------------------------------------------------------------------------------------------
def _run_layer(task: harness.Task, ctx: harness.Context, B: int) -> list[dict]:
    c, dtype = task.case, task.dtype
    HiLo, nn_reason = _vitkern_nn()
    pad = c.needs_pad
    lit = LITv2HiLo(c.dim, c.heads, qkv_bias=c.qkv_bias, window_size=c.window_size, alpha=c.alpha, pad=pad)
    randomize_(lit, std=0.02, seed=ctx.seed)
    lit = lit.to(ctx.device, dtype).eval()
    provs = []
    vk = None
    if HiLo is None:
        provs.append(Provider("vitkern.nn.HiLo", "vitkern", None, skip=nn_reason, backend="auto"))
    else:
        try:
            kw = {"pad": PAD_ARG} if pad else {}
            vk = HiLo(c.dim, c.heads, qkv_bias=c.qkv_bias, window_size=c.window_size, alpha=c.alpha, **kw)
            vk.load_state_dict(lit.state_dict(), strict=True)
            vk = vk.to(ctx.device, dtype).eval()
            provs.append(Provider("vitkern.nn.HiLo", "vitkern", lambda x, m=vk: m(x, c.H, c.W), backend="auto",
                                  module=vk))
        except Exception as exc:  # noqa: BLE001
            msg = f"{task.label} vitkern.nn.HiLo: construct/load_state_dict failed: {type(exc).__name__}: {exc}"
            ctx.failures.append(msg)
            if ctx.strict:
                raise
            provs.append(Provider("vitkern.nn.HiLo", "vitkern", None, skip=msg, backend="auto"))
    provs.append(Provider("litv2_module", "baseline", lambda x, m=lit: m(x, c.H, c.W), module=lit))
    if ctx.compile_baselines:
        try:
            compiled = torch.compile(lit, dynamic=False)
            provs.append(Provider("litv2_module_compiled", "baseline", lambda x, m=compiled: m(x, c.H, c.W),
                                  module=compiled))
        except Exception as exc:  # noqa: BLE001
            provs.append(Provider("litv2_module_compiled", "baseline", None, skip=f"torch.compile failed: {exc}"))

    lit64 = LITv2HiLo(c.dim, c.heads, qkv_bias=c.qkv_bias, window_size=c.window_size, alpha=c.alpha, pad=pad)
    lit64.load_state_dict(lit.state_dict())
    lit64 = lit64.to(ctx.device, torch.float64).eval()

    elem = torch.empty((), dtype=dtype).element_size()
    n_params = sum(p.numel() for p in lit.parameters())
    act_bytes = B * c.N * c.dim * elem * 2
    copies = harness.n_rotations(act_bytes, ctx.dev)
    xs, douts = [], []
    for i in range(copies):
        gen = _seeded(ctx.seed, c.name, "layer", i)
        xs.append([_randn((B, c.N, c.dim), gen, dtype, ctx.device)])
        douts.append(_randn((B, c.N, c.dim), gen, dtype, ctx.device))
    with_grad = "fwd+bwd" in ctx.modes

    checks: dict[str, dict] = {}
    for p in provs:
        if p.fn is None:
            continue
        try:
            info = _check_layer(p.module, lit, lit64, xs[0][0], douts[0], c, dtype, with_grad)
        except Exception as exc:  # noqa: BLE001
            if p.kind != "vitkern":
                raise
            msg = f"{task.label} {p.name}: raised {type(exc).__name__}: {exc}"
            ctx.failures.append(msg)
            if ctx.strict:
                raise
            checks[p.name] = {"ok": False, "error": True, "message": msg}
            p.fn = None
            continue
        checks[p.name] = info
        if p.kind == "baseline" and not info["ok"]:
            ctx.log(f"note: {task.label} baseline {p.name} differs from LITv2HiLo (fp64): {info['message']}")
        if p.kind == "vitkern" and not info["ok"]:
            msg = f"{task.label} {p.name}: WRONG vs LITv2HiLo (fp64): {info['message']}"
            ctx.log("!!! " + msg)
            if ctx.strict:
                raise CorrectnessError(msg)
            ctx.failures.append(msg)
            p.fn = None

    resolved = _resolve_backend(ctx.device)
    return time_providers(task, B, provs, checks, ctx, xs, douts, copies,
                            flops_fn=lambda mode: layer_flops(c, B, mode),
                            bytes_fn=lambda mode: layer_bytes(c, B, n_params, elem, mode),
                            extra=lambda p: {"resolved_backend": resolved} if p.kind == "vitkern" else {})


def _check_layer(module, lit, lit64, x, dout, c: HiLoCase, dtype, with_grad: bool) -> dict:
    """Output (and dx, and in fwd+bwd mode the parameter gradients) of ``module`` vs LITv2HiLo in fp64."""

    def run(m, xin, dy):
        xin = xin.detach().clone().requires_grad_(with_grad)
        if not with_grad:
            with torch.no_grad():
                return {"out": m(xin, c.H, c.W)}
        m.zero_grad(set_to_none=True)
        y = m(xin, c.H, c.W)
        y.backward(dy.to(y.dtype))
        res = {"out": y.detach(), "dx": xin.grad}
        for n, prm in m.named_parameters():
            if prm.grad is not None:  # torch.compile wraps the module as _orig_mod
                res["d:" + n.removeprefix("_orig_mod.")] = prm.grad.detach().clone()
        m.zero_grad(set_to_none=True)
        return res

    ref = run(lit64, x.to(torch.float64), dout.to(torch.float64))
    ref_lp = run(lit, x, dout)
    got = run(module, x, dout)
    info: dict[str, Any] = {"max_abs_err": {}, "norm_err": {}, "tol": {}, "ref_err": {}}
    bad = []
    for nm, r in ref.items():
        if nm not in got:
            bad.append(f"{nm}: missing gradient")
            continue
        e_abs, e_norm = _norm_err(got[nm], r)
        e_ref = _norm_err(ref_lp[nm], r)[1] if nm in ref_lp else 0.0
        tol = max(ERR_FLOOR.get(dtype, 1e-2), ERR_MULT * e_ref)
        info["max_abs_err"][nm], info["norm_err"][nm] = e_abs, e_norm
        info["ref_err"][nm], info["tol"][nm] = e_ref, tol
        if not (e_norm <= tol):
            bad.append(f"{nm}: normalised error {e_norm:.3g} > tol {tol:.3g} (max abs {e_abs:.3g})")
    info["ok"] = not bad
    info["message"] = "; ".join(bad)
    return info


def cases_for(select: str | None, quick: bool) -> list[HiLoCase]:
    return hilo_cases(select, quick=quick)
