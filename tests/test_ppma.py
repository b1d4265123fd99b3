"""PPMA: reference, Triton kernels (interpreter or GPU), ops checks, nn module parity."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import HAS_CUDA, KERNEL_DEVICES, assert_close, check_against_reference
from vitkern import backends
from vitkern.bench.ppma_original import (PPMACrissCrossAttention, PPMAFullAttention, ppma_rotary,
                                         randomize_)
from vitkern.nn.ppma import PolylinePathAttention
from vitkern.ops import ppma as ops
from vitkern.reference import ppma as R

# (B, heads, H, W, head_dim): odd shapes on purpose.
CASES = [
    (1, 1, 1, 1, 16),      # N = 1
    (2, 2, 3, 5, 16),      # H != W
    (1, 2, 1, 13, 16),     # 1 x N: only horizontal segments
    (1, 2, 13, 1, 32),     # N x 1: only vertical segments
    (2, 2, 7, 7, 32),      # PPMA stage 4 map
    (1, 1, 14, 14, 16),    # PPMA-T stage 3 map, several tiles each way
    (1, 2, 5, 9, 24),      # d = 24 (padded head dim), W = 9 (pitch 16)
    (1, 1, 3, 20, 16),     # W = 20 (pitch 32): one image row per backward tile
]


def _ids(case):
    return "B{}-h{}-{}x{}-d{}".format(*case)


def _inputs(B, h, H, W, d, dtype, device, seed=0):
    """q, k, v (B, h, N, d) and log-decays (B, h, N) in PPMA's range (negative, ~softplus·A)."""
    g = torch.Generator().manual_seed(seed)
    N = H * W
    qkv = [torch.randn(B, h, N, d, generator=g, dtype=torch.float64) for _ in range(3)]
    decays = [-torch.rand(B, h, N, generator=g, dtype=torch.float64) * 0.8 for _ in range(2)]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in qkv + decays]


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------


def naive_log_mask(a, g, H, W):
    """The spec's definition, by loops: Σ a along the query's row from c1 to c2 plus Σ g along
    the key's column from r1 to r2 (start excluded, end included)."""
    a = a.reshape(H, W)
    g = g.reshape(H, W)
    out = torch.zeros(H * W, H * W, dtype=a.dtype)
    for r1, c1, r2, c2 in itertools.product(range(H), range(W), range(H), range(W)):
        lo, hi = sorted((c1, c2))
        horiz = a[r1, lo + 1:hi + 1].sum()
        lo, hi = sorted((r1, r2))
        vert = g[lo + 1:hi + 1, c2].sum()
        out[r1 * W + c1, r2 * W + c2] = horiz + vert
    return out


