"""CUDA C++ HiLo Hi-Fi kernels (csrc/hilo/): proven on the CPU, run for real on a GPU.

CPU tier (always, needs only a host C++ compiler): ``tests/csrc/hilo_host.cpp`` compiles the
kernels' per-thread program (``csrc/hilo/hifi_core.h``: argument checks, launch geometry, window /
lane index math, zero padding, 16-byte vector vs strided access, fp32 softmax and its gradient,
fp16 / bf16 conversions) with g++ into a shared library, loaded here with ctypes, which executes
whole launches block by block on CPU tensors. Forward and every gradient are compared with
``vitkern.reference`` in fp32, fp16 *and* bf16 (no interpreter involved: the conversions are
the kernels' own). Only the GPU glue of hifi.cu (barriers, warp shuffles, the launch) is not run.

The Lo-Fi forward kernel (``csrc/hilo/lofi_core.h``: in-kernel s×s pooling, key chunks, online
softmax) is run the same way. The op layer (custom ops, fake kernels, autograd, dispatch reasons)
runs on the CPU with vitkern._C's launch replaced by the CPU build.

Alignment: the CPU build checks every 16-byte vector access and shared-memory region of the
per-thread code (``csrc/common/numeric.h``) and returns ``STATUS["misaligned"]`` where a GPU
would fault with cudaErrorMisalignedAddress; a second build with issue 13's unrounded Hi-Fi
window size planted (``VK_TEST_HIFI_WINDOW_ALIGN=1``) proves that the checks catch it.

GPU tier (skipped without a CUDA device and a built ``vitkern._C``): the real kernels through
``ops.*(..., backend="cuda")``, forward and Hi-Fi gradients, fp32 / fp16 / bf16.
"""
from __future__ import annotations

import ctypes
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA, assert_close, check_against_reference
from vitkern import reference as R

sys.path.insert(0, str(Path(__file__).resolve().parent / "csrc"))
from host_twin import DTYPE_CODE, STATUS, VkTensor, build, desc, patch_cext  # noqa: E402
from host_twin import call as _call  # noqa: E402


# ---------------------------------------------------------------------------------------------
# the CPU build
# ---------------------------------------------------------------------------------------------
def _load_hilo_host(tmp_path_factory, defines=()):
    so = build(tmp_path_factory, "hilo_host.cpp", defines)
    P = ctypes.POINTER(VkTensor)
    i64, f32, buf, n = ctypes.c_int64, ctypes.c_float, ctypes.c_char_p, ctypes.c_size_t
    so.vk_host_hifi_fwd.argtypes = [P, P, P, P, i64, i64, i64, f32, buf, n]
    so.vk_host_hifi_bwd.argtypes = [P, P, P, P, P, P, P, i64, i64, i64, f32, buf, n]
    so.vk_host_hifi_geometry.argtypes = [P, P, P, P, i64, i64, i64, ctypes.c_int32,
                                         ctypes.POINTER(i64), buf, n]
    so.vk_host_hifi_supported.argtypes = [ctypes.c_int32, i64, i64, ctypes.c_int32, buf, n]
    for name in ("vk_host_to_half", "vk_host_to_bf16", "vk_host_from_half", "vk_host_from_bf16"):
        getattr(so, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64]
        getattr(so, name).restype = None
    so.vk_host_lofi_fwd.argtypes = [P, P, P, P, i64, i64, i64, ctypes.c_int32, f32, buf, n]
    so.vk_host_lofi_supported.argtypes = [ctypes.c_int32, i64, i64, buf, n]
    so.vk_host_lofi_geometry.argtypes = [P, P, P, P, i64, i64, i64, ctypes.c_int32,
                                         ctypes.POINTER(i64), buf, n]
    so.vk_host_fastdiv.argtypes = [ctypes.c_uint32, ctypes.c_uint32]
    so.vk_host_fastdiv.restype = ctypes.c_uint32
    so.vk_host_vector_probe.argtypes = [ctypes.c_int32, i64, buf, n]
    return so


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return _load_hilo_host(tmp_path_factory)


@pytest.fixture(scope="module")
def host_unrounded(tmp_path_factory):
    """The CPU build with issue 13's bug planted: Hi-Fi windows sized without rounding up to
    16 bytes (VK_TEST_HIFI_WINDOW_ALIGN=1, csrc/hilo/hifi_core.h)."""
    return _load_hilo_host(tmp_path_factory, ["VK_TEST_HIFI_WINDOW_ALIGN=1"])


def host_fwd(so, q, k, v, hw, s, scale=None, o=None):
    B, h, N, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    if o is None:  # the op's layout: (B, N, heads, d) storage, NaN where nothing was written
        o = torch.full((B, N, h, d), float("nan"), dtype=q.dtype).transpose(1, 2)
    st, why = _call(so.vk_host_hifi_fwd, desc(q), desc(k), desc(v), desc(o), hw[0], hw[1], s, scale)
    assert st == 0, why
    return o


def host_bwd(so, do, q, k, v, hw, s, scale=None):
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    grads = [torch.full(t.shape, float("nan"), dtype=t.dtype) for t in (q, k, v)]
    st, why = _call(so.vk_host_hifi_bwd, desc(q), desc(k), desc(v), desc(do), *map(desc, grads),
                    hw[0], hw[1], s, scale)
    assert st == 0, why
    return grads


def geometry(so, q, hw, s, backward=False, tensors=None):
    out = (ctypes.c_int64 * 8)()
    q, k, v, o = tensors or (q, q, q, q)
    st, why = _call(so.vk_host_hifi_geometry, desc(q), desc(k), desc(v), desc(o), hw[0], hw[1], s,
                    int(backward), out)
    assert st == 0, why
    keys = ("lanes", "nv", "win_threads", "wpb", "block_threads", "smem", "grid", "vec_mask")
    return dict(zip(keys, list(out)))


class HostHifi(torch.autograd.Function):
    """The CPU build as an autograd function, so ``check_against_reference`` drives it."""

    @staticmethod
    def forward(ctx, q, k, v, so, hw, s, scale):
        ctx.save_for_backward(q, k, v)
        ctx.args = (so, hw, s, scale)
        return host_fwd(so, q, k, v, hw, s, scale)

    @staticmethod
    def backward(ctx, do):
        so, hw, s, scale = ctx.args
        q, k, v = ctx.saved_tensors
        return (*host_bwd(so, do, q, k, v, hw, s, scale), None, None, None, None)


def _qkv(B, h, N, d, dtype, seed=0, n_kv=None):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for shape in ((B, h, N, d), (B, h, n_kv or N, d), (B, h, n_kv or N, d))]


