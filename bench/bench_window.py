"""Swin window attention benchmarks: vitkern vs timm's eager path, SDPA and FlexAttention; SparseViT.

For every case of ``shapes.WINDOW_CASES`` (Swin-T/S/B stages at 224 and 384) and every dtype:

==============  ==========================================  ============================================
group           vitkern provider                            baselines (same run)
==============  ==========================================  ============================================
``attn``        ``ops.window_attention`` on q, k, v views   ``timm_math`` (roll, pad, window_partition of
                of one packed projection (roll / pad /      q, k, v; timm's WindowAttention math: scaled
                partition / shift mask / bias by index      q·kᵀ + bias table + shift mask, softmax, ·v;
                math), bias table differentiable            window_reverse, crop, roll back), ``sdpa``
                                                            (same partition, SDPA with timm's fused-path
                                                            float mask = bias + shift mask), ``flex``
                                                            (same partition, FlexAttention with a
                                                            same-window BlockMask and a bias/mask
                                                            score_mod; CUDA only)
``block_attn``  a timm ``SwinTransformerBlock`` patched by  the unpatched block's ``_attn`` (timm's own
                ``patch_model``: ``_attn(x)`` = qkv, op,    code: roll, pad, partition, WindowAttention
                proj on the full map                        with qkv / proj, reverse, roll), same weights
``sparse<P>``   ``ops.window_attention(active_windows=...)``  ``dense`` = the same op on every window;
                keeping ``int(nW·(1-P/100))`` windows per    the record's ``flop_bound`` = nW / K is the
                image (P = 30, 50, 70, SparseViT's ratios)   FLOP-wise speedup limit
==============  ==========================================  ============================================

vitkern providers are named ``vitkern[<backend>]``, one per backend as in ``bench_hilo`` (on CUDA
every available compiled backend). ``vitkern[cuda]`` is the CUDA C++ Swin forward (csrc/window/:
square 7×7 / 12×12 windows, head_dim 32, fp16 / bf16, every window): its ``fwd+bwd`` records and
the cases it refuses by design (fp32, ``active_windows``, other shapes) are ``skipped`` with the
reason, and its ``speedup_vs_vitkern`` against ``vitkern[triton]`` (same task and mode) is the
number that decides whether ``auto`` may prefer it. Its GB/s is measured against the byte model
below, like every provider's.

Correctness first: every provider's output (and with ``fwd+bwd`` the gradients of every input) is
compared with ``vitkern.reference.window`` in fp64 under the flash-attention rule before it is
timed (``bench_hilo._check``); a wrong vitkern provider is not timed and fails the run.

Useful FLOPs (forward): ``4 · ws² · d`` per real query per head (q·kᵀ over the ws² keys of its
window, then P·v): ``B · h · Nq · 4 · ws² · d`` with Nq the real queries computed (all H·W, or
those of the kept windows); softmax, bias, mask, partition copies and pad queries not counted.
fwd+bwd = 3.5 × forward (flash-attention convention). ``block_attn`` adds the two projections,
``2 · B · N · C · 4C``.

Byte model (``e`` bytes per element; each tensor moved once): forward ``e · B · h · d · 4 · Nq``
(read q, k, v, write o); the backward adds ``e · B · h · d · 8 · Nq`` (read q, k, v, o, dO; write
dq, dk, dv) plus the fp32 log-sum-exp and delta, ``8 · B · h · Nq``. The bias table is negligible.
``block_attn``: ``e · (2 · B · N · C + P)`` (x in, y out, P parameters), backward 2 × that.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from . import harness
from .bench_hilo import (Provider, _flex_available, _flex_fn, _randn, _resolve_backend, _seeded,
                         check_providers, default_backends, time_providers)
from .shapes import WindowCase, window_cases

FAMILY = "window"
SPARSITIES = (30, 50, 70)
GROUPS = ("attn", "block_attn") + tuple(f"sparse{p}" for p in SPARSITIES)


def available() -> tuple[bool, str]:
    try:
        import vitkern.ops.window  # noqa: F401 (importable: the vitkern providers can run)
    except Exception as exc:  # noqa: BLE001
        return False, f"vitkern.ops.window not importable: {type(exc).__name__}: {exc}"
    return True, ""


def cases_for(select: str | None, quick: bool) -> list[WindowCase]:
    return window_cases(select, quick=quick)


def plan(cases: list[WindowCase], dtypes: list[torch.dtype], groups: tuple[str, ...] = GROUPS):
    tasks = []
    for c in cases:
        for dtype in dtypes:
            for g in groups:
                if g.startswith("sparse") and _n_keep(c, g) in (0, c.n_windows):
                    continue  # one window per image: nothing to prune
                tasks.append(harness.Task("window", c, dtype, g))
    return tasks


def _n_keep(c: WindowCase, group: str) -> int:
    return int(c.n_windows * (1.0 - int(group[len("sparse"):]) / 100.0))


# ---------------------------------------------------------------------------------------------
# baselines on raster q, k, v (B, h, N, d) with a bias table ((2ws-1)², h)
# ---------------------------------------------------------------------------------------------
def _geometry(c: WindowCase):
    from vitkern.reference.window import effective_window

    (ws, _), (s, _) = effective_window((c.H, c.W), c.window_size, c.shift)  # square cases
    return ws, s, -(-c.H // ws) * ws, -(-c.W // ws) * ws


def _partition(t, c: WindowCase):
    """timm's roll -> pad -> window_partition of a (B, h, N, d) tensor: (B·nW, h, ws², d)."""
    ws, s, Hp, Wp = _geometry(c)
    B, h, _, d = t.shape
    m = t.reshape(B, h, c.H, c.W, d)
    if s:
        m = torch.roll(m, (-s, -s), (2, 3))
    m = F.pad(m, (0, 0, 0, Wp - c.W, 0, Hp - c.H))
    m = m.reshape(B, h, Hp // ws, ws, Wp // ws, ws, d).permute(0, 2, 4, 1, 3, 5, 6)
    return m.reshape(-1, h, ws * ws, d)


def _reverse(o, c: WindowCase, B: int):
    ws, s, Hp, Wp = _geometry(c)
    h, d = o.shape[1], o.shape[-1]
    m = o.reshape(B, Hp // ws, Wp // ws, h, ws, ws, d).permute(0, 3, 1, 4, 2, 5, 6)
    m = m.reshape(B, h, Hp, Wp, d)[:, :, :c.H, :c.W]
    if s:
        m = torch.roll(m, (s, s), (2, 3))
    return m.reshape(B, h, c.H * c.W, d)


def _bias_and_mask(table, c: WindowCase, dtype):
    """timm's (h, ws², ws²) relative position bias and (nW, ws², ws²) shift mask (or None)."""
    from vitkern.reference.window import dense_bias

    ws, s, Hp, Wp = _geometry(c)
    bias = dense_bias(table, ws, table.shape[1]).to(dtype)
    if not s:
        return bias, None
    ids = torch.zeros(Hp, Wp, device=table.device)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            ids[hs, wsl] = cnt
            cnt += 1
    win = ids.reshape(Hp // ws, ws, Wp // ws, ws).transpose(1, 2).reshape(-1, ws * ws)
    mask = (win[:, None, :] != win[:, :, None]).to(dtype) * -100.0
    return bias, mask


def timm_math(q, k, v, table, *, c: WindowCase, scale: float):
    """timm WindowAttention's eager math on partitioned windows (incl. roll / pad / reverse)."""
    B = q.shape[0]
    qw, kw, vw = (_partition(t, c) for t in (q, k, v))
    bias, mask = _bias_and_mask(table, c, q.dtype)
    attn = (qw * scale) @ kw.transpose(-2, -1) + bias
    if mask is not None:
        nw, n, h = mask.shape[0], qw.shape[2], qw.shape[1]
        attn = (attn.view(-1, nw, h, n, n) + mask[None, :, None]).view(-1, h, n, n)
    return _reverse(attn.softmax(-1) @ vw, c, B)


def sdpa_windows(q, k, v, table, *, c: WindowCase, scale: float):
    """SDPA over partitioned windows with timm's fused-path float mask (bias + shift mask)."""
    B = q.shape[0]
    qw, kw, vw = (_partition(t, c) for t in (q, k, v))
    bias, mask = _bias_and_mask(table, c, q.dtype)
    h, n = qw.shape[1], qw.shape[2]
    attn_mask = bias[None]
    if mask is not None:
        nw = mask.shape[0]
        attn_mask = attn_mask + mask.view(1, nw, 1, n, n).expand(B, -1, h, -1, -1).reshape(
            -1, h, n, n)
    o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=attn_mask, scale=scale)
    return _reverse(o, c, B)


def make_flex(c: WindowCase, device: torch.device, scale: float) -> Callable:
    """FlexAttention on the partitioned windows laid end to end: a same-window BlockMask and a
    score_mod adding the table bias and the shift mask (differentiable in the table)."""
    from torch.nn.attention.flex_attention import create_block_mask

    ws, s, Hp, Wp = _geometry(c)
    n = ws * ws
    nw = (Hp // ws) * (Wp // ws)
    L = nw * n
    block_mask = create_block_mask(lambda b, h, qi, ki: qi // n == ki // n, B=None, H=None,
                                   Q_LEN=L, KV_LEN=L, device=device)
    flex = _flex_fn()
    from vitkern.reference.window import relative_position_index

    idx = relative_position_index(ws, device)

    def run(q, k, v, table):
        B, h = q.shape[:2]
        _, mask = _bias_and_mask(table, c, torch.float32)
        mask = mask if mask is not None else torch.zeros(nw, n, n, device=q.device)

        def score_mod(score, b, hh, qi, ki):
            i, j = qi % n, ki % n
            return score + table[idx[i, j], hh] + mask[qi // n, i, j]

        qw, kw, vw = (_partition(t, c).reshape(B, nw, h, n, -1).transpose(1, 2).reshape(
            B, h, L, -1) for t in (q, k, v))
        o = flex(qw, kw, vw, score_mod=score_mod, block_mask=block_mask, scale=scale)
        o = o.reshape(B, h, nw, n, -1).transpose(1, 2).reshape(B * nw, h, n, -1)
        return _reverse(o, c, B)

    return run


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------
def _vitkern_names(ctx: harness.Context) -> list[tuple[str, str]]:
    out = []
    for b in (list(ctx.backends) if ctx.backends else default_backends(ctx.device)):
        resolved = _resolve_backend(ctx.device) if b == "auto" else None
        out.append((f"vitkern[auto:{resolved}]" if resolved else f"vitkern[{b}]", b))
    return out


def _inputs(task: harness.Task, ctx: harness.Context, B: int, copy_i: int):
    c = task.case
    gen = _seeded(ctx.seed, c.name, task.group, copy_i)
    ws = _geometry(c)[0]
    qkv = _randn((B, c.H * c.W, 3, c.heads, c.head_dim), gen, task.dtype, ctx.device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as a module produces them
    table = _randn(((2 * ws - 1) ** 2, c.heads), gen, task.dtype, ctx.device)
    dout = _randn((B, c.heads, c.H * c.W, c.head_dim), gen, task.dtype, ctx.device)
    return [q, k, v, table], dout


def _record(task: harness.Task, B: int, p: Provider, mode: str) -> dict:
    c = task.case
    return {"family": FAMILY, "case": c.name, "group": task.group, "provider": p.name,
            "kind": p.kind, "backend": p.backend, "mode": mode,
            "dtype": harness.dtype_name(task.dtype), "batch": B, "shape": c.describe(), "H": c.H,
            "W": c.W, "heads": c.heads, "head_dim": c.head_dim, "window_size": c.window_size,
            "shift": c.shift, "n_windows": c.n_windows}


def _kept_queries(c: WindowCase, active) -> int:
    """Real queries in the kept windows, summed over the batch."""
    from vitkern.reference.window import active_token_mask

    ws, s, _, _ = _geometry(c)
    return int(active_token_mask((c.H, c.W), ws, s, active.cpu()).sum())


def run_task(task: harness.Task, ctx: harness.Context) -> list[dict]:
    """Check and time every provider of one (case, dtype, group); returns result records."""
    from vitkern.ops.window import window_attention
    from vitkern.reference import window as ref

    c = task.case
    B = ctx.batch or c.batch_for(ctx.device)
    if task.group == "block_attn":
        return _run_block(task, ctx, B)
    elem = torch.empty((), dtype=task.dtype).element_size()
    ws, s, _, _ = _geometry(c)
    scale = c.head_dim ** -0.5
    kw = dict(hw=(c.H, c.W), window_size=c.window_size, shift=c.shift, scale=scale)
    copies = harness.n_rotations(4 * elem * B * c.heads * c.H * c.W * c.head_dim, ctx.dev)
    sets = [_inputs(task, ctx, B, i) for i in range(copies)]
    arg_sets, douts = [x[0] for x in sets], [x[1] for x in sets]
    active, extra = None, {}
    if task.group.startswith("sparse"):
        K = _n_keep(c, task.group)
        gen = _seeded(ctx.seed, c.name, "keep")
        active = torch.stack([torch.randperm(c.n_windows, generator=gen)[:K]
                              for _ in range(B)]).to(ctx.device)
        extra = dict(kept_windows=K, sparsity=int(task.group[len("sparse"):]),
                     flop_bound=c.n_windows / K)
    nq = B * c.H * c.W if active is None else _kept_queries(c, active)

    provs = []
    for name, b in _vitkern_names(ctx):
        provs.append(Provider(name, "vitkern", lambda q, k, v, t, b=b: window_attention(
            q, k, v, rel_pos_bias=t, active_windows=active, backend=b, **kw), backend=b))
    if active is not None:
        for name, b in _vitkern_names(ctx):
            provs.append(Provider(name.replace("vitkern", "dense"), "baseline",
                                  lambda q, k, v, t, b=b: window_attention(
                                      q, k, v, rel_pos_bias=t, backend=b, **kw), backend=b))
    else:
        provs.append(Provider("timm_math", "baseline",
                              lambda q, k, v, t: timm_math(q, k, v, t, c=c, scale=scale)))
        provs.append(Provider("sdpa", "baseline",
                              lambda q, k, v, t: sdpa_windows(q, k, v, t, c=c, scale=scale)))
        ok, why = _flex_available(ctx.device)
        if ok and not ctx.flex:
            ok, why = False, "disabled (--no-flex)"
        if ok:
            try:
                provs.append(Provider("flex", "baseline", make_flex(c, ctx.device, scale)))
            except Exception as exc:  # noqa: BLE001
                provs.append(Provider("flex", "baseline", None, skip=f"setup failed: {exc}"))
        else:
            provs.append(Provider("flex", "baseline", None, skip=why))

    def ref_fn(q, k, v, t, act=active):
        return ref.window_attention(q, k, v, rel_pos_bias=t, pad_order="shift_then_pad",
                                    active_windows=None if act is None else act.to(q.device),
                                    **kw)

    sparse = [p for p in provs if p.kind == "vitkern"] if active is not None else provs
    checks = check_providers(task, ctx, sparse, ref_fn, arg_sets[0], douts[0])
    if active is not None:  # the dense providers compute every window: checked densely
        dense = [p for p in provs if p.kind == "baseline"]
        checks.update(check_providers(task, ctx, dense,
                                      lambda q, k, v, t: ref_fn(q, k, v, t, None), arg_sets[0],
                                      douts[0]))

    def flops_fn(mode, n=nq):
        f = n * c.heads * 4 * ws * ws * c.head_dim
        return f * (3.5 if mode == "fwd+bwd" else 1.0)

    def bytes_fn(mode, n=nq):
        fwd = elem * c.heads * c.head_dim * 4 * n
        return fwd if mode == "fwd" else fwd + elem * c.heads * c.head_dim * 8 * n + 8 * c.heads * n

    return time_providers(task, B, provs, checks, ctx, arg_sets, douts, copies, flops_fn, bytes_fn,
                          extra=lambda p: extra, record=_record)


def _run_block(task: harness.Task, ctx: harness.Context, B: int) -> list[dict]:
    """timm's SwinTransformerBlock._attn vs the patched block (same weights)."""
    c = task.case
    try:
        from timm.models.swin_transformer import SwinTransformerBlock
    except Exception as exc:  # noqa: BLE001
        p = Provider("timm_block", "baseline", None, skip=f"timm unavailable: {exc}")
        return [dict(_record(task, B, p, m), status="skipped", reason=p.skip) for m in ctx.modes]
    from vitkern.integrations.timm import patch_model

    torch.manual_seed(ctx.seed)
    timm_blk = SwinTransformerBlock(c.dim, (c.H, c.W), num_heads=c.heads,
                                    window_size=c.window_size, shift_size=c.shift)
    timm_blk = timm_blk.to(ctx.device, task.dtype)
    timm_blk.attn.fused_attn = False
    with torch.no_grad():
        timm_blk.attn.relative_position_bias_table.normal_()
    ref64 = copy.deepcopy(timm_blk).double()
    provs = []
    for name, b in _vitkern_names(ctx):
        blk = copy.deepcopy(timm_blk)
        patch_model(blk, backend=b)
        provs.append(Provider(name, "vitkern", blk._attn, backend=b, module=blk))
    provs.append(Provider("timm", "baseline", timm_blk._attn, module=timm_blk))
    gen = _seeded(ctx.seed, c.name, "block")
    elem = torch.empty((), dtype=task.dtype).element_size()
    copies = harness.n_rotations(2 * elem * B * c.H * c.W * c.dim, ctx.dev)
    sets = [([_randn((B, c.H, c.W, c.dim), gen, task.dtype, ctx.device)],
             _randn((B, c.H, c.W, c.dim), gen, task.dtype, ctx.device)) for _ in range(copies)]
    arg_sets, douts = [x[0] for x in sets], [x[1] for x in sets]
    checks = check_providers(task, ctx, provs, lambda x: ref64._attn(x), arg_sets[0], douts[0])
    ws = _geometry(c)[0]
    n = B * c.H * c.W
    n_params = sum(p.numel() for p in timm_blk.attn.parameters())

    def flops_fn(mode):
        f = n * c.heads * 4 * ws * ws * c.head_dim + 2 * n * c.dim * 4 * c.dim
        return f * (3.5 if mode == "fwd+bwd" else 1.0)

    def bytes_fn(mode):
        f = elem * (2 * n * c.dim + n_params)
        return f if mode == "fwd" else 3 * f

    return time_providers(task, B, provs, checks, ctx, arg_sets, douts, copies, flops_fn, bytes_fn,
                          record=_record)

