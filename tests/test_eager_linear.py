"""The eager linear / softmax-free attention (vitkern.eager.linear) against the reference
(vitkern.reference.linear): forward and every gradient, fp64 tightly, fp32 within 1e-5 of the
fp64 reference, fp16 / bf16 within 3x the reference's own error in that dtype (conftest rule;
6x for one gradient formed by cancellation, see _lin_case);
every option of each op, odd shapes, strided views, grad and no-grad paths."""
from __future__ import annotations

import inspect

import pytest
import torch

from conftest import assert_close
from vitkern.eager import linear as E
from vitkern.reference import linear as R

LOWP = [torch.float16, torch.bfloat16]
ALL = [torch.float64, torch.float32] + LOWP
_DT = dict(ids=lambda x: str(x).split(".")[-1])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: a second intra-op thread only adds OpenMP hand-offs, which on a
    busy 2-core machine made this file 10x slower (24 s instead of 2.3 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rand(shape, seed, *, scale=1.0, positive=False, away=0.0):
    """Normal samples; ``positive``: |x| + 0.1; ``away``: magnitudes >= away (off ReLU's kink,
    so that no denominator is a lone tiny φ(q)·z: such rows amplify any rounding, the
    reference's own included, past the fp32 bound)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if away:
        x = torch.where(x >= 0, x + away, x - away)
    return (x.abs() + 0.1 if positive else x) * scale


def _check(run_eager, run_ref, inputs, *, fp64_rtol=1e-10, nograd=True, factor=3.0):
    """``run_eager(*inputs)`` and its gradient w.r.t. every floating input that requires grad
    (each in its own dtype) against the reference: fp64 inputs tightly against the fp64
    reference; other dtypes against the fp64 reference, bounded as conftest.assert_close (fp32:
    1e-5 of max|ref|; 16-bit: ``factor`` x the reference's error in that dtype). With
    ``nograd`` the no-grad call (in-place path) must give the grad-mode output up to rounding."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point())
              if isinstance(t, torch.Tensor) else t for t in inputs]
    diff = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    out = run_eager(*leaves)
    dtype = next(t for t in leaves if isinstance(t, torch.Tensor)).dtype
    assert out.dtype == dtype and out.is_contiguous()
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(out, diff, go.to(dtype))

    def clone_as(ts, double):
        return [t.detach().clone().to(torch.float64 if double and t.is_floating_point()
                                      else t.dtype).requires_grad_(t.requires_grad)
                if isinstance(t, torch.Tensor) else t for t in ts]

    ref_in = clone_as(leaves, True)
    ref = run_ref(*ref_in)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_in if isinstance(t, torch.Tensor)
                                          and t.requires_grad], go)
    lowp = lowp_grads = None
    if dtype in LOWP:
        lowp_in = clone_as(leaves, False)
        lowp = run_ref(*lowp_in)
        lowp_grads = torch.autograd.grad(lowp, [t for t in lowp_in if isinstance(t, torch.Tensor)
                                                and t.requires_grad], go.to(dtype))
    names = ["out"] + [f"grad{i}" for i in range(len(diff))]
    pairs = zip(names, [out, *grads], [ref, *ref_grads],
                [lowp, *lowp_grads] if lowp is not None else [None] * (len(diff) + 1))
    for i, (name, a, b, lp) in enumerate(pairs):
        assert a.shape == b.shape, name
        if i:  # each gradient in its input's dtype (an fp32 temperature with 16-bit q, k, v)
            assert a.dtype == diff[i - 1].dtype, name
        if dtype in LOWP:  # 16-bit math: the 16-bit bound, whatever the gradient's dtype
            assert_close(a.to(dtype), b, lp.to(dtype), name=name, factor=factor)
        elif a.dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=fp64_rtol, atol=fp64_rtol * max(
                1.0, b.abs().max().item()), msg=name)
        else:
            assert_close(a, b, name=name)
    if nograd:
        with torch.no_grad():
            again = run_eager(*leaves)
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
        torch.testing.assert_close(again.double(), out.detach().double(), rtol=tol,
                                   atol=tol * max(1.0, out.abs().max().item()))