# (B, heads, H, W, s, pad, d): odd on purpose -- non-divisible maps, single windows, s = 1 and 3
# (the runtime-s kernels), d that gives 1, 2, 4, 8 lanes and 1, 3, 5 vectors per lane.
CASES = [
    (2, 3, 4, 6, 2, None, 32),       # LITv2 s = 2, d = 32: 4 lanes x 1 vector (fp16)
    (1, 2, 7, 5, 2, "zero", 16),     # zero padding, both borders
    (1, 1, 2, 2, 2, None, 8),        # a single window, d = 8 (1 lane)
    (1, 2, 9, 13, 4, "zero", 48),    # s = 4 with padding, d = 48 (2 lanes x 3 vectors in fp16)
    (2, 1, 8, 8, 4, None, 64),       # s = 4, 8 lanes
    (1, 2, 6, 9, 3, None, 24),       # s = 3 (runtime s), d = 24 (3 vectors, 1 lane in fp16)
    (1, 2, 5, 4, 3, "zero", 80),     # s = 3 with padding, d = 80 (5 vectors)
    (1, 2, 3, 5, 1, None, 16),       # s = 1: o = v
    (3, 2, 14, 14, 2, None, 32),     # LITv2 stage 3 map, several blocks
    (1, 1, 5, 7, 4, "zero", 128),    # d = 128: 8 lanes x 2 vectors; a map smaller than 2x2 windows
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ids(c):
    B, h, H, W, s, pad, d = c
    return f"B{B}-h{h}-{H}x{W}-s{s}-{pad or 'nopad'}-d{d}"


def _dt(x):
    return str(x).split(".")[-1]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_host_build_matches_reference(host, case, dtype):
    """Forward and dq, dk, dv of the kernels' program vs the fp64 reference (flash-attn rule)."""
    B, h, H, W, s, pad, d = case
    kw = dict(hw=(H, W), window_size=s, pad=pad)
    check_against_reference(
        lambda q, k, v: HostHifi.apply(q, k, v, host, (H, W), s, d ** -0.5),
        lambda q, k, v: R.hifi_attention(q, k, v, **kw),
        _qkv(B, h, H * W, d, dtype), dtype)


def host_lofi(so, q, k, v, hw, s, kv_pooled=False, scale=None):
    B, h, N, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    o = torch.full((B, N, h, d), float("nan"), dtype=q.dtype).transpose(1, 2)
    st, why = _call(so.vk_host_lofi_fwd, desc(q), desc(k), desc(v), desc(o), hw[0], hw[1], s,
                    int(kv_pooled), scale)
    assert st == 0, why
    return o


# (B, heads, H, W, s, pad, d, kv_pooled): several key chunks of 32 (last one partial), query
# tiles of 256 / L queries (several per map), border pooled keys of zero-padded maps; head dims
# that are not 16 times a power of two (48, 80, 96: lanes rounded up to 4, 8, 8 with idle padding
# lanes and zero-padded shared-memory rows; 48 in fp32 is 12 vectors in a 16-vector padded row).
LOFI_CASES = [
    (2, 2, 4, 6, 2, None, 32, False),
    (1, 3, 7, 5, 2, "zero", 16, False),
    (1, 2, 9, 13, 4, "zero", 64, False),
    (1, 1, 14, 14, 1, None, 32, False),     # s = 1: global attention, 196 keys = 7 chunks
    (1, 2, 20, 18, 2, None, 128, False),    # 90 pooled keys, 8 lanes, 32-query tiles
    (1, 1, 17, 23, 2, "zero", 16, False),   # 108 pooled keys, padded border
    (1, 2, 8, 7, 3, "zero", 32, False),     # s = 3
    (2, 2, 7, 5, 2, "zero", 32, True),      # pre-pooled k, v
    (2, 2, 9, 7, 2, "zero", 48, False),     # 4 lanes, 1 idle; 63 queries in 64-query tiles
    (1, 1, 11, 13, 3, "zero", 80, False),   # 8 lanes, 3 idle; s = 3, 143 queries = 5 tiles
    (1, 2, 15, 9, 2, "zero", 96, False),    # 8 lanes, 2 idle; 40 pooled keys = 2 chunks
    (1, 1, 13, 19, 2, "zero", 112, False),  # 8 lanes, 1 idle; 70 pooled keys = 3 chunks
    (2, 1, 7, 9, 2, "zero", 80, True),      # pre-pooled k, v, d = 80
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("case", LOFI_CASES, ids=lambda c: _ids(c[:7]) + ("-pooled" if c[7] else ""))
def test_host_build_lofi_matches_reference(host, case, dtype):
    B, h, H, W, s, pad, d, kv_pooled = case
    m = -(-H // s) * -(-W // s)
    q, k, v = (t.detach() for t in _qkv(B, h, H * W, d, dtype, n_kv=m if kv_pooled else None))
    kw = dict(hw=(H, W), window_size=s, pad=pad, kv_pooled=kv_pooled)
    out = host_lofi(host, q, k, v, (H, W), s, kv_pooled)
    ref = R.lofi_attention(q.double(), k.double(), v.double(), **kw)
    lowp = R.lofi_attention(q, k, v, **kw) if dtype != torch.float32 else None
    assert_close(out, ref, lowp)


def test_host_build_lofi_strided_and_errors(host):
    B, H, W, h, d, s = 2, 6, 10, 2, 32, 2
    q, k, v = _packed_views(B, H * W, h, d, torch.float16)
    kk = k[..., :d]  # fine: same view
    buf = torch.randn(q.numel() + 1).half()
    v2 = buf[1:].view(q.shape)  # misaligned: element-wise path
    for vv in (v, v2):
        out = host_lofi(host, q, kk, vv, (H, W), s)
        kw = dict(hw=(H, W), window_size=s)
        assert_close(out, R.lofi_attention(q.double(), kk.double(), vv.double(), **kw),
                     R.lofi_attention(q, kk, vv, **kw))
    o = torch.empty(q.shape, dtype=q.dtype)
    st, why = _call(host.vk_host_lofi_fwd, desc(q), desc(k), desc(v), desc(o), H, W, s, 1, 0.2)
    assert st == STATUS["invalid"] and "pooled map" in why  # k is not the pooled map
    for bad in (40, 8, 0, 136, 144, 256):  # not a multiple of 16, or above 128
        st, why = _call(host.vk_host_lofi_supported, 1, bad, 2)
        assert st == STATUS["shape"] and f"head_dim {bad} not supported" in why, (bad, why)
        assert "multiple of 16 up to 128" in why
    for good in range(16, 129, 16):
        assert _call(host.vk_host_lofi_supported, 0, good, 2)[0] == 0, good
    q40 = torch.zeros(1, 1, 4, 40)
    st, why = _call(host.vk_host_lofi_fwd, *(desc(q40) for _ in range(4)), 2, 2, 2, 0, 0.2)
    assert st == STATUS["shape"] and "head_dim 40" in why  # make_params refuses it too
    st, why = _call(host.vk_host_lofi_supported, 1, 32, 9)
    assert st == STATUS["shape"] and "kv_pooled=True" in why
    assert _call(host.vk_host_lofi_supported, 2, 128, 8)[0] == 0


def lofi_geometry(so, q, k, v, o, hw, s, kv_pooled=False):
    out = (ctypes.c_int64 * 8)()
    st, why = _call(so.vk_host_lofi_geometry, desc(q), desc(k), desc(v), desc(o), hw[0], hw[1], s,
                    int(kv_pooled), out)
    assert st == 0, why
    keys = ("lanes", "dp", "qt", "block_threads", "smem", "grid", "items", "vec_mask")
    return dict(zip(keys, list(out)))


def _padded_dim(d):
    """The kernel's padded row width: 16 · (the power of two >= d / 16)."""
    lanes = 1
    while 16 * lanes < d:
        lanes *= 2
    return 16 * lanes


def _guarded(shape, d, dtype, gen, channel_stride=1):
    """A (…, d) view whose row continues with NaN up to (and past) the padded width: a read of
    any channel >= d spreads NaN into the output."""
    dp = _padded_dim(d)
    wide = torch.full((*shape, channel_stride * dp + 16), float("nan"), dtype=dtype)
    view = wide[..., : channel_stride * d : channel_stride]
    view.copy_(torch.randn((*shape, d), generator=gen).to(dtype))
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("d", [16, 32, 48, 64, 80, 96, 112, 128])
def test_host_build_lofi_geometry(host, d, dtype):
    """lanes = the power of two >= d / 16, padded rows of dp = 16 · lanes in shared memory."""
    B, h, H, W, s = 2, 3, 7, 9, 2
    q = torch.empty(B, h, H * W, d, dtype=dtype)
    g = lofi_geometry(host, q, q, q, q, (H, W), s)
    lanes = _padded_dim(d) // 16
    vec = 16 // q.element_size()
    assert (g["lanes"], g["dp"], g["block_threads"]) == (lanes, 16 * lanes, 256)
    assert g["qt"] == 256 // lanes and g["grid"] == B * h * math.ceil(H * W / g["qt"])
    assert g["smem"] == 2 * 32 * g["dp"] * 4  # fp32 K and V rows of 32 pooled keys
    assert g["items"] == 32 * g["dp"] // vec  # (key, vector) items of the padded rows
    assert g["vec_mask"] & 0b1111 == 0b1111


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("d", [48, 80, 96])
def test_host_build_lofi_padded_lanes_strided(host, d, dtype):
    """Head dims with idle padding lanes on every access path: NaN right after channel d in
    memory (a read past d, vectorised or element-wise, would show), a packed projection view,
    channel stride 2, a misaligned view, a stride-0 batch, pooled and pre-pooled k, v; the
    output is a view into a wider buffer whose channels >= d must stay untouched."""
    B, h, H, W, s = 2, 2, 7, 9, 2
    N, m = H * W, -(-H // s) * -(-W // s)
    g = torch.Generator().manual_seed(d)
    dp = _padded_dim(d)
    q = _guarded((B, h, N), d, dtype, g)
    k = _guarded((B, h, N), d, dtype, g)
    k2 = _guarded((B, h, N), d, dtype, g, channel_stride=2)       # element-wise path
    v = _guarded((B, h, N), d, dtype, g)
    buf = torch.randn(B * h * N * d + 1, generator=g).to(dtype)
    v2 = buf[1:].view(B, h, N, d)                                  # misaligned: element-wise
    qp, kp, vp = _packed_views(B, N, h, d, dtype)                  # 16-byte vectors
    kpool, vpool = (_guarded((B, h, m), d, dtype, g) for _ in range(2))
    qe, ke, ve = (t[:1].expand(B, -1, -1, -1) for t in (q, k, v))  # stride-0 batch

    def run(q, k, v, kv_pooled=False):
        o_wide = torch.full((B, N, h, dp + 8), 7.0, dtype=dtype)
        o_wide[..., :d] = float("nan")
        o = o_wide[..., :d].transpose(1, 2)
        st, why = _call(host.vk_host_lofi_fwd, desc(q), desc(k), desc(v), desc(o), H, W, s,
                        int(kv_pooled), d ** -0.5)
        assert st == 0, why
        assert (o_wide[..., d:] == 7.0).all(), "a store past channel d"
        kw = dict(hw=(H, W), window_size=s, pad="zero", kv_pooled=kv_pooled)
        ref = R.lofi_attention(q.double(), k.double(), v.double(), **kw)
        lowp = R.lofi_attention(q, k, v, **kw) if dtype != torch.float32 else None
        assert_close(o, ref, lowp)
        return o

    geo = lofi_geometry(host, q, k, v, q, (H, W), s)
    assert geo["vec_mask"] & 0b111 == 0b111 and geo["dp"] == dp
    geo = lofi_geometry(host, qp, k2, v2, qp, (H, W), s)
    assert geo["vec_mask"] & 0b111 == 0b001  # k2, v2 element-wise
    run(q, k, v)
    run(q, k2, v2)
    run(qp, kp, vp)
    run(qp, k2, vp)
    run(qe, ke, ve)
    run(q, kpool, vpool, kv_pooled=True)


def test_host_build_custom_scale_and_large_logits(host):
    """A negative scale (max must be taken after scaling) and logits ~1e3 (max subtraction)."""
    q, k, v = (t.detach() for t in _qkv(1, 2, 24, 16, torch.float32, seed=5))
    for scale in (-0.7, 40.0):
        out = host_fwd(host, q, k, v, (4, 6), 2, scale)
        ref = R.hifi_attention(q.double(), k.double(), v.double(), hw=(4, 6), window_size=2,
                               scale=scale)
        assert_close(out, ref)


def _packed_views(B, N, h, d, dtype, seed=3):
    """q, k, v as permuted views of one (B, N, 3·h·d) projection output, like HiLo's h_qkv."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3 * h * d, generator=g).to(dtype)
    return qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_host_build_strided_layouts(host, dtype):
    """Both access paths: 16-byte vectors on the packed projection view; element-wise on a
    channel-strided view and on a misaligned one; a stride-0 (expanded) batch."""
    B, H, W, h, d, s = 2, 6, 4, 3, 32, 2
    N = H * W
    q, k, v = _packed_views(B, N, h, d, dtype)
    assert not q.is_contiguous()
    geo = geometry(host, q, (H, W), s, tensors=(q, k, v, q))
    assert geo["vec_mask"] & 0b1111 == 0b1111  # q, k, v, o all vectorised
    # channel stride 2 (every other channel of a wider tensor)
    g = torch.Generator().manual_seed(4)
    k2 = torch.randn(B, h, N, 2 * d, generator=g).to(dtype)[..., ::2]
    # misaligned base pointer: one element into a buffer
    buf = torch.randn(B * h * N * d + 1, generator=g).to(dtype)
    v2 = buf[1:].view(B, h, N, d)
    geo = geometry(host, q, (H, W), s, tensors=(q, k2, v2, q))
    assert geo["vec_mask"] & 0b111 == 0b001  # q vectorised, k and v element-wise
    for kk, vv in ((k, v), (k2, v2)):
        out = host_fwd(host, q, kk, vv, (H, W), s)
        ref = R.hifi_attention(*(t.double() for t in (q, kk, vv)), hw=(H, W), window_size=s)
        lowp = R.hifi_attention(q, kk, vv, hw=(H, W), window_size=s) if dtype != torch.float32 else None
        assert_close(out, ref, lowp)
        assert out.transpose(1, 2).is_contiguous()
    # expanded batch: stride 0
    qe = q[:1].expand(3, -1, -1, -1)
    out = host_fwd(host, qe, qe, qe, (H, W), s)
    q64 = qe.double()
    lowp = R.hifi_attention(qe, qe, qe, hw=(H, W), window_size=s) if dtype != torch.float32 else None
    assert_close(out, R.hifi_attention(q64, q64, q64, hw=(H, W), window_size=s), lowp)
    # gradients into a strided input's layout work the same (outputs are fresh tensors)
    do = torch.randn(B, h, N, d, generator=g).to(dtype)
    dq, dk, dv = host_bwd(host, do, q, k2, v2, (H, W), s)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k2, v2))
    ref = R.hifi_attention(qr, kr, vr, hw=(H, W), window_size=s)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), do.double())
    if dtype == torch.float32:
        for got, want in zip((dq, dk, dv), ref_grads):
            assert_close(got, want)
    else:
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k2, v2))
        lowp = torch.autograd.grad(R.hifi_attention(ql, kl, vl, hw=(H, W), window_size=s),
                                   (ql, kl, vl), do)
        for got, want, lp in zip((dq, dk, dv), ref_grads, lowp):
            assert_close(got, want, lp)


def test_host_build_geometry(host):
    """The launch plan the kernels' comments promise: many windows per ~256-thread block."""
    q = torch.empty(2, 3, 14 * 14, 32, dtype=torch.float16)
    g = geometry(host, q, (14, 14), 2)
    assert (g["lanes"], g["nv"], g["win_threads"], g["wpb"], g["block_threads"]) == (4, 1, 16, 16, 256)
    assert g["grid"] == math.ceil(2 * 3 * 49 / 16)
    assert g["smem"] == 16 * 2 * 4 * 32 * 2  # k and v of 16 windows, fp16
    q = torch.empty(1, 1, 16 * 16, 64, dtype=torch.float32)
    g = geometry(host, q, (16, 16), 4, backward=True)
    assert (g["lanes"], g["nv"], g["win_threads"], g["wpb"]) == (8, 2, 128, 2)
    assert g["smem"] == 2 * (4 * 16 * 64 * 4 + 2 * 16 * 16 * 4)
    q = torch.empty(1, 1, 9, 80, dtype=torch.float16)  # 10 vectors: 2 lanes x 5
    g = geometry(host, q, (3, 3), 3)
    assert (g["lanes"], g["nv"], g["win_threads"], g["block_threads"]) == (2, 5, 18, 256)


# ---------------------------------------------------------------------------------------------
# alignment: the CPU build checks every 16-byte vector access and shared-memory region
# ---------------------------------------------------------------------------------------------
VECTOR_OPS = ["copy16 store", "copy16 load", "load16_float", "zero_chunk", "store_chunk_float",
              "gather_chunk"]  # vk_host_vector_probe's ops, in order


@pytest.mark.parametrize("op", range(len(VECTOR_OPS)), ids=VECTOR_OPS)
def test_host_build_checks_vector_alignment(host, op):
    """Each 16-byte move of csrc/common/numeric.h refuses an address that is not a multiple of
    16 (the GPU's cudaErrorMisalignedAddress) and takes every aligned one."""
    for offset in (0, 16, 32):
        assert _call(host.vk_host_vector_probe, op, offset) == (0, ""), offset
    for offset in (2, 4, 8, 12):
        st, why = _call(host.vk_host_vector_probe, op, offset)
        assert st == STATUS["misaligned"], (offset, why)
        assert why.startswith("misaligned 16-byte vector") and "needs 16-byte alignment" in why, why
        assert f"is {offset} mod 16" in why, why


def _hifi_window_smem(backward, s, d, esize):
    """Shared-memory bytes of one Hi-Fi window: 2 / 4 [s²][d] arrays (+ fp32 p, ds [s²][s²]
    rows), rounded up to 16 bytes so that every window of a block starts 16-byte aligned."""
    nk = s * s
    size = (4 if backward else 2) * nk * d * esize + (2 * nk * nk * 4 if backward else 0)
    return -(-size // 16) * 16


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_host_build_hifi_windows_are_16_byte_aligned(host, dtype, backward):
    """Every window's shared-memory region is a multiple of 16 bytes, for every s and head dim
    class (s = 1, 3 backward: nk = 1, 9 make the p / ds rows an odd multiple of 8 bytes)."""
    vec = 16 // torch.empty(0, dtype=dtype).element_size()
    for s in (1, 2, 3, 4):
        for d in (vec, 3 * vec, 5 * vec, 8 * vec, 16 * vec):
            q = torch.empty(1, 2, (2 * s) * (2 * s + 1), d, dtype=dtype)
            if _call(host.vk_host_hifi_supported, DTYPE_CODE[dtype], d, s, int(backward))[0]:
                continue  # over the shared-memory limit
            g = geometry(host, q, (2 * s, 2 * s + 1), s, backward)
            per_window = g["smem"] // g["wpb"]
            assert g["smem"] == g["wpb"] * per_window
            assert per_window == _hifi_window_smem(backward, s, d, q.element_size()), (s, d)
            assert per_window % 16 == 0, (s, d, per_window)


# Issue 13: (6×9 map, s = 3, d = 24) and (3×5, s = 1, d = 16) -- the backward of every odd window
# of a block started 8 bytes off a 16-byte boundary (cudaErrorMisalignedAddress on a GPU).
MISALIGNED_CASES = [(1, 2, 6, 9, 3, None, 24), (1, 2, 3, 5, 1, None, 16)]
assert all(c in CASES for c in MISALIGNED_CASES)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("case", MISALIGNED_CASES, ids=_ids)
def test_host_build_catches_unrounded_hifi_smem(host, host_unrounded, case, dtype):
    """The bug planted back (windows sized without rounding): the alignment checks of the CPU
    build refuse the backward launch; the fixed build runs the same case, matching the
    reference (forward and gradients)."""
    B, h, H, W, s, pad, d = case
    q, k, v = (t.detach() for t in _qkv(B, h, H * W, d, dtype))
    g = geometry(host_unrounded, q, (H, W), s, backward=True)
    assert g["wpb"] > 1 and (g["smem"] // g["wpb"]) % 16 == 8  # really planted: odd windows off
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    st, why = _call(host_unrounded.vk_host_hifi_bwd, desc(q), desc(k), desc(v), desc(q),
                    *map(desc, grads), H, W, s, d ** -0.5)
    assert st == STATUS["misaligned"], why
    assert why.startswith("misaligned Hi-Fi window array: shared-memory byte offset"), why
    assert "is 8 mod 16 (needs 16-byte alignment)" in why, why
    # the forward's windows (k, v arrays only) are multiples of 16 bytes either way
    assert torch.equal(host_fwd(host_unrounded, q, k, v, (H, W), s),
                       host_fwd(host, q, k, v, (H, W), s))
    # the fixed build: the same launch runs and matches the reference
    test_host_build_matches_reference(host, case, dtype)


def test_host_build_empty_batch(host):
    q = torch.empty(0, 2, 16, 16)
    o = torch.empty(0, 2, 16, 16)
    st, why = _call(host.vk_host_hifi_fwd, desc(q), desc(q), desc(q), desc(o), 4, 4, 2, 0.25)
    assert st == 0, why


@pytest.mark.parametrize("dtype,d,s,backward,status,match", [
    (torch.float16, 32, 5, 0, "shape", "window_size 5 > 4"),
    (torch.float16, 12, 2, 0, "shape", "head_dim 12 not supported .*multiples of 8"),
    (torch.float32, 12, 2, 0, "success", ""),  # fp32 vectors hold 4 elements
    (torch.float16, 264, 2, 0, "shape", "up to 256"),
    (torch.float32, 256, 4, 1, "shape", "shared memory"),
    (torch.float32, 256, 4, 0, "success", ""),
    (torch.float64, 32, 2, 0, "dtype", "dtype"),
])
def test_host_build_supported(host, dtype, d, s, backward, status, match):
    st, why = _call(host.vk_host_hifi_supported, DTYPE_CODE.get(dtype, 7), d, s, backward)
    assert st == STATUS[status], why
    if match:
        import re
        assert re.search(match, why), why


def test_host_build_rejects_bad_descriptors(host):
    q = torch.randn(1, 2, 16, 16)
    o = torch.empty(1, 2, 16, 16)
    fwd = host.vk_host_hifi_fwd
    assert _call(fwd, desc(q), desc(q), desc(q), desc(o), 4, 5, 2, 0.25)[0] == STATUS["invalid"]
    st, why = _call(fwd, desc(q), desc(q[:, :1]), desc(q), desc(o), 4, 4, 2, 0.25)
    assert st == STATUS["invalid"] and "one shape" in why
    st, why = _call(fwd, desc(q), desc(q.half()), desc(q), desc(o), 4, 4, 2, 0.25)
    assert st == STATUS["dtype"], why
    null = desc(q)
    null.data = None
    assert _call(fwd, desc(q), null, desc(q), desc(o), 4, 4, 2, 0.25)[0] == STATUS["invalid"]
    assert _call(fwd, desc(q), desc(q), desc(q), desc(o), 4, 4, 2, float("nan"))[0] == STATUS["invalid"]
    assert "finite" in _call(fwd, desc(q), desc(q), desc(q), desc(o), 4, 4, 2, float("inf"))[1]
    assert not torch.isnan(q).any()


# ---------------------------------------------------------------------------------------------
# the numeric building blocks
# ---------------------------------------------------------------------------------------------
def _special_floats():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(20000, generator=g) * torch.logspace(-9, 6, 20000),
        torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.99,
                      65520.0, 1e-8, 2.98e-8, 5.96e-8, 6.1e-5, 3.4e38, -3.4e38, 1e-40]),
    ]).float()
    # exact halfway cases of both formats (ties to even)
    halves = torch.arange(-2048, 2048, dtype=torch.float64) + 0.5
    return torch.cat([x, (halves * 2 ** -10).float(), (halves * 2 ** -7).float(),
                      (halves * 2 ** -24).float()])


@pytest.mark.parametrize("name,dtype", [("half", torch.float16), ("bf16", torch.bfloat16)])
def test_host_conversions_match_torch(host, name, dtype):
    x = _special_floats()
    bits = torch.empty(x.numel(), dtype=torch.int16)
    getattr(host, f"vk_host_to_{name}")(x.data_ptr(), bits.data_ptr(), x.numel())
    want = x.to(dtype).view(torch.int16)
    nan = torch.isnan(x)
    assert torch.equal(bits[~nan], want[~nan])
    assert torch.isnan(bits[nan].view(dtype)).all()
    allbits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    back = torch.empty(allbits.numel(), dtype=torch.float32)
    getattr(host, f"vk_host_from_{name}")(allbits.data_ptr(), back.data_ptr(), allbits.numel())
    ref = allbits.view(dtype).float()
    assert torch.equal(torch.isnan(back), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(back[ok].view(torch.int32), ref[ok].view(torch.int32))


def test_host_fastdiv(host):
    g = torch.Generator().manual_seed(0)
    divisors = list(range(1, 600)) + [2 ** k + e for k in range(10, 31) for e in (-1, 0, 1)]
    divisors += torch.randint(1, 2 ** 31 - 1, (200,), generator=g).tolist()
    for d in divisors:
        ns = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 ** 31 - 1, 2 ** 31 - 2]
        ns += torch.randint(0, 2 ** 31 - 1, (20,), generator=g).tolist()
        for n in ns:
            if 0 <= n < 2 ** 31:
                assert host.vk_host_fastdiv(n, d) == n // d, (n, d)


# ---------------------------------------------------------------------------------------------
# the op layer (ops.hilo's "cuda" branch), on the CPU: vitkern._C's launch is replaced by the
# CPU build, so custom-op registration, fake kernels, autograd wiring, argument order, output
# layout and the dispatch reasons are all exercised without a GPU.
# ---------------------------------------------------------------------------------------------
class _HostModule:
    """Stands in for vitkern._C: the same entry points, run by the CPU build."""

    def __init__(self, so):
        self.so = so

    def status_string(self, code):
        return f"status {code}"

    def hifi_supported(self, dtype, d, s, backward=False):
        return _call(self.so.vk_host_hifi_supported, dtype, d, s, int(backward))

    def _tensors(self, args):
        return [desc(a) if isinstance(a, torch.Tensor) else a for a in args]

    def hifi_fwd(self, *args):
        return _call(self.so.vk_host_hifi_fwd, *self._tensors(args))

    def hifi_bwd(self, *args):
        return _call(self.so.vk_host_hifi_bwd, *self._tensors(args))

    def lofi_supported(self, dtype, d, pool):
        return _call(self.so.vk_host_lofi_supported, dtype, d, pool)

    def lofi_fwd(self, q, k, v, o, H, W, s, kv_pooled, scale):
        return _call(self.so.vk_host_lofi_fwd, *self._tensors((q, k, v, o)), H, W, s,
                     int(kv_pooled), scale)

    def window_fwd(self, *args):  # present in the real module; not exercised here
        raise NotImplementedError


@pytest.fixture
def host_ext(host, monkeypatch):
    """vitkern._C replaced by the CPU build (for CPU tensors)."""
    return patch_cext(monkeypatch, _HostModule(host))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=_ids)
def test_op_layer_through_host_build(host_ext, case, dtype):
    B, h, H, W, s, pad, d = case
    kw = dict(hw=(H, W), window_size=s, pad=pad)
    scale = d ** -0.5
    check_against_reference(
        lambda q, k, v: torch.ops.vitkern.hifi_cuda_fwd(q, k, v, H, W, s, scale),
        lambda q, k, v: R.hifi_attention(q, k, v, **kw),
        _qkv(B, h, H * W, d, dtype), dtype)


def test_op_layer_opcheck_through_host_build(host_ext):
    from vitkern import _cext

    q, k, v = _qkv(1, 2, 24, 16, torch.float32)
    torch.library.opcheck(torch.ops.vitkern.hifi_cuda_fwd.default, (q, k, v, 4, 6, 2, 0.25))
    o = torch.ops.vitkern.hifi_cuda_fwd(q, k, v, 4, 6, 2, 0.25)
    assert o.transpose(1, 2).is_contiguous()  # (B, N, heads, d) storage, like the triton op
    with pytest.raises(_cext.CudaExtError, match="hifi_fwd failed.*window_size 5 > 4"):
        torch.ops.vitkern.hifi_cuda_fwd(q, k, v, 4, 6, 5, 0.25)


def test_op_layer_hilo_inference_through_host_build(host_ext):
    """Mixed Hi-Fi / Lo-Fi heads (forward-only op): both kernels write their heads of one buffer."""
    B, h, H, W, s, n_lo, d = 2, 3, 7, 5, 2, 2, 32
    q, k, v = (t.detach() for t in _qkv(B, h, H * W, d, torch.float32))
    o = torch.ops.vitkern.hilo_cuda_fwd(q, k, v, H, W, s, n_lo, d ** -0.5, False)
    ref = R.hilo_attention(q.double(), k.double(), v.double(), hw=(H, W), window_size=s,
                           num_lo_heads=n_lo, pad="zero")
    assert_close(o, ref)
    torch.library.opcheck(torch.ops.vitkern.hilo_cuda_fwd.default,
                          (q, k, v, H, W, s, n_lo, d ** -0.5, False))
    m = 4 * 3
    kp, vp = (torch.randn(B, h, m, d) for _ in range(2))
    o = torch.ops.vitkern.hilo_cuda_fwd(q, kp, vp, H, W, s, h, d ** -0.5, True)
    ref = R.lofi_attention(q.double(), kp.double(), vp.double(), hw=(H, W), window_size=s,
                           kv_pooled=True, pad="zero")
    assert_close(o, ref)


def test_cuda_dispatch_reasons(host_ext):
    from vitkern.ops import hilo as H

    f16, f32 = torch.float16, torch.float32
    reason = H._cuda_shape_reason  # (dtype, d, s, n_hi, n_lo, kv_pooled, needs_grad)
    assert reason(f16, 32, 2, 2, 0, False, True) is None
    assert reason(f32, 80, 3, 2, 0, False, True) is None
    assert reason(f16, 32, 2, 2, 10, False, False) is None           # LITv2-S split, inference
    assert "forward-only" in reason(f16, 32, 2, 2, 10, False, True)  # ... training: triton
    assert reason(f16, 80, 2, 0, 2, False, False) is None            # Lo-Fi: any multiple of 16
    assert reason(f32, 48, 3, 2, 4, False, False) is None
    assert "head_dim 72 not supported by the CUDA Lo-Fi" in reason(f16, 72, 2, 0, 2, False, False)
    assert "head_dim 144 not supported by the CUDA Lo-Fi" in reason(f16, 144, 2, 0, 2, False, False)
    assert reason(f16, 32, 9, 0, 2, True, False) is None             # pre-pooled: any s
    assert "kv_pooled=True" in reason(f16, 32, 9, 0, 2, False, False)
    assert "float64 not supported by cuda" in reason(torch.float64, 32, 2, 1, 0, False, False)
    assert "head_dim 12" in reason(f16, 12, 2, 1, 0, False, False)
    assert "window_size 8 > 4" in reason(f16, 32, 8, 1, 0, False, False)
    # fp32 d=256 s=4: the forward fits, the backward's shared memory does not -> only with grad
    assert reason(f32, 256, 4, 1, 0, False, False) is None
    assert "shared memory" in reason(f32, 256, 4, 1, 0, False, True)
    assert "tensors are on cpu" in H._cuda_reason(torch.empty(1, 1, 4, 32), 2, 0, False, False)


def test_cuda_backend_is_opt_in(host_ext):
    from vitkern import backends, cuda_auto

    ok, why = backends.cuda_status()
    assert ok and "HiLo Hi-Fi" in why and "Lo-Fi" in why and "opt-in" in why
    assert "cuda_auto.json" in why
    summary = backends.cuda_auto_summary()  # what the committed vitkern/cuda_auto.json approves
    assert summary.startswith("auto-approved: ")
    assert ("none yet" in summary) == (not cuda_auto.approvals())
    # auto asks cuda first, but only an approved kernel passes (see the next test)
    assert backends.AUTO_ORDER[0] == "cuda"
    assert backends.select("x", "cuda", lambda name, explicit: None) == "cuda"


def _approve(monkeypatch, *entries):
    """Pretend vitkern/cuda_auto.json approves ``entries`` ((kernel, dtype) on capability 9.0),
    with tensors of the CPU build standing in for CUDA tensors of an sm_90 device."""
    from vitkern import backends, cuda_auto
    from vitkern.ops import hilo as H

    table = {(k, "9.0", dt): {"kernel": k, "capability": "9.0", "dtype": dt,
                              "speedup_vs_triton": 2.0} for k, dt in entries}
    monkeypatch.setattr(cuda_auto, "_approved", lambda: table)
    monkeypatch.setattr(cuda_auto, "capability", lambda index: "9.0")
    monkeypatch.setattr(cuda_auto, "_index", lambda device: 0)
    device_reason = backends.device_reason

    def on_gpu(name, device, explicit):  # the CPU tensors play CUDA tensors
        if name == "cuda":
            return None if explicit else (cuda_auto._device_reason(0) or None)
        return device_reason(name, device, explicit)

    monkeypatch.setattr(backends, "device_reason", on_gpu)
    monkeypatch.setattr(cuda_auto, "reason", lambda kernels, device, dtype: cuda_auto._reason(
        ",".join(kernels), 0, str(dtype).removeprefix("torch.")) or None)
    monkeypatch.setattr(H, "_cuda_reason", lambda q, s, n_lo, kv_pooled, needs_grad: H._cuda_shape_reason(
        q.dtype, q.shape[-1], s, q.shape[1] - n_lo, n_lo, kv_pooled, needs_grad))


def test_auto_picks_cuda_only_where_approved(host_ext, monkeypatch):
    """backend="auto" runs a CUDA C++ kernel only for the (kernel, GPU generation, dtype) triples
    that vitkern/cuda_auto.json approves: every kernel a call runs must be approved."""
    import torch._dynamo

    from vitkern import cuda_auto, ops
    from vitkern.ops import hilo as H

    f16 = torch.float16
    q = torch.empty(1, 4, 24, 32, dtype=f16)
    pick = lambda n_lo, needs_grad, dtype=f16: H._backend(  # noqa: E731
        "hilo_attention", "auto", q.to(dtype), 2, n_lo, False, needs_grad)
    _approve(monkeypatch)
    assert pick(0, False) == "reference"  # nothing approved: no cuda (CPU tensors: reference)
    assert "no CUDA kernel approved for auto on compute capability 9.0" in cuda_auto._device_reason(0)
    _approve(monkeypatch, ("hifi_fwd", "float16"), ("lofi_fwd", "bfloat16"))
    assert pick(0, False) == "cuda"                        # Hi-Fi inference, fp16: approved
    assert pick(0, True) == "reference"                    # training also runs hifi_bwd
    assert pick(0, False, torch.bfloat16) == "reference"   # hifi_fwd is approved for fp16 only
    assert pick(2, False) == "reference"                   # lofi_fwd not approved for fp16
    why = cuda_auto._reason("hifi_fwd,hifi_bwd", 0, "float16")
    assert "hifi_bwd not approved for auto on compute capability 9.0 / float16" in why
    assert "hifi_fwd" not in why.split(" not approved")[0]
    _approve(monkeypatch, ("hifi_fwd", "float16"), ("hifi_bwd", "float16"), ("lofi_fwd", "float16"))
    assert pick(0, True) == "cuda" and pick(2, False) == "cuda"
    assert pick(2, True) == "reference"   # the Lo-Fi kernel is forward-only: refused, not approved
    # and the call really runs the CUDA kernel (the CPU build here) under auto
    q, k, v = _qkv(1, 4, 24, 32, f16)
    from vitkern import _cext

    calls, launch = [], _cext.launch

    def spy(entry, *args, **kw):
        calls.append(entry)
        return launch(entry, *args, **kw)

    monkeypatch.setattr(_cext, "launch", spy)
    with torch.no_grad():
        out = ops.hilo_attention(q, k, v, hw=(4, 6), window_size=2, num_lo_heads=2)
    assert calls == ["hifi_fwd", "lofi_fwd"], calls
    ref = R.hilo_attention(q.double(), k.double(), v.double(), hw=(4, 6), window_size=2,
                           num_lo_heads=2)
    assert_close(out, ref, R.hilo_attention(q, k, v, hw=(4, 6), window_size=2, num_lo_heads=2))
    # the approval lookups fold to constants under torch.compile: no graph break
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: ops.hilo_attention(q, k, v, hw=(4, 6), window_size=2,
                                                          num_lo_heads=2),
                       fullgraph=True, backend="aot_eager")
    calls.clear()
    with torch.no_grad():
        assert torch.equal(fn(q, k, v), out)
    assert calls == ["hifi_fwd", "lofi_fwd"], calls


