"""Swin window attention: reference vs a naive dense-mask spec, Triton kernels (interpreter or GPU)
vs the reference incl. the bias-table gradient, ops checks, and parity with timm's Swin block."""
from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, KERNEL_DEVICES, assert_close, check_against_reference, spy_on
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
    # non-square windows (a 10th entry: clamp)
    (2, 2, 7, 11, (3, 5), (1, 2), 16, "table", "shift_then_pad", None),  # explicit wh x ww
    (1, 2, 7, 11, (3, 5), (1, 2), 16, "dense", "pad_then_shift", None),
    (1, 2, 5, 9, 7, 3, 16, "table", "shift_then_pad", "per_axis"),  # timm: (5, 7), shift (0, 3)
    (1, 2, 7, 14, 7, 3, 16, "table", "pad_then_shift", "per_axis"),  # (7, 7), shift (0, 3)
    (1, 2, 5, 5, 7, 3, 16, "table", "shift_then_pad", None),  # always_partition: padded 7x7
]


def _unpack(case):
    """(B, h, H, W, ws, s, d, bias, order, clamp); clamp defaults to the op's "swin"."""
    return tuple(case) + ("swin",) * (10 - len(case))


def _ids(case):
    B, h, H, W, ws, s, d, bias, order, clamp = _unpack(case)
    ws_, s_ = ("x".join(map(str, x)) if isinstance(x, tuple) else x for x in (ws, s))
    return (f"B{B}-h{h}-{H}x{W}-ws{ws_}-s{s_}-d{d}-{bias}-{order.split('_')[0]}"
            + ("" if clamp == "swin" else f"-clamp{clamp}"))


def _inputs(case, dtype, device, seed=0):
    B, h, H, W, ws, s, d, bias, order, clamp = _unpack(case)
    g = torch.Generator().manual_seed(seed)
    (wh, ww), _ = W_ref.effective_window((H, W), ws, s, clamp)
    ts = [torch.randn(B, h, H * W, d, generator=g, dtype=torch.float64) for _ in range(3)]
    if bias == "table":
        ts.append(torch.randn((2 * wh - 1) * (2 * ww - 1), h, generator=g, dtype=torch.float64))
    elif bias == "dense":
        ts.append(torch.randn(h, wh * ww, wh * ww, generator=g, dtype=torch.float64))
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in ts]


def _kw(case):
    B, h, H, W, ws, s, d, bias, order, clamp = _unpack(case)
    return dict(hw=(H, W), window_size=ws, shift=s, pad_order=order, clamp=clamp)


def _call(fn, kw):
    return lambda q, k, v, *b: fn(q, k, v, rel_pos_bias=b[0] if b else None, **kw)


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------


def _naive_geometry(H, W, ws, s, clamp):
    """The spec's effective window: "swin" (global min(H, W) window, no shift, when the map is
    not larger than the window), "per_axis" (timm: per axis), None (as given)."""
    (wh, ww), (sh, sw) = (ws if isinstance(ws, tuple) else (ws, ws)), (
        s if isinstance(s, tuple) else (s, s))
    if clamp == "swin" and min(H, W) <= wh:
        return (min(H, W),) * 2, (0, 0)
    if clamp == "per_axis":
        if H <= wh:
            wh, sh = H, 0
        if W <= ww:
            ww, sw = W, 0
    return (wh, ww), (sh, sw)


