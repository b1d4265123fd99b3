"""Linear / softmax-free attention: references, Triton kernels (interpreter or GPU), op checks,
modules (L2ViT LinearAttention, XCiT XCA) and timm XCiT patching."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import HAS_CUDA, KERNEL_DEVICES, assert_close, check_against_reference, spy_on
from vitkern import backends
from vitkern.nn.linear import XCA, LinearAttention
from vitkern.ops import linear as L
from vitkern.ops.linear import PRESETS, linear_attention, xca_attention
from vitkern.reference import linear as R

DEV = "cuda" if HAS_CUDA else "cpu"
_dt_id = lambda x: str(x).split(".")[-1]  # noqa: E731


def _rand(shape, dtype=torch.float64, device="cpu", seed=0, positive=False, away=0.0):
    """Normal samples; ``positive``: |x| + 0.1; ``away``: magnitudes >= away (off ReLU kinks)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if positive:
        x = x.abs() + 0.1
    elif away:
        x = torch.where(x >= 0, x + away, x - away)
    return x.to(device=device, dtype=dtype).requires_grad_()


def _temp(h, seed=5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(h, 1, 1, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()


# --------------------------------------------------------------------------------------------
# references against the papers' formulations (written from the spec, fp64)
# --------------------------------------------------------------------------------------------


def fast_transformers_linear(q, k, v, mask_keep, eps=1e-6):
    """fast-transformers' non-causal LinearAttention in its (N, L, H, D) layout, mask 1 = keep."""
    Q, K, V = (t.transpose(1, 2) for t in (q, k, v))
    Qp, Kp = F.elu(Q) + 1, (F.elu(K) + 1) * mask_keep[:, :, None, None]
    KV = torch.einsum("nshd,nshm->nhmd", Kp, V)
    Z = 1 / (torch.einsum("nlhd,nhd->nlh", Qp, Kp.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhmd,nlh->nlhm", Qp, KV, Z).transpose(1, 2)


def efficientvit_linear(q, k, v, eps=1e-15):
    """EfficientViT LiteMLA's trick: V padded with a row of ones gives num and den in one GEMM
    (channels-first (B, h, d, N) layout)."""
    qc, kc, vc = (t.transpose(-1, -2) for t in (F.relu(q), F.relu(k), v))
    vc = F.pad(vc, (0, 0, 0, 1), value=1.0)
    out = (vc @ kc.transpose(-1, -2)) @ qc
    return (out[..., :-1, :] / (out[..., -1:, :] + eps)).transpose(-1, -2)


def test_reference_katharopoulos_with_mask_matches_fast_transformers():
    q, k, v = (_rand((2, 3, 9, 8), seed=i) for i in range(3))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True
    mask[1, 2] = True
    out = R.linear_attention(q, k, v, key_padding_mask=mask, **PRESETS["katharopoulos"])
    expected = fast_transformers_linear(q, k, v, (~mask).double())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # masked keys are exactly absent: same as dropping them (elu+1 of a padded zero is 1, not 0)
    short = R.linear_attention(q[:1], k[:1, :, :6], v[:1, :, :6], **PRESETS["katharopoulos"])
    torch.testing.assert_close(out[:1], short, rtol=1e-12, atol=1e-12)


def test_reference_efficientvit_preset():
    q, k, v = (_rand((2, 2, 13, 8), seed=i) for i in range(3))
    out = R.linear_attention(q, k, v, **PRESETS["efficientvit"])
    torch.testing.assert_close(out, efficientvit_linear(q, k, v), rtol=1e-10, atol=1e-12)


def test_reference_xca_matches_timm_xca_both_paths():
    timm_xcit = pytest.importorskip("timm.models.xcit")
    torch.manual_seed(0)
    m = timm_xcit.XCA(32, num_heads=4, qkv_bias=True).double()
    with torch.no_grad():
        m.temperature.copy_(torch.rand(4, 1, 1) + 0.5)
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    qkv = m.qkv(x).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
    o = R.xca_attention(qkv[0], qkv[1], qkv[2], temperature=m.temperature)
    ours = m.proj(o.transpose(1, 2).reshape(2, 50, 32))
    for fused in (True, False):
        m.fused_attn = fused
        torch.testing.assert_close(ours, m(x), rtol=1e-10, atol=1e-12)


def test_reference_gradcheck_linear():
    h = 2
    # away from ReLU kinks; clamp floor chosen so that some rows clamp and none sit near it
    q = _rand((1, h, 6, 4), seed=1, away=0.2)
    k = _rand((1, h, 6, 4), seed=2, away=0.2)
    v = _rand((1, h, 6, 3), seed=3)
    t = _temp(h)
    mask = torch.tensor([[False, False, True, False, False, True]])
    for kw in (dict(feature_map="elu1", key_padding_mask=mask), dict(feature_map="relu"),
               dict(feature_map="identity", eps=0.0)):
        args = (q, k, v, t) if kw["feature_map"] != "identity" else (
            _rand((1, h, 6, 4), seed=1, positive=True), _rand((1, h, 6, 4), seed=2, positive=True),
            v, t)
        fn = lambda q, k, v, t: R.linear_attention(q, k, v, temperature=t, scale=0.7, **kw)  # noqa
        assert torch.autograd.gradcheck(fn, args)
    with torch.no_grad():
        den = (F.relu(q) * F.relu(k).sum(-2, keepdim=True)).sum(-1)
    srt = den.flatten().sort().values
    floor = float(srt[5] + srt[6]) / 2  # between two denominators: half the rows clamp
    assert ((den - floor).abs() > 0.01).all()
    assert (den < floor).any() and (den > floor).any()
    fn = lambda q, k, v, t: R.linear_attention(q, k, v, temperature=t, feature_map="relu",  # noqa
                                               denom="clamp", eps=floor)
    assert torch.autograd.gradcheck(fn, (q, k, v, t))


def test_reference_gradcheck_xca():
    q, k, v = (_rand((2, 2, 7, 4), seed=i) for i in range(3))
    t = _temp(2)
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: R.xca_attention(q, k, v, temperature=t), (q, k, v, t))


# --------------------------------------------------------------------------------------------
# Triton kernels against the reference, forward and every gradient
# --------------------------------------------------------------------------------------------

def _check_kernel(run_kernel, run_ref, inputs, dtype, names, xca=False):
    """Forward and every gradient vs the reference; where the triton backend refuses the backward
    by design (outside the declared capability), the forward without gradients instead, and
    the refusal."""
    q, v = inputs[0], inputs[2]
    try:
        L._backend("t", "triton", q, None if xca else v.shape[-1], xca, backward=True)
    except backends.BackendError as exc:
        why = next(line.strip() for line in str(exc).splitlines()
                   if line.strip().startswith("triton:"))
        assert "is outside the declared capability of triton " in why, exc
        if "the forward runs" not in why:  # refused outright, visibly skipped
            assert " backward " not in why, why
            with pytest.raises(backends.BackendError, match="declared capability"):
                run_kernel(*inputs)
            pytest.skip(why)
        with torch.no_grad():
            out = run_kernel(*inputs)
            ref = run_ref(*(t.detach().double().cpu() for t in inputs))
            lowp = run_ref(*inputs) if dtype != torch.float32 else None
        assert_close(out.cpu(), ref, None if lowp is None else lowp.cpu())
        with pytest.raises(backends.BackendError, match="the forward runs"):
            run_kernel(*inputs)
        return
    check_against_reference(run_kernel, run_ref, inputs, dtype, names=names)


# (B, heads, N, M, d, e, feature_map, denom, eps, temperature?, masked?): odd on purpose.
LINEAR_CASES = [
    (1, 2, 1, 1, 16, 16, "elu1", "add", 1e-6, False, False),          # N = 1
    (2, 3, 49, 49, 32, 32, "elu1", "add", 1e-6, True, True),           # masked keys, temperature
    (1, 2, 197, 197, 64, 64, "relu", "clamp", 100.0, True, False),     # L2ViT preset, clamp active
    (1, 2, 197, 197, 32, 32, "relu", "clamp", 3.0, True, True),        # clamp partly active
    (2, 2, 49, 150, 80, 48, "relu", "add", 1e-15, False, False),       # EfficientViT; M≠N, e≠d
    (1, 1, 785, 785, 16, 16, "identity", "add", 1e-6, True, False),    # many split partials
    (1, 2, 7, 20, 16, 32, "elu1", "clamp", 1e-3, True, True),
]


def _lin_ids(c):
    B, h, N, M, d, e, fm, den, eps, t, m = c
    return f"B{B}-h{h}-N{N}-M{M}-d{d}-e{e}-{fm}-{den}{eps:g}" + ("-temp" if t else "") + (
        "-mask" if m else "")


def _mask(B, M, seed=7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, M, generator=g) < 0.3
    mask[:, 0] = False  # every row keeps a key
    return mask


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=_dt_id)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=_lin_ids)
def test_triton_linear_attention(case, device, dtype):
    B, h, N, M, d, e, fm, denom, eps, use_t, masked = case
    pos = fm == "identity"  # identity features: keep the denominator away from 0
    scale = 0.5 if fm == "relu" and denom == "clamp" and eps > 50 else 1.0
    mask = _mask(B, M).to(device) if masked else None
    # the L2ViT case: inputs scaled so that both sides of the floor of 100 occur
    amp = 0.22 if eps == 100.0 else 1.0
    inputs = [_rand((B, h, N, d), dtype, device, 1, positive=pos) * amp,
              _rand((B, h, M, d), dtype, device, 2, positive=pos) * amp,
              _rand((B, h, M, e), dtype, device, 3)]
    inputs = [t.detach().requires_grad_() for t in inputs]
    kw = dict(feature_map=fm, denom=denom, eps=eps, scale=scale, key_padding_mask=mask)
    names = ("dq", "dk", "dv")
    if use_t:
        inputs.append(_temp(h, device=device).to(dtype).detach().requires_grad_())
        names += ("dtemperature",)

    def run(backend):
        def f(q, k, v, t=None):
            fn = L.linear_attention if backend == "triton" else R.linear_attention
            extra = dict(backend="triton") if backend == "triton" else {}
            m = None if mask is None else mask.to(q.device)
            return fn(q, k, v, temperature=t, **dict(kw, key_padding_mask=m), **extra)
        return f

    if eps == 100.0:  # the clamp must be active for some rows and not for others
        with torch.no_grad():
            fq, fk = F.relu(inputs[0].double()), F.relu(inputs[1].double())
            den = (fq * fk.sum(-2, keepdim=True)).sum(-1)
        assert (den < 100).any() and (den > 100).any()
    _check_kernel(run("triton"), run("ref"), inputs, dtype, names)


# (B, heads, N, d): N + 1 with a CLS token, d = 16/32/48/64/80.
XCA_CASES = [(1, 2, 1, 16), (2, 3, 49, 32), (1, 2, 197, 48), (1, 2, 197, 64), (1, 1, 785, 80),
             (2, 2, 50, 16)]


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=_dt_id)
@pytest.mark.parametrize("case", XCA_CASES, ids=lambda c: "B{}-h{}-N{}-d{}".format(*c))
def test_triton_xca(case, device, dtype):
    B, h, N, d = case
    inputs = [_rand((B, h, N, d), dtype, device, i).detach().requires_grad_() for i in range(3)]
    inputs.append(_temp(h, device=device).to(dtype).detach().requires_grad_())
    _check_kernel(
        lambda q, k, v, t: L.xca_attention(q, k, v, temperature=t, backend="triton"),
        lambda q, k, v, t: R.xca_attention(q, k, v, temperature=t),
        inputs, dtype, ("dq", "dk", "dv", "dtemperature"), xca=True)