def test_bench_cuda_provider_pieces():
    from vitkern.backends import BackendError
    from vitkern.bench import bench_hilo as bh

    exc = BackendError("hilo_attention: backend 'cuda' cannot run these inputs:\n"
                       "  cuda: 1 Lo-Fi head(s): no CUDA Lo-Fi kernel yet\n  triton: accepts these inputs")
    assert bh._is_refusal(exc) and not bh._is_refusal(RuntimeError("x"))
    assert bh._refusal_reason(exc, "cuda") == "1 Lo-Fi head(s): no CUDA Lo-Fi kernel yet"
    recs = [{"provider": p, "kind": k, "mode": "fwd", "ms": ms, "status": "ok"}
            for p, k, ms in (("vitkern[cuda]", "vitkern", 0.5), ("vitkern[triton]", "vitkern", 1.0),
                             ("litv2", "baseline", 2.0))]
    bh._add_speedups(recs)
    assert recs[0]["speedup"] == {"litv2": 4.0}
    assert recs[0]["speedup_vs_vitkern"] == {"vitkern[triton]": 2.0}
    assert recs[1]["speedup_vs_vitkern"] == {"vitkern[cuda]": 0.5}


@pytest.mark.parametrize("group", ["hifi", "hilo"])
def test_bench_cuda_provider_end_to_end_on_cpu(host_ext, monkeypatch, group):
    """bench_hilo with the vitkern[cuda] provider, run by the CPU build: checked against the
    reference and timed; the forward-only Lo-Fi kernel gets fwd records, fwd+bwd is skipped."""
    from vitkern.bench import bench_hilo, harness
    from vitkern.bench.shapes import get_case
    from vitkern.ops import hilo as H

    monkeypatch.setattr(H, "_cuda_reason", lambda q, s, n_lo, kv_pooled, needs_grad: H._cuda_shape_reason(
        q.dtype, q.shape[-1], s, q.shape[1] - n_lo, n_lo, kv_pooled, needs_grad))
    ctx = harness.Context(device=torch.device("cpu"), dev=harness.device_info("cpu"), quick=True,
                          batch=1, log=lambda s: None, backends=("cuda",), modes=("fwd", "fwd+bwd"))
    task = harness.Task("hilo", get_case("t_small_even"), torch.float32, group)
    recs = {(r["provider"], r["mode"]): r for r in bench_hilo.run_task(task, ctx)}
    assert not ctx.failures, ctx.failures
    fwd, bwd = recs[("vitkern[cuda]", "fwd")], recs[("vitkern[cuda]", "fwd+bwd")]
    assert fwd["status"] == "ok" and fwd["check"]["ok"] and fwd["gbps"] > 0, fwd
    assert "litv2" in fwd["speedup"]
    if group == "hifi":
        assert bwd["status"] == "ok", bwd
    else:
        assert bwd["status"] == "skipped" and "forward-only" in bwd["reason"], bwd