def _naive_frame(H, W, ws, s, order, clamp):
    """Per frame position p of the shifted, padded frame: source token (-1 pad), window id,
    local row / col, region id; and the effective window."""
    (wh, ww), (sh, sw) = _naive_geometry(H, W, ws, s, clamp)
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    P = Hp * Wp
    src = torch.full((P,), -1, dtype=torch.long)
    win, loc_i, loc_j, region = (torch.zeros(P, dtype=torch.long) for _ in range(4))

    def slice_id(x, L, w, sft):
        return 0 if x < L - w else (1 if (sft == 0 or x < L - sft) else 2)

    for rp in range(Hp):
        for cp in range(Wp):
            p = rp * Wp + cp
            if order == "shift_then_pad":
                r, c = ((rp + sh) % H, (cp + sw) % W) if (rp < H and cp < W) else (H, W)
            else:
                r, c = (rp + sh) % Hp, (cp + sw) % Wp
            if r < H and c < W:
                src[p] = r * W + c
            win[p] = (rp // wh) * (Wp // ww) + cp // ww
            loc_i[p], loc_j[p] = rp % wh, cp % ww
            region[p] = 3 * slice_id(rp, Hp, wh, sh) + slice_id(cp, Wp, ww, sw)
    return src, win, loc_i, loc_j, region, (wh, ww), bool(sh or sw)


def naive_window(q, k, v, bias, H, W, ws, s, order, clamp="swin", mask_value=-100.0):
    """The spec as dense masked attention over every position of the shifted, padded frame.

    Written from the prose of the spec (not from the reference): Swin's clamp rules; frame
    position -> source token per pad order; region ids from Swin's three slices per axis; the
    bias table index idx = (hi - hj + wh - 1)(2ww - 1) + (wi - wj + ww - 1).
    """
    B, h, N, d = q.shape
    src, win, loc_i, loc_j, region, (wh, ww), shifted = _naive_frame(H, W, ws, s, order, clamp)
    P = src.numel()
    real = src >= 0

    def frame(t):  # (B, h, N, d) -> (B, h, P, d), zero at pad positions
        out = t.new_zeros(B, h, P, d)
        out[:, :, real] = t[:, :, src[real]]
        return out

    logits = (frame(q) @ frame(k).transpose(-1, -2)) * d ** -0.5
    if bias is not None:
        if bias.dim() == 2:
            idx = ((loc_i[:, None] - loc_i[None, :] + wh - 1) * (2 * ww - 1)
                   + (loc_j[:, None] - loc_j[None, :] + ww - 1))
            logits = logits + bias[idx].permute(2, 0, 1)
        else:
            slot = loc_i * ww + loc_j
            logits = logits + bias[:, slot[:, None], slot[None, :]]
    if shifted:
        logits = logits + (region[:, None] != region[None, :]).to(q.dtype) * mask_value
    logits = logits.masked_fill(win[:, None] != win[None, :], float("-inf"))
    o = torch.softmax(logits, -1) @ frame(v)
    out = torch.empty_like(q)
    out[:, :, src[real]] = o[:, :, real]
    return out


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_naive_spec(case):
    B, h, H, W, ws, s, d, bias, order, clamp = _unpack(case)
    ins = _inputs(case, torch.float64, "cpu")
    out = _call(W_ref.window_attention, _kw(case))(*ins)
    expected = naive_window(*ins[:3], ins[3] if bias else None, H, W, ws, s, order, clamp)
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
    B, h, H, W, ws, s, d, bias, order, clamp = _unpack(case)
    try:  # skip (visibly) where the backend refuses by design: outside its declared capability
        W_ops._backend("t", "triton", torch.empty(1, h, 1, d, dtype=dtype, device=device), ws)
    except backends.BackendError as exc:
        assert "outside the declared capability of triton" in str(exc), exc
        pytest.skip(str(exc).splitlines()[2].strip())
    run = _call(lambda *a, **k: window_attention(*a, backend="triton", **k), kw)
    check_against_reference(run, _call(W_ref.window_attention, kw), _inputs(case, dtype, device),
                             dtype)


# (case, dtype, dQ rides on the bias-gradient pass?): the tile table decides (interpreter: the
# first candidate; fp32 d = 16 and 16-bit d = 64 take 32-slot key blocks, 16-bit d = 32
# 64-slot ones)
FUSED_DQ_CASES = [
    ((1, 2, 9, 13, 4, 2, 16, "table", "pad_then_shift"), torch.float32, True),   # 16 tokens
    ((1, 2, 14, 14, 7, 3, 16, "table", "shift_then_pad"), torch.float32, False),  # 49 > 32
    ((1, 2, 14, 14, 7, 3, 32, "table", "shift_then_pad"), torch.float16, True),  # Swin's case
    ((1, 3, 8, 8, 4, 2, 40, "dense", "pad_then_shift"), torch.float16, True),    # 16 tokens
    ((1, 1, 14, 14, 7, 3, 64, "table", "shift_then_pad"), torch.float16, False),  # d = 64 tiles
]


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's tile choice")
@pytest.mark.parametrize("case,dtype,fused", FUSED_DQ_CASES,
                         ids=lambda x: _ids(x) if isinstance(x, tuple) else str(x))
def test_triton_dq_rides_on_the_bias_gradient_pass(case, dtype, fused, monkeypatch):
    """When the bias-gradient kernel's key-slot block holds a whole window it writes dq too and
    the dQ kernel is not launched; otherwise the dQ kernel runs. Whichever computes dq runs
    first: it stores the deltas that dK/dV reads (no delta pre-pass). Both against the
    reference, forward and every gradient."""
    from vitkern.triton_kernels import window as tk

    launched = []
    for name in ("dkdv", "dq", "dbias"):
        spy_on(monkeypatch, getattr(tk, f"window_bwd_{name}"), name, launched)
    run = _call(lambda *a, **k: window_attention(*a, backend="triton", **k), _kw(case))
    check_against_reference(run, _call(W_ref.window_attention, _kw(case)),
                            _inputs(case, dtype, "cpu"), dtype)
    assert launched == (["dbias", "dkdv"] if fused else ["dq", "dbias", "dkdv"])


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
# active windows (SparseViT): only listed windows computed, the rest zeros / untouched
# --------------------------------------------------------------------------------------------

# (case, K): a few kept, none kept, all kept (in a shuffled order)
ACTIVE_CASES = [
    ((2, 2, 9, 13, 4, 2, 16, "table", "shift_then_pad"), 3),
    ((1, 2, 14, 14, 7, 3, 32, "table", "pad_then_shift"), 1),
    ((2, 1, 9, 13, 4, 2, 16, None, "pad_then_shift"), 0),
    ((1, 2, 12, 13, 7, 3, 16, "dense", "shift_then_pad"), 4),
    ((1, 2, 5, 6, 7, 3, 16, "table", "shift_then_pad"), 1),  # clamped: 1x2 global windows
    ((2, 2, 7, 11, (3, 5), (1, 2), 16, "table", "pad_then_shift", None), 3),  # 3x5 windows
    ((1, 2, 5, 9, 7, 3, 16, "table", "shift_then_pad", "per_axis"), 1),
]


def _active_ids(case, K, seed=0):
    B, h, H, W, ws, s, d, bias, order, clamp = _unpack(case)
    gh, gw = W_ref.window_grid((H, W), ws, s, clamp)
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(gh * gw, generator=g)[:K] for _ in range(B)])