@pytest.mark.parametrize("op", ["linear", "xca"])
def test_triton_fp32_temperature_with_16bit_inputs(op):
    """An fp32 temperature parameter with fp16 activations (autocast): the gradient comes back
    in fp32 and matches the fp64 reference."""
    q, k, v = (_rand((1, 2, 33, 16), torch.float16, DEV, i) for i in range(3))
    t = _temp(2, device=DEV).to(torch.float32).detach().requires_grad_()
    op_fn, fn = ((L.linear_attention, R.linear_attention) if op == "linear" else
                 (L.xca_attention, R.xca_attention))
    out = op_fn(q, k, v, temperature=t, backend="triton")
    assert out.dtype == torch.float16
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV, torch.float16)
    (dt,) = torch.autograd.grad(out, t, g)
    t64 = t.detach().double().cpu().requires_grad_()
    ref = fn(*(x.detach().double().cpu() for x in (q, k, v)), temperature=t64)
    (rdt,) = torch.autograd.grad(ref, t64, g.double().cpu())
    assert dt.dtype == torch.float32 and dt.shape == t.shape
    torch.testing.assert_close(dt.double().cpu(), rdt, rtol=2e-2, atol=2e-2 * rdt.abs().max())


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=_dt_id)
@pytest.mark.parametrize("case", [(2, 3, 49, 32), (1, 2, 197, 48), (1, 2, 70, 64), (1, 1, 1, 16)],
                         ids=lambda c: "B{}-h{}-N{}-d{}".format(*c))
