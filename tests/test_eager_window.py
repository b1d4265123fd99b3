"""The eager Swin window attention (vitkern.eager.window) against the reference: forward and every
gradient (q, k, v, bias table or dense bias) on the window family's odd cases (maps not divisible
by the window, both pad orders, non-square windows, shift, clamp rules), active windows (none,
some, all), a hard mask, strided projection views, and both SDPA call plans (one call per mask
pattern, merged patterns)."""
from __future__ import annotations

import pytest
import torch

import test_window as TW  # the family tests' case lists and input builders
from conftest import assert_close, check_against_reference
from vitkern.eager import window as E
from vitkern.reference import window as R

_DT = dict(ids=lambda x: str(x).split(".")[-1])
LOWP = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (this file measured ~6x faster than with OpenMP threads
    contending for a loaded machine's cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _as_op_passes(case) -> dict:
    """The op's call: the effective (clamped) window and shift, clamp=None."""
    B, h, H, W, ws, s, d, bias, order, clamp = TW._unpack(case)
    win, sft = R.effective_window((H, W), ws, s, clamp)
    return dict(hw=(H, W), window_size=win, shift=sft, pad_order=order, clamp=None)


def _as_given(case) -> dict:
    """The case's own window, shift and clamp (the reference's default clamp left out), and a
    logit scale that is not head_dim**-0.5."""
    kw = dict(TW._kw(case), scale=0.3)
    if kw["clamp"] == "swin":
        del kw["clamp"]
    return kw


def _check_fp64(case, kw):
    """fp64: the same math up to rounding, forward and every gradient."""
    ins = TW._inputs(case, torch.float64, "cpu")
    out = TW._call(E.window_attention, kw)(*ins)
    ref_in = [t.detach().clone().requires_grad_() for t in ins]
    ref = TW._call(R.window_attention, kw)(*ref_in)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    for name, g, rg in zip(("dq", "dk", "dv", "dbias"), torch.autograd.grad(out, ins, grad),
                           torch.autograd.grad(ref, ref_in, grad)):
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("call", [_as_op_passes, _as_given], ids=["op", "given"])
@pytest.mark.parametrize("case", TW.CASES, ids=TW._ids)
def test_eager_window_fp64(case, call):
    _check_fp64(case, call(case))


@pytest.mark.parametrize("dtype", [torch.float32] + LOWP, **_DT)
@pytest.mark.parametrize("case", TW.CASES, ids=TW._ids)
def test_eager_window(case, dtype):
    """fp32: within 1e-5 of max|ref| (fp64 reference); fp16 / bf16: within 3x the error of the
    reference's own math in that dtype (conftest rule), forward and every gradient."""
    kw = _as_op_passes(case)
    check_against_reference(TW._call(E.window_attention, kw), TW._call(R.window_attention, kw),
                            TW._inputs(case, dtype, "cpu"), dtype)


def test_eager_window_reference_defaults():
    """No optional argument: shift 0, no bias, Swin's clamp (an 8x8 map, 4x4 windows)."""
    q, k, v = (torch.randn(2, 3, 64, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(E.window_attention(q, k, v, hw=(8, 8), window_size=4),
                               R.window_attention(q, k, v, hw=(8, 8), window_size=4),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# active windows: none, some, all (shuffled)
# --------------------------------------------------------------------------------------------


def _n_windows(case) -> int:
    B, h, H, W, ws, s, d, bias, order, clamp = TW._unpack(case)
    gh, gw = R.window_grid((H, W), ws, s, clamp)
    return gh * gw


ACTIVE = TW.ACTIVE_CASES + [(case, "all") for case, _ in TW.ACTIVE_CASES[:3]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], **_DT)
@pytest.mark.parametrize("case,K", ACTIVE, ids=TW._active_ids_str)
def test_eager_window_active(case, K, dtype):
    K = _n_windows(case) if K == "all" else K
    act = TW._active_ids(case, K).to(torch.int32 if K % 2 else torch.int64)
    for call in (_as_op_passes, _as_given):
        kw = dict(call(case), active_windows=act)
        if dtype == torch.float64:
            _check_fp64(case, kw)
        else:
            check_against_reference(TW._call(E.window_attention, kw),
                                    TW._call(R.window_attention, kw),
                                    TW._inputs(case, dtype, "cpu"), dtype)


def test_eager_window_no_active_window_zero_gradients():
    """K = 0: zeros, and zero (not missing) gradients for every input, as the reference."""
    case = (2, 2, 9, 13, 4, 2, 16, "table", "shift_then_pad")
    ins = TW._inputs(case, torch.float32, "cpu")
    act = torch.zeros(2, 0, dtype=torch.int32)
    out = TW._call(E.window_attention, dict(_as_op_passes(case), active_windows=act))(*ins)
    assert out.shape == ins[0].shape and (out == 0).all()
    for g, t in zip(torch.autograd.grad(out.sum(), ins), ins):
        assert g.shape == t.shape and (g == 0).all()


# --------------------------------------------------------------------------------------------
# masks, call plans, layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [(1, 2, 8, 8, 4, 2, 16, "table", "pad_then_shift"),
                                  (2, 2, 9, 13, 4, 2, 16, None, "shift_then_pad")], ids=TW._ids)
def test_eager_window_hard_mask(case):
    """mask_value=-inf (a hard shift mask): finite outputs and gradients."""
    kw = dict(_as_op_passes(case), mask_value=float("-inf"))
    _check_fp64(case, kw)
    check_against_reference(TW._call(E.window_attention, kw), TW._call(R.window_attention, kw),
                            TW._inputs(case, torch.float32, "cpu"), torch.float32)


@pytest.fixture
def merge_budget(monkeypatch):
    """Set E._MERGE_ELEMS for one test; the cached plans (built under the old budget) go."""
    def set_budget(value):
        monkeypatch.setattr(E, "_MERGE_ELEMS", value)
        E._dense_plan.cache_clear()
    yield set_budget
    E._dense_plan.cache_clear()


@pytest.mark.parametrize("budget", [-1, 1 << 16, 1 << 40], ids=["alone", "default", "merged"])
@pytest.mark.parametrize("case", [(1, 2, 28, 28, 7, 3, 8, "table", "shift_then_pad"),
                                  (2, 3, 20, 17, 4, 2, 8, "dense", "pad_then_shift"),
                                  (1, 2, 14, 14, 7, 3, 8, "table", "shift_then_pad")], ids=TW._ids)
def test_eager_window_call_plans(case, budget, merge_budget):
    """Every mask pattern in its own SDPA call, small patterns merged (a mask per window), all
    merged: one result. The 28x28 / 7 grid has patterns of 16, 4, 4 and 1 windows."""
    merge_budget(budget)
    _check_fp64(case, _as_op_passes(case))
    kw = _as_op_passes(case)
    B, h, H, W, *_ = TW._unpack(case)
    plan = E._dense_plan((H, W, *kw["window_size"], *kw["shift"], kw["pad_order"],
                          torch.device("cpu")), B, h)
    n_calls = {-1: 4, 1 << 40: 1}.get(budget)
    assert n_calls is None or len(plan.calls) == n_calls
    # sparse plans run the same schedule on the kept windows
    act = TW._active_ids(case, _n_windows(case) // 2 + 1)
    _check_fp64(case, dict(kw, active_windows=act))


def test_eager_window_strided_projection_and_output_layout():
    """q, k, v as views of one packed (B, N, 3, heads, d) projection (gathered without a copy of
    the map), an fp64 table with fp32 activations (bias gradient in fp64), int32 ids; the output
    is stored (B, N, heads, d), so folding the heads into channels is a view."""
    B, H, W, h, d, ws = 2, 12, 10, 3, 16, 4
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, H * W, 3 * h * d, generator=g, requires_grad=True)
    q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    table = torch.randn((2 * ws - 1) ** 2, h, generator=g, dtype=torch.float64,
                        requires_grad=True)
    kw = dict(hw=(H, W), window_size=ws, shift=2, clamp=None)
    out = E.window_attention(q, k, v, rel_pos_bias=table, **kw)
    assert out.dtype == torch.float32
    assert out.transpose(1, 2).reshape(B, H * W, h * d).data_ptr() == out.data_ptr()
    ref_in = [t.detach().double().requires_grad_() for t in (qkv, table)]
    rq, rk, rv = ref_in[0].unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    ref = R.window_attention(rq, rk, rv, rel_pos_bias=ref_in[1], **kw)
    assert_close(out, ref)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dqkv, dtable = torch.autograd.grad(out, (qkv, table), grad.float())
    rdqkv, rdtable = torch.autograd.grad(ref, ref_in, grad)
    assert dtable.dtype == torch.float64
    assert_close(dqkv, rdqkv, name="dqkv")
    assert_close(dtable, rdtable, name="dtable")
    act = torch.tensor([[0, 5, 3], [8, 1, 2]], dtype=torch.int32)
    with torch.no_grad():
        assert_close(E.window_attention(q, k, v, rel_pos_bias=table, active_windows=act, **kw),
                     R.window_attention(rq, rk, rv, rel_pos_bias=ref_in[1],
                                        active_windows=act.long(), **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], **_DT)
def test_eager_window_fused_backward(dtype):
    """A bias that needs no gradient (or none): SDPA's fused CPU kernel runs forward and
    backward; dq, dk, dv match the reference."""
    case = (2, 2, 9, 13, 4, 2, 16, "table", "shift_then_pad")
    q, k, v, table = TW._inputs(case, dtype, "cpu")
    table = table.detach()
    kw = _as_op_passes(case)
    check_against_reference(lambda *a: E.window_attention(*a, rel_pos_bias=table, **kw),
                            lambda *a: R.window_attention(*a, rel_pos_bias=table.to(a[0].dtype),
                                                          **kw),
                            [q, k, v], dtype)


def test_eager_window_empty_batch():
    q = torch.randn(0, 2, 16, 8, requires_grad=True)
    out = E.window_attention(q, q, q, hw=(4, 4), window_size=2, shift=1)
    assert out.shape == q.shape


def test_eager_window_inference_mode_then_training():
    """Index tensors cached by a first call under torch.inference_mode still serve a later call
    that records autograd (an inference tensor cannot be saved for backward)."""
    for cache in (E._geometry, E._dense_plan, E._pattern_masks):
        cache.cache_clear()
    case = (1, 2, 11, 9, 4, 2, 8, "table", "pad_then_shift")
    ins = TW._inputs(case, torch.float64, "cpu")
    with torch.inference_mode():
        TW._call(E.window_attention, _as_op_passes(case))(*ins)
    _check_fp64(case, _as_op_passes(case))