def _active_ids_str(x):
    return f"K{x}" if isinstance(x, int) else _ids(x)


def naive_window_active(q, k, v, bias, H, W, ws, s, order, clamp, active):
    """The naive spec with the tokens of non-listed windows zeroed (windows located from the
    spec's frame: window id = (r' // wh) * (Wp // ww) + c' // ww of the frame position)."""
    out = naive_window(q, k, v, bias, H, W, ws, s, order, clamp)
    src, win, *_ = _naive_frame(H, W, ws, s, order, clamp)
    win_of = torch.empty(H * W, dtype=torch.long)
    win_of[src[src >= 0]] = win[src >= 0]
    keep = (win_of[None, :, None] == active[:, None, :]).any(-1)  # (B, N)
    return out * keep[:, None, :, None]


@pytest.mark.parametrize("case,K", ACTIVE_CASES, ids=_active_ids_str)
def test_reference_active_matches_naive_spec(case, K):
    B, h, H, W, ws, s, d, bias, order, clamp = _unpack(case)
    ins = _inputs(case, torch.float64, "cpu")
    act = _active_ids(case, K)
    out = _call(W_ref.window_attention, dict(_kw(case), active_windows=act))(*ins)
    expected = naive_window_active(*ins[:3], ins[3] if bias else None, H, W, ws, s, order,
                                   clamp, act)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", ["shift_then_pad", "pad_then_shift"])
@pytest.mark.parametrize("H,W,ws,s", [(14, 14, 7, 3), (9, 13, 4, 2), (12, 13, 7, 3)])
def test_window_ids_follow_swin_partition_order(H, W, ws, s, order):
    """Window k of active_windows is the k-th window of timm's / mmdet's window_partition of the
    rolled (and padded) map."""
    swin = pytest.importorskip("timm.models.swin_transformer")
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    ids = torch.arange(H * W, dtype=torch.float64).reshape(1, H, W, 1)
    pad = (0, 0, 0, Wp - W, 0, Hp - H)
    if order == "shift_then_pad":
        frame = torch.nn.functional.pad(torch.roll(ids, (-s, -s), (1, 2)), pad, value=-1.0)
    else:
        frame = torch.roll(torch.nn.functional.pad(ids, pad, value=-1.0), (-s, -s), (1, 2))
    expected = swin.window_partition(frame, (ws, ws)).reshape(-1, ws * ws).long()
    assert torch.equal(W_ref.window_token_ids((H, W), ws, s, order), expected)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("case,K", ACTIVE_CASES, ids=_active_ids_str)