def test_signatures_match_the_reference():
    for name in ("linear_attention", "xca_attention", "soft_attention", "gaussian_kernel",
                 "newton_schulz_inverse"):
        assert inspect.signature(getattr(E, name)) == inspect.signature(getattr(R, name)), name


# --------------------------------------------------------------------------------------------
# linear attention
# --------------------------------------------------------------------------------------------

# (B, h, N, M, d, e): odd N and M, M != N, e != d, head dims down to 1
LIN_SHAPES = [(2, 3, 13, 9, 4, 6), (1, 2, 1, 5, 1, 3), (2, 1, 33, 33, 16, 16), (1, 4, 7, 1, 3, 2)]
LIN_OPTIONS = [
    dict(feature_map="elu1", denom="add", eps=1e-6),                                # katharopoulos
    dict(feature_map="relu", denom="clamp", eps=2.0, temperature=True),             # l2vit-like
    dict(feature_map="relu", denom="add", eps=1e-15, scale=0.7),                    # efficientvit
    dict(feature_map="identity", denom="add", eps=0.0, scale=1.3, temperature=True),
    dict(feature_map="identity", denom="clamp", eps=0.5, mask=True),
    dict(feature_map="elu1", denom="clamp", eps=0.25, temperature=True, mask=True, scale=0.5),
    dict(feature_map="relu", denom="add", eps=1e-6, mask=True),
]


def _lin_case(shape, opts, dtype):
    B, h, N, M, d, e = shape
    pos = opts["feature_map"] == "identity"  # keep its denominator away from 0
    q = _rand((B, h, N, d), 1, positive=pos, away=0.2)
    k = _rand((B, h, M, d), 2, positive=pos, away=0.2)
    v = _rand((B, h, M, e), 3)
    ins = [q.to(dtype), k.to(dtype), v.to(dtype)]
    kw = {x: opts[x] for x in ("feature_map", "denom", "eps", "scale") if x in opts}
    if dtype == torch.float16 and 0 < kw["eps"] < 1e-4:
        # fp16 flushes 1e-15 to 0 (a row with φ(q) = 0 is then 0 / 0) and 1 / 1e-6 overflows
        # in the backward of such a row: NaN in the reference too
        kw["eps"] = 1e-4
    if opts.get("temperature"):
        ins.append((torch.rand(h, 1, 1, generator=torch.Generator().manual_seed(4),
                               dtype=torch.float64) + 0.5).to(dtype))
    else:
        ins.append(None)
    if opts.get("mask"):
        mask = torch.rand(B, M, generator=torch.Generator().manual_seed(5)) < 0.4
        mask[0, 0] = True
        ins.append(mask)
    else:
        ins.append(None)

    def run(fn):
        return lambda q, k, v, t, m: fn(q, k, v, temperature=t, key_padding_mask=m, **kw)

    # one key (M = 1): out = c·v·(φq·φk) / (φq·φk + eps) barely depends on q, so dq is two
    # O(1) terms cancelling to ~1e-3, at 16-bit rounding noise in both implementations (over 30
    # seeds the eager / reference error ratio has median 1.0, max 4.5)
    factor = 6.0 if M == 1 else 3.0
    return run(E.linear_attention), run(R.linear_attention), ins, factor


@pytest.mark.parametrize("dtype", ALL, **_DT)
@pytest.mark.parametrize("opts", LIN_OPTIONS, ids=lambda o: "-".join(
    f"{k}={v}" for k, v in o.items() if k in ("feature_map", "denom") or v is True))
@pytest.mark.parametrize("shape", LIN_SHAPES, ids=lambda s: "B{}-h{}-N{}-M{}-d{}-e{}".format(*s))
def test_eager_linear_attention(shape, opts, dtype):
    fe, fr, ins, factor = _lin_case(shape, opts, dtype)
    _check(fe, fr, ins, factor=factor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], **_DT)