@pytest.mark.parametrize("hw", [(3, 4), (1, 5), (4, 1), (2, 2)])
def test_reference_mask_matches_definition(hw):
    H, W = hw
    a, g = (-torch.rand(1, 1, H * W, dtype=torch.float64) for _ in range(2))
    mask = R.ppma_log_mask(a, g, hw=hw)[0, 0]
    torch.testing.assert_close(mask, naive_log_mask(a[0, 0], g[0, 0], H, W), rtol=0, atol=1e-14)
    # constant decays: Kronecker product of Manhattan decays (RMT) with separate rates
    mask = R.ppma_log_mask(torch.full_like(a, -0.3), torch.full_like(g, -0.7), hw=hw)[0, 0]
    rr, cc = (torch.arange(H * W) // W).double(), (torch.arange(H * W) % W).double()
    manhattan = (-0.3 * (cc[:, None] - cc[None, :]).abs() - 0.7 * (rr[:, None] - rr[None, :]).abs())
    torch.testing.assert_close(mask, manhattan, rtol=0, atol=1e-14)


def test_reference_attention_is_two_renormalised_softmaxes():
    q, k, v, a, g = _inputs(1, 2, 3, 4, 8, torch.float64, "cpu")
    L = R.ppma_log_mask(a, g, hw=(3, 4)).exp()
    e = torch.exp((q @ k.transpose(-1, -2)) * 8 ** -0.5)
    p1 = e * L / (e * L).sum(-1, keepdim=True)
    p2 = e * L.transpose(-1, -2) / (e * L.transpose(-1, -2)).sum(-1, keepdim=True)
    expected = (0.5 * p1 + 0.5 * p2) @ v
    out = R.ppma_attention(q, k, v, a, g, hw=(3, 4))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_reference_criss_cross_two_hop_weights():
    """Each order's effective query->key weight is a product of a row and a column softmax."""
    H, W, d = 3, 4, 8
    q, k, v, a, g = _inputs(1, 1, H, W, d, torch.float64, "cpu")
    s = (q[0, 0] @ k[0, 0].T) * d ** -0.5
    sw, sh = R._row_col_masks(a, g, (H, W))
    dense = torch.zeros(H * W, H * W, dtype=torch.float64)
    aw = [torch.softmax(s[r * W:(r + 1) * W, r * W:(r + 1) * W] + sw[0, 0, r], -1)
          for r in range(H)]
    ah = [torch.softmax(s[c::W, c::W] + sh[0, 0, c], -1) for c in range(W)]
    for r1, c1, r2, c2 in itertools.product(range(H), range(W), range(H), range(W)):
        # row r1 then column c2 (V2H corner (r1, c2)) + column c1 then row r2 (H2V corner (r2, c1))
        dense[r1 * W + c1, r2 * W + c2] = 0.5 * (aw[r1][c1, c2] * ah[c2][r1, r2]
                                                 + ah[c1][r1, r2] * aw[r2][c1, c2])
    out = R.ppma_criss_cross_attention(q, k, v, a, g, hw=(H, W))
    torch.testing.assert_close(out[0, 0], dense @ v[0, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [R.ppma_attention, R.ppma_criss_cross_attention],
                         ids=["full", "criss_cross"])
@pytest.mark.parametrize("hw", [(2, 3), (1, 4), (3, 1)])
def test_reference_gradcheck(fn, hw):
    H, W = hw
    inputs = _inputs(1, 2, H, W, 4, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda *t: fn(*t, hw=hw), inputs)


def test_reference_decays_and_rope_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    A_log = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: R.ppma_decays(*t, 2), (x, w, bias, A_log))
    sin, cos = R.ppma_rel_pos((2, 3), 4, dtype=torch.float64)
    z = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: R.ppma_rope(t, sin, cos), (z,))


# --------------------------------------------------------------------------------------------
# Triton kernels against the reference, forward and every gradient
# --------------------------------------------------------------------------------------------

NAMES = ("dq", "dk", "dv", "dlog_decay_h", "dlog_decay_v")


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_ppma_attention(case, device, dtype):
    B, h, H, W, d = case
    check_against_reference(
        lambda *t: ops.ppma_attention(*t, hw=(H, W), backend="triton"),
        lambda *t: R.ppma_attention(*t, hw=(H, W)),
        _inputs(B, h, H, W, d, dtype, device), dtype, names=NAMES)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=_ids)
def test_triton_inference_forward_matches_training_forward(case, device, dtype):
    """Without gradients the forward (``ppma_infer``) writes o alone (no O1, no LSE): the same
    bits as a training forward."""
    B, h, H, W, d = case
    inputs = _inputs(B, h, H, W, d, dtype, device)
    train = ops.ppma_attention(*inputs, hw=(H, W), backend="triton")
    with torch.no_grad():
        infer = ops.ppma_attention(*inputs, hw=(H, W), backend="triton")
    assert train.requires_grad and not infer.requires_grad
    assert torch.equal(train.detach(), infer)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("hw", [(3, 40), (2, 70)], ids=str)