def test_triton_active_windows(case, K, device, dtype):
    kw = dict(_kw(case), active_windows=_active_ids(case, K).to(device))
    run = _call(lambda *a, **k: window_attention(*a, backend="triton", **k), kw)
    ref_kw = dict(kw, active_windows=kw["active_windows"].cpu())
    check_against_reference(run, _call(W_ref.window_attention, ref_kw),
                            _inputs(case, dtype, device), dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_active_windows_out_is_left_untouched_elsewhere(backend):
    case = (2, 2, 9, 13, 4, 2, 16, "table", "pad_then_shift")
    B, h, H, W, ws, s, d, bias, order, clamp = _unpack(case)
    q, k, v, table = (t.detach() for t in _inputs(case, torch.float32, "cpu"))
    act = _active_ids(case, 5).int()
    kw = dict(_kw(case), rel_pos_bias=table, active_windows=act)
    # a strided (B, N, heads, d)-stored buffer, pre-filled with sentinels
    out = torch.full((B, H * W, h, d), 7.0).transpose(1, 2)
    before = out.clone()
    with torch.no_grad():
        res = window_attention(q, k, v, out=out, backend=backend, **kw)
    assert res is out
    keep = W_ref.active_token_mask((H, W), ws, s, act, order)[:, None, :, None].expand_as(out)
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(out[~keep], before[~keep])
    expected = W_ref.window_attention(q.double(), k.double(), v.double(),
                                      **dict(kw, rel_pos_bias=table.double()))
    assert_close(out[keep], expected[keep])
    # without out=: zeros at the dropped windows
    zero = window_attention(q, k, v, backend=backend, **kw)
    assert torch.equal(zero[~keep], torch.zeros_like(zero[~keep]))


def test_active_windows_grads_only_through_kept_windows():
    case = (1, 2, 8, 8, 4, 2, 16, "table", "shift_then_pad")
    q, k, v, table = _inputs(case, torch.float32, "cpu")
    act = torch.tensor([[2]])
    out = window_attention(q, k, v, rel_pos_bias=table, active_windows=act, backend="triton",
                           **_kw(case))
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    keep = W_ref.active_token_mask((8, 8), 4, 2, act)[0]
    assert keep.sum() == 16
    for g in (dq, dk, dv):
        assert torch.equal(g[:, :, ~keep], torch.zeros_like(g[:, :, ~keep]))
        assert g[:, :, keep].abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_out_overlapping_an_input_or_itself_is_refused(backend):
    """out= sharing memory with an input (exact aliasing included) or with itself raises: the
    kernel would overwrite what it still reads (the Triton backend used to return a wrong answer
    silently with out one token into q's storage)."""
    B, h, H, W, d = 1, 2, 4, 4, 8
    kw = dict(hw=(H, W), window_size=2, backend=backend)
    buf = _t(B, h, H * W + 1, d)
    q, k, v = buf[:, :, :-1], _t(B, h, H * W, d), _t(B, h, H * W, d)
    with torch.no_grad():
        for out, name in ((buf[:, :, 1:], "q"), (q, "q"), (v, "v")):  # shifted, exact, exact
            with pytest.raises(ValueError, match=f"out shares memory with {name}"):
                window_attention(q, k, v, out=out, **kw)
        big = _t(B * h * H * W * d)  # a bias table at the start of out's storage
        table, out = big[: 9 * h].view(9, h), big.view(B, h, H * W, d)
        with pytest.raises(ValueError, match="out shares memory with rel_pos_bias"):
            window_attention(q, k, v, rel_pos_bias=table, out=out, **kw)
        with pytest.raises(ValueError, match="out overlaps itself"):
            window_attention(q, k, v, out=_t(1, 1, 1, d).expand(B, h, H * W, d), **kw)
        # separate memory, including a disjoint slice of the same buffer, is fine
        pair = _t(2, B, h, H * W, d)
        res = window_attention(pair[0], k, v, out=pair[1], **kw)
        assert res.data_ptr() == pair[1].data_ptr()
        assert_close(res, W_ref.window_attention(pair[0].double(), k.double(), v.double(),
                                                 hw=(H, W), window_size=2))


def test_out_refuses_autograd():
    x = _t(1, 2, 16, 8).requires_grad_()
    with pytest.raises(RuntimeError, match="out= does not support automatic differentiation"):
        window_attention(x, x, x, hw=(4, 4), window_size=2, out=torch.empty(1, 2, 16, 8))


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
    (dict(shift=2), ValueError, r"shift must be an int \(or a pair\) in \[0, window_size=2\)"),
    (dict(window_size=(2,)), ValueError, "window_size must be an int >= 1 or a pair"),
    (dict(window_size=(2, 4), shift=(1, 4)), ValueError, "shift must be an int"),
    (dict(window_size=(2, 4)), ValueError, "clamp='swin' takes a square window"),
    (dict(clamp="timm"), ValueError, "clamp must be one of"),
    (dict(shift=-1), ValueError, "shift must be an int"),
    (dict(pad_order="reflect"), ValueError, "pad_order must be one of"),
    (dict(mask_value=float("nan")), ValueError, "mask_value must be a float <= 0"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(rel_pos_bias=_t(25, 2)), ValueError, r"rel_pos_bias must be the table \(9, 2\)"),
    (dict(rel_pos_bias=_t(2, 4, 5)), ValueError, r"or a dense bias \(2, 4, 4\)"),
    (dict(rel_pos_bias=[1.0]), TypeError, "rel_pos_bias must be a torch.Tensor"),
    (dict(backend="cudnn"), ValueError, "unknown backend"),
    (dict(active_windows=[0, 1]), TypeError, "active_windows must be a torch.Tensor"),
    (dict(active_windows=torch.zeros(1, 2)), TypeError, "active_windows must be an int64"),
    (dict(active_windows=torch.zeros(2, 1, dtype=torch.long)), ValueError,
     r"active_windows must have shape \(B=1, K\)"),
    (dict(active_windows=torch.arange(5)[None]), ValueError, r"has only 4 \(2x2\) windows"),
    (dict(active_windows=torch.tensor([[0, 4]])), ValueError, r"out-of-range ids \(min 0, max 4\)"),
    (dict(active_windows=torch.tensor([[-1]])), ValueError, "out-of-range ids"),
    (dict(active_windows=torch.tensor([[1, 3, 1]])), ValueError, "lists a window twice in row 0"),
    (dict(active_windows=torch.zeros(1, 1, dtype=torch.long, device="meta")), ValueError,
     "active_windows is on meta"),
    (dict(out=torch.empty(1, 2, 16, 4)), ValueError, r"out must be a \(1, 2, 16, 8\)"),
    (dict(out="buffer"), TypeError, "out must be a torch.Tensor"),
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
    assert W_ops._backend("x", "auto", q, 2) == "eager"
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
                          (q, k, v, table, None, 4, 4, 2, 2, 1, 1, 0.25, -100.0, False))
    active = torch.tensor([[3, 0]], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.vitkern.window_fwd.default,
                          (q, k, v, table, active, 4, 4, 2, 2, 1, 1, 0.25, -100.0, True))
    table13 = torch.randn(5, 2, generator=g).to(device).requires_grad_()  # a 1x3 window
    torch.library.opcheck(torch.ops.vitkern.window_fwd.default,
                          (q, k, v, table13, None, 4, 4, 1, 3, 0, 1, 0.25, -100.0, False))
    out = torch.randn(1, 2, 16, 16, generator=g).to(device)
    torch.library.opcheck(torch.ops.vitkern.window_fwd_out.default,
                          (q.detach(), k.detach(), v.detach(), table.detach(), active, out, 4, 4,
                           2, 2, 1, 1, 0.25, -100.0, True))


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


