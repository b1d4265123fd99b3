"""HiLo attention: reference, Triton kernels (interpreter or GPU), ops checks, nn module parity."""
from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, KERNEL_DEVICES, assert_close, check_against_reference
from vitkern import backends, ops
from vitkern import reference as R
from vitkern.bench.litv2 import LITv2HiLo
from vitkern.nn import HiLo

# (B, heads, H, W, window_size, num_lo_heads, pad, head_dim): odd shapes on purpose.
CASES = [
    (1, 2, 1, 1, 1, 1, None, 16),       # N = 1
    (2, 3, 4, 6, 2, 1, None, 16),       # H != W
    (1, 2, 2, 2, 2, 1, None, 32),       # a single window
    (2, 3, 7, 5, 2, 2, "zero", 32),     # non-divisible, zero padding
    (1, 2, 9, 13, 4, 1, "zero", 48),    # s = 4, padding, d = 48
    (1, 3, 5, 6, 2, 1, "zero", 80),     # d = 80 (ViT-H); fp32 Lo-Fi pooling refuses it
    (1, 2, 14, 14, 2, 1, None, 32),     # LITv2 stage 3 map (N = 196)
    (1, 2, 6, 9, 3, 1, None, 24),       # s = 3: windows of 9 tokens straddle tiles
    (1, 1, 12, 12, 12, 0, None, 16),    # one 144-token window: several key tiles per window
    (1, 2, 1, 197, 1, 2, None, 32),     # s = 1: global attention over 197 tokens (ViT-like)
    (1, 2, 3, 3, 2, 2, "zero", 8),      # d = 8, Lo-Fi only, map smaller than two windows
    # per-window Hi-Fi kernels (s <= 4): several window blocks per (batch, head), a partial last
    # block, padding, several head-dim chunks
    (2, 2, 11, 13, 2, 0, "zero", 16),   # s = 2: 42 windows, the last block partial
    (2, 3, 9, 7, 3, 1, "zero", 16),     # s = 3: 9 windows (odd) in blocks of 2
    (2, 2, 12, 20, 4, 1, None, 16),     # s = 4: 15 windows in blocks of 2
    (1, 2, 5, 8, 3, 0, "zero", 128),    # s = 3, d = 128: several head-dim chunks
]


def _ids(case):
    B, h, H, W, s, nlo, pad, d = case
    return f"B{B}-h{h}-{H}x{W}-s{s}-lo{nlo}-{pad or 'nopad'}-d{d}"


def _qkv(B, h, N, d, dtype, device, n_kv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, h, N, d), (B, h, n_kv or N, d), (B, h, n_kv or N, d)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            .requires_grad_() for s in shapes]


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------