def test_triton_forward_wide_maps(hw, device, dtype):
    """Maps wider than a tile (forward only): each tile lies inside one image row, its corner
    values come from one row segment per side."""
    H, W = hw
    q, k, v, a, g = (t.detach() for t in _inputs(1, 2, H, W, 16, dtype, device, seed=3))
    with torch.no_grad():
        out = ops.ppma_attention(q, k, v, a, g, hw=hw, backend="triton")
    ref = R.ppma_attention(*(t.double().cpu() for t in (q, k, v, a, g)), hw=hw)
    lowp = None if dtype == torch.float32 else R.ppma_attention(q, k, v, a, g, hw=hw).cpu()
    assert_close(out.cpu(), ref, lowp)


# criss-cross runs one program per row and per column: kept smaller (the interpreter is slow)
CC_CASES = [
    (1, 2, 3, 5, 16),      # H != W
    (1, 1, 1, 13, 16),     # 1 x N: the column maps are 1x1
    (1, 1, 9, 1, 32),      # N x 1
    (1, 1, 7, 7, 32),      # PPMA stage-4 map size
]


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("case", CC_CASES, ids=_ids)
def test_triton_ppma_criss_cross(case, device, dtype):
    B, h, H, W, d = case
    check_against_reference(
        lambda *t: ops.ppma_criss_cross_attention(*t, hw=(H, W), backend="triton"),
        lambda *t: R.ppma_criss_cross_attention(*t, hw=(H, W)),
        _inputs(B, h, H, W, d, dtype, device, seed=2), dtype, names=NAMES)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES[:1], ids=lambda x: str(x).split(".")[-1])
def test_triton_strong_decays_and_scale(device, dtype):
    """Steep masks (decays down to -6: most of L underflows) and a custom scale."""
    B, h, H, W, d = 1, 2, 6, 5, 16
    q, k, v, a, g = _inputs(B, h, H, W, d, dtype, device, seed=5)
    with torch.no_grad():
        a.mul_(7.5)
        g.mul_(7.5)
    check_against_reference(
        lambda *t: ops.ppma_attention(*t, hw=(H, W), scale=0.3, backend="triton"),
        lambda *t: R.ppma_attention(*t, hw=(H, W), scale=0.3),
        [q, k, v, a, g], dtype, names=NAMES)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES[:1], ids=lambda x: str(x).split(".")[-1])
def test_triton_reads_strided_projection_views(device, dtype):
    """q, k, v as head views of (B, N, heads·d) projections, decays as strided views."""
    B, H, W, h, d = 2, 4, 6, 2, 16
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, H * W, 3, h, d, generator=g).to(device, dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    dec = -torch.rand(B, H * W, h, 2, generator=g).to(device, dtype)
    a, gg = dec[..., 0].transpose(1, 2), dec[..., 1].transpose(1, 2)
    assert not q.is_contiguous() and not a.is_contiguous()
    out = ops.ppma_attention(q, k, v, a, gg, hw=(H, W), backend="triton")
    ref = R.ppma_attention(*(t.double().cpu() for t in (q, k, v, a, gg)), hw=(H, W))
    assert_close(out.cpu(), ref)
    assert out.transpose(1, 2).reshape(B, H * W, h * d).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("shape,heads", [((2, 3, 5, 32), 4), ((1, 7, 48), 2), ((1, 1, 1, 16), 1)])
def test_triton_ppma_decays(shape, heads, device, dtype):
    """Fused decays vs the reference: x (any dtype) and fp32 parameters, as in an AMP model;
    dt_bias spans PPMA's init range and softplus's threshold (20)."""
    g = torch.Generator().manual_seed(0)
    d = shape[-1] // heads
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(2, d, generator=g, dtype=torch.float64) * 0.5).to(device).float()
    bias = torch.tensor([-6.5, -3.0, 0.5, 25.0][:heads], dtype=torch.float32, device=device)
    A_log = (torch.randn(heads, generator=g) * 0.1).to(device)
    inputs = [x, w.requires_grad_(), bias.requires_grad_(), A_log.requires_grad_()]
    out = ops.ppma_decays(*inputs, heads, backend="triton")
    assert all(o.dtype == torch.float32 and o.shape == (shape[0], heads, x[0, ..., 0].numel())
               for o in out)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref = R.ppma_decays(*ref_in, heads)
    douts = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref]
    grads = torch.autograd.grad(out, inputs, [t.to(device, torch.float32) for t in douts])
    ref_grads = torch.autograd.grad(ref, ref_in, douts)
    for name, a, b in zip(("a", "g"), out, ref):
        assert_close(a.cpu(), b, name=name)
    assert grads[0].dtype == dtype and all(t.dtype == torch.float32 for t in grads[1:])
    for name, a, b in zip(("dx", "ddt_weight", "ddt_bias", "dA_log"), grads, ref_grads):
        # dx is rounded to x's dtype: bound by the error of the reference rounded the same way
        lowp = b.to(a.dtype) if a.dtype != torch.float32 else None
        assert_close(a.cpu(), b, lowp, name=name)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("hw,d", [((5, 7), 16), ((1, 70), 32), ((1, 1), 8)])