def test_triton_xca_fused_and_split_forward_agree(case, device, dtype, monkeypatch):
    """Maps of up to FUSED_MAX_N tokens run the one-launch fused forward; the split forward
    (three launches) computes the same: both against the reference, forward and every
    gradient, and against each other (fp32: within summation-order rounding)."""
    from vitkern.triton_kernels import linear as tk

    B, h, N, d = case
    assert tk.xca.fused(N, d)
    inputs = [_rand((B, h, N, d), dtype, device, i).detach().requires_grad_() for i in range(3)]
    inputs.append(_temp(h, device=device).to(dtype).detach().requires_grad_())
    launched = []
    for name in ("xca_fused", "xca_softmax", "xca_apply"):
        spy_on(monkeypatch, getattr(tk, name), name, launched)
    outs = {}
    for split in (False, True):
        with monkeypatch.context() as m:
            if split:
                m.setattr(tk.xca, "FUSED_MAX_N", 0)
            launched.clear()
            _check_kernel(
                lambda q, k, v, t: L.xca_attention(q, k, v, temperature=t, backend="triton"),
                lambda q, k, v, t: R.xca_attention(q, k, v, temperature=t),
                inputs, dtype, ("dq", "dk", "dv", "dtemperature"), xca=True)
            assert launched == (["xca_softmax", "xca_apply"] if split else ["xca_fused"])
            with torch.no_grad():
                outs[split] = L.xca_attention(*inputs[:3], temperature=inputs[3],
                                              backend="triton")
    if dtype == torch.float32:
        torch.testing.assert_close(outs[False], outs[True], rtol=1e-5, atol=1e-6)


def test_triton_xca_zero_channel_and_float_temperature():
    """An all-zero channel hits F.normalize's eps floor (no gradient through its norm)."""
    q, k, v = (_rand((1, 2, 30, 16), torch.float32, DEV, i).detach() for i in range(3))
    q[:, :, :, 3] = 0
    k[:, 1, :, 5] = 0
    inputs = [t.requires_grad_() for t in (q, k, v)]
    check_against_reference(
        lambda q, k, v: L.xca_attention(q, k, v, temperature=1.3, backend="triton"),
        lambda q, k, v: R.xca_attention(q, k, v, temperature=1.3),
        inputs, torch.float32, names=("dq", "dk", "dv"))


def test_triton_xca_equivariant_under_circular_token_roll():
    q, k, v = (_rand((2, 2, 197, 32), torch.float32, DEV, i).detach() for i in range(3))
    t = torch.tensor([0.7, 1.9], device=DEV)
    out = L.xca_attention(q, k, v, temperature=t, backend="triton")
    for shift in (1, 64, 150):
        rolled = L.xca_attention(*(x.roll(shift, dims=2) for x in (q, k, v)), temperature=t,
                                 backend="triton")
        torch.testing.assert_close(rolled, out.roll(shift, dims=2), rtol=1e-5, atol=1e-6)


def test_triton_xca_zero_padding_is_exact():
    q, k, v = (_rand((1, 2, 49, 16), torch.float32, DEV, i).detach() for i in range(3))
    pad = lambda x: F.pad(x, (0, 0, 0, 30))  # noqa: E731
    out = L.xca_attention(q, k, v, temperature=1.0, backend="triton")
    padded = L.xca_attention(pad(q), pad(k), pad(v), temperature=1.0, backend="triton")
    torch.testing.assert_close(padded[:, :, :49], out, rtol=1e-5, atol=1e-6)
    assert (padded[:, :, 49:] == 0).all()