# ---------------------------------------------------------------------------------------------
# GPU tier: the real kernels through the op (skipped without a GPU and a built vitkern._C)
# ---------------------------------------------------------------------------------------------
def _cuda_ready():
    if not HAS_CUDA:
        return False, "no CUDA device"
    from vitkern import _cext

    mod, why = _cext.load()
    if mod is None:
        return False, why
    if not hasattr(mod, "hifi_fwd") or not hasattr(mod, "lofi_fwd"):
        return False, "vitkern._C has no HiLo kernels (stale build)"
    return True, ""


_READY = _cuda_ready()
needs_cuda_ext = pytest.mark.skipif(not _READY[0], reason=_READY[1] or "ready")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cuda_hifi_matches_reference(case, dtype):
    from vitkern import ops

    B, h, H, W, s, pad, d = case
    kw = dict(hw=(H, W), window_size=s, pad=pad)
    inputs = [t.detach().cuda().requires_grad_() for t in _qkv(B, h, H * W, d, dtype)]
    check_against_reference(
        lambda q, k, v: ops.hifi_attention(q, k, v, backend="cuda", **kw),
        lambda q, k, v: R.hifi_attention(q, k, v, **kw), inputs, dtype)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_cuda_hifi_strided_and_hilo_split(dtype):
    """Packed projection views (16-byte vectors), a misaligned view (element path), and
    hilo_attention with num_lo_heads=0 on the cuda backend."""
    from vitkern import ops

    B, H, W, h, d, s = 2, 14, 14, 3, 32, 2
    q, k, v = (t.cuda() for t in _packed_views(B, H * W, h, d, dtype))
    out = ops.hifi_attention(q, k, v, hw=(H, W), window_size=s, backend="cuda")
    ref = R.hifi_attention(*(t.double().cpu() for t in (q, k, v)), hw=(H, W), window_size=s)
    lowp = R.hifi_attention(q, k, v, hw=(H, W), window_size=s).cpu() if dtype != torch.float32 else None
    assert_close(out.cpu(), ref, lowp)
    buf = torch.randn(q.numel() + 1, device="cuda").to(dtype)
    k2 = buf[1:].view(q.shape)
    out = ops.hilo_attention(q, k2, v, hw=(H, W), window_size=s, num_lo_heads=0, backend="cuda")
    ref = R.hifi_attention(*(t.double().cpu() for t in (q, k2, v)), hw=(H, W), window_size=s)
    lowp = R.hifi_attention(q, k2, v, hw=(H, W), window_size=s).cpu() if dtype != torch.float32 else None
    assert_close(out.cpu(), ref, lowp)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("case", LOFI_CASES, ids=lambda c: _ids(c[:7]) + ("-pooled" if c[7] else ""))
