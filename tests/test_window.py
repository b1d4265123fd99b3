"""Swin window attention: reference vs a naive dense-mask spec, Triton kernels (interpreter or GPU)
vs the reference incl. the bias-table gradient, ops checks, and parity with timm's Swin block."""
from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, KERNEL_DEVICES, assert_close, check_against_reference
from vitkern import backends
from vitkern.ops import window as W_ops
from vitkern.reference import window as W_ref

window_attention = W_ops.window_attention

# (B, heads, H, W, window_size, shift, head_dim, bias, pad_order): odd shapes on purpose.
CASES = [
    (1, 2, 14, 14, 7, 3, 32, "table", "shift_then_pad"),   # Swin-T stage 3, SW-MSA
    (1, 2, 14, 14, 7, 0, 16, "table", "shift_then_pad"),   # W-MSA
    (2, 2, 9, 13, 4, 2, 16, "table", "shift_then_pad"),    # non-divisible both axes, timm order
    (1, 2, 9, 13, 4, 2, 16, "table", "pad_then_shift"),    # the same, mmdet order
    (1, 2, 12, 13, 7, 3, 16, "table", "shift_then_pad"),   # H mod ws > shift: timm's edge mixing
    (1, 2, 12, 13, 7, 3, 16, "table", "pad_then_shift"),
    (1, 2, 5, 6, 7, 3, 16, "table", "shift_then_pad"),     # ws >= map: global 5x5 window, no shift
    (1, 3, 8, 8, 4, 2, 40, "dense", "pad_then_shift"),     # dense (Swin V2 style) bias, d = 40
    (1, 2, 6, 10, 3, 1, 16, None, "shift_then_pad"),       # no bias, 9-token windows straddle tiles
    (1, 1, 24, 24, 12, 6, 16, "table", "shift_then_pad"),  # 144-token windows: several tiles each
    (1, 2, 7, 7, 7, 3, 80, "table", "shift_then_pad"),     # Swin last stage (clamped), d = 80
]


def _ids(case):
    B, h, H, W, ws, s, d, bias, order = case
    return f"B{B}-h{h}-{H}x{W}-ws{ws}-s{s}-d{d}-{bias}-{order.split('_')[0]}"


def _inputs(case, dtype, device, seed=0):
    B, h, H, W, ws, s, d, bias, order = case
    g = torch.Generator().manual_seed(seed)
    wse, _ = W_ref.effective_window((H, W), ws, s)
    ts = [torch.randn(B, h, H * W, d, generator=g, dtype=torch.float64) for _ in range(3)]
    if bias == "table":
        ts.append(torch.randn((2 * wse - 1) ** 2, h, generator=g, dtype=torch.float64))
    elif bias == "dense":
        ts.append(torch.randn(h, wse * wse, wse * wse, generator=g, dtype=torch.float64))
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in ts]


def _kw(case):
    B, h, H, W, ws, s, d, bias, order = case
    return dict(hw=(H, W), window_size=ws, shift=s, pad_order=order)


def _call(fn, kw):
    return lambda q, k, v, *b: fn(q, k, v, rel_pos_bias=b[0] if b else None, **kw)


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------


