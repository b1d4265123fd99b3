"""The eager backend (vitkern.eager: composite PyTorch, SDPA-based) against the reference, and
``auto``'s choice of it for CPU tensors. Shapes reuse the family tests' odd cases."""
from __future__ import annotations

import pytest
import torch

import test_ppma as P  # the family tests' case lists and input builders
import test_token as TT
from conftest import assert_close, check_against_reference
from vitkern import backends
from vitkern.eager import ppma as E_ppma
from vitkern.ops import hilo as hilo_ops
from vitkern.ops import linear as linear_ops
from vitkern.ops import ppma as ppma_ops
from vitkern.ops import token as T
from vitkern.ops import window as window_ops
from vitkern.reference import ppma as R_ppma
from vitkern.reference import token as R_token

DTYPES = [torch.float32, torch.float16]
_DT = dict(ids=lambda x: str(x).split(".")[-1])


# --------------------------------------------------------------------------------------------
# token attention: dense and ragged, forward, importance and every gradient
# --------------------------------------------------------------------------------------------


def _unpack(res, want_imp):
    return res if want_imp else (res, None)


def _check_token(case, dtype, *, grad_out=True, grad_imp=True, varlen=False):
    """eager o, importance and grads (q, k, v, key_bias; through o and the CLS importance) vs
    the fp64 reference, bounded by the reference's own error in ``dtype`` (conftest rule)."""
    if varlen:
        mode = case[5]
        qkv, bias, idx, cu = TT._varlen_inputs(case, dtype, "cpu")
    else:
        mode = TT._mode(case[6])
        qkv, bias, idx = TT._inputs(case, dtype, "cpu")
        cu = None
    leaves = qkv + ([bias] if bias is not None else [])

    def run(fn, ins, **extra):
        q, k, v = (t.transpose(0, 1) for t in ins[:3]) if varlen else ins[:3]
        res = fn(q, k, v, keep_idx=idx, cu_seqlens=cu,
                 key_bias=ins[3] if bias is not None else None, return_importance=mode, **extra)
        return _unpack(res, mode is not None)

    out, imp = run(T.token_attention, leaves, backend="eager")
    assert out.dtype == dtype
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    ref_o, ref_imp = run(R_token.token_attention, ref_in)
    lowp = None
    if dtype != torch.float32:
        lowp_in = [t.detach().clone().requires_grad_() for t in leaves]
        lowp = run(R_token.token_attention, lowp_in)
    assert out.shape == ref_o.shape
    assert_close(out, ref_o, None if lowp is None else lowp[0], name="out")
    if mode is not None:
        assert imp.shape == ref_imp.shape and imp.dtype == dtype
        assert_close(imp, ref_imp, None if lowp is None else lowp[1], name=mode)
    if mode == "colsum":  # documented: no gradient
        assert not imp.requires_grad
        imp = ref_imp = None
        lowp = None if lowp is None else (lowp[0], None)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(ref_o.shape, generator=g, dtype=torch.float64) * float(grad_out)
    gi = (torch.randn(ref_imp.shape, generator=g, dtype=torch.float64) * 10.0 * float(grad_imp)
          if mode == "cls" else None)

    def loss(o, i):
        total = (o * go.to(o.dtype)).sum()
        return total if i is None else total + (i * gi.to(i.dtype)).sum()

    grads = torch.autograd.grad(loss(out, imp), leaves)
    ref_grads = torch.autograd.grad(loss(ref_o, ref_imp), ref_in)
    lowp_grads = (torch.autograd.grad(loss(*lowp), lowp_in) if lowp is not None
                  else [None] * len(leaves))
    for name, gr, rg, lg in zip(["dq", "dk", "dv", "dkey_bias"], grads, ref_grads, lowp_grads):
        assert gr.shape == rg.shape and gr.dtype == dtype, name
        assert_close(gr, rg, lg, name=name)


@pytest.mark.parametrize("dtype", DTYPES, **_DT)
@pytest.mark.parametrize("case", TT.CASES, ids=TT._ids)
def test_eager_token_attention(case, dtype):
    _check_token(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, **_DT)
@pytest.mark.parametrize("case", TT.VARLEN_CASES, ids=TT._vids)
def test_eager_token_varlen(case, dtype):
    _check_token(case, dtype, varlen=True)


def test_eager_token_varlen_all_sequences_empty():
    q = torch.randn(5, 2, 8, requires_grad=True)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    o, imp = T.token_attention(q, q, q, cu_seqlens=cu, keep_idx=torch.zeros(0, dtype=torch.long),
                               return_importance="cls", backend="eager")
    assert o.shape == (0, 2, 8) and imp.shape == (0,)


