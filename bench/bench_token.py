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
written. Correctness (``harness.run_entry``): each provider's outputs (and with ``fwd+bwd`` the
gradients) vs the fp64 reference on the same inputs, errors relative to max |ref| (floors ``TOL``);
in the ``model`` group the patched model with keep rate 1.0 against the unpatched one.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import vitkern.ops.token as ops
from vitkern.integrations.timm import patch_model
from vitkern.reference.token import token_attention as reference

from . import registry
from .harness import Provider
from .shapes import TOKEN_MODEL_CASES, TOKEN_MODEL_QUICK_CPU, TokenCase, token_cases

FAMILY = "token"
#: max |err| / max |ref| allowed against the fp64 reference
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _fields(c) -> dict:
    if isinstance(c, TokenCase):
        return dict(shape=c.describe(), N=c.N, K=c.K, keep=c.keep, heads=c.heads, head_dim=c.head_dim)
    return dict(shape=c.model, keep=c.keep)


TOKEN = registry.Family(FAMILY, token_cases, _fields, tol=TOL, norm_floor=1e-6, eager=True)


# ---------------------------------------------------------------------------------------------
# op groups
# ---------------------------------------------------------------------------------------------
def _flops_bytes(c: TokenCase, B: int, group: str, mode: str, elem: int) -> tuple[float, float]:
    n = c.K if group == "kept" else c.N
    flops = 4.0 * B * c.heads * n * n * c.head_dim
    rows = B * c.heads * n
    nbytes = 4 * rows * c.head_dim * elem + 4 * rows + (8 * B * n if group == "kept" else 0)
    if mode == "fwd+bwd":
        flops *= 3.5
        nbytes += 5 * rows * c.head_dim * elem + 8 * rows
    return flops, nbytes


def _gather(t, idx):
    B, h, _, d = t.shape
    return t.gather(2, idx[:, None, :, None].expand(B, h, idx.shape[1], d))


def _unfused(q, k, v, idx):
    """EViT's attention: the probabilities materialised to read their CLS row."""
    p = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
    return p @ v, p[:, :, 0].mean(1)


def _call(f, group: str, **kw):
    """``f(q, k, v, **kw)`` among the kept tokens (``kept``) or returning EViT's CLS importance."""
    if group == "kept":
        return lambda q, k, v, idx: f(q, k, v, keep_idx=idx, **kw)
    return lambda q, k, v, idx: f(q, k, v, return_importance="cls", **kw)


def _register_op(group: str, name: str, baselines: dict) -> None:
    """token_attention on q, k, v views of one (B, N, 3, h, d) projection (as a ViT block produces
    them) and EViT's kept indices (CLS first, then the top K - 1 by a score)."""

    def inputs(r, gen):
        c = r.case
        q, k, v = r.randn((r.B, c.N, 3, c.heads, c.head_dim), gen).permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.rand(r.B, c.N, generator=gen)
        keep_idx = torch.cat([torch.zeros(r.B, 1, dtype=torch.long),
                              scores[:, 1:].topk(c.K - 1, dim=1).indices + 1], 1).to(r.device)
        rows = c.K if group == "kept" else c.N
        return [q, k, v, keep_idx], r.randn((r.B, c.heads, rows, c.head_dim), gen)

    TOKEN.register(
        group, inputs=inputs, name=name, baselines=baselines, arg_names=("q", "k", "v", "keep_idx"),
        vitkern=lambda r, b: _call(ops.token_attention, group, backend=b),
        reference=lambda r, dtype: _call(reference, group),
        flops=lambda r, mode: _flops_bytes(r.case, r.B, group, mode, r.elem)[0],
        bytes=lambda r, mode: _flops_bytes(r.case, r.B, group, mode, r.elem)[1])


_register_op("kept", "vitkern.token_attention[{b}]", {
    "gather+sdpa": lambda r: lambda q, k, v, i: F.scaled_dot_product_attention(
        _gather(q, i), _gather(k, i), _gather(v, i))})
_register_op("cls", "vitkern.token_attention[{b}]+cls", {
    "unfused+probs (EViT)": lambda r: _unfused,
    "sdpa (no importance)": lambda r: lambda q, k, v, i: F.scaled_dot_product_attention(q, k, v)})


# ---------------------------------------------------------------------------------------------
# model group: images/s of a timm ViT with EViT dropping
# ---------------------------------------------------------------------------------------------
def _model_prepare(r) -> None:
    import timm

    on_cpu = r.device.type != "cuda"
    if on_cpu and r.ctx.quick:
        r.case = TOKEN_MODEL_QUICK_CPU
    mc = r.case
    r.B = r.ctx.batch or (mc.cpu_batch if on_cpu else mc.batch)
    torch.manual_seed(r.ctx.seed)
    r.base = timm.create_model(mc.model, pretrained=False, img_size=mc.img_size).eval().to(
        r.device, r.dtype)
    r.base64 = copy.deepcopy(r.base).double()


def _patched(r, keep: float, backend: str) -> torch.nn.Module:
    m = copy.deepcopy(r.base)
    patch_model(m, token_drop=keep, backend=backend)
    return m


TOKEN.register(
    "model", cases=TOKEN_MODEL_CASES, prepare=_model_prepare, modes=("fwd",),
    throughput="images_per_s", tol_scale=10.0, name="vitkern EViT keep {case.keep} [{b}]",
    inputs=lambda r, gen: ([r.randn((r.B, 3, r.case.img_size, r.case.img_size), gen)], None),
    # checked: the kernels inside the model with keep rate 1.0 (nothing dropped) against the
    # unpatched model (with dropping, near-tied importances may legitimately pick other tokens in
    # low precision; the op groups check the kernels exactly)
    vitkern=lambda r, b: Provider(fn=_patched(r, r.case.keep, b), check=_patched(r, 1.0, b)),
    baselines={"timm": lambda r: Provider(fn=r.base, check=False),
               "unfused": lambda r: Provider(f"EViT keep {r.case.keep} unfused (reference)",
                                             fn=_patched(r, r.case.keep, "reference"),
                                             backend="reference", check=False)},
    reference=lambda r, dtype: r.base64 if dtype == torch.float64 else r.base)

GROUPS = TOKEN.groups
plan, run_task, cases_for = TOKEN.plan, TOKEN.run_task, TOKEN.cases_for