def test_triton_linear_masked_keys_equal_dropped_keys():
    q, k, v = (_rand((1, 2, 40, 16), torch.float32, DEV, i).detach() for i in range(3))
    mask = torch.zeros(1, 40, dtype=torch.bool, device=DEV)
    mask[:, 25:] = True
    k_in, v_in = k.clone().requires_grad_(), v.clone().requires_grad_()
    out = L.linear_attention(q, k_in, v_in, key_padding_mask=mask, backend="triton")
    short = L.linear_attention(q, k[:, :, :25], v[:, :, :25], backend="triton")
    torch.testing.assert_close(out, short, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert (k_in.grad[:, :, 25:] == 0).all() and (v_in.grad[:, :, 25:] == 0).all()


@pytest.mark.parametrize("op", ["linear", "xca"])
def test_triton_reads_strided_projection_views_and_is_deterministic(op):
    B, N, h, d = 2, 37, 2, 16
    qkv = _rand((B, N, 3 * h * d), torch.float32, DEV, 3).detach()
    q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    if op == "linear":
        fn = lambda *a: L.linear_attention(*a, backend="triton")  # noqa: E731
        rf = R.linear_attention
    else:
        fn = lambda *a: L.xca_attention(*a, temperature=1.5, backend="triton")  # noqa: E731
        rf = lambda *a: R.xca_attention(*a, temperature=1.5)  # noqa: E731
    out = fn(q, k, v)
    assert_close(out.cpu(), rf(q.double().cpu(), k.double().cpu(), v.double().cpu()))
    assert out.transpose(1, 2).reshape(B, N, h * d).data_ptr() == out.data_ptr()
    assert torch.equal(out, fn(q, k, v))  # fixed-order split-N folds: bitwise reproducible


def test_triton_strided_temperature():
    q, k, v = (_rand((1, 2, 21, 16), torch.float32, DEV, i).detach() for i in range(3))
    t_all = torch.tensor([0.5, 9.0, 1.5, 9.0], device=DEV)
    t = t_all[::2]
    assert not t.is_contiguous()
    for op, rf in ((L.linear_attention, R.linear_attention), (L.xca_attention, R.xca_attention)):
        out = op(q, k, v, temperature=t, backend="triton")
        ref = rf(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                 temperature=t.double().cpu())
        assert_close(out.cpu(), ref)


def test_split_plan_covers_every_tile():
    from vitkern.triton_kernels import linear as tk

    t = torch.empty(1)
    for n, bm in ((1, 64), (64, 64), (65, 64), (785, 64), (197, 128)):
        n_split, per = tk.split_plan(t, 4, n, bm)
        tiles = -(-n // bm)
        assert n_split * per >= tiles and (n_split - 1) * per < tiles  # no empty split


# --------------------------------------------------------------------------------------------
# checks and dispatch
# --------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=_t(2, 16, 4)), ValueError, "q must be 4-D"),
    (dict(k=_t(1, 2, 15, 8)), ValueError, "v must have shape"),
    (dict(k=_t(1, 3, 16, 8)), ValueError, "k must have shape"),
    (dict(v=_t(1, 2, 16, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(feature_map="softmax"), ValueError, "feature_map must be one of"),
    (dict(denom="max"), ValueError, "denom must be one of"),
    (dict(eps=-1.0), ValueError, "eps must be >= 0"),
    (dict(eps=float("nan")), TypeError, "eps must be a finite float"),
    (dict(scale="x"), TypeError, "scale must be a finite float"),
    (dict(temperature=torch.ones(3)), ValueError, "one value per head"),
    (dict(temperature=torch.ones(2, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(temperature="t"), TypeError, "temperature must be a torch.Tensor"),
    (dict(key_padding_mask=torch.zeros(1, 16)), TypeError, "bool tensor"),
    (dict(key_padding_mask=torch.zeros(1, 15, dtype=torch.bool)), ValueError, r"\(B, M\)"),
    (dict(backend="cudnn"), ValueError, "unknown backend"),
])
def test_linear_bad_inputs_raise_clear_errors(kwargs, exc, match):
    args = dict(q=_t(1, 2, 16, 8), k=_t(1, 2, 16, 8), v=_t(1, 2, 16, 8))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(k=_t(1, 2, 15, 8)), ValueError, "one shape"),
    (dict(temperature=None), TypeError, "temperature is required"),
    (dict(temperature=torch.ones(2, 2)), ValueError, "one value per head"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(q=torch.ones(1, 2, 16, 8, dtype=torch.int32)), TypeError, "floating-point"),
])
def test_xca_bad_inputs_raise_clear_errors(kwargs, exc, match):
    args = dict(q=_t(1, 2, 16, 8), k=_t(1, 2, 16, 8), v=_t(1, 2, 16, 8), temperature=1.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        xca_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch rules")
def test_dispatch_on_cpu():
    q = _t(1, 2, 16, 8)
    assert L._backend("x", "auto", q, 8, False) == "eager"
    assert L._backend("x", "triton", q, 8, True) == "triton"
    with pytest.raises(backends.BackendError) as info:
        xca_attention(q.double(), q.double(), q.double(), temperature=1.0, backend="triton")
    assert "dtype torch.float64 not supported by triton" in str(info.value)
    x = _t(1, 2, 16, 256)
    with pytest.raises(backends.BackendError, match="outside the declared capability of triton"):
        linear_attention(x, x, x, backend="triton")
    with pytest.raises(backends.BackendError, match="outside the declared capability of triton"):
        xca_attention(x, x, x, temperature=1.0, backend="triton")


def test_empty_batch():
    q = _t(0, 2, 16, 8)
    assert linear_attention(q, q, q).shape == q.shape
    assert xca_attention(q, q, q, temperature=1.0).shape == q.shape


# --------------------------------------------------------------------------------------------
# modules: L2ViT LinearAttention, XCiT XCA, timm patching
# --------------------------------------------------------------------------------------------


class L2ViTLinearAttention(nn.Module):
    """L2ViT's LinearAttention as its paper / code define it (spec section 3.1): the oracle."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1) * (dim // num_heads) ** -0.5)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = F.relu(q), F.relu(k)
        den = (q @ k.transpose(-2, -1).sum(-1, keepdim=True)).clamp_min(100.0)
        out = (q @ ((k.transpose(-2, -1) @ v) * self.temperature)) / den
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def _randomize(module, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (0.5 if p.dim() == 3 else 0.0))


def _module_parity(ours, oracle, x, backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = DEV if backend == "triton" else "cpu"
    ours = ours.to(device, dtype)
    x_ours = x.to(device, dtype).detach().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out, ref = ours(x_ours), oracle(x_ref)
    assert_close(out.cpu(), ref, name="out")
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (out * grad.to(device, dtype)).sum().backward()
    (ref * grad).sum().backward()
    assert_close(x_ours.grad.cpu(), x_ref.grad, name="dx")
    ref_params = dict(oracle.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad.cpu(), ref_params[name].grad, name=f"d{name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_linear_attention_module_matches_l2vit(backend):
    oracle = L2ViTLinearAttention(64, 2).double()
    _randomize(oracle, std=0.1)
    ours = LinearAttention(64, 2, qkv_bias=True, backend=backend).double()
    ours.load_state_dict(oracle.state_dict(), strict=True)
    x = torch.randn(2, 49, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the floor of 100 is active for some tokens and not for others
        q, k, _ = oracle.qkv(x).reshape(2, 49, 3, 2, 32).permute(2, 0, 3, 1, 4)
        den = (F.relu(q) * F.relu(k).sum(-2, keepdim=True)).sum(-1)
    assert (den < 100).any() and (den > 100).any()
    _module_parity(ours, oracle, x, backend)
    assert LinearAttention(64, 2).temperature.flatten()[0].item() == pytest.approx(32 ** -0.5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_xca_module_matches_timm(backend):
    timm_xcit = pytest.importorskip("timm.models.xcit")
    oracle = timm_xcit.XCA(64, num_heads=4, qkv_bias=True).double()
    _randomize(oracle)
    ours = XCA(64, num_heads=4, qkv_bias=True, backend=backend).double()
    ours.load_state_dict(oracle.state_dict(), strict=True)
    x = torch.randn(2, 50, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _module_parity(ours, oracle, x, backend)


def test_xca_from_timm_reuses_parameters_and_refuses_attn_drop():
    timm_xcit = pytest.importorskip("timm.models.xcit")
    from vitkern.integrations.timm import UnsupportedModule

    m = timm_xcit.XCA(48, num_heads=4, qkv_bias=True)
    new = XCA.from_timm(m, backend="reference")
    assert new.temperature is m.temperature and new.qkv.weight is m.qkv.weight
    assert new.proj.bias is m.proj.bias
    assert sorted(new.state_dict()) == sorted(m.state_dict())
    with pytest.raises(UnsupportedModule, match="attn_drop"):
        XCA.from_timm(timm_xcit.XCA(48, num_heads=4, attn_drop=0.1))
    with pytest.raises(ValueError, match="attn_drop"):
        XCA(48, 4, attn_drop=0.1)


def _patched_parity(name_or_model, backend, img=224, batch=2):
    import timm
    from vitkern.integrations.timm import patch_model

    torch.manual_seed(0)
    model = (timm.create_model(name_or_model, pretrained=False)
             if isinstance(name_or_model, str) else name_or_model)
    model.eval()
    with torch.no_grad():  # non-trivial temperatures (timm initialises them to 1)
        for n, p in model.named_parameters():
            if n.endswith("attn.temperature"):
                p.copy_(torch.rand(p.shape) + 0.5)
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(1))
    x = x.to(next(model.parameters()).device)
    params = dict(model.named_parameters())
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(params.values()))
    report = patch_model(model, backend=backend)
    n_xca = sum(type(m).__name__ == "XCA" for m in model.modules())
    assert len(report.replaced) == n_xca > 0 and not any("XCA" in r[1] for r in report.left)
    assert all(isinstance(m, XCA) for m in model.modules() if type(m).__name__ == "XCA")
    assert dict(model.named_parameters()).keys() == params.keys()
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(params.values()))
    assert_close(out.double().cpu(), ref.double().cpu(), name="logits")
    for (n, _), g, rg in zip(params.items(), grads, ref_grads):
        assert_close(g.double().cpu(), rg.double().cpu(), name=f"d{n}")


def test_patch_xcit_tiny_12_p16_224_reference_backend():
    """The full timm model on CPU: every XCA replaced, same logits and parameter gradients."""
    pytest.importorskip("timm")
    _patched_parity("xcit_tiny_12_p16_224", "auto", batch=1)


def test_patch_small_xcit_triton_backend():
    """A depth-2 XCiT (32x32 images, N = 16 tokens, d = 16) through the Triton kernels."""
    timm_xcit = pytest.importorskip("timm.models.xcit")
    model = timm_xcit.Xcit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                           cls_attn_layers=1, num_classes=10)
    if HAS_CUDA:
        model = model.cuda()
    _patched_parity(model, "triton", img=32)


# --------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------


def test_opcheck_linear():
    q, k, v = (_rand((1, 2, 20, 16), torch.float32, DEV, i) for i in range(3))
    t = torch.tensor([0.3, 0.9], device=DEV, requires_grad=True)
    mask = torch.zeros(1, 20, dtype=torch.bool, device=DEV)
    mask[0, 3] = True
    torch.library.opcheck(torch.ops.vitkern.linear_attn_fwd.default,
                          (q, k, v, t, mask, "elu1", 1.0, False, 1e-6))
    torch.library.opcheck(torch.ops.vitkern.linear_attn_fwd.default,
                          (q, k, v, None, None, "relu", 0.5, True, 2.0))


def test_opcheck_xca():
    q, k, v = (_rand((1, 2, 20, 16), torch.float32, DEV, i) for i in range(3))
    t = torch.tensor([0.3, 0.9], device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkern.xca_fwd.default, (q, k, v, t, 1e-12))


def test_torch_compile_fullgraph_no_recompile():
    import torch._dynamo

    torch._dynamo.reset()
    block = nn.Sequential(XCA(32, 2, qkv_bias=True, backend="triton"),
                          LinearAttention(32, 2, qkv_bias=True, backend="triton")).to(DEV)
    compiled = torch.compile(block, fullgraph=True,
                             backend="aot_eager" if not HAS_CUDA else "inductor")
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        for _ in range(2):
            x = torch.randn(2, 24, 32, device=DEV).requires_grad_()
            out = compiled(x)
            out.sum().backward()
            torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# kernel configs and the benchmark module
# --------------------------------------------------------------------------------------------


def test_aot_specs_are_few_unique_and_prefer_the_table_tile():
    from vitkern.triton_kernels import aot
    from vitkern.triton_kernels import linear as tk

    specs = tk.aot_specs()
    names = [s.name for s in specs] + [c.name for s in specs for c in s.candidates]
    assert len(names) == len(set(names)) and len(specs) <= 22  # the AOT test's time budget
    for s in specs:
        assert isinstance(s, aot.AotSpec) and s.candidates, s.name
        kname = s.name.split("[")[0].split(".")[1]
        first = s.candidates[0]
        k = first.constexprs
        tile = (first.num_warps, first.num_stages)
        if kname in tk.SOFT_TILES:
            key = (max(32, k["BLOCK_L"], k["BLOCK_D"], k["BLOCK_E"]), k["DOT_PRECISION"] != "native")
            assert (k["BLOCK_M"], *tile) == tk.SOFT_TILES[kname][key], s.name
        elif kname in tk.TILES:
            key = (max(k["BLOCK_D"], k.get("BLOCK_E", 0)), k["DOT_PRECISION"] != "native")
            assert (k["BLOCK_M"], *tile) == tk.TILES[kname][key], s.name
        elif kname in ("xca_softmax", "xca_bwd_small"):
            assert (k["BLOCK_I"], *tile) == tk.XCA_SMALL_TILES[k["BLOCK_D"]], s.name
        else:
            assert kname == "fold" and k["BLOCK"] == tk.FOLD_BLOCK, s.name
        if kname != "fold":  # smaller fallbacks follow the preferred tile
            assert len(s.candidates) > 1, s.name
        # the candidates differ in their tile only: one specialisation
        sizes = ("BLOCK_M", "BLOCK_I")
        for c in s.candidates:
            assert c.fn is first.fn and c.signature == first.signature, c.name
            assert {n: v for n, v in c.constexprs.items() if n not in sizes} == {
                n: v for n, v in k.items() if n not in sizes}, c.name


def test_capability_is_declared_apart_from_the_tile_candidates(monkeypatch):
    """The head dims the backend takes come from the declaration alone: emptying the candidate
    tables changes no answer (they are tuning), and the declaration is the documented one."""
    from vitkern.triton_kernels import linear as tk

    def answers():
        lin = {(d, fp32, bwd): tk.unsupported(d, fp32, backward=bwd)
               for d in (8, 16, 32, 48, 64, 80, 128, 160, 256) for fp32 in (False, True)
               for bwd in (False, True)}
        xca = {(d, fp32, bwd): tk.unsupported(d, fp32, xca=True, backward=bwd)
               for d in (16, 64, 80, 128, 256) for fp32 in (False, True) for bwd in (False, True)}
        soft = {(m, fp32, bwd): tk.soft_unsupported(m, 32, 32, fp32, bwd)
                for m in (5, 49, 64, 65) for fp32 in (False, True) for bwd in (False, True)}
        return lin, xca, soft

    before = answers()
    for table in ("TILES", "SOFT_TILES", "XCA_SMALL_TILES"):
        monkeypatch.setattr(tk, table, {})
    assert answers() == before
    lin, xca, soft = before
    largest = lambda table, fp32, bwd: max(d for (d, f, b), why in table.items()  # noqa: E731
                                           if f == fp32 and b == bwd and why is None)
    # (fp16, fp32) per pass: the table of vitkern.ops.linear's docstring
    assert [largest(lin, f, False) for f in (False, True)] == [128, 64]
    assert [largest(lin, f, True) for f in (False, True)] == [64, 32]
    assert [largest(xca, f, b) for b in (False, True) for f in (False, True)] == [128, 64] * 2
    assert all((why is None) == (m <= 64) for (m, _, _), why in soft.items())
    assert "the forward runs: call it without gradients" in lin[128, False, True]
    assert "the forward runs" not in lin[256, False, True]
    assert ("declared capability of triton linear attention backward (up to 64"
            in lin[128, False, True])


def test_fallback_tiles_give_the_same_results(monkeypatch):
    """Every launcher made to reject its preferred tile (a probe standing in for the spill
    check) runs a fallback (another BLOCK_M / BLOCK_I, so another split plan, grid and partial
    buffers): the results do not change."""
    from vitkern.triton_kernels import linear as tk
    from vitkern.triton_kernels.tuning import Launcher

    def run():
        g = torch.Generator().manual_seed(3)
        q, k, v, lm = (torch.randn(shape, generator=g).to(DEV).requires_grad_()
                       for shape in [(1, 2, 150, 32)] * 3 + [(1, 2, 7, 32)])
        mask = _mask(1, 150).to(DEV)
        t = (torch.rand(2, generator=g) + 0.5).to(DEV)
        outs = [linear_attention(q, k, v, key_padding_mask=mask, temperature=t, backend="triton"),
                xca_attention(q, k, v, temperature=t, backend="triton"),
                soft_attention(q * 0.2, lm * 0.2, v, backend="triton")]
        with monkeypatch.context() as m:  # XCA's split forward too (150 tokens run fused)
            m.setattr(tk.xca, "FUSED_MAX_N", 0)
            outs.append(xca_attention(q, k, v, temperature=t, backend="triton"))
        grads = torch.autograd.grad(sum(o.square().sum() for o in outs), (q, k, v, lm))
        return [o.detach() for o in outs] + list(grads)

    expected = run()
    rejected = []
    for launcher in vars(tk).values():
        if isinstance(launcher, Launcher) and launcher is not tk.fold:
            def probe(fn, cfg, args, constexprs, launcher=launcher):
                preferred = launcher.candidates(**constexprs)[0]
                rejected.append(launcher.name)
                return 64 if cfg.all_kwargs() == preferred.all_kwargs() else 0
            monkeypatch.setattr(launcher, "probe", probe)
            monkeypatch.setattr(launcher, "_kept", {})
            monkeypatch.setattr(launcher, "_plans", {})  # planned launches choose again
    got = run()
    assert len(set(rejected)) == 12, sorted(set(rejected))
    for a, b in zip(got, expected):  # sums in another order: fp32 rounding, relative to max|b|
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_bench_linear_smoke_and_correctness_gate(monkeypatch):
    from vitkern.bench import bench_linear as bl, harness
    from vitkern.bench.shapes import LinearCase, linear_cases

    assert {c.op for c in linear_cases()} == {"xca", "linear", "soft"}
    assert [c.name for c in linear_cases(quick=True)] == ["xcit_s_p16_224", "l2vit_t_s3",
                                                          "soft_t_s3"]
    cases = [LinearCase("t_xca", "xca", 13, 2, 16),
             LinearCase("t_l2", "linear", 13, 2, 16, "l2vit"),
             LinearCase("t_soft", "soft", 13, 2, 16, landmarks=5)]
    ctx = harness.Context(device=torch.device("cpu"), dev=harness.device_info("cpu"),
                          modes=("fwd", "fwd+bwd"), quick=True, log=lambda s: None)
    recs = [r for t in bl.plan(cases, [torch.float32]) for r in bl.run_task(t, ctx)]
    assert not ctx.failures
    ours = [r for r in recs if r["kind"] == "vitkern"]
    assert len(ours) == 6 and all(r["status"] == "ok" and r["speedup"] for r in ours)
    assert all(r["bytes"] > 0 and r["gbps"] > 0 for r in ours)
    assert {r["provider"] for r in recs} >= {"timm_xca", "pytorch", "sdpa"}
    # a wrong vitkern result is caught before timing and fails the run
    real = L.xca_attention
    monkeypatch.setattr(L, "xca_attention", lambda *a, **k: real(*a, **k) * 1.01)
    recs = bl.run_task(harness.Task("linear", cases[0], torch.float32, "xca"), ctx)
    assert ctx.failures and "WRONG" in ctx.failures[0]
    assert [r["status"] for r in recs if r["kind"] == "vitkern"] == ["wrong", "wrong"]
    real_soft = L.soft_attention
    monkeypatch.setattr(L, "soft_attention", lambda *a, **k: real_soft(*a, **k) * 1.01)
    ctx.failures.clear()
    recs = bl.run_task(harness.Task("linear", cases[2], torch.float32, "soft"), ctx)
    assert ctx.failures and "WRONG" in ctx.failures[0]


# --------------------------------------------------------------------------------------------
# SOFT: Gaussian-kernel Nyström attention, Newton–Schulz inverse, SoftAttention module
# --------------------------------------------------------------------------------------------

from vitkern.nn.linear import SoftAttention  # noqa: E402
from vitkern.ops.linear import newton_schulz_inverse, soft_attention  # noqa: E402


def _spread_landmarks(shape, seed=0, dtype=torch.float64, scale=0.6):
    """Landmarks far enough apart that A = exp(-½‖l_i − l_j‖²) is well conditioned."""
    return _rand(shape, dtype, seed=seed) * scale


def _gram(lm):
    return R.gaussian_kernel(lm, lm)


def ns_oracle(a, iters, reg=0.01):
    """SOFT's ``newton_inv`` restated from the spec, one matrix at a time (fp64)."""
    out = torch.empty_like(a)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in a.shape[:-2]]).reshape(
            -1, a.dim() - 2).tolist():
        A = a[tuple(idx)]
        P = A + reg * torch.eye(A.shape[0], dtype=A.dtype)
        alpha = 1.8 / float(max(A.sum(1))) ** 2
        V = alpha * P
        for _ in range(iters):
            V = 2 * V - V @ P @ V
        out[tuple(idx)] = V
    return out