def test_eager_token_gradient_through_importance_only():
    _check_token((2, 2, 41, 32, 17, "head", True), torch.float32, grad_out=False)


def test_eager_token_fp64_matches_reference_tightly():
    """fp64: the same math up to rounding (SDPA's fused kernel vs the reference's matmuls)."""
    case = (2, 3, 37, 16, 20, "neginf", True)
    (q, k, v), bias, idx = TT._inputs(case, torch.float64, "cpu")
    kw = dict(keep_idx=idx, key_bias=bias, return_importance="cls")
    o, imp = T.token_attention(q, k, v, backend="eager", **kw)
    ro, rimp = R_token.token_attention(q, k, v, **kw)
    torch.testing.assert_close(o, ro, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(imp, rimp, rtol=1e-12, atol=1e-12)


def test_eager_token_all_neginf_rows_have_zero_grads():
    (q, k, v), bias, _ = TT._inputs((1, 2, 9, 8, None, "head", True), torch.float32, "cpu")
    with torch.no_grad():
        bias[0, 0] = float("-inf")
    o, imp = T.token_attention(q, k, v, key_bias=bias, return_importance="cls", backend="eager")
    (o.sum() + imp.sum()).backward()
    assert (o[0, 0] == 0).all() and not torch.isnan(q.grad).any()
    assert not torch.isnan(bias.grad).any() and not torch.isnan(k.grad).any()
    assert (q.grad[0, 0] == 0).all() and (k.grad[0, 0] == 0).all() and (v.grad[0, 0] == 0).all()
    assert (bias.grad[0, 0] == 0).all()
    assert (q.grad[0, 1] != 0).any()  # the other head is alive


def test_eager_token_strided_projection_views():
    """q, k, v as permuted views of one (B, N, 3, heads, d) projection, int32 keep_idx, a
    strided bias: the same result as the reference."""
    B, N, h, d = 2, 29, 2, 16
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3 * h * d, generator=g)
    q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    idx = torch.stack([torch.randperm(N, generator=g)[:11] for _ in range(B)])
    bias = torch.randn(B, 2 * N, generator=g)[:, ::2]
    for mode in (None, "cls", "colsum"):
        out = T.token_attention(q, k, v, keep_idx=idx.to(torch.int32), key_bias=bias,
                                return_importance=mode, backend="eager")
        ref = R_token.token_attention(*(t.double() for t in (q, k, v)), keep_idx=idx,
                                      key_bias=bias.double(), return_importance=mode)
        for a, b in zip(*(((x,) if mode is None else x) for x in (out, ref))):
            assert_close(a, b)


# --------------------------------------------------------------------------------------------
# PPMA full attention
# --------------------------------------------------------------------------------------------


def _ppma_check(case, dtype, **kw):
    B, h, H, W, d = case
    check_against_reference(
        lambda *t: ppma_ops.ppma_attention(*t, hw=(H, W), backend="eager", **kw),
        lambda *t: R_ppma.ppma_attention(*t, hw=(H, W), **kw),
        P._inputs(B, h, H, W, d, dtype, "cpu"), dtype, names=P.NAMES)


@pytest.mark.parametrize("path", ["small", "logits", "sdpa"])
@pytest.mark.parametrize("dtype", DTYPES, **_DT)
@pytest.mark.parametrize("case", P.CASES, ids=P._ids)
def test_eager_ppma_attention(case, dtype, path, monkeypatch):
    """Every path on the family's odd shapes: tiny maps (the reference's code), blocked logits
    (maps up to 1024 tokens) and blocked SDPA (larger maps), forced here on small maps."""
    if path != "small":
        monkeypatch.setattr(E_ppma, "_SMALL", 0)
        monkeypatch.setattr(E_ppma, "_SDPA_FROM", 0 if path == "sdpa" else 1 << 30)
    _ppma_check(case, dtype)


@pytest.mark.parametrize("case", [(1, 2, 17, 16, 8), (1, 1, 33, 32, 8)], ids=P._ids)
def test_eager_ppma_default_paths(case):
    """Maps past the thresholds with the shipped settings: 272 tokens (blocked logits) and 1056
    tokens (blocked SDPA, three row blocks)."""
    _ppma_check(case, torch.float32)


@pytest.mark.parametrize("sdpa", [False, True], ids=["logits", "sdpa"])
@pytest.mark.parametrize("case", [(2, 2, 3, 5, 16), (3, 2, 7, 4, 8), (1, 1, 13, 1, 16)],
                         ids=P._ids)