def test_triton_ppma_rope(hw, d, device, dtype):
    """Fused RoPE (forward and its transpose) vs theta_shift, x a strided head view."""
    H, W = hw
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, H * W, 3, d, generator=g, dtype=torch.float64).transpose(1, 2)
    sin, cos = R.ppma_rel_pos(hw, d)
    check_against_reference(
        lambda t: ops.ppma_rope(t, sin.to(device), cos.to(device), backend="triton"),
        lambda t: R.ppma_rope(t, sin.to(t.device, t.dtype), cos.to(t.device, t.dtype)),
        [x.to(device, dtype).requires_grad_()], dtype, names=("dx",))


@pytest.mark.parametrize("H,W", [(1, 1), (5, 7), (3, 70), (40, 1), (2100, 1), (40, 40)])
@pytest.mark.parametrize("device", [d for d, _ in KERNEL_DEVICES])
def test_triton_prefix_scans(H, W, device, monkeypatch):
    """The scan kernel against torch's cumsums: the packed (P, Q) table from strided fp16
    log-decays, and the reverse scans (two gradient tables summed, or one) into each
    log-decay's dtype; maps of one or several row chunks. Maps wider than the kernel's row
    tile take torch's cumsums (same results)."""
    from vitkern.triton_kernels import ppma as tk

    gen = torch.Generator().manual_seed(0)
    B, h, n = 2, 3, H * W
    a = torch.randn(B, n, h, generator=gen).half().to(device).transpose(1, 2)  # token stride h
    g = torch.randn(B, h, n, generator=gen).to(device)
    p = a.float().reshape(B, h, H, W).cumsum(3).reshape(B, h, n)
    q = g.reshape(B, h, H, W).cumsum(2).reshape(B, h, n)
    grads = [torch.randn(B, h, n, generator=gen).to(device) for _ in range(4)]

    def rev(x, dim):
        return x.reshape(B, h, H, W).flip(dim).cumsum(dim).flip(dim).reshape(B, h, n)

    def close(x, y, contiguous=True):
        assert x.dtype == y.dtype and x.is_contiguous() == contiguous
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4 * max(H, W))

    for wide in (False, True):  # the kernel, then torch's fallback
        if wide:
            monkeypatch.setattr(tk.common, "SCAN_MAX_WIDTH", W - 1)
        pairs = tk.prefix_table(a, g, H, W).view(torch.float32).reshape(B, h, n, 2)
        close(pairs[..., 0], p, contiguous=False)
        close(pairs[..., 1], q, contiguous=False)
        da, dg = tk.decay_grads(*grads[:2], H, W, (torch.float16, torch.float32), *grads[2:])
        close(da, rev(grads[0] + grads[2], 3).half())
        close(dg, rev(grads[1] + grads[3], 2))
        da, dg = tk.decay_grads(*grads[:2], H, W, (torch.float32, torch.float32))
        close(da, rev(grads[0], 3))
        close(dg, rev(grads[1], 2))


