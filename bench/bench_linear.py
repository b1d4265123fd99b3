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

Correctness first: a vitkern provider's output (and, in fwd+bwd, the gradients of q, k, v and
the temperature) must be within ``max(floor, 4 × e_ref)`` of the fp64 reference, e_ref being the
error of the reference math in the benchmark dtype (errors normalised by max(1, max|ref|)).

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

import math
import traceback

import torch
import torch.nn.functional as F

from . import harness
from .shapes import LinearCase, linear_cases

FAMILY = "linear"
GROUPS = ("xca", "linear", "soft")
SOFT_ITERS = 20
ERR_FLOOR = {torch.float32: 5e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
ERR_MULT = 4.0


def available() -> tuple[bool, str]:
    return True, ""


def cases_for(select: str | None, quick: bool) -> list[LinearCase]:
    return linear_cases(select, quick=quick)


def plan(cases: list[LinearCase], dtypes: list[torch.dtype], groups: tuple[str, ...] = GROUPS):
    return [harness.Task("linear", c, dt, c.op) for c in cases for dt in dtypes if c.op in groups]


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
# providers
# ---------------------------------------------------------------------------------------------
def _timm_xca(q, k, v, t):
    """timm's fused XCA path on (B, h, N, d) q, k, v: channels become the sequence of SDPA."""
    qt = F.normalize(q.transpose(-1, -2), dim=-1) * t.reshape(1, -1, 1, 1).to(q.dtype)
    kt = F.normalize(k.transpose(-1, -2), dim=-1)
    return F.scaled_dot_product_attention(qt, kt, v.transpose(-1, -2), scale=1.0).transpose(-1, -2)


def _fla_fn():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as exc:  # noqa: BLE001
        return None, f"flash-linear-attention not installed ({type(exc).__name__})"
    return (lambda q, k, v, t: chunk_linear_attn(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), normalize=True)[0]), ""


def _providers(task: harness.Task, ctx: harness.Context) -> list[dict]:
    from vitkern.ops import linear as ops
    from vitkern.reference import linear as ref

    c = task.case
    kw = ops.PRESETS.get(c.preset, {})
    if ctx.backends:
        names = list(ctx.backends)
    else:
        names = ["triton"] if ctx.device.type == "cuda" else ["auto"]
    provs = []
    if c.op == "soft":
        for b in names:
            provs.append(dict(name=f"vitkern[{b}]", kind="vitkern", backend=b, check=True,
                              fn=(lambda b: lambda q, lm, v: ops.soft_attention(
                                  q, lm, v, iters=SOFT_ITERS, backend=b))(b)))
        provs.append(dict(name="pytorch", kind="baseline", check=True,
                          fn=lambda q, lm, v: ref.soft_attention(q, lm, v, iters=SOFT_ITERS)))
        provs.append(dict(name="sdpa", kind="baseline", check=False,
                          fn=lambda q, lm, v: F.scaled_dot_product_attention(q, q, v)))
        return provs
    for b in names:
        if c.op == "xca":
            fn = (lambda b: lambda q, k, v, t: ops.xca_attention(q, k, v, temperature=t,
                                                                 backend=b))(b)
        else:
            fn = (lambda b: lambda q, k, v, t: ops.linear_attention(q, k, v, temperature=t,
                                                                    backend=b, **kw))(b)
        provs.append(dict(name=f"vitkern[{b}]", kind="vitkern", fn=fn, backend=b, check=True))
    if c.op == "xca":
        provs.append(dict(name="timm_xca", kind="baseline", fn=_timm_xca, check=True))
        provs.append(dict(name="pytorch", kind="baseline", check=True,
                          fn=lambda q, k, v, t: ref.xca_attention(q, k, v, temperature=t)))
    else:
        provs.append(dict(name="pytorch", kind="baseline", check=True,
                          fn=lambda q, k, v, t: ref.linear_attention(q, k, v, temperature=t, **kw)))
        fla, why = _fla_fn()
        if fla is not None and ctx.device.type == "cuda":
            provs.append(dict(name="fla_causal", kind="baseline", fn=fla, check=False))
        else:
            provs.append(dict(name="fla_causal", kind="baseline", fn=None,
                              skip=why or "CUDA only"))
    provs.append(dict(name="sdpa", kind="baseline", check=False,
                      fn=lambda q, k, v, t: F.scaled_dot_product_attention(q, k, v)))
    return provs