def naive_window(q, k, v, bias, H, W, ws, s, order, mask_value=-100.0):
    """The spec as dense masked attention over every position of the shifted, padded frame.

    Written from the prose of the spec (not from the reference): Swin's clamp rule; frame
    position -> source token per pad order; region ids from Swin's three slices per axis; the
    bias table index idx = (hi - hj + ws - 1)(2ws - 1) + (wi - wj + ws - 1).
    """
    B, h, N, d = q.shape
    if min(H, W) <= ws:
        ws, s = min(H, W), 0
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    P = Hp * Wp
    src = torch.full((P,), -1, dtype=torch.long)
    win, loc_i, loc_j, region = (torch.zeros(P, dtype=torch.long) for _ in range(4))

    def slice_id(x, L):
        return 0 if x < L - ws else (1 if (s == 0 or x < L - s) else 2)

    for rp in range(Hp):
        for cp in range(Wp):
            p = rp * Wp + cp
            if order == "shift_then_pad":
                r, c = ((rp + s) % H, (cp + s) % W) if (rp < H and cp < W) else (H, W)
            else:
                r, c = (rp + s) % Hp, (cp + s) % Wp
            if r < H and c < W:
                src[p] = r * W + c
            win[p] = (rp // ws) * (Wp // ws) + cp // ws
            loc_i[p], loc_j[p] = rp % ws, cp % ws
            region[p] = 3 * slice_id(rp, Hp) + slice_id(cp, Wp)
    real = src >= 0

    def frame(t):  # (B, h, N, d) -> (B, h, P, d), zero at pad positions
        out = t.new_zeros(B, h, P, d)
        out[:, :, real] = t[:, :, src[real]]
        return out

    logits = (frame(q) @ frame(k).transpose(-1, -2)) * d ** -0.5
    if bias is not None:
        if bias.dim() == 2:
            idx = ((loc_i[:, None] - loc_i[None, :] + ws - 1) * (2 * ws - 1)
                   + (loc_j[:, None] - loc_j[None, :] + ws - 1))
            logits = logits + bias[idx].permute(2, 0, 1)
        else:
            slot = loc_i * ws + loc_j
            logits = logits + bias[:, slot[:, None], slot[None, :]]
    if s:
        logits = logits + (region[:, None] != region[None, :]).to(q.dtype) * mask_value
    logits = logits.masked_fill(win[:, None] != win[None, :], float("-inf"))
    o = torch.softmax(logits, -1) @ frame(v)
    out = torch.empty_like(q)
    out[:, :, src[real]] = o[:, :, real]
    return out


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_naive_spec(case):
    B, h, H, W, ws, s, d, bias, order = case
    ins = _inputs(case, torch.float64, "cpu")
    out = _call(W_ref.window_attention, _kw(case))(*ins)
    expected = naive_window(*ins[:3], ins[3] if bias else None, H, W, ws, s, order)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_reference_timm_order_mixes_opposite_edges():
    """The spec's observation: for H mod ws > shift, roll-then-pad differs from pad-then-roll."""
    case = (1, 1, 12, 14, 7, 3, 8, None, "shift_then_pad")
    q, k, v = _inputs(case, torch.float64, "cpu")
    a = window_attention(q, k, v, hw=(12, 14), window_size=7, shift=3, pad_order="shift_then_pad")
    b = window_attention(q, k, v, hw=(12, 14), window_size=7, shift=3, pad_order="pad_then_shift")
    assert (a - b).abs().max() > 1e-3
    # divisible maps: the two orders agree
    q, k, v = _inputs((1, 1, 14, 21, 7, 3, 8, None, "x"), torch.float64, "cpu")
    a = window_attention(q, k, v, hw=(14, 21), window_size=7, shift=3, pad_order="shift_then_pad")
    b = window_attention(q, k, v, hw=(14, 21), window_size=7, shift=3, pad_order="pad_then_shift")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", [(1, 1, 4, 5, 3, 1, 2, "table", "shift_then_pad"),
                                  (1, 1, 3, 5, 2, 1, 2, "dense", "pad_then_shift")], ids=_ids)
def test_reference_gradcheck(case):
    ins = _inputs(case, torch.float64, "cpu")
    assert torch.autograd.gradcheck(_call(W_ref.window_attention, _kw(case)), tuple(ins))


# --------------------------------------------------------------------------------------------
# Triton kernels against the reference, forward and every gradient (bias included)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_window(case, device, dtype):
    kw = _kw(case)
    B, h, H, W, ws, s, d, bias, order = case
    try:  # skip (visibly) where the backend refuses by design: no spill-free tiles
        W_ops._backend("t", "triton", torch.empty(1, h, 1, d, dtype=dtype, device=device), ws)
    except backends.BackendError as exc:
        assert "no spill-free triton tiles" in str(exc), exc
        pytest.skip(str(exc).splitlines()[2].strip())
    run = _call(lambda *a, **k: window_attention(*a, backend="triton", **k), kw)
    check_against_reference(run, _call(W_ref.window_attention, kw), _inputs(case, dtype, device),
                             dtype)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES[:1], ids=lambda x: str(x).split(".")[-1])