def test_reference_newton_schulz_is_the_shipped_iteration_not_an_inverse():
    lm = _spread_landmarks((2, 3, 9, 8)).detach()
    a = _gram(lm)
    torch.testing.assert_close(R.newton_schulz_inverse(a, 20), ns_oracle(a, 20), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(R.newton_schulz_inverse(a, 7, 0.1), ns_oracle(a, 7, 0.1),
                               rtol=1e-12, atol=1e-12)
    eye = torch.eye(9, dtype=torch.float64)
    # well spread landmarks: 20 steps reach the inverse of A + 0.01 I
    torch.testing.assert_close(R.newton_schulz_inverse(a, 20), torch.linalg.inv(a + 0.01 * eye),
                               rtol=1e-9, atol=1e-9)
    # clustered landmarks (A near rank one): 20 steps are far from the inverse, 60 reach it
    base = torch.randn(1, 1, 1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    close = base + 0.05 * torch.randn(1, 1, 49, 8, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(4))
    ac = _gram(close)
    inv = torch.linalg.inv(ac + 0.01 * torch.eye(49, dtype=torch.float64))
    rel = lambda x: float((x - inv).norm() / inv.norm())  # noqa: E731
    assert rel(R.newton_schulz_inverse(ac, 20)) > 0.3
    assert rel(R.newton_schulz_inverse(ac, 60)) < 1e-6
    # 16-bit inputs: fp32 math and result (SOFT's fp32 identity promotes them)
    out16 = R.newton_schulz_inverse(a.half(), 20)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, R.newton_schulz_inverse(a.half().float(), 20))


def test_reference_newton_schulz_backward_is_minus_vt_g_vt():
    base = torch.randn(1, 2, 1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    close = base + 0.05 * torch.randn(1, 2, 12, 8, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(4))
    a = _gram(close).requires_grad_()  # not converged after 20 steps: still SOFT's formula
    v = newton_schulz_inverse(a, 20)
    g = torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (da,) = torch.autograd.grad(v, a, g)
    vt = v.detach().transpose(-1, -2)
    torch.testing.assert_close(da, -(vt @ g @ vt), rtol=1e-12, atol=1e-12)


def test_reference_gradcheck_soft():
    q = _rand((1, 2, 7, 4), seed=1) * 0.7
    lm = _spread_landmarks((1, 2, 5, 4), seed=2)
    v = _rand((1, 2, 7, 3), seed=3)
    ainv = _rand((1, 2, 5, 5), seed=4)
    q, lm, v, ainv = (t.detach().requires_grad_() for t in (q, lm, v, ainv))
    # the core with a given Ainv: plain autograd
    assert torch.autograd.gradcheck(lambda *a: R.soft_attention(*a), (q, lm, v, ainv))
    # the Newton–Schulz backward is the true gradient once the iteration has converged
    a = _gram(lm.detach()).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: R.newton_schulz_inverse(a, 60), (a,))
    # ... and so the whole op with Ainv computed from the landmarks
    assert torch.autograd.gradcheck(lambda q, lm, v: R.soft_attention(q, lm, v, iters=60),
                                    (q, lm, v))


# (B, heads, N, m, d, e, ainv given?): odd on purpose; m = 49, d = 32 is SOFT's every stage
SOFT_CASES = [
    (1, 1, 1, 1, 16, 16, False),       # N = 1, one landmark
    (2, 3, 37, 9, 16, 20, True),       # e != d, Ainv given
    (1, 2, 196, 49, 32, 32, False),    # SOFT stage 3 at 224² (14², ratio 2)
    (1, 2, 150, 64, 48, 32, True),     # largest landmark block; d = 48 (fp32: refused)
    (1, 2, 150, 64, 32, 48, True),     # largest landmark block at the largest fp32 d
    (2, 1, 785, 12, 32, 64, False),    # many split partials
]


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=_dt_id)
@pytest.mark.parametrize("case", SOFT_CASES, ids=lambda c: "B{}-h{}-N{}-m{}-d{}-e{}".format(
    *c[:6]) + ("-ainv" if c[6] else ""))