def test_cuda_lofi_matches_reference(case, dtype):
    from vitkern import ops

    B, h, H, W, s, pad, d, kv_pooled = case
    m = -(-H // s) * -(-W // s)
    q, k, v = (t.detach().cuda() for t in _qkv(B, h, H * W, d, dtype, n_kv=m if kv_pooled else None))
    kw = dict(hw=(H, W), window_size=s, pad=pad, kv_pooled=kv_pooled)
    with torch.no_grad():
        out = ops.lofi_attention(q, k, v, backend="cuda", **kw)
    ref = R.lofi_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), **kw)
    lowp = R.lofi_attention(q, k, v, **kw).cpu() if dtype != torch.float32 else None
    assert_close(out.cpu(), ref, lowp)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("d", [48, 80, 96])
def test_cuda_lofi_padded_lanes_guarded(d, dtype):
    """Non-power-of-two lane counts on the GPU: NaN right after channel d in memory (any read
    past d shows), vectorised and element-wise paths, pooled and pre-pooled k, v."""
    from vitkern import ops

    B, h, H, W, s = 2, 3, 13, 11, 2
    N, m = H * W, -(-H // s) * -(-W // s)
    g = torch.Generator().manual_seed(d)
    q, k, v = (_guarded((B, h, N), d, dtype, g).cuda() for _ in range(3))
    k2 = _guarded((B, h, N), d, dtype, g, channel_stride=2).cuda()
    kp, vp = (_guarded((B, h, m), d, dtype, g).cuda() for _ in range(2))
    for kk, vv, pooled in ((k, v, False), (k2, v, False), (kp, vp, True)):
        kw = dict(hw=(H, W), window_size=s, kv_pooled=pooled)
        with torch.no_grad():
            out = ops.lofi_attention(q, kk, vv, backend="cuda", **kw)
        ref = R.lofi_attention(*(t.double().cpu() for t in (q, kk, vv)), **kw)
        lowp = R.lofi_attention(q, kk, vv, **kw).cpu() if dtype != torch.float32 else None
        assert_close(out.cpu(), ref, lowp)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("d", [32, 80])
def test_cuda_hilo_inference_mixed_heads(d, dtype):
    from vitkern import ops

    B, h, H, W, s, n_lo = 2, 12, 14, 14, 2, 10  # LITv2-S stage 3 split (d = 80: other dims)
    q, k, v = (t.cuda() for t in _packed_views(B, H * W, h, d, dtype))
    kw = dict(hw=(H, W), window_size=s, num_lo_heads=n_lo)
    with torch.no_grad():
        out = ops.hilo_attention(q, k, v, backend="cuda", **kw)
    ref = R.hilo_attention(*(t.double().cpu() for t in (q, k, v)), **kw)
    lowp = R.hilo_attention(q, k, v, **kw).cpu() if dtype != torch.float32 else None
    assert_close(out.cpu(), ref, lowp)
    from vitkern.backends import BackendError

    with pytest.raises(BackendError, match="forward-only"):
        ops.hilo_attention(q.requires_grad_(), k, v, backend="cuda", **kw)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_hifi_opcheck():
    from vitkern.ops import hilo as ops_hilo  # noqa: F401  (registers the ops)

    q, k, v = (t.detach().cuda().requires_grad_() for t in _qkv(1, 2, 24, 16, torch.float16))
    torch.library.opcheck(torch.ops.vitkern.hifi_cuda_fwd.default, (q, k, v, 4, 6, 2, 0.25))


def test_cuda_branch_compiles_fullgraph(host_ext, monkeypatch):
    """torch.compile(fullgraph=True) through the "cuda" dispatch (device check bypassed: the CPU
    build runs the kernels): the shape checks are constant-folded, no graph break."""
    import torch._dynamo

    from vitkern import ops
    from vitkern.ops import hilo as H

    monkeypatch.setattr(H, "_cuda_reason", lambda q, s, n_lo, kv_pooled, needs_grad: H._cuda_shape_reason(
        q.dtype, q.shape[-1], s, q.shape[1] - n_lo, n_lo, kv_pooled, needs_grad))
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: ops.hifi_attention(q, k, v, hw=(4, 6), window_size=2,
                                                          backend="cuda"),
                       fullgraph=True, backend="aot_eager")
    q, k, v = _qkv(1, 2, 24, 16, torch.float32)
    out = fn(q, k, v)
    out.sum().backward()
    ref = R.hifi_attention(q.detach().double(), k.detach().double(), v.detach().double(),
                           hw=(4, 6), window_size=2)
    assert_close(out.detach(), ref)
    assert q.grad is not None and not torch.isnan(q.grad).any()
