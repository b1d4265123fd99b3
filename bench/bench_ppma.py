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
of every provider against the fp64 reference on a batch-1 slice.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from vitkern.backends import BackendError

from . import harness
from .ppma_original import ppma_original_attention, ppma_original_criss_cross
from .shapes import PPMACase, ppma_cases

FAMILY = "ppma"
GROUPS = ("full", "criss_cross")
#: max error / max(1, max|ref|) a provider may show against the fp64 reference
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def available() -> tuple[bool, str]:
    return True, ""


def cases_for(select: str | None, quick: bool) -> list[PPMACase]:
    return ppma_cases(select, quick=quick)


def plan(cases, dtypes, groups=GROUPS) -> list[harness.Task]:
    return [harness.Task("ppma", c, dt, g) for c in cases for dt in dtypes for g in groups]


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


def _inputs(c: PPMACase, B: int, dtype, device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, c.heads, c.N, c.head_dim, generator=g) for _ in range(3)]
    decays = [-torch.rand(B, c.heads, c.N, generator=g) * 0.5 for _ in range(2)]
    return [t.to(device=device, dtype=dtype) for t in qkv + decays]


@dataclass
class Provider:
    name: str
    kind: str                          # "vitkern" | "baseline"
    fn: Callable | None
    backend: str | None = None
    skip: str = ""
    refused: dict = field(default_factory=dict)  # mode -> why the op refuses it by design


def _providers(task: harness.Task, ctx: harness.Context) -> list[Provider]:
    hw = (task.case.H, task.case.W)
    full = task.group == "full"
    provs = []
    wanted = ctx.backends or (("triton",) if ctx.device.type == "cuda" else ("auto",))
    try:
        from vitkern.ops import ppma as vk

        ppma_attention = vk.ppma_attention if full else vk.ppma_criss_cross_attention
    except Exception as exc:  # noqa: BLE001 - reported as a skipped provider
        ppma_attention, why = None, f"vitkern.ops.ppma unavailable: {exc}"
    for b in wanted:
        name = "vitkern" if len(wanted) == 1 else f"vitkern[{b}]"
        if ppma_attention is None:
            provs.append(Provider(name, "vitkern", None, b, why))
            continue
        provs.append(Provider(name, "vitkern",
                              lambda q, k, v, a, g, b=b: ppma_attention(q, k, v, a, g, hw=hw,
                                                                        backend=b), b))
    original = ppma_original_attention if full else ppma_original_criss_cross
    provs.append(Provider("ppma_original", "baseline",
                          lambda q, k, v, a, g: original(q, k, v, a, g, hw=hw)))
    if full:
        provs.append(Provider("sdpa_unmasked", "baseline",
                              lambda q, k, v, a, g: F.scaled_dot_product_attention(q, k, v)))
    return provs


def _check(p: Provider, task: harness.Task, ctx: harness.Context, with_grad: bool) -> dict:
    """Output (and gradients) on a batch-1 slice vs the fp64 reference."""
    from vitkern.reference import ppma as R

    ref = R.ppma_attention if task.group == "full" else R.ppma_criss_cross_attention

    c = task.case
    hw = (c.H, c.W)
    x = [t.requires_grad_(with_grad) for t in _inputs(c, 1, task.dtype, ctx.device, ctx.seed + 99)]
    x64 = [t.detach().double().requires_grad_(with_grad) for t in x]
    out, want = p.fn(*x), ref(*x64, hw=hw)
    pairs = [("out", out, want)]
    if with_grad:
        dout = torch.randn_like(want)
        got = torch.autograd.grad(out, x, dout.to(out.dtype))
        exp = torch.autograd.grad(want, x64, dout)
        pairs += list(zip(("dq", "dk", "dv", "da", "dg"), got, exp))
    errs = {}
    for name, a, b in pairs:
        a64 = a.detach().double()
        errs[name] = (math.inf if not torch.isfinite(a64).all() else
                      (a64 - b).abs().max().item() / max(1.0, b.abs().max().item()))
    tol = TOLERANCE.get(task.dtype, 1e-6)
    bad = [f"{n} {e:.3g} > {tol:g}" for n, e in errs.items() if not e <= tol]
    return {"ok": not bad, "max_abs_err": errs, "tolerance": tol, "message": "; ".join(bad)}


def _peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def _callable(fn, arg_sets, douts, mode):
    if mode == "fwd":
        def call(*args):
            with torch.no_grad():
                return fn(*args)
        return harness.rotating(call, [tuple(a) for a in arg_sets]), []
    leaves = [[t.detach().clone().requires_grad_() for t in a] for a in arg_sets]

    def call_bwd(*args):
        *xs, dout = args
        for t in xs:
            t.grad = None
        fn(*xs).backward(dout)

    return (harness.rotating(call_bwd, [tuple(ls) + (d,) for ls, d in zip(leaves, douts)]),
            [t for ls in leaves for t in ls])


