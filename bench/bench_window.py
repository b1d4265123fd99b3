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

Correctness first (``harness.run_entry``): every provider's output (and with ``fwd+bwd`` the
gradients of every input, and of the block's parameters) is compared with
``vitkern.reference.window`` (the timm block in fp64 for ``block_attn``) in fp64 under the
flash-attention rule before it is timed; a wrong vitkern provider is not timed and fails the run.

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

import vitkern.ops.window as ops
from vitkern.integrations.timm import patch_model
from vitkern.reference import window as ref

from . import registry
from .harness import Provider, flex_attention
from .shapes import WindowCase, window_cases

FAMILY = "window"
SPARSITIES = (30, 50, 70)


# ---------------------------------------------------------------------------------------------
# baselines on raster q, k, v (B, h, N, d) with a bias table ((2ws-1)², h)
# ---------------------------------------------------------------------------------------------
def _geometry(c: WindowCase):
    (ws, _), (s, _) = ref.effective_window((c.H, c.W), c.window_size, c.shift)  # square cases
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
    ws, s, Hp, Wp = _geometry(c)
    bias = ref.dense_bias(table, ws, table.shape[1]).to(dtype)
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


def flex_windows(r) -> Callable:
    """FlexAttention on the partitioned windows laid end to end: a same-window BlockMask and a
    score_mod adding the table bias and the shift mask (differentiable in the table)."""
    from torch.nn.attention.flex_attention import create_block_mask

    flex, c, scale = flex_attention(r.ctx), r.case, r.kw["scale"]
    ws, s, Hp, Wp = _geometry(c)
    n = ws * ws
    nw = (Hp // ws) * (Wp // ws)
    L = nw * n
    block_mask = create_block_mask(lambda b, h, qi, ki: qi // n == ki // n, B=None, H=None,
                                   Q_LEN=L, KV_LEN=L, device=r.device)
    idx = ref.relative_position_index(ws, r.device)

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
# Registry entries
# ---------------------------------------------------------------------------------------------
WINDOW = registry.Family(
    FAMILY, window_cases, backends=("triton", "cuda"), eager=True,
    fields=lambda c: {"shape": c.describe(), "H": c.H, "W": c.W, "heads": c.heads,
                      "head_dim": c.head_dim, "window_size": c.window_size, "shift": c.shift,
                      "n_windows": c.n_windows})


def _n_keep(c: WindowCase, sparsity: int) -> int:
    return int(c.n_windows * (1.0 - sparsity / 100.0))


def _prepare(r, sparsity: int = 0) -> None:
    """Geometry, and with ``sparsity`` the kept windows of each image (SparseViT)."""
    c = r.case
    r.ws, r.s = _geometry(c)[:2]
    r.kw = dict(hw=(c.H, c.W), window_size=c.window_size, shift=c.shift, scale=c.head_dim ** -0.5)
    r.active, r.nq = None, r.B * c.H * c.W  # real queries computed
    if sparsity:
        K, gen = _n_keep(c, sparsity), r.gen("keep")
        r.active = torch.stack([torch.randperm(c.n_windows, generator=gen)[:K]
                                for _ in range(r.B)]).to(r.device)
        r.nq = int(ref.active_token_mask((c.H, c.W), r.ws, r.s, r.active.cpu()).sum())
        r.fields.update(kept_windows=K, sparsity=sparsity, flop_bound=c.n_windows / K)


def _inputs(r, gen):
    """q, k, v as strided views of one packed projection (as a module produces them), the table."""
    c = r.case
    q, k, v = r.randn((r.B, c.H * c.W, 3, c.heads, c.head_dim), gen).permute(2, 0, 3, 1, 4).unbind(0)
    table = r.randn(((2 * r.ws - 1) ** 2, c.heads), gen)
    return [q, k, v, table], r.randn((r.B, c.heads, c.H * c.W, c.head_dim), gen)


def _op(r, backend, active):
    return lambda q, k, v, t: ops.window_attention(q, k, v, rel_pos_bias=t, active_windows=active,
                                                   backend=backend, **r.kw)


def _reference(r, dtype, active=None):
    return lambda q, k, v, t: ref.window_attention(q, k, v, rel_pos_bias=t, active_windows=active,
                                                   pad_order="shift_then_pad", **r.kw)


def _dense(r) -> list[Provider]:
    """The same op on every window, per vitkern backend: checked densely."""
    return [Provider(f"dense[{label}]", fn=_op(r, b, None), backend=b, reference=_reference)
            for label, b in r.backends]


def _attention_flops(r, mode):
    c = r.case
    return r.nq * c.heads * 4 * r.ws * r.ws * c.head_dim * (3.5 if mode == "fwd+bwd" else 1.0)


def _attention_bytes(r, mode):
    hd = r.elem * r.case.heads * r.case.head_dim
    return 4 * hd * r.nq if mode == "fwd" else 12 * hd * r.nq + 8 * r.case.heads * r.nq


def _register_attn(group: str, sparsity: int, baselines: dict):
    WINDOW.register(
        group, prepare=lambda r: _prepare(r, sparsity), inputs=_inputs, name="vitkern[{label}]",
        applies=lambda c: not sparsity or _n_keep(c, sparsity) not in (0, c.n_windows),
        vitkern=lambda r, b: _op(r, b, r.active), reference=lambda r, dtype: _reference(r, dtype, r.active),
        baselines=baselines, flops=_attention_flops, bytes=_attention_bytes,
        arg_names=("q", "k", "v", "table"))


_register_attn("attn", 0, {
    "timm_math": lambda r: lambda q, k, v, t: timm_math(q, k, v, t, c=r.case, scale=r.kw["scale"]),
    "sdpa": lambda r: lambda q, k, v, t: sdpa_windows(q, k, v, t, c=r.case, scale=r.kw["scale"]),
    "flex": flex_windows})


# block_attn: timm's SwinTransformerBlock._attn vs the patched block (same weights)
def _block_prepare(r) -> None:
    from timm.models.swin_transformer import SwinTransformerBlock

    c = r.case
    torch.manual_seed(r.ctx.seed)
    blk = SwinTransformerBlock(c.dim, (c.H, c.W), num_heads=c.heads, window_size=c.window_size,
                               shift_size=c.shift).to(r.device, r.dtype)
    blk.attn.fused_attn = False
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()
    r.blk, r.blk64, r.ws = blk, copy.deepcopy(blk).double(), _geometry(c)[0]


def _patched(r, backend) -> Provider:
    blk = copy.deepcopy(r.blk)
    patch_model(blk, backend=backend)
    return Provider(fn=blk._attn, module=blk)


def _block_flops(r, mode):
    c, n = r.case, r.B * r.case.H * r.case.W
    f = n * c.heads * 4 * r.ws * r.ws * c.head_dim + 2 * n * c.dim * 4 * c.dim
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def _block_bytes(r, mode):
    n_params = sum(p.numel() for p in r.blk.attn.parameters())
    f = r.elem * (2 * r.B * r.case.H * r.case.W * r.case.dim + n_params)
    return f if mode == "fwd" else 3 * f


WINDOW.register(
    "block_attn", prepare=_block_prepare, vitkern=_patched, name="vitkern[{label}]",
    inputs=lambda r, gen: ([r.randn((r.B, r.case.H, r.case.W, r.case.dim), gen)],
                           r.randn((r.B, r.case.H, r.case.W, r.case.dim), gen)),
    baselines={"timm": lambda r: Provider(fn=r.blk._attn, module=r.blk)},
    reference=lambda r, dtype: (Provider(fn=r.blk64._attn, module=r.blk64) if dtype == torch.float64
                                else Provider(fn=r.blk._attn, module=r.blk)),
    flops=_block_flops, bytes=_block_bytes, arg_names=("x",))
for _p in SPARSITIES:
    _register_attn(f"sparse{_p}", _p, {"dense": _dense})

GROUPS = WINDOW.groups
plan, run_task, cases_for = WINDOW.plan, WINDOW.run_task, WINDOW.cases_for