def test_eager_linear_fp32_temperature_with_other_dtypes(dtype):
    """An fp32 temperature parameter with fp32 or fp16 activations (L2ViT under autocast): the
    factor is taken in the activations' dtype, its gradient comes back in fp32."""
    q, k, v = (_rand((2, 3, 11, 8), s).to(dtype) for s in (1, 2, 3))
    t = torch.rand(3, generator=torch.Generator().manual_seed(4)) + 0.5
    kw = dict(feature_map="relu", denom="clamp", eps=3.0)
    _check(lambda q, k, v, t: E.linear_attention(q, k, v, temperature=t, **kw),
           lambda q, k, v, t: R.linear_attention(q, k, v, temperature=t, **kw), [q, k, v, t])


def test_eager_linear_relu_kink_and_masked_rows_match_the_reference_gradients():
    """Exact zeros in q / k (ReLU's kink: gradient 0 as F.relu), a batch item whose keys
    are all masked (output 0), φ(q) rows that are all zero: the same outputs and gradients."""
    q, k, v = (_rand((2, 2, 6, 3), s) for s in (1, 2, 3))
    q[1, :, 2] = 0.0  # batch item 1: its keys take part, so the kink's gradient is exercised
    k[1, :, 1] = 0.0
    q[1, 0, 4] = -1.0  # relu(q) row all zero
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0] = True
    for kw in (dict(feature_map="relu", eps=1e-6), dict(feature_map="elu1"),
               dict(feature_map="relu", denom="clamp", eps=0.3)):
        _check(lambda q, k, v: E.linear_attention(q, k, v, key_padding_mask=mask, **kw),
               lambda q, k, v: R.linear_attention(q, k, v, key_padding_mask=mask, **kw),
               [q, k, v], fp64_rtol=1e-12)