def test_triton_soft_attention(case, device, dtype):
    B, h, N, m, d, e, given = case
    q = _rand((B, h, N, d), seed=1) * (0.6 / d ** 0.25)
    lm = _spread_landmarks((B, h, m, d), seed=2, scale=0.8 / d ** 0.25)
    inputs = [q, lm, _rand((B, h, N, e), seed=3)]
    names = ("dq", "dlandmarks", "dv")
    if given:
        inputs.append(R.newton_schulz_inverse(_gram(lm.detach()), 20) + 0.05 * _rand(
            (B, h, m, m), seed=4))
        names += ("dainv",)
    inputs = [t.detach().to(device, dtype).requires_grad_() for t in inputs]
    from vitkern.triton_kernels import linear as tk

    if dtype == torch.float32 and d > tk.SOFT_FP32_MAX_HEAD_DIM:  # the declared refusal
        with pytest.raises(backends.BackendError, match="float32 head_dim 48 is outside the "
                                                        "declared capability of triton SOFT"):
            soft_attention(*inputs, backend="triton")
        return
    check_against_reference(lambda *a: soft_attention(*a, backend="triton"),
                            lambda *a: R.soft_attention(*a), inputs, dtype, names=names)


def test_triton_soft_reads_strided_views_and_is_deterministic():
    B, h, N, d, m = 2, 2, 45, 16, 9
    g = torch.Generator().manual_seed(0)
    qv = torch.randn(B, N, 2, h, d, generator=g).to(DEV) * 0.5  # packed projection
    q, v = qv.permute(2, 0, 3, 1, 4).unbind(0)
    lm = (torch.randn(B, m, h, d, generator=g) * 0.5).to(DEV).transpose(1, 2)
    out = soft_attention(q, lm, v, backend="triton")
    assert_close(out.cpu().double(), R.soft_attention(*(t.cpu().double() for t in (q, lm, v))))
    assert torch.equal(out, soft_attention(q, lm, v, backend="triton"))