def _reference_fn(c: LinearCase):
    from vitkern.ops.linear import PRESETS
    from vitkern.reference import linear as ref

    if c.op == "xca":
        return lambda q, k, v, t: ref.xca_attention(q, k, v, temperature=t)
    if c.op == "soft":
        return lambda q, lm, v: ref.soft_attention(q, lm, v, iters=SOFT_ITERS)
    return lambda q, k, v, t: ref.linear_attention(q, k, v, temperature=t, **PRESETS[c.preset])


def _inputs(task: harness.Task, ctx: harness.Context, B: int, copy: int):
    c = task.case
    g = torch.Generator().manual_seed(ctx.seed * 1000 + copy)
    if c.op == "soft":
        # SOFT's scales: q = W_q x / d**¼, landmarks after LayerNorm + GELU (≈ unit entries
        # shrunk here so that K1 is not all underflow on random data)
        shape, s = (B, c.heads, c.N, c.head_dim), c.head_dim ** -0.25
        q = (torch.randn(shape, generator=g) * s).to(ctx.device, task.dtype)
        lm = (torch.randn(B, c.heads, c.landmarks, c.head_dim, generator=g) * s).to(
            ctx.device, task.dtype)
        v = torch.randn(shape, generator=g).to(ctx.device, task.dtype)
        return [q, lm, v], torch.randn(shape, generator=g).to(ctx.device, task.dtype)
    # L2ViT: |q|, |k| ~ 0.25 puts the denominators around the clamp floor of 100 at N ~ 200
    amp = 0.25 if c.preset == "l2vit" else 1.0
    shape = (B, c.heads, c.N, c.head_dim)
    qkv = [(torch.randn(shape, generator=g) * (amp if i < 2 else 1.0)).to(ctx.device, task.dtype)
           for i in range(3)]
    t = (torch.rand(c.heads, generator=g) + 0.5).to(ctx.device)
    dout = torch.randn(shape, generator=g).to(ctx.device, task.dtype)
    return qkv + [t], dout