def test_eager_linear_strided_projection_views_and_empty_sizes():
    B, N, h, d = 2, 19, 3, 8
    qkv = torch.randn(B, N, 3 * h * d, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    for fm in ("elu1", "relu", "identity"):
        kw = dict(feature_map=fm, eps=1e-3 if fm != "identity" else 50.0,
                  denom="add" if fm != "identity" else "clamp")
        _check(lambda q, k, v: E.linear_attention(q, k, v, **kw),
               lambda q, k, v: R.linear_attention(q, k, v, **kw), [q, k, v])
    for shape_q, shape_kv in (((2, 3, 0, 4), (2, 3, 5, 4)), ((2, 3, 4, 4), (2, 3, 0, 4)),
                              ((0, 3, 4, 4), (0, 3, 5, 4))):
        q, k = torch.randn(shape_q), torch.randn(shape_kv)
        out = E.linear_attention(q, k, k)
        torch.testing.assert_close(out, R.linear_attention(q, k, k))


def test_eager_linear_bad_options_raise_as_the_reference():
    q = torch.randn(1, 1, 3, 2)
    for kw, match in ((dict(feature_map="softmax"), "unknown feature_map"),
                      (dict(denom="max"), "denom must be")):
        for fn in (E.linear_attention, R.linear_attention):
            with pytest.raises(ValueError, match=match):
                fn(q, q, q, **kw)


# --------------------------------------------------------------------------------------------
# XCA
# --------------------------------------------------------------------------------------------

# (B, h, N, d): a CLS-like odd N, N = 1, head dims down to 1
XCA_SHAPES = [(2, 3, 13, 8), (1, 2, 1, 4), (2, 4, 50, 16), (1, 1, 9, 1), (1, 2, 197, 48)]


@pytest.mark.parametrize("dtype", ALL, **_DT)
@pytest.mark.parametrize("temp", ["tensor", "float", "eps"])
@pytest.mark.parametrize("shape", XCA_SHAPES, ids=lambda s: "B{}-h{}-N{}-d{}".format(*s))
def test_eager_xca_attention(shape, temp, dtype):
    B, h, N, d = shape
    ins = [_rand(shape, s).to(dtype) for s in (1, 2, 3)]
    if temp == "float":
        fe = lambda q, k, v: E.xca_attention(q, k, v, temperature=1.7)  # noqa: E731
        fr = lambda q, k, v: R.xca_attention(q, k, v, temperature=1.7)  # noqa: E731
    else:
        eps = 1e-12 if temp == "tensor" else 0.5  # a floor that clamps some channels
        ins.append((torch.rand(h, 1, 1, generator=torch.Generator().manual_seed(4),
                               dtype=torch.float64) + 0.5).to(dtype))
        fe = lambda q, k, v, t: E.xca_attention(q, k, v, temperature=t, eps=eps)  # noqa: E731
        fr = lambda q, k, v, t: R.xca_attention(q, k, v, temperature=t, eps=eps)  # noqa: E731
    _check(fe, fr, ins)


def test_eager_xca_and_soft_empty_sizes():
    for shape in ((0, 2, 5, 4), (2, 2, 0, 4), (1, 0, 3, 4)):
        x = torch.randn(shape)
        t = torch.ones(shape[1])
        torch.testing.assert_close(E.xca_attention(x, x, x, temperature=t),
                                   R.xca_attention(x, x, x, temperature=t))
        lm = torch.randn(shape[0], shape[1], 3, shape[3])
        torch.testing.assert_close(E.soft_attention(x, lm, x), R.soft_attention(x, lm, x))
    a = torch.randn(0, 4, 4)
    torch.testing.assert_close(E.newton_schulz_inverse(a), R.newton_schulz_inverse(a))


def test_eager_xca_zero_channel_has_finite_matching_gradients():
    q, k, v = (_rand((2, 2, 11, 5), s) for s in (1, 2, 3))
    q[0, 1, :, 3] = 0.0
    k[1, 0, :, 0] = 0.0
    t = torch.rand(2, dtype=torch.float64) + 0.5
    for dtype in (torch.float64, torch.float32):
        _check(lambda q, k, v, t: E.xca_attention(q, k, v, temperature=t),
               lambda q, k, v, t: R.xca_attention(q, k, v, temperature=t),
               [x.to(dtype) for x in (q, k, v, t)])


def test_eager_xca_strided_projection_views_and_fp32_temperature():
    B, N, h, d = 2, 29, 4, 8
    qkv = torch.randn(B, N, 3 * h * d, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    t = torch.rand(h, 1, 1) + 0.5
    run = lambda fn: lambda q, k, v, t: fn(q, k, v, temperature=t)  # noqa: E731
    _check(run(E.xca_attention), run(R.xca_attention), [q, k, v, t])
    _check(run(E.xca_attention), run(R.xca_attention), [q.double(), k.double(), v.double(), t])


# --------------------------------------------------------------------------------------------
# SOFT
# --------------------------------------------------------------------------------------------

# (B, h, N, m, d, e, ainv given?)
SOFT_SHAPES = [(1, 1, 1, 1, 4, 4, False), (2, 3, 37, 9, 16, 20, True),
               (1, 2, 50, 49, 32, 32, False), (2, 1, 21, 5, 3, 7, False), (1, 2, 13, 6, 8, 5, True)]


def _soft_inputs(shape, dtype):
    B, h, N, m, d, e, given = shape
    q = _rand((B, h, N, d), 1, scale=0.6 / d ** 0.25)
    lm = _rand((B, h, m, d), 2, scale=0.8 / d ** 0.25)  # spread: A well conditioned
    ins = [q, lm, _rand((B, h, N, e), 3)]
    if given:
        ai = R.newton_schulz_inverse(R.gaussian_kernel(lm, lm), 20) + 0.05 * _rand((B, h, m, m), 4)
        ins.append(ai)
    return [t.to(dtype) for t in ins]


@pytest.mark.parametrize("dtype", ALL, **_DT)
@pytest.mark.parametrize("shape", SOFT_SHAPES, ids=lambda s: "B{}-h{}-N{}-m{}-d{}-e{}".format(
    *s[:6]) + ("-ainv" if s[6] else ""))
def test_eager_soft_attention(shape, dtype):
    _check(E.soft_attention, R.soft_attention, _soft_inputs(shape, dtype))


@pytest.mark.parametrize("kw", [dict(iters=0), dict(iters=3, reg=0.1), dict(iters=60, reg=0.0)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], **_DT)
def test_eager_soft_attention_options(kw, dtype):
    run = lambda fn: lambda q, lm, v: fn(q, lm, v, **kw)  # noqa: E731
    _check(run(E.soft_attention), run(R.soft_attention),
           _soft_inputs((2, 2, 17, 7, 8, 6, False), dtype))


def test_eager_soft_strided_views_fp32_and_fp16():
    B, N, h, d, m = 2, 23, 2, 8, 5
    x = torch.randn(B, N, 2 * h * d, generator=torch.Generator().manual_seed(0)) * 0.5
    q, v = x.unflatten(-1, (2, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    lm = torch.randn(B, m, h, d, generator=torch.Generator().manual_seed(1)).transpose(1, 2) * 0.5
    assert not q.is_contiguous() and not lm.is_contiguous()
    _check(E.soft_attention, R.soft_attention, [q, lm, v])
    _check(E.soft_attention, R.soft_attention, [t.half() for t in (q, lm, v)])


def _clustered_gram(seed=3, b=2, m=12):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, 1, 8, dtype=torch.float64, generator=g)
    lm = base + 0.05 * torch.randn(b, 1, m, 8, dtype=torch.float64, generator=g)
    return R.gaussian_kernel(lm, lm)  # A near rank one: 20 steps do not converge


@pytest.mark.parametrize("iters", [0, 1, 20])
def test_eager_newton_schulz_is_the_reference_iteration(iters):
    """Same iterate (not converged on clustered landmarks), fp64 / fp32 / 16-bit (fp32 result),
    and SOFT's backward −Vᵀ G Vᵀ."""
    a = _clustered_gram()
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.float16, 1e-5)):
        x = a.to(dtype)
        out, ref = E.newton_schulz_inverse(x, iters), R.newton_schulz_inverse(x, iters)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * ref.abs().max().item())
    x = a.clone().requires_grad_()
    v = E.newton_schulz_inverse(x, iters, 0.05)
    g = torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (da,) = torch.autograd.grad(v, x, g)
    xr = a.clone().requires_grad_()
    (dr,) = torch.autograd.grad(R.newton_schulz_inverse(xr, iters, 0.05), xr, g)
    # fp64 to 1e-12 of the gradient's magnitude, as the forward above (after 20 unconverged
    # steps it reaches ~600: an absolute 1e-12 is below the rounding of the machine's BLAS)
    torch.testing.assert_close(da, dr, rtol=1e-12, atol=1e-12 * dr.abs().max().item())
    xh = a.half().requires_grad_()
    (dh,) = torch.autograd.grad(E.newton_schulz_inverse(xh, iters), xh, g.float())
    xr = a.half().requires_grad_()
    (drh,) = torch.autograd.grad(R.newton_schulz_inverse(xr, iters), xr, g.float())
    assert dh.dtype == torch.float16
    torch.testing.assert_close(dh, drh)


def test_eager_gaussian_kernel_matches_the_reference():
    x, y = _rand((2, 3, 17, 5), 1), _rand((2, 3, 4, 5), 2)
    for a, b in ((x, y), (x[0, 0], y[0, 0]), (x[0], y[0]), (x, y[:1]), (x[0], y[0, 0])):
        _check(E.gaussian_kernel, R.gaussian_kernel, [a, b])  # leading dims: any, broadcast
        _check(E.gaussian_kernel, R.gaussian_kernel, [a.float(), b.float()])


def test_eager_soft_attention_broadcast_ainv():
    q, lm, v, _ = _soft_inputs((2, 3, 11, 4, 8, 5, True), torch.float64)
    for ai in (_rand((4, 4), 6), _rand((1, 3, 4, 4), 6)):
        _check(E.soft_attention, R.soft_attention, [q, lm, v, ai])