def naive_hilo(q, k, v, H, W, s, n_lo, scale):
    """The spec, written as dense masked attention over the zero-padded map (fp64, small N)."""
    B, h, N, d = q.shape
    Hp, Wp = -(-H // s) * s, -(-W // s) * s

    def padded(t):  # (B, h, N, d) -> (B, h, Hp*Wp, d), zeros at pad tokens
        out = t.new_zeros(B, h, Hp, Wp, d)
        out[:, :, :H, :W] = t.reshape(B, h, H, W, d)
        return out.reshape(B, h, Hp * Wp, d)

    rows = torch.arange(Hp).repeat_interleave(Wp)
    cols = torch.arange(Wp).repeat(Hp)
    window = (rows // s) * (Wp // s) + cols // s
    real = (rows < H) & (cols < W)
    qp, kp, vp = padded(q), padded(k), padded(v)
    n_hi = h - n_lo
    # Hi-Fi: every padded token attends to the tokens of its own window (pad tokens included).
    scores = (qp @ kp.transpose(-1, -2)) * scale
    same = window[:, None] == window[None, :]
    hi = torch.softmax(scores.masked_fill(~same, float("-inf")), -1) @ vp
    # Lo-Fi: pooled key j is the mean of the s*s tokens of window j (divisor s*s).
    n_win = (Hp // s) * (Wp // s)
    pool = (window[None, :] == torch.arange(n_win)[:, None]).to(q.dtype) / (s * s)
    lo = torch.softmax((qp @ (pool @ kp).transpose(-1, -2)) * scale, -1) @ (pool @ vp)
    out = torch.cat([hi[:, :n_hi], lo[:, n_hi:]], dim=1)
    return out[:, :, real]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_naive_spec(case):
    B, h, H, W, s, nlo, pad, d = case
    q, k, v = _qkv(B, h, H * W, d, torch.float64, "cpu")
    out = R.hilo_attention(q, k, v, hw=(H, W), window_size=s, num_lo_heads=nlo, pad=pad)
    expected = naive_hilo(q, k, v, H, W, s, nlo, d ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [(1, 3, 4, 6, 2, 1, None, 4), (1, 3, 3, 5, 2, 2, "zero", 4),
                                  (1, 2, 5, 6, 4, 1, "zero", 4), (1, 2, 6, 3, 3, 1, None, 4)],
                         ids=_ids)
def test_reference_gradcheck(case):
    B, h, H, W, s, nlo, pad, d = case
    q, k, v = _qkv(B, h, H * W, d, torch.float64, "cpu")
    fn = lambda q, k, v: R.hilo_attention(q, k, v, hw=(H, W), window_size=s,  # noqa: E731
                                          num_lo_heads=nlo, pad=pad)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_reference_lofi_pooled_kv_equals_pooling():
    q, k, v = _qkv(2, 2, 5 * 7, 16, torch.float64, "cpu")
    kp = R.hilo.pool_kv(k, hw=(5, 7), window_size=2)
    vp = R.hilo.pool_kv(v, hw=(5, 7), window_size=2)
    a = R.lofi_attention(q, k, v, hw=(5, 7), window_size=2, pad="zero")
    b = R.lofi_attention(q, kp, vp, hw=(5, 7), window_size=2, pad="zero", kv_pooled=True)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Triton kernels against the reference, forward and every gradient
# --------------------------------------------------------------------------------------------


def _skip_if_refused(select, q):
    """Skip (visibly) where the backend refuses by design: outside the declared capability for that shape."""
    try:
        select(q)
    except backends.BackendError as exc:
        assert "outside the declared capability of triton" in str(exc), exc
        pytest.skip(str(exc).splitlines()[2].strip())


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_hilo(case, device, dtype):
    B, h, H, W, s, nlo, pad, d = case
    if s > 8 and nlo:
        pytest.skip("in-kernel pooling is limited to s <= 8")
    kw = dict(hw=(H, W), window_size=s, num_lo_heads=nlo, pad=pad)
    _skip_if_refused(lambda q: ops.hilo._backend("t", "triton", q, s, nlo, False),
                     torch.empty(B, h, H * W, d, dtype=dtype, device=device))
    check_against_reference(
        lambda q, k, v: ops.hilo_attention(q, k, v, backend="triton", **kw),
        lambda q, k, v: R.hilo_attention(q, k, v, **kw),
        _qkv(B, h, H * W, d, dtype, device), dtype)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("hw,s,pad", [((6, 10), 2, None), ((7, 5), 2, "zero"), ((5, 5), 4, "zero")])
def test_triton_lofi_pooled_kv(hw, s, pad, device, dtype):
    H, W = hw
    m = -(-H // s) * -(-W // s)
    kw = dict(hw=hw, window_size=s, pad=pad, kv_pooled=True)
    check_against_reference(
        lambda q, k, v: ops.lofi_attention(q, k, v, backend="triton", **kw),
        lambda q, k, v: R.lofi_attention(q, k, v, **kw),
        _qkv(2, 2, H * W, 32, dtype, device, n_kv=m), dtype)


@pytest.mark.parametrize("device,dtype", KERNEL_DEVICES[:1], ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("H,W,s", [(6, 4, 2), (6, 9, 3), (5, 5, 5)])
def test_triton_reads_strided_projection_views(device, dtype, H, W, s):
    """q, k, v as permuted views of one packed (B, N, 3, heads, d) projection: no copies needed."""
    B, h, d = 2, 2, 16
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, H * W, 3 * h * d, generator=g).to(device, dtype)
    q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = ops.hifi_attention(q, k, v, hw=(H, W), window_size=s, backend="triton")
    ref = R.hifi_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), hw=(H, W),
                           window_size=s)
    assert_close(out.cpu(), ref)
    # the output folds back into channels as a view
    assert out.transpose(1, 2).reshape(B, H * W, h * d).data_ptr() == out.data_ptr()
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("s,small", [(2, True), (3, True), (4, True), (5, False)])
def test_small_windows_run_the_per_window_kernels(monkeypatch, s, small):
    """Hi-Fi windows of s <= 4 run one forward and one backward per-window kernel; larger
    windows the packed tile kernels, dQ first (it stores the deltas dK/dV reads: no delta
    pre-pass)."""
    from vitkern.triton_kernels import hilo as tk

    launched = []
    for name in ("hifi_small_fwd", "hifi_small_bwd", "hilo_fwd", "hilo_bwd_dkdv", "hilo_bwd_dq"):
        launcher = getattr(tk, name)

        def spy(*a, _name=name, _fn=launcher.launch, **kw):
            launched.append(_name)
            return _fn(*a, **kw)
        monkeypatch.setattr(launcher, "launch", spy)
    q, k, v = _qkv(1, 1, s * s, 16, torch.float32, KERNEL_DEVICES[0][0])
    ops.hifi_attention(q, k, v, hw=(s, s), window_size=s, backend="triton").sum().backward()
    assert launched == (["hifi_small_fwd", "hifi_small_bwd"] if small else
                        ["hilo_fwd", "hilo_bwd_dq", "hilo_bwd_dkdv"])


def test_triton_zero_stride_batch():
    """An expanded (stride-0) batch is read through its strides, no copy needed."""
    q = torch.randn(1, 1, 4, 16, device=KERNEL_DEVICES[0][0]).expand(3, 1, 4, 16)
    out = ops.hifi_attention(q, q, q, hw=(2, 2), window_size=2, backend="triton")
    q64 = q.double().cpu()
    assert_close(out.cpu(), R.hifi_attention(q64, q64, q64, hw=(2, 2), window_size=2))


# --------------------------------------------------------------------------------------------
# checks and dispatch
# --------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=_t(2, 16, 4)), ValueError, "q must be 4-D"),
    (dict(k=_t(1, 2, 15, 8)), ValueError, "k must have shape"),
    (dict(v=_t(1, 2, 16, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(q=torch.ones(1, 2, 16, 8, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(hw=(4, 5)), ValueError, "N=16 tokens but hw"),
    (dict(hw=(4,)), ValueError, "hw must be a pair"),
    (dict(window_size=0), ValueError, "window_size must be an int"),
    (dict(window_size=3), ValueError, "not divisible by window_size=3"),
    (dict(num_lo_heads=3), ValueError, r"num_lo_heads must be an int in \[0, 2\]"),
    (dict(num_lo_heads=-1), ValueError, "num_lo_heads"),
    (dict(pad="reflect"), ValueError, "pad must be None or 'zero'"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(backend="cudnn"), ValueError, "unknown backend"),
    (dict(q="nope"), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.empty(1, 2, 16, 8, device="meta")), ValueError, "must be on one device"),
])
def test_bad_inputs_raise_clear_errors(kwargs, exc, match):
    args = dict(q=_t(1, 2, 16, 8), k=_t(1, 2, 16, 8), v=_t(1, 2, 16, 8), hw=(4, 4),
                window_size=2, num_lo_heads=1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.hilo_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_pooled_kv_shape_is_checked():
    q = _t(1, 2, 35, 8)
    with pytest.raises(ValueError, match="3x4 pooled map"):
        ops.lofi_attention(q, _t(1, 2, 35, 8), _t(1, 2, 35, 8), hw=(5, 7), window_size=2,
                           pad="zero", kv_pooled=True)


@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch rules")
def test_dispatch_on_cpu():
    q = _t(1, 2, 16, 8)
    # auto on CPU tensors is the reference, even with the interpreter on
    assert ops.hilo._backend("x", "auto", q, 2, 1, False) == "reference"
    assert ops.hilo._backend("x", "triton", q, 2, 1, False) == "triton"
    # a refused explicit backend lists every backend and why
    with pytest.raises(backends.BackendError) as info:
        ops.hilo_attention(q.double(), q.double(), q.double(), hw=(4, 4), window_size=2,
                           num_lo_heads=1, backend="triton")
    msg = str(info.value)
    assert "dtype torch.float64 not supported by triton" in msg
    assert "cuda:" in msg and "reference:" in msg
    with pytest.raises(backends.BackendError, match="head_dim 12 not supported by triton"):
        x = _t(1, 2, 16, 12)
        ops.hilo_attention(x, x, x, hw=(4, 4), window_size=2, num_lo_heads=1, backend="triton")
    # beyond the declared capability (independent of any tile list) the backend says so
    x = _t(1, 2, 16, 256)
    with pytest.raises(backends.BackendError, match="float32 head_dim 256 is outside the declared "
                                                    "capability of triton HiLo in window mode"):
        ops.hifi_attention(x, x, x, hw=(4, 4), window_size=2, backend="triton")
    x = _t(1, 2, 16, 256, dtype=torch.float16)
    with pytest.raises(backends.BackendError, match=r"in pool mode \(up to 128: larger tiles spill "
                                                    r"registers\); pool k, v first"):
        ops.lofi_attention(x, x, x, hw=(4, 4), window_size=2, backend="triton")
    assert ops.hilo._backend("x", "triton", x, 2, 2, True) == "triton"  # pre-pooled k, v: fine


def test_env_var_forces_backend(monkeypatch):
    q = _t(1, 2, 16, 8)
    monkeypatch.setenv("VITKERN_BACKEND", "reference")
    assert ops.hilo._backend("x", "auto", q, 2, 1, False) == "reference"
    monkeypatch.setenv("VITKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        ops.hilo_attention(q, q, q, hw=(4, 4), window_size=2, num_lo_heads=1)


def test_empty_batch():
    q = _t(0, 2, 16, 8)
    assert ops.hilo_attention(q, q, q, hw=(4, 4), window_size=2, num_lo_heads=1).shape == q.shape


# --------------------------------------------------------------------------------------------
# nn.HiLo against LITv2's module (written from the spec in vitkern.bench.litv2)
# --------------------------------------------------------------------------------------------

MODULE_CASES = [
    # dim, heads, alpha, ws, qkv_bias, H, W, pad
    (64, 4, 0.5, 2, True, 4, 6, None),
    (96, 12, 0.9, 2, True, 6, 6, None),     # LITv2-S split (10 Lo-Fi + 2 Hi-Fi), d = 8
    (64, 4, 0.5, 2, True, 5, 7, "zero"),    # detection padding with qkv bias
    (64, 4, 0.5, 4, False, 6, 9, "zero"),
    (64, 4, 0.9, 1, True, 3, 5, None),      # ws = 1: plain MHSA
    (64, 4, 0.0, 2, True, 4, 4, None),      # no Lo-Fi heads
    (64, 4, 1.0, 2, True, 4, 4, None),      # no Hi-Fi heads
]


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_module_matches_litv2(case, backend):
    dim, heads, alpha, ws, bias, H, W, pad = case
    litv2 = LITv2HiLo(dim, heads, qkv_bias=bias, window_size=ws, alpha=alpha,
                      pad=pad is not None).double()
    _randomize(litv2)
    ours = HiLo(dim, heads, qkv_bias=bias, window_size=ws, alpha=alpha, pad=pad,
                backend=backend).double()
    ours.load_state_dict(litv2.state_dict(), strict=True)
    litv2.load_state_dict(ours.state_dict(), strict=True)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = "cuda" if backend == "triton" and HAS_CUDA else "cpu"
    ours = ours.to(device, dtype)
    x = torch.randn(2, H * W, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_ours = x.to(device, dtype).detach().clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out, ref = ours(x_ours, H, W), litv2(x_ref, H, W)
    assert_close(out.cpu(), ref, name="out")
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (out * grad.to(device, dtype)).sum().backward()
    (ref * grad).sum().backward()
    assert_close(x_ours.grad.cpu(), x_ref.grad, name="dx")
    ref_params = dict(litv2.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad.cpu(), ref_params[name].grad, name=f"d{name}")
    assert ours.flops(H, W) == litv2.flops(H, W)


def test_module_flops_reference_values():
    assert HiLo(384, 12, window_size=2, alpha=0.5).flops(14, 14) == 83_467_776
    assert HiLo(384, 12, window_size=2, alpha=0.9).flops(14, 14) == 77_697_536
    assert HiLo(768, 12, window_size=2, alpha=0.9).flops(14, 14) == 298_296_320


def test_module_head_split_and_errors():
    m = HiLo(384, 12, qkv_bias=True, window_size=2, alpha=0.9)
    assert (m.h_heads, m.l_heads) == (2, 10)
    assert sorted(m.state_dict()) == sorted(
        ["h_qkv.weight", "h_qkv.bias", "h_proj.weight", "h_proj.bias", "l_q.weight", "l_q.bias",
         "l_kv.weight", "l_kv.bias", "l_proj.weight", "l_proj.bias"])
    with pytest.raises(ValueError, match="divisible by num_heads"):
        HiLo(100, 12)
    with pytest.raises(ValueError, match="not divisible by window_size=2"):
        m(torch.randn(1, 15, 384), 3, 5)
    with pytest.raises(ValueError, match="N=15 tokens but H\\*W=16"):
        m(torch.randn(1, 15, 384), 4, 4)


# --------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nlo,kv_pooled", [(1, False), (2, True)])
def test_opcheck(nlo, kv_pooled):
    device = "cuda" if HAS_CUDA else "cpu"
    H, W, s = 4, 6, 2
    n_kv = 6 if kv_pooled else 24
    q, k, v = _qkv(1, 2, H * W, 16, torch.float32, device, n_kv=n_kv)
    torch.library.opcheck(torch.ops.vitkern.hilo_fwd.default,
                          (q, k, v, H, W, s, nlo, 16 ** -0.5, kv_pooled))


def test_torch_compile_fullgraph_no_recompile():
    import torch._dynamo

    device = "cuda" if HAS_CUDA else "cpu"
    torch._dynamo.reset()
    block = HiLo(64, 4, qkv_bias=True, window_size=2, alpha=0.5, backend="triton").to(device)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if not HAS_CUDA else "inductor")
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        for seed in range(2):
            x = torch.randn(2, 24, 64, device=device, generator=None).requires_grad_()
            out = compiled(x, 4, 6)
            out.sum().backward()
            torch.testing.assert_close(out, block(x, 4, 6), rtol=1e-5, atol=1e-5)