def test_eager_ppma_blocks_and_paths(case, sdpa, monkeypatch):
    """Tiny blocks (several query-row blocks and batch chunks) on both blocked paths."""
    monkeypatch.setattr(E_ppma, "_SMALL", 0)
    monkeypatch.setattr(E_ppma, "_BLOCK", 2 * case[1] * case[3] * case[2] * case[3])
    monkeypatch.setattr(E_ppma, "_SDPA_FROM", 0 if sdpa else 1 << 30)
    _ppma_check(case, torch.float32, scale=0.3)


@pytest.mark.parametrize("path", ["small", "logits", "sdpa"])
def test_eager_ppma_strided_views_and_mixed_decay_dtype(path, monkeypatch):
    if path != "small":
        monkeypatch.setattr(E_ppma, "_SMALL", 0)
        monkeypatch.setattr(E_ppma, "_SDPA_FROM", 0 if path == "sdpa" else 1 << 30)
    B, H, W, h, d = 2, 4, 6, 2, 16
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, H * W, 3, h, d, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    dec = -torch.rand(B, H * W, h, 2, generator=g)
    a, gg = dec[..., 0].transpose(1, 2), dec[..., 1].transpose(1, 2)
    assert not q.is_contiguous() and not a.is_contiguous()
    out = ppma_ops.ppma_attention(q, k, v, a, gg, hw=(H, W), backend="eager")
    ref = R_ppma.ppma_attention(*(t.double() for t in (q, k, v, a, gg)), hw=(H, W))
    assert_close(out, ref)
    # fp16 activations with fp32 log-decays (autocast's rule: the decays keep their dtype)
    h16 = [t.half() for t in (q, k, v)]
    out = ppma_ops.ppma_attention(*h16, a, gg, hw=(H, W), backend="eager")
    lowp = R_ppma.ppma_attention(*h16, a, gg, hw=(H, W))
    assert out.dtype == torch.float16
    assert_close(out, ref, lowp)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------


def test_auto_picks_eager_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("VITKERN_BACKEND", raising=False)
    q = torch.randn(1, 2, 16, 8)
    assert "eager" in backends.BACKENDS
    assert backends.AUTO_ORDER.index("eager") == backends.AUTO_ORDER.index("reference") - 1
    assert T._backend("x", "auto", q, None) == "eager"
    assert ppma_ops._backend("x", "auto", q, 4, True) == "eager"
    assert window_ops._backend("x", "auto", q, (2, 2)) == "eager"
    assert linear_ops._backend("x", "auto", q, 8, False) == "eager"
    # ops without an eager module keep their reference under auto and under backend="eager"
    for be in ("auto", "eager"):
        assert hilo_ops._backend("x", be, q, 2, 1, False) == "reference"
    # VITKERN_BACKEND replaces auto; explicit arguments still win
    monkeypatch.setenv("VITKERN_BACKEND", "eager")
    assert T._backend("x", "auto", q, None) == "eager"
    assert T._backend("x", "reference", q, None) == "reference"
    monkeypatch.setenv("VITKERN_BACKEND", "reference")
    assert T._backend("x", "auto", q, None) == "reference"


def test_auto_on_cpu_runs_the_eager_code(monkeypatch):
    """The auto call is the eager call (the same numbers, not just the same name)."""
    monkeypatch.delenv("VITKERN_BACKEND", raising=False)
    (q, k, v), bias, idx = TT._inputs((2, 2, 23, 16, 9, "batch", True), torch.float32, "cpu")
    a = T.token_attention(q, k, v, keep_idx=idx, key_bias=bias, return_importance="cls")
    b = T.token_attention(q, k, v, keep_idx=idx, key_bias=bias, return_importance="cls",
                          backend="eager")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    qp, kp, vp, ap, gp = P._inputs(1, 2, 3, 5, 16, torch.float32, "cpu")
    assert torch.equal(ppma_ops.ppma_attention(qp, kp, vp, ap, gp, hw=(3, 5)),
                       ppma_ops.ppma_attention(qp, kp, vp, ap, gp, hw=(3, 5), backend="eager"))


def test_eager_is_listed_in_errors_and_status():
    q = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    with pytest.raises(backends.BackendError, match="eager: accepts these inputs"):
        T.token_attention(q, q, q, backend="triton")
    ok, why = backends.backend_status()["eager"]
    assert ok and "token_attention" in why
    with pytest.raises(ValueError, match="'eager'"):
        T.token_attention(q, q, q, backend="eagre")


def test_auto_on_gpu_tensors_keeps_the_old_order():
    """auto does not take eager for GPU tensors (device_reason alone: no GPU needed)."""
    assert backends.device_reason("eager", torch.device("cuda"), False) is not None
    assert backends.device_reason("eager", torch.device("cuda"), True) is None
    assert backends.device_reason("eager", torch.device("cpu"), False) is None