@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch rules")
def test_torch_compile_of_auto_on_cpu_traces_the_reference():
    """auto runs the eager module on CPU tensors; inside torch.compile (fullgraph) it traces the
    reference instead (the eager module plans its gathers from index values), equal within fp32
    rounding."""
    import torch._dynamo

    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 2, 36, 16) for _ in range(3))
    table = torch.randn(25, 2)

    def f(q, k, v):
        return window_attention(q, k, v, hw=(6, 6), window_size=3, shift=1, rel_pos_bias=table)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(got, f(q, k, v), rtol=1e-5, atol=1e-5)


def test_active_windows_checked_without_a_device_sync(monkeypatch):
    """active_windows values are checked for CPU tensors (and on a GPU only with
    VITKERN_DEBUG=1); with the check off, as on a GPU, the call reads no value back."""
    q, k, v = (torch.randn(2, 2, 8 * 8, 8) for _ in range(3))
    kw = dict(hw=(8, 8), window_size=4, shift=2, backend="reference")
    with pytest.raises(ValueError, match="out-of-range ids"):
        W_ops.window_attention(q, k, v, active_windows=torch.tensor([[0, 4], [1, 2]]), **kw)
    monkeypatch.setattr(W_ops, "check_values", lambda t: False)

    def no_sync(*args, **kwargs):
        raise AssertionError("a tensor value was read back to the host (a device sync)")

    for name in ("item", "tolist", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    W_ops._check_active("window_attention", torch.tensor([[0, 3], [1, 2]]), 2, (8, 8), (4, 4),
                        q.device)