def test_triton_strided_views_and_bias_grad_determinism(device, dtype):
    """q, k, v as views of one packed (B, N, 3, heads, d) projection; fp64 table; the bias
    gradient is bitwise reproducible (no atomics); the output folds into channels as a view."""
    B, H, W, h, d, ws = 2, 8, 8, 2, 16, 4
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, H * W, 3 * h * d, generator=g).to(device, dtype)
    q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    table = torch.randn((2 * ws - 1) ** 2, h, generator=g, dtype=torch.float64).to(device)
    table.requires_grad_()
    kw = dict(hw=(H, W), window_size=ws, shift=2)
    out = window_attention(q, k, v, rel_pos_bias=table, backend="triton", **kw)
    ref = W_ref.window_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                 rel_pos_bias=table.detach().cpu(), **kw)
    assert_close(out.cpu(), ref)
    assert out.transpose(1, 2).reshape(B, H * W, h * d).data_ptr() == out.data_ptr()
    grad = torch.randn(out.shape, generator=g).to(device, dtype)
    g1, = torch.autograd.grad(out, table, grad, retain_graph=True)
    g2, = torch.autograd.grad(out, table, grad)
    assert g1.dtype == torch.float64 and torch.equal(g1, g2)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES[:1], ids=lambda x: str(x).split(".")[-1])
def test_triton_hard_mask_value(device, dtype):
    """mask_value=-inf (a hard shift mask) instead of Swin's -100."""
    case = (1, 2, 8, 8, 4, 2, 16, "table", "pad_then_shift")
    kw = dict(_kw(case), mask_value=float("-inf"))
    run = _call(lambda *a, **k: window_attention(*a, backend="triton", **k), kw)
    check_against_reference(run, _call(W_ref.window_attention, kw), _inputs(case, dtype, device),
                             dtype)


def test_triton_big_batch_offsets_do_not_overflow():
    q = torch.randn(1, 1, 16, 16).expand(3, 1, 16, 16)  # stride 0 batch
    out = window_attention(q, q, q, hw=(4, 4), window_size=2, shift=1, backend="triton")
    ref = W_ref.window_attention(q.double(), q.double(), q.double(), hw=(4, 4), window_size=2,
                                 shift=1)
    assert_close(out, ref)


# --------------------------------------------------------------------------------------------
# parity with timm's Swin block (roll / pad / partition / mask / WindowAttention)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("H,W,ws,s", [(14, 14, 7, 3), (12, 13, 7, 3), (8, 8, 4, 0), (5, 5, 7, 3)])
def test_matches_timm_swin_block(H, W, ws, s, backend):
    swin = pytest.importorskip("timm.models.swin_transformer")
    h, d, B = 2, 16, 2
    C = h * d
    torch.manual_seed(0)
    block = swin.SwinTransformerBlock(C, (H, W), num_heads=h, window_size=ws, shift_size=s,
                                      qkv_bias=False).double().eval()
    block.attn.fused_attn = False
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    expected = block._attn(x)
    dtype = torch.float64 if backend == "reference" else torch.float32
    attn = block.attn
    qkv = (x.reshape(B, H * W, C) @ attn.qkv.weight.t()).to(dtype)
    q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    o = window_attention(q, k, v, hw=(H, W), window_size=ws, shift=s,
                         rel_pos_bias=attn.relative_position_bias_table.detach().to(dtype),
                         backend=backend)
    out = attn.proj(o.double().transpose(1, 2).reshape(B, H * W, C)).reshape(B, H, W, C)
    assert_close(out.detach(), expected.detach(), name="timm")