def test_triton_soft_zero_v_padding_tokens_are_exact():
    """Padded queries have non-zero K1 rows (the spec's caveat): with zero v they change
    nothing for the real tokens."""
    B, h, N, d, m = 1, 2, 30, 16, 6
    q = _rand((B, h, N, d), torch.float32, DEV, 1).detach() * 0.5
    lm = _rand((B, h, m, d), torch.float32, DEV, 2).detach() * 0.5
    v = _rand((B, h, N, d), torch.float32, DEV, 3).detach()
    out = soft_attention(q, lm, v, backend="triton")
    pad = torch.cat([q, torch.zeros(B, h, 5, d, device=DEV)], 2)
    vpad = torch.cat([v, torch.zeros(B, h, 5, d, device=DEV)], 2)
    assert_close(soft_attention(pad, lm, vpad, backend="triton")[:, :, :N].cpu().double(),
                 out.cpu().double())


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=_t(2, 16, 8)), ValueError, "q must be 4-D"),
    (dict(landmarks=_t(1, 2, 4, 7)), ValueError, "landmarks must have shape"),
    (dict(landmarks=_t(1, 2, 0, 8)), ValueError, "m>=1"),
    (dict(v=_t(1, 2, 15, 8)), ValueError, "v must have shape"),
    (dict(v=_t(1, 2, 16, 8, dtype=torch.float16)), TypeError, "share a dtype"),
    (dict(ainv=_t(1, 2, 4, 5)), ValueError, "ainv must have shape"),
    (dict(ainv=torch.ones(1, 2, 4, 4, dtype=torch.int64)), TypeError, "ainv must be"),
    (dict(iters=-1), TypeError, "iters must be an int"),
    (dict(iters=2.0), TypeError, "iters must be an int"),
    (dict(reg=-0.1), ValueError, "reg must be >= 0"),
    (dict(backend="cudnn"), ValueError, "unknown backend"),
])
def test_soft_bad_inputs_raise_clear_errors(kwargs, exc, match):
    args = dict(q=_t(1, 2, 16, 8), landmarks=_t(1, 2, 4, 8), v=_t(1, 2, 16, 8))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        soft_attention(args.pop("q"), args.pop("landmarks"), args.pop("v"), **args)


def test_newton_schulz_bad_inputs_and_soft_refusals():
    with pytest.raises(ValueError, match="square"):
        newton_schulz_inverse(_t(2, 3, 4))
    with pytest.raises(ValueError, match="square"):
        newton_schulz_inverse(_t(5))
    with pytest.raises(TypeError, match="floating-point"):
        newton_schulz_inverse(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="iters"):
        newton_schulz_inverse(_t(3, 3), iters=None)
    q = _t(1, 2, 16, 8, dtype=torch.float32).to(DEV)
    with pytest.raises(backends.BackendError, match="landmarks 65"):
        soft_attention(q, _t(1, 2, 65, 8).to(DEV), q, backend="triton")
    with pytest.raises(backends.BackendError, match="head_dim 80"):
        x = _t(1, 2, 16, 80).to(DEV)
        soft_attention(x, _t(1, 2, 4, 80).to(DEV), x, backend="triton")
    with pytest.raises(backends.BackendError, match="float64 not supported by triton"):
        soft_attention(q.double(), _t(1, 2, 4, 8).double().to(DEV), q.double(), backend="triton")
    # without gradients refused sizes fall back to the reference under "auto"
    assert soft_attention(q, _t(1, 2, 65, 8).to(DEV), q).shape == q.shape
    assert soft_attention(_t(0, 2, 16, 8), _t(0, 2, 4, 8), _t(0, 2, 16, 8)).shape == (0, 2, 16, 8)