def run_task(task: harness.Task, ctx: harness.Context) -> list[dict]:
    c, dtype = task.case, task.dtype
    B = ctx.batch or (c.batch if ctx.device.type == "cuda" else c.cpu_batch)
    elem = torch.empty((), dtype=dtype).element_size()
    copies = harness.n_rotations(int(attention_bytes(c, B, elem, "fwd")), ctx.dev)
    arg_sets = [_inputs(c, B, dtype, ctx.device, ctx.seed + i) for i in range(copies)]
    douts = [torch.randn_like(a[0]) for a in arg_sets]
    provs = _providers(task, ctx)
    with_grad = "fwd+bwd" in ctx.modes
    checks = {}
    for p in provs:
        if p.fn is None:
            continue
        try:
            try:
                info = _check(p, task, ctx, with_grad and p.name != "sdpa_unmasked")
            except BackendError as exc:  # e.g. a map too wide for the backward: time fwd only
                if not with_grad or p.kind != "vitkern":
                    raise
                lines = [ln.strip() for ln in str(exc).splitlines()]
                p.refused["fwd+bwd"] = next((ln for ln in lines if ln.startswith(f"{p.backend}:")),
                                            str(exc))
                info = _check(p, task, ctx, False)
            checks[p.name] = info
        except Exception as exc:  # noqa: BLE001
            info = {"ok": False, "message": f"raised {type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=4)}
            checks[p.name] = info
            if p.kind == "baseline":
                p.fn, p.skip = None, info["message"]
                continue
        if p.kind == "vitkern" and not info["ok"]:
            msg = f"{task.label} {p.name}: WRONG or failed vs reference: {info['message']}"
            ctx.log("!!! " + msg)
            ctx.failures.append(msg)
            if ctx.strict:
                raise AssertionError(msg)
            p.fn = None
    checks.pop("sdpa_unmasked", None)  # a different op: timed, not checked

    records = []
    for mode in ctx.modes:
        fns, g2n, recs = {}, {}, {}
        for p in provs:
            rec = {"family": FAMILY, "case": c.name, "group": task.group, "provider": p.name,
                   "kind": p.kind, "backend": p.backend, "mode": mode,
                   "dtype": harness.dtype_name(dtype), "batch": B, "shape": c.describe(),
                   "H": c.H, "W": c.W, "heads": c.heads, "head_dim": c.head_dim}
            if p.name in checks:
                rec["check"] = checks[p.name]
            recs[p.name] = rec
            if p.fn is None:
                rec.update(status="skipped" if p.kind == "baseline" or p.skip else "wrong",
                           reason=p.skip or checks.get(p.name, {}).get("message"))
                continue
            if mode in p.refused:
                rec.update(status="skipped", reason=f"refused by design: {p.refused[mode]}")
                continue
            fns[p.name], g2n[p.name] = _callable(p.fn, arg_sets, douts, mode)
        timings = harness.bench_many(fns, ctx.device, quick=ctx.quick, grad_to_none=g2n)
        for name, t in timings.items():
            rec, kind = recs[name], recs[name]["kind"]
            if isinstance(t, Exception):  # e.g. the original's N×N mask out of memory
                rec.update(status="error" if kind == "vitkern" else "skipped",
                           reason=f"{type(t).__name__}: {str(t)[:300]}")
                if kind == "vitkern":
                    ctx.failures.append(f"{task.label} {name} [{mode}]: {rec['reason']}")
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            flops = attention_flops(c, B, mode, task.group)
            nbytes = attention_bytes(c, B, elem, mode)
            rec.update(harness.metrics(t.ms, flops, nbytes, ctx.dev, dtype))
            rec.update(status="ok", ms_p20=t.ms_p20, ms_p80=t.ms_p80, reps=t.reps, timer=t.timer,
                       flops=flops, bytes=nbytes, rotated_copies=copies,
                       peak_mem_mb=_peak_mb(fns[name], ctx.device))
        records.extend(recs.values())
    for r in records:  # speedup = baseline ms / vitkern ms, same mode
        if r["kind"] == "vitkern" and r.get("status") == "ok":
            r["speedup"] = {b["provider"]: b["ms"] / r["ms"] for b in records
                            if b["kind"] == "baseline" and b.get("status") == "ok"
                            and b["mode"] == r["mode"]}
    return records