# --------------------------------------------------------------------------------------------
# checks, dispatch, registration
# --------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=_t(2, 16, 4)), ValueError, "q must be 4-D"),
    (dict(k=_t(1, 2, 15, 8)), ValueError, "q, k, v must have one shape"),
    (dict(v=_t(1, 2, 16, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(q=torch.ones(1, 2, 16, 8, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(q="nope"), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.empty(1, 2, 16, 8, device="meta")), ValueError, "must be on one device"),
    (dict(hw=(4, 5)), ValueError, "N=16 tokens but hw"),
    (dict(hw=(4,)), ValueError, "hw must be a pair"),
    (dict(window_size=0), ValueError, "window_size must be an int"),
    (dict(shift=2), ValueError, r"shift must be an int in \[0, window_size=2\)"),
    (dict(shift=-1), ValueError, "shift must be an int"),
    (dict(pad_order="reflect"), ValueError, "pad_order must be one of"),
    (dict(mask_value=float("nan")), ValueError, "mask_value must be a float <= 0"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(rel_pos_bias=_t(25, 2)), ValueError, r"rel_pos_bias must be the table \(9, 2\)"),
    (dict(rel_pos_bias=_t(2, 4, 5)), ValueError, r"or a dense bias \(2, 4, 4\)"),
    (dict(rel_pos_bias=[1.0]), TypeError, "rel_pos_bias must be a torch.Tensor"),
    (dict(backend="cudnn"), ValueError, "unknown backend"),
])
def test_bad_inputs_raise_clear_errors(kwargs, exc, match):
    args = dict(q=_t(1, 2, 16, 8), k=_t(1, 2, 16, 8), v=_t(1, 2, 16, 8), hw=(4, 4),
                window_size=2, shift=1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        window_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_clamped_window_bias_size_is_explained():
    x = _t(1, 2, 25, 8)
    with pytest.raises(ValueError, match=r"window clamped to the 5x5 map: 7 -> 5"):
        window_attention(x, x, x, hw=(5, 5), window_size=7, rel_pos_bias=_t(169, 2))


@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch rules")
def test_dispatch_on_cpu():
    q = _t(1, 2, 16, 8)
    assert W_ops._backend("x", "auto", q, 2) == "reference"
    assert W_ops._backend("x", "triton", q, 2) == "triton"
    with pytest.raises(backends.BackendError) as info:
        window_attention(q.double(), q.double(), q.double(), hw=(4, 4), window_size=2,
                         backend="triton")
    msg = str(info.value)
    assert "dtype torch.float64 not supported by triton" in msg
    assert "cuda:" in msg and "reference:" in msg
    for d, match in ((12, "head_dim 12 not supported"), (256, "head_dim 256 not supported")):
        x = _t(1, 2, 16, d)
        with pytest.raises(backends.BackendError, match=match):
            window_attention(x, x, x, hw=(4, 4), window_size=2, backend="triton")
    x = _t(1, 1, 17 * 17, 8)
    with pytest.raises(backends.BackendError, match="window_size 17 > 16"):
        window_attention(x, x, x, hw=(17, 17), window_size=17, backend="triton")


def test_empty_batch():
    q = _t(0, 2, 16, 8)
    assert window_attention(q, q, q, hw=(4, 4), window_size=2, shift=1).shape == q.shape


def test_opcheck():
    device = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g).to(device).requires_grad_()
               for _ in range(3))
    table = torch.randn(9, 2, generator=g).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.vitkern.window_fwd.default,
                          (q, k, v, table, 4, 4, 2, 1, 0.25, -100.0, False))


def test_torch_compile_fullgraph_no_recompile():
    import torch._dynamo

    device = "cuda" if HAS_CUDA else "cpu"
    torch._dynamo.reset()
    table = torch.randn(9, 2, device=device).requires_grad_()

    def f(x):
        q, k, v = x.unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4).unbind(0)
        o = window_attention(q, k, v, hw=(4, 6), window_size=2, shift=1, rel_pos_bias=table,
                             backend="triton")
        return o.transpose(1, 2).flatten(2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if not HAS_CUDA else "inductor")
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        for seed in range(2):
            x = torch.randn(2, 24, 96, device=device).requires_grad_()
            out = compiled(x)
            gx, gt = torch.autograd.grad(out.sum(), (x, table))
            ex, et = torch.autograd.grad(f(x).sum(), (x, table))
            torch.testing.assert_close(out, f(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gt, et, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-5)
