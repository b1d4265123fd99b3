"""Token-attention benchmarks (EViT / ToMe / TinyDrop) for ``python -m vitkern.bench``.

Groups (cases from :data:`vitkern.bench.shapes.TOKEN_CASES`: ViT-S/B/L token counts 197 / 577 /
1025, keep rates 0.9 / 0.7 / 0.5):

* ``kept`` — attention among the K kept tokens read in place (``token_attention(keep_idx=...)``)
  vs the usual gather of q, k, v followed by SDPA.
* ``cls`` — attention over all N tokens that also returns EViT's CLS importance
  (``return_importance="cls"``) vs the unfused attention that materialises the probabilities to
  read their CLS row (what EViT's code does), and vs SDPA alone (no importance: a lower bound).
* ``model`` — images/s of a timm ViT-B/16 (random weights) patched with EViT keep 0.7
  (``patch_model(token_drop=0.7)``, kernels) vs the unpatched model (timm's SDPA attention) and vs
  the same EViT dropping on unfused attention (``backend="reference"``: probabilities
  materialised, EViT today).

Useful FLOPs count the attention matmuls of the tokens actually attended (4·B·h·K²·d forward,
×3.5 forward+backward). Byte model (forward): q, k, v rows read once, o written once (input
dtype), fp32 log-sum-exp, int64 indices; forward+backward adds dO, O read and dQ, dK, dV
written. Correctness: each provider's output vs the fp32 reference on the same inputs.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from . import harness
from .shapes import TOKEN_MODEL_CASES, TOKEN_MODEL_QUICK_CPU, TokenCase, TokenModelCase, token_cases

FAMILY = "token"
GROUPS = ("kept", "cls", "model")
#: max |err| / max |ref| allowed against the fp32 reference
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def available() -> tuple[bool, str]:
    return True, ""


def cases_for(select: str | None, quick: bool) -> list[TokenCase]:
    return token_cases(select, quick=quick)


def plan(cases: list[TokenCase], dtypes: list[torch.dtype], groups: tuple[str, ...] = GROUPS
         ) -> list[harness.Task]:
    tasks = [harness.Task(FAMILY, c, dt, g)
             for c in cases for dt in dtypes for g in groups if g != "model"]
    if "model" in groups:
        tasks += [harness.Task(FAMILY, m, dt, "model") for m in TOKEN_MODEL_CASES for dt in dtypes]
    return tasks


def _backends(ctx: harness.Context) -> list[str]:
    if ctx.backends:
        return list(ctx.backends)
    return ["triton"] if ctx.device.type == "cuda" else ["auto"]


# ---------------------------------------------------------------------------------------------
# op groups
# ---------------------------------------------------------------------------------------------


def _inputs(c: TokenCase, B: int, dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    # q, k, v as views of one (B, N, 3, h, d) projection, as a ViT block produces them
    qkv = torch.randn(B, c.N, 3, c.heads, c.head_dim, generator=g).to(device, dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scores = torch.rand(B, c.N, generator=g)
    keep_idx = torch.cat([torch.zeros(B, 1, dtype=torch.long),
                          scores[:, 1:].topk(c.K - 1, dim=1).indices + 1], 1).to(device)
    return q, k, v, keep_idx


def _gather(t, idx):
    B, h, _, d = t.shape
    return t.gather(2, idx[:, None, :, None].expand(B, h, idx.shape[1], d))


def _providers(task: harness.Task, ctx: harness.Context) -> dict[str, tuple[str, Callable, str | None]]:
    """name -> (kind, fn(q, k, v, idx) -> output tensor(s), backend)."""
    from vitkern.ops.token import token_attention

    provs: dict[str, tuple[str, Callable, str | None]] = {}
    if task.group == "kept":
        for be in _backends(ctx):
            provs[f"vitkern.token_attention[{be}]"] = (
                "vitkern", lambda q, k, v, i, be=be: token_attention(q, k, v, keep_idx=i,
                                                                      backend=be), be)
        provs["gather+sdpa"] = ("baseline", lambda q, k, v, i: F.scaled_dot_product_attention(
            _gather(q, i), _gather(k, i), _gather(v, i)), None)
    else:
        for be in _backends(ctx):
            provs[f"vitkern.token_attention[{be}]+cls"] = (
                "vitkern", lambda q, k, v, i, be=be: token_attention(
                    q, k, v, return_importance="cls", backend=be), be)

        def unfused(q, k, v, i):
            p = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
            return p @ v, p[:, :, 0].mean(1)

        provs["unfused+probs (EViT)"] = ("baseline", unfused, None)
        provs["sdpa (no importance)"] = ("baseline", lambda q, k, v, i:
                                         F.scaled_dot_product_attention(q, k, v), None)
    return provs


def _reference(task: harness.Task, q, k, v, idx):
    from vitkern.reference.token import token_attention as ref

    q, k, v = (t.float() for t in (q, k, v))
    if task.group == "kept":
        return ref(q, k, v, keep_idx=idx)
    return ref(q, k, v, return_importance="cls")


def _check(out, ref, dtype) -> dict:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    errs = [((o.float() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()
            for o, r in zip(outs, refs)]
    err = max(errs)
    return {"rel_err": err, "tol": TOL[dtype], "ok": bool(err <= TOL[dtype])}


def _flops_bytes(c: TokenCase, B: int, group: str, mode: str, elem: int) -> tuple[float, float]:
    n = c.K if group == "kept" else c.N
    flops = 4.0 * B * c.heads * n * n * c.head_dim
    rows = B * c.heads * n
    nbytes = 4 * rows * c.head_dim * elem + 4 * rows + (8 * B * n if group == "kept" else 0)
    if mode == "fwd+bwd":
        flops *= 3.5
        nbytes += 5 * rows * c.head_dim * elem + 8 * rows
    return flops, nbytes


def _record(task: harness.Task, B: int, name: str, kind: str, backend, mode: str) -> dict:
    c = task.case
    rec = {"family": FAMILY, "case": c.name, "group": task.group, "provider": name, "kind": kind,
           "backend": backend, "mode": mode, "dtype": harness.dtype_name(task.dtype), "batch": B}
    if isinstance(c, TokenCase):
        rec.update(shape=c.describe(), N=c.N, K=c.K, keep=c.keep, heads=c.heads,
                   head_dim=c.head_dim)
    else:
        rec.update(shape=c.model, keep=c.keep)
    return rec


def _timed(fn, args, mode: str, device):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(*args)
        return call, []
    q, k, v, idx = args
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def call_bwd():
        if device.type != "cuda":
            for t in leaves:
                t.grad = None
        out = fn(*leaves, idx)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return call_bwd, leaves


def _fail(task, name, mode, msg, ctx, exc=None):
    ctx.failures.append(f"{task.label} {name} [{mode}]: {msg}")
    if ctx.strict and exc is not None:
        raise exc


def run_task(task: harness.Task, ctx: harness.Context) -> list[dict]:
    """Check and time every provider of one (case, dtype, group); returns result records."""
    if task.group == "model":
        return _run_model(task, ctx)
    c = task.case
    B = ctx.batch or (c.batch if ctx.device.type == "cuda" else c.cpu_batch)
    elem = torch.empty((), dtype=task.dtype).element_size()
    args = _inputs(c, B, task.dtype, ctx.device, ctx.seed)
    ref = _reference(task, *args)
    records = []
    for mode in ctx.modes:
        fns, g2n, recs = {}, {}, {}
        for name, (kind, fn, be) in _providers(task, ctx).items():
            rec = recs[name] = _record(task, B, name, kind, be, mode)
            try:
                with torch.no_grad():
                    rec["check"] = chk = _check(fn(*args), ref, task.dtype)
                rec["max_abs_err"] = chk["rel_err"]
                if not chk["ok"] and kind == "vitkern":
                    rec.update(status="wrong", reason=f"rel err {chk['rel_err']:.3g}")
                    _fail(task, name, mode, rec["reason"], ctx)
                    continue
                fns[name], g2n[name] = _timed(fn, args, mode, ctx.device)
            except Exception as exc:  # noqa: BLE001 - reported per provider
                rec.update(status="error" if kind == "vitkern" else "skipped",
                           reason=f"{type(exc).__name__}: {exc}")
                if kind == "vitkern":
                    _fail(task, name, mode, rec["reason"], ctx, exc)
        timings = harness.bench_many(fns, ctx.device, quick=ctx.quick, grad_to_none=g2n)
        flops, nbytes = _flops_bytes(c, B, task.group, mode, elem)
        for name, t in timings.items():
            rec = recs[name]
            if isinstance(t, Exception):
                rec.update(status="error", reason=f"{type(t).__name__}: {t}")
                if rec["kind"] == "vitkern":
                    _fail(task, name, mode, rec["reason"], ctx, t)
                continue
            rec.update(harness.metrics(t.ms, flops, nbytes, ctx.dev, task.dtype))
            rec.update(status="ok", ms_p20=t.ms_p20, ms_p80=t.ms_p80, reps=t.reps,
                       timer=t.timer, flops=flops, bytes=nbytes)
        records.extend(recs.values())
    _add_speedups(records)
    return records


def _add_speedups(records: list[dict]) -> None:
    """speedup[baseline] = baseline ms / vitkern ms (same task and mode)."""
    for r in records:
        if r.get("kind") != "vitkern" or r.get("status") != "ok":
            continue
        r["speedup"] = {b["provider"]: b["ms"] / r["ms"] for b in records
                        if b.get("kind") == "baseline" and b.get("status") == "ok"
                        and b["mode"] == r["mode"] and r["ms"] > 0}


# ---------------------------------------------------------------------------------------------
# model group: images/s of a timm ViT with EViT dropping
# ---------------------------------------------------------------------------------------------


def _run_model(task: harness.Task, ctx: harness.Context) -> list[dict]:
    import timm

    from vitkern.integrations.timm import patch_model

    on_cpu = ctx.device.type != "cuda"
    mc: TokenModelCase = TOKEN_MODEL_QUICK_CPU if (on_cpu and ctx.quick) else task.case
    task = harness.Task(FAMILY, mc, task.dtype, "model")
    B = ctx.batch or (mc.cpu_batch if on_cpu else mc.batch)
    torch.manual_seed(ctx.seed)
    base = timm.create_model(mc.model, pretrained=False, img_size=mc.img_size).eval().to(
        ctx.device, task.dtype)
    models: dict[str, tuple[str, torch.nn.Module, str | None]] = {"timm": ("baseline", base, None)}
    for be in _backends(ctx):
        m = copy.deepcopy(base)
        patch_model(m, token_drop=mc.keep, backend=be)
        models[f"vitkern EViT keep {mc.keep} [{be}]"] = ("vitkern", m, be)
    m = copy.deepcopy(base)
    patch_model(m, token_drop=mc.keep, backend="reference")
    models[f"EViT keep {mc.keep} unfused (reference)"] = ("baseline", m, "reference")
    gen = torch.Generator().manual_seed(ctx.seed)
    images = torch.randn(B, 3, mc.img_size, mc.img_size, generator=gen).to(ctx.device, task.dtype)
    with torch.no_grad():
        ref = base(images).float()
    fns, recs = {}, {}
    for name, (kind, model, be) in models.items():
        rec = recs[name] = _record(task, B, name, kind, be, "fwd")
        if kind == "vitkern":
            # the kernels inside the model: keep rate 1.0 (nothing dropped) must give the
            # unpatched logits (with dropping, near-tied importances may legitimately pick
            # other tokens in low precision; the op groups check the kernels exactly)
            try:
                same = copy.deepcopy(base)
                patch_model(same, token_drop=1.0, backend=be)
                with torch.no_grad():
                    out = same(images).float()
                del same
                err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                rec["check"] = {"rel_err": err, "tol": 10 * TOL[task.dtype],
                                "ok": err <= 10 * TOL[task.dtype]}
                if not rec["check"]["ok"]:
                    rec.update(status="wrong", reason=f"logits rel err {err:.3g}")
                    _fail(task, name, "fwd", rec["reason"], ctx)
                    continue
            except Exception as exc:  # noqa: BLE001
                rec.update(status="error", reason=f"{type(exc).__name__}: {exc}")
                _fail(task, name, "fwd", rec["reason"], ctx, exc)
                continue

        def call(model=model):
            with torch.no_grad():
                model(images)
        fns[name] = call
    for name, t in harness.bench_many(fns, ctx.device, quick=ctx.quick).items():
        rec = recs[name]
        if isinstance(t, Exception):
            rec.update(status="error", reason=f"{type(t).__name__}: {t}")
            continue
        rec.update(status="ok", ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, reps=t.reps,
                   timer=t.timer, images_per_s=B / (t.ms * 1e-3))
    records = list(recs.values())
    _add_speedups(records)
    return records