def test_opcheck_soft():
    q, lm, v = (_rand(s, torch.float32, DEV, i) * 0.5 for i, s in enumerate(
        ((1, 2, 20, 16), (1, 2, 5, 16), (1, 2, 20, 24))))
    ainv = _rand((1, 2, 5, 5), torch.float32, DEV, 4)
    torch.library.opcheck(torch.ops.vitkern.soft_attn_fwd.default, (q, lm, v, ainv))


class SoftmaxFreeAttentionOracle(nn.Module):
    """SOFT's ``SoftmaxFreeAttention`` (ratio > 1, kernel_method "torch") as the spec
    (section 1) defines it, with its parameter names: the oracle for :class:`SoftAttention`."""

    def __init__(self, dim, num_heads, ratio, conv_size, max_iter=20):
        super().__init__()
        d = dim // num_heads
        self.h, self.d, self.r, self.iters = num_heads, d, ratio, max_iter
        self.W_q, self.W_v = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn = nn.Module()
        self.attn.Qlandmark_op = nn.Conv2d(d, d, ratio, stride=ratio, bias=False)
        self.attn.Qnorm_act = nn.Sequential(nn.LayerNorm(d), nn.GELU())
        self.attn.conv = nn.Conv2d(num_heads, num_heads, conv_size, padding=conv_size // 2,
                                   bias=False, groups=num_heads)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        h, d = self.h, self.d
        Q = self.W_q(x).reshape(B, N, h, d).transpose(1, 2) / d ** 0.25
        V = self.W_v(x).reshape(B, N, h, d).transpose(1, 2)
        lm = self.attn.Qlandmark_op(Q.reshape(B * h, H, W, d).permute(0, 3, 1, 2))
        lm = self.attn.Qnorm_act(lm.flatten(2).transpose(1, 2).reshape(B, h, -1, d))

        def sqdist(a, b):  # SOFT's torch form: ones-matmuls, no clamp
            return (a ** 2 @ torch.ones(d, b.shape[-2], dtype=a.dtype)
                    + torch.ones(a.shape[-2], d, dtype=a.dtype) @ b.transpose(-1, -2) ** 2
                    - 2 * a @ b.transpose(-1, -2))

        k1 = torch.exp(-sqdist(Q, lm) / 2)
        ainv = newton_schulz_inverse(torch.exp(-sqdist(lm, lm) / 2), self.iters)
        X = (k1 @ ainv) @ (k1.transpose(-1, -2) @ V)
        Vc = V.reshape(B, h, H, W, d).permute(0, 4, 1, 2, 3).reshape(B * d, h, H, W)
        X = X + self.attn.conv(Vc).reshape(B, d, h, H, W).flatten(3).permute(0, 2, 3, 1)
        return self.ff(X.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_soft_attention_module_matches_soft(backend):
    H, W, ratio = 9, 7, 2  # floor(H/r)·floor(W/r) = 12 landmarks; odd sizes drop a row/col
    oracle = SoftmaxFreeAttentionOracle(64, 2, ratio, 3).double()
    _randomize(oracle, std=0.1)
    ours = SoftAttention(64, 2, ratio, 3, kernel_method="torch", backend=backend).double()
    ours.load_state_dict(oracle.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(oracle.state_dict())
    x = torch.randn(2, H * W, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    class Bound(nn.Module):  # forward(x) for _module_parity
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, H, W)

    if backend == "reference":
        _module_parity(Bound(ours), Bound(oracle), x, backend)
        return
    # fp32: the m×m Gram matrix and the 20 Newton–Schulz steps in fp32 amplify round-off (the
    # fp32 oracle itself misses 1e-5·max|ref| on dx), so each fp32 result is bounded by 3× the
    # error of the same oracle run in fp32 (the flash-attn rule) or 1e-5·max|ref|.
    import copy

    grad = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def run(model, dtype, device):
        model = model.to(device, dtype)
        xi = x.detach().to(device, dtype).clone().requires_grad_()
        out = model(xi, H, W)
        (out * grad.to(device, dtype)).sum().backward()
        res = {"out": out, "dx": xi.grad}
        res.update({f"d{n}": p.grad for n, p in model.named_parameters()})
        return {k: t.detach().cpu().double() for k, t in res.items()}

    ref = run(oracle, torch.float64, "cpu")
    low = run(copy.deepcopy(oracle), torch.float32, "cpu")
    got = run(ours, torch.float32, DEV)
    assert set(got) == set(ref)
    for k in ref:
        assert not torch.isnan(got[k]).any(), k
        err, mag = (got[k] - ref[k]).abs().max().item(), ref[k].abs().max().item()
        base = (low[k] - ref[k]).abs().max().item()
        assert err <= max(1e-5 * max(mag, 1.0), 3.0 * base), (k, err, base, mag)


def test_soft_attention_module_errors():
    with pytest.raises(ValueError, match="ratio must be an int >= 2"):
        SoftAttention(64, 2, 1, 3)
    with pytest.raises(ValueError, match="kernel_method"):
        SoftAttention(64, 2, 2, 3, kernel_method="numpy")
    m = SoftAttention(64, 2, 4, 3)
    with pytest.raises(ValueError, match="H\\*W"):
        m(torch.randn(1, 50, 64), 7, 7)
    with pytest.raises(ValueError, match="landmark cell"):
        m(torch.randn(1, 9, 64), 3, 3)
    assert "conv" not in dict(SoftAttention(64, 2, 2, 0).named_modules()).get("attn")._modules


def test_soft_module_torch_compile_fullgraph_no_recompile():
    """The Newton–Schulz autograd.Function, the landmark convs and the fused op in one graph."""
    import torch._dynamo

    torch._dynamo.reset()
    block = SoftAttention(32, 2, 2, 3, backend="triton").to(DEV)
    compiled = torch.compile(lambda x: block(x, 5, 6), fullgraph=True,
                             backend="aot_eager" if not HAS_CUDA else "inductor")
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        for _ in range(2):
            x = torch.randn(2, 30, 32, device=DEV).requires_grad_()
            out = compiled(x)
            out.sum().backward()
            torch.testing.assert_close(out, block(x, 5, 6), rtol=1e-5, atol=1e-5)