def test_triton_backward_is_deterministic():
    """Decay gradients come from plain per-tile stores and fixed-order reductions (no atomics)."""
    device = KERNEL_DEVICES[0][0]
    inputs = _inputs(2, 2, 6, 7, 16, torch.float32, device, seed=7)
    dout = torch.randn(2, 2, 42, 16, generator=torch.Generator().manual_seed(8)).to(device)
    runs = [torch.autograd.grad(ops.ppma_attention(*inputs, hw=(6, 7), backend="triton"), inputs,
                                dout) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# --------------------------------------------------------------------------------------------
# checks and dispatch
# --------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=_t(2, 12, 8)), ValueError, "q must be 4-D"),
    (dict(k=_t(1, 2, 11, 8)), ValueError, "k must have q's shape"),
    (dict(v=_t(1, 2, 12, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(hw=(4, 4)), ValueError, "N=12 tokens but hw"),
    (dict(hw=(12,)), ValueError, "hw must be a pair"),
    (dict(a=_t(1, 2, 11)), ValueError, r"log_decay_h must have shape \(B, heads, N\)"),
    (dict(g=_t(1, 2, 12, 1)), ValueError, "log_decay_v must have shape"),
    (dict(a=torch.ones(1, 2, 12, dtype=torch.int64)), TypeError, "log_decay_h must be a floating"),
    (dict(g="x"), TypeError, "log_decay_v must be a torch.Tensor"),
    (dict(g=torch.empty(1, 2, 12, device="meta")), ValueError, "log_decay_v is on meta"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(backend="cudnn"), ValueError, "unknown backend"),
])
@pytest.mark.parametrize("fn", [ops.ppma_attention, ops.ppma_criss_cross_attention],
                         ids=["full", "criss_cross"])
def test_bad_inputs_raise_clear_errors(fn, kwargs, exc, match):
    args = dict(q=_t(1, 2, 12, 8), k=_t(1, 2, 12, 8), v=_t(1, 2, 12, 8), a=_t(1, 2, 12),
                g=_t(1, 2, 12), hw=(3, 4))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fn(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("a"), args.pop("g"), **args)


def test_rope_bad_inputs():
    sin, cos = R.ppma_rel_pos((3, 4), 8)
    with pytest.raises(ValueError, match="x must be a 4-D"):
        ops.ppma_rope(_t(2, 12, 8), sin, cos)
    with pytest.raises(ValueError, match=r"sin must be \(H, W, 8\) or \(12, 8\)"):
        ops.ppma_rope(_t(1, 2, 12, 8), sin[:2], cos)
    with pytest.raises(ValueError, match="head_dim must be even"):
        ops.ppma_rope(_t(1, 2, 12, 7), _t(12, 7), _t(12, 7))


def test_decays_bad_inputs():
    x = _t(1, 3, 4, 8)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ops.ppma_decays(x, _t(2, 4), _t(3), _t(3), 3)
    with pytest.raises(ValueError, match=r"dt_weight must be \(2, 4\)"):
        ops.ppma_decays(x, _t(4, 2), _t(2), _t(2), 2)
    with pytest.raises(ValueError, match=r"A_log must be \(2,\)"):
        ops.ppma_decays(x, _t(2, 4), _t(2), _t(3), 2)


@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch rules")
def test_dispatch_on_cpu():
    q = _t(1, 2, 12, 16)
    assert ops._backend("x", "auto", q, 4, True) == "eager"  # CPU tensors: vitkern.eager.ppma
    assert ops._backend("x", "reference", q, 4, True) == "reference"
    assert ops._backend("x", "triton", q, 4, True) == "triton"
    with pytest.raises(backends.BackendError) as info:
        x = q.double()
        ops.ppma_attention(x, x, x, x[..., 0], x[..., 0], hw=(3, 4), backend="triton")
    msg = str(info.value)
    assert "dtype torch.float64 not supported by triton" in msg and "reference:" in msg
    with pytest.raises(backends.BackendError, match="head_dim 12 not supported by triton"):
        x = _t(1, 2, 12, 12)
        ops.ppma_attention(x, x, x, x[..., 0], x[..., 0], hw=(3, 4), backend="triton")
    with pytest.raises(backends.BackendError, match="head_dim 256 is outside the declared capability"):
        x = _t(1, 1, 4, 256)
        ops.ppma_attention(x, x, x, x[..., 0], x[..., 0], hw=(2, 2), backend="triton")
    # wide maps: inference runs, training is refused with the reason
    wide = _t(1, 1, 100, 16)
    a = -torch.rand(1, 1, 100)
    out = ops.ppma_attention(wide, wide, wide, a, a, hw=(1, 100), backend="triton")
    assert_close(out, R.ppma_attention(*(t.double() for t in (wide, wide, wide, a, a)),
                                       hw=(1, 100)))
    with pytest.raises(backends.BackendError, match="map width W=100"):
        ops.ppma_attention(wide.requires_grad_(), wide, wide, a, a, hw=(1, 100), backend="triton")
    long = _t(1, 1, 33, 16)
    with pytest.raises(backends.BackendError, match="rows and columns of at most 32 tokens"):
        ops.ppma_criss_cross_attention(long, long, long, long[..., 0], long[..., 0], hw=(33, 1),
                                       backend="triton")


def test_empty_batch():
    q = _t(0, 2, 12, 8)
    out = ops.ppma_attention(q, q, q, q[..., 0], q[..., 0], hw=(3, 4), backend="triton")
    assert out.shape == q.shape


# --------------------------------------------------------------------------------------------
# nn.PolylinePathAttention against PPMA's layers (written from the spec in vitkern.bench)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,hw,backend", [
    ("full", (3, 5), "reference"), ("full", (3, 5), "triton"), ("full", (7, 7), "triton"),
    ("full", (1, 6), "triton"), ("full", (6, 1), "reference"),
    ("criss_cross", (4, 6), "reference"), ("criss_cross", (5, 1), "reference"),
    ("criss_cross", (3, 5), "triton"),
])
def test_module_matches_ppma(mode, hw, backend):
    H, W = hw
    C, heads = 64, 4
    orig = randomize_((PPMAFullAttention if mode == "full" else PPMACrissCrossAttention)(C, heads))
    orig = orig.double()
    ours = PolylinePathAttention(C, heads, mode=mode, backend=backend).double()
    ours.load_state_dict(orig.state_dict(), strict=True)
    orig.load_state_dict(ours.state_dict(), strict=True)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = "cuda" if backend == "triton" and HAS_CUDA else "cpu"
    ours = ours.to(device, dtype)
    x = torch.randn(2, H, W, C, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_ours = x.to(device, dtype).detach().clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out = ours(x_ours, ours.rel_pos(hw, device=device, dtype=dtype))
    ref = orig(x_ref, ppma_rotary(hw, C // heads, dtype=torch.float64))
    assert_close(out.cpu(), ref, name="out")
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (out * grad.to(device, dtype)).sum().backward()
    (ref * grad).sum().backward()
    assert_close(x_ours.grad.cpu(), x_ref.grad, name="dx")
    ref_params = dict(orig.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad.cpu(), ref_params[name].grad, name=f"d{name}")


def test_module_state_dict_keys_and_errors():
    m = PolylinePathAttention(64, 4)
    assert sorted(m.state_dict()) == sorted([
        "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight",
        "v_proj.bias", "out_proj.weight", "out_proj.bias", "lepe.conv.weight", "lepe.conv.bias",
        "path_embed.dt_linear.weight", "path_embed.dt_bias", "path_embed.A_log"])
    assert tuple(m.path_embed.dt_linear.weight.shape) == (2, 16)
    with pytest.raises(ValueError, match="mode must be"):
        PolylinePathAttention(64, 4, mode="linear")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        PolylinePathAttention(60, 8)
    with pytest.raises(ValueError, match="rel_pos"):
        m(torch.randn(1, 3, 4, 64), m.rel_pos((4, 3)))


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------


def test_opcheck():
    device = "cuda" if HAS_CUDA else "cpu"
    q, k, v, a, g = _inputs(1, 2, 3, 5, 16, torch.float32, device)
    torch.library.opcheck(torch.ops.vitkern.ppma_fwd.default, (q, k, v, a, g, 3, 5, 0.25))
    plain = [t.detach() for t in (q, k, v, a, g)]  # inference: no autograd
    torch.library.opcheck(torch.ops.vitkern.ppma_infer.default, (*plain, 3, 5, 0.25))
    x = torch.randn(2, 6, 32, device=device, requires_grad=True)
    params = [torch.randn(2, 16, device=device), torch.randn(2, device=device),
              torch.randn(2, device=device)]
    torch.library.opcheck(torch.ops.vitkern.ppma_decays_fwd.default,
                          (x, *(p.requires_grad_() for p in params), 2))
    sin, cos = R.ppma_rel_pos((3, 5), 16)
    torch.library.opcheck(torch.ops.vitkern.ppma_rope.default,
                          (q.detach().requires_grad_(), sin.to(device), cos.to(device)))


# --------------------------------------------------------------------------------------------
# benchmark module smoke test (tiny shapes, few reps, CPU)
# --------------------------------------------------------------------------------------------


def test_bench_module_smoke():
    from vitkern.bench import bench_ppma, harness
    from vitkern.bench.shapes import PPMACase, ppma_cases

    assert {c.name for c in ppma_cases("ppma_b")} == {"ppma_b_s1", "ppma_b_s2", "ppma_b_s3",
                                                      "ppma_tsb_s4"}
    case = PPMACase("t_tiny", 3, 5, 2, 16)
    device = torch.device("cpu")
    ctx = harness.Context(device=device, dev=harness.device_info(device),
                          modes=("fwd", "fwd+bwd"), quick=True, backends=("reference", "triton"),
                          batch=1, log=lambda msg: None)
    tasks = bench_ppma.plan([case], [torch.float32])
    assert [t.group for t in tasks] == ["full", "criss_cross"]
    records = [r for t in tasks for r in bench_ppma.run_task(t, ctx)]
    assert ctx.failures == [], ctx.failures
    by = {(r["group"], r["provider"], r["mode"]): r for r in records}
    provs = ("vitkern[reference]", "vitkern[triton]", "ppma_original")
    assert set(by) == {(g, p, m) for g in ("full", "criss_cross")
                       for p in provs + (("sdpa_unmasked",) if g == "full" else ())
                       for m in ("fwd", "fwd+bwd")}
    for (group, prov, mode), r in by.items():
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["flops"] == bench_ppma.attention_flops(case, 1, mode, group)
        if prov != "sdpa_unmasked":
            assert r["check"]["ok"], r["check"]
        if r["kind"] == "vitkern":
            assert set(r["speedup"]) == ({"ppma_original", "sdpa_unmasked"} if group == "full"
                                         else {"ppma_original"})
    # a map too wide for the triton backward: forward timed, forward+backward skipped with why
    wide = PPMACase("t_wide", 1, 40, 1, 16)
    ctx.backends = ("triton",)
    records = bench_ppma.run_task(harness.Task("ppma", wide, torch.float32, "full"), ctx)
    assert ctx.failures == [], ctx.failures
    mine = {r["mode"]: r for r in records if r["kind"] == "vitkern"}
    assert mine["fwd"]["status"] == "ok" and mine["fwd+bwd"]["status"] == "skipped"
    assert "map width W=40" in mine["fwd+bwd"]["reason"]


def test_torch_compile_fullgraph_no_recompile():
    import torch._dynamo

    device = "cuda" if HAS_CUDA else "cpu"
    torch._dynamo.reset()
    block = PolylinePathAttention(32, 2, backend="triton").to(device)
    rel_pos = block.rel_pos((3, 5), device=device)
    compiled = torch.compile(block, fullgraph=True,
                             backend="aot_eager" if not HAS_CUDA else "inductor")
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        for _ in range(2):
            x = torch.randn(2, 3, 5, 32, device=device).requires_grad_()
            out = compiled(x, rel_pos)
            out.sum().backward()
            torch.testing.assert_close(out, block(x, rel_pos), rtol=1e-5, atol=1e-5)