def _outputs(fn, inputs, dout, with_grad):
    leaves = [x.detach().clone().requires_grad_(with_grad) for x in inputs]
    out = fn(*leaves)
    if not with_grad:
        return [out.detach()]
    return [out.detach()] + list(torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def _check(fn, ref_fn, inputs, dout, dtype, with_grad) -> dict:
    """Errors of ``fn`` against the fp64 reference, bounded by ERR_MULT × the reference math's own
    error in ``dtype``."""
    exact = _outputs(ref_fn, [x.double() for x in inputs], dout.double(), with_grad)
    lowp = _outputs(ref_fn, inputs, dout, with_grad)
    got = _outputs(fn, inputs, dout, with_grad)
    names = (["out", "dq", "dlandmarks", "dv"] if len(inputs) == 3 else
             ["out", "dq", "dk", "dv", "dtemperature"])[:len(exact)]
    errs, bad = {}, []
    for nm, a, lp, r in zip(names, got, lowp, exact):
        scale = max(1.0, r.abs().max().item())
        e = (a.double() - r).abs().max().item() / scale if torch.isfinite(a).all() else math.inf
        e_ref = (lp.double() - r).abs().max().item() / scale
        tol = max(ERR_FLOOR[dtype], ERR_MULT * e_ref)
        errs[nm] = e
        if not e <= tol:
            bad.append(f"{nm}: normalised error {e:.3g} > tol {tol:.3g}")
    return {"ok": not bad, "message": "; ".join(bad), "max_abs_err": errs}


def _timed(fn, arg_sets, douts, mode):
    if mode == "fwd":
        def call(*args):
            with torch.no_grad():
                return fn(*args)
        return harness.rotating(call, [tuple(a) for a in arg_sets]), []
    leaves = [[x.detach().clone().requires_grad_(x.is_floating_point()) for x in a]
              for a in arg_sets]
    params = [x for ls in leaves for x in ls]

    def call_bwd(*args):
        *xs, dout = args
        for x in xs:
            x.grad = None
        fn(*xs).backward(dout)

    return harness.rotating(call_bwd, [tuple(ls) + (d,) for ls, d in zip(leaves, douts)]), params


def run_task(task: harness.Task, ctx: harness.Context) -> list[dict]:
    """Check and time every provider of one (case, dtype); returns result records."""
    c = task.case
    B = ctx.batch or (1 if ctx.quick and ctx.device.type != "cuda" else c.batch_for(ctx.device))
    elem = torch.empty((), dtype=task.dtype).element_size()
    copies = harness.n_rotations(int(op_bytes(c, B, elem, "fwd")), ctx.dev)
    sets = [_inputs(task, ctx, B, i) for i in range(copies)]
    arg_sets, douts = [s[0] for s in sets], [s[1] for s in sets]
    with_grad = "fwd+bwd" in ctx.modes
    ref_fn = _reference_fn(c)
    provs = _providers(task, ctx)
    checks: dict[str, dict] = {}
    for p in provs:
        if p["fn"] is None or not p.get("check"):
            continue
        try:
            info = _check(p["fn"], ref_fn, arg_sets[0], douts[0], task.dtype, with_grad)
        except Exception as exc:  # noqa: BLE001
            info = {"ok": False, "message": f"raised {type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=4)}
            if ctx.strict and p["kind"] == "vitkern":
                raise
        checks[p["name"]] = info
        if not info["ok"]:
            if p["kind"] == "vitkern":
                msg = f"{task.label} {p['name']}: WRONG vs reference: {info['message']}"
                ctx.log("!!! " + msg)
                ctx.failures.append(msg)
                if ctx.strict:
                    raise AssertionError(msg)
            p["skip"], p["fn"] = info["message"], None

    records = []
    for mode in ctx.modes:
        fns, g2n, recs = {}, {}, {}
        for p in provs:
            rec = {"family": FAMILY, "case": c.name, "group": task.group, "provider": p["name"],
                   "kind": p["kind"], "backend": p.get("backend"), "mode": mode,
                   "dtype": harness.dtype_name(task.dtype), "batch": B, "shape": c.describe(),
                   "N": c.N, "heads": c.heads, "head_dim": c.head_dim, "preset": c.preset or None}
            if p["name"] in checks:
                rec["check"] = checks[p["name"]]
                rec["max_abs_err"] = max(checks[p["name"]].get("max_abs_err", {}).values(),
                                         default=None)
            recs[p["name"]] = rec
            if p["fn"] is None:
                failed = p["kind"] == "vitkern" and p["name"] in checks
                rec.update(status="wrong" if failed else "skipped", reason=p.get("skip"))
                continue
            fns[p["name"]], g2n[p["name"]] = _timed(p["fn"], arg_sets, douts, mode)
        timings = harness.bench_many(fns, ctx.device, quick=ctx.quick, grad_to_none=g2n)
        for name, t in timings.items():
            rec = recs[name]
            if isinstance(t, Exception):
                rec.update(status="error" if rec["kind"] == "vitkern" else "skipped",
                           reason=f"{type(t).__name__}: {t}")
                if rec["kind"] == "vitkern":
                    ctx.failures.append(f"{task.label} {name} [{mode}]: {rec['reason']}")
                continue
            flops, nbytes = op_flops(c, B, mode), op_bytes(c, B, elem, mode)
            rec.update(harness.metrics(t.ms, flops, nbytes, ctx.dev, task.dtype))
            rec.update(status="ok", ms_p20=t.ms_p20, ms_p80=t.ms_p80, reps=t.reps, timer=t.timer,
                       flops=flops, bytes=nbytes, rotated_copies=copies)
        for r in recs.values():
            if r["kind"] == "vitkern" and r.get("status") == "ok":
                r["speedup"] = {b["provider"]: b["ms"] / r["ms"] for b in recs.values()
                                if b["kind"] == "baseline" and b.get("status") == "ok"}
        records.extend(recs.values())
    return records
