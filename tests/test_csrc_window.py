"""CUDA C++ Swin window attention forward (csrc/window/): proven on the CPU, run on a GPU.

CPU tier: ``tests/csrc/window_host.cpp`` compiles the kernel's per-thread program
(``csrc/window/window_core.h``: token mapping of the shifted / zero-padded frame in both pad
orders, Swin's region mask, relative-position bias (table or dense), fp32 softmax, staging and
output on the kernel's shared-memory layout, the grid-stride walk over windows) with g++ and runs
whole launches on CPU tensors (fp16 and bf16: the kernel's own conversions), against
``vitkern.reference.window``. The two tensor-core products (wmma) are the only GPU-only part:
the CPU build computes them tile by tile from the kernel's own tile pointers. Every 16-byte vector
access, shared-memory region and wmma tile (32 bytes, ldm a multiple of 16 bytes) is checked for
alignment; a misaligned one fails the launch with ``VK_STATUS_MISALIGNED``.

GPU tier (skipped without a CUDA device and a built ``vitkern._C``): the real kernel through
``vitkern.ops.window_attention(..., backend="cuda")``.
"""
from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA, assert_close
from vitkern import reference as R

sys.path.insert(0, str(Path(__file__).resolve().parent / "csrc"))
from host_twin import DTYPE_CODE, VkTensor, build, desc, patch_cext  # noqa: E402
from host_twin import call as _call  # noqa: E402

PAD_ORDER = {"shift_then_pad": 0, "pad_then_shift": 1}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    so = build(tmp_path_factory, "window_host.cpp")
    P, i64 = ctypes.POINTER(VkTensor), ctypes.c_int64
    so.vk_host_window_fwd.argtypes = [P, P, P, P, P, i64, i64, i64, i64, ctypes.c_int32,
                                      ctypes.c_float, ctypes.c_float, i64, ctypes.c_char_p,
                                      ctypes.c_size_t]
    so.vk_host_window_supported.argtypes = [ctypes.c_int32, i64, i64, ctypes.c_char_p, ctypes.c_size_t]
    return so


def effective(hw, window_size, shift):
    """(ws, shift) after Swin's clamp (square windows; the reference returns per-axis pairs)."""
    w, s = R.window.effective_window(hw, window_size, shift)
    if isinstance(w, tuple):
        assert w[0] == w[1] and s[0] == s[1], (w, s)
        return w[0], s[0]
    return w, s


def host_window(so, q, k, v, hw, window_size, shift=0, bias=None, mask_value=-100.0, scale=None,
                pad_order="shift_then_pad", max_blocks=3):
    B, h, N, d = q.shape
    ws, s = effective(hw, window_size, shift)
    scale = d ** -0.5 if scale is None else scale
    o = torch.full((B, N, h, d), float("nan"), dtype=q.dtype).transpose(1, 2)
    bd = ctypes.pointer(desc(bias)) if bias is not None else None
    st, why = _call(so.vk_host_window_fwd, desc(q), desc(k), desc(v), desc(o), bd, hw[0], hw[1],
                    ws, s, PAD_ORDER[pad_order], mask_value, scale, max_blocks)
    assert st == 0, why
    return o


def _bias(kind, ws, h, seed=7):
    g = torch.Generator().manual_seed(seed)
    if kind == "table":
        return torch.randn((2 * ws - 1) ** 2, h, generator=g)
    if kind == "dense":
        return torch.randn(h, ws * ws, ws * ws, generator=g)
    return None


# (B, heads, H, W, window_size, shift, pad_order, bias)
CASES = [
    (1, 2, 14, 14, 7, 0, "shift_then_pad", "table"),   # Swin-T stage 3 tile, W-MSA
    (1, 2, 14, 14, 7, 3, "shift_then_pad", "table"),   # SW-MSA
    (2, 1, 9, 11, 7, 3, "shift_then_pad", "table"),    # non-divisible, timm order
    (1, 2, 9, 11, 7, 3, "pad_then_shift", "dense"),    # non-divisible, mmdet order, dense bias
    (1, 1, 7, 7, 7, 0, "shift_then_pad", None),        # one global window, no bias
    (1, 2, 7, 20, 7, 3, "shift_then_pad", "table"),    # min(H, W) = ws: Swin clamps shift to 0
    (1, 2, 24, 24, 12, 6, "shift_then_pad", "table"),  # Swin-B 384 window 12, shifted
    (1, 1, 13, 26, 12, 6, "pad_then_shift", "table"),  # ws = 12 with padding
]


def _ids(c):
    B, h, H, W, ws, s, order, bias = c
    return f"B{B}-h{h}-{H}x{W}-ws{ws}-s{s}-{order}-{bias}"


def _qkv(B, h, N, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, d, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda x: str(x)[6:])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_host_build_matches_reference(host, case, dtype):
    B, h, H, W, ws, shift, order, kind = case
    ews, _ = effective((H, W), ws, shift)
    if ews not in (7, 12):
        pytest.skip(f"effective window {ews}: not a CUDA kernel size (refused, see test below)")
    q, k, v = _qkv(B, h, H * W, 32, dtype)
    bias = _bias(kind, ews, h)
    kw = dict(hw=(H, W), window_size=ws, shift=shift, rel_pos_bias=bias, pad_order=order)
    out = host_window(host, q, k, v, (H, W), ws, shift, bias, pad_order=order)
    kw.pop("rel_pos_bias")
    ref = R.window_attention(q.double(), k.double(), v.double(),
                             rel_pos_bias=None if bias is None else bias.double(), **kw)
    lowp = R.window_attention(q, k, v, rel_pos_bias=None if bias is None else bias.to(dtype), **kw)
    assert_close(out, ref, lowp)


def test_host_build_strided_hard_mask_and_scale(host):
    """Packed projection views (16-byte vectors) and a misaligned k (element path); a hard
    (-inf) shift mask and a custom scale."""
    B, H, W, h, d = 2, 14, 14, 3, 32
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, H * W, 3 * h * d, generator=g).half()
    q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    buf = torch.randn(k.numel() + 1, generator=g).half()
    k2 = buf[1:].view(k.shape)
    bias = _bias("table", 7, h)
    for kk, mask, scale in ((k, -100.0, None), (k2, float("-inf"), 0.3)):
        kw = dict(hw=(H, W), window_size=7, shift=3, mask_value=mask, scale=scale)
        out = host_window(host, q, kk, v, (H, W), 7, 3, bias, mask_value=mask, scale=scale, max_blocks=1000)
        ref = R.window_attention(q.double(), kk.double(), v.double(), rel_pos_bias=bias.double(), **kw)
        lowp = R.window_attention(q, kk, v, rel_pos_bias=bias.half(), **kw)
        assert_close(out, ref, lowp)


@pytest.mark.parametrize("dtype,d,ws,match", [
    (torch.float32, 32, 7, "float16 / bfloat16 only"),
    (torch.float16, 64, 7, "head_dim 64"),
    (torch.float16, 32, 5, "window 5"),
    (torch.bfloat16, 32, 12, ""),
])
def test_host_build_supported(host, dtype, d, ws, match):
    st, why = _call(host.vk_host_window_supported, DTYPE_CODE[dtype], d, ws)
    assert (st == 0) == (not match), why
    assert re.search(match, why) if match else why == ""


def test_host_build_rejects_bad_bias(host):
    q, k, v = _qkv(1, 2, 49, 32, torch.float16)
    o = torch.empty_like(q)
    for bias in (torch.randn(13 * 13, 3), torch.randn(13 * 13, 2).half()):
        st, why = _call(host.vk_host_window_fwd, desc(q), desc(k), desc(v), desc(o),
                        ctypes.pointer(desc(bias)), 7, 7, 7, 0, 0, -100.0, 0.2, 10)
        assert st != 0 and "rel_pos_bias" in why, why


# ---------------------------------------------------------------------------------------------
# the op layer (vitkern.ops.window) on the CPU: vitkern._C replaced by the CPU build
# ---------------------------------------------------------------------------------------------
class _HostModule:
    def __init__(self, so):
        self.so = so

    def status_string(self, code):
        return f"status {code}"

    def window_supported(self, dtype, d, ws):
        return _call(self.so.vk_host_window_supported, dtype, d, ws)

    def window_fwd(self, q, k, v, o, bias, H, W, ws, shift, order, mask, scale):
        bd = None if bias is None else ctypes.pointer(desc(bias))
        return _call(self.so.vk_host_window_fwd, desc(q), desc(k), desc(v), desc(o), bd, H, W, ws,
                     shift, order, mask, scale, 5)


@pytest.fixture
def host_ext(host, monkeypatch):
    return patch_cext(monkeypatch, _HostModule(host))


def test_op_layer_through_host_build(host_ext):
    from vitkern.ops import window as wc

    q, k, v = _qkv(2, 2, 9 * 11, 32, torch.float16)
    bias = _bias("table", 7, 2).half()  # converted to fp32 by the op
    out = torch.ops.vitkern.window_cuda_fwd(q, k, v, bias, 9, 11, 7, 3, -100.0, 32 ** -0.5,
                                            "pad_then_shift")
    kw = dict(hw=(9, 11), window_size=7, shift=3, pad_order="pad_then_shift")
    assert_close(out, R.window_attention(q.double(), k.double(), v.double(), rel_pos_bias=bias.double(), **kw),
                 R.window_attention(q, k, v, rel_pos_bias=bias, **kw))
    assert out.transpose(1, 2).is_contiguous()
    torch.library.opcheck(torch.ops.vitkern.window_cuda_fwd.default,
                          (q, k, v, bias.float(), 9, 11, 7, 3, -100.0, 0.2, "shift_then_pad"))
    torch.library.opcheck(torch.ops.vitkern.window_cuda_fwd.default,
                          (q, k, v, None, 9, 11, 7, 0, -100.0, 0.2, "shift_then_pad"))


def test_cuda_reason(host_ext):
    from vitkern.ops import window as wc

    q = torch.empty(1, 2, 49, 32, dtype=torch.float16)
    assert "tensors are on cpu" in wc._cuda_reason(q, (7, 7), (0, 0), None, False)
    meta = torch.empty(1, 2, 49, 32, dtype=torch.float16, device="meta")
    assert "tensors are on meta" in wc._cuda_reason(meta, (7, 7), (0, 0), None, False)
    f16 = torch.float16
    assert wc._cuda_shape_reason(f16, 32, 7, None, False) is None
    assert wc._cuda_shape_reason(torch.bfloat16, 32, 12, None, False) is None
    assert "forward-only" in wc._cuda_shape_reason(f16, 32, 7, None, True)
    assert "active_windows" in wc._cuda_shape_reason(f16, 32, 7, torch.zeros(1, 1), False)
    assert "out=" in wc._cuda_shape_reason(f16, 32, 7, None, False, out=q)
    assert "float16 / bfloat16 only" in wc._cuda_shape_reason(torch.float32, 32, 7, None, False)
    assert "head_dim 64" in wc._cuda_shape_reason(f16, 64, 7, None, False)
    assert "window 8" in wc._cuda_shape_reason(f16, 32, 8, None, False)


def test_bench_window_cuda_provider(host_ext, monkeypatch):
    """bench_window's ``vitkern[cuda]`` provider end to end on the CPU build: checked against the
    reference and timed forward, its fwd+bwd records skipped with the reason (an inference
    kernel), refused cases (fp32, sparse windows) skipped by design; the run records no failure."""
    from vitkern import backends
    from vitkern.bench import bench_window as bw, harness
    from vitkern.ops import window as wc

    device_reason = backends.device_reason
    monkeypatch.setattr(backends, "device_reason", lambda name, dev, explicit: (  # auto: no cuda
        None if name == "cuda" and explicit else device_reason(name, dev, explicit)))
    monkeypatch.setattr(wc, "_cuda_reason", lambda q, win, sft, act, ng, out=None: (
        wc._cuda_shape_reason(q.dtype, q.shape[-1], win[0], act, ng, out)))
    ctx = harness.Context(device=torch.device("cpu"), dev=harness.device_info("cpu"),
                          modes=("fwd", "fwd+bwd"), quick=True, strict=True, batch=1,
                          backends=("auto", "cuda"), log=lambda s: None)
    tasks = bw.plan(bw.cases_for("t_win_small", True), [torch.float16, torch.float32],
                    ("attn", "block_attn", "sparse50"))
    recs = {(t.dtype, t.group, r["provider"], r["mode"]): r for t in tasks
            for r in bw.run_task(t, ctx)}
    assert not ctx.failures
    f16, f32 = torch.float16, torch.float32
    for group in ("attn", "block_attn"):
        fwd = recs[(f16, group, "vitkern[cuda]", "fwd")]
        assert fwd["status"] == "ok" and fwd["check"]["ok"] and fwd["gbps"] > 0, fwd
        assert fwd["speedup_vs_vitkern"].keys() == {"vitkern[auto:eager]"}
        bwd = recs[(f16, group, "vitkern[cuda]", "fwd+bwd")]
        assert bwd["status"] == "skipped" and "forward-only" in bwd["reason"], bwd
        for mode in ctx.modes:
            r = recs[(f32, group, "vitkern[cuda]", mode)]
            assert r["status"] == "skipped" and "float16 / bfloat16 only" in r["reason"], r
    sparse = recs[(f16, "sparse50", "vitkern[cuda]", "fwd")]
    assert sparse["status"] == "skipped" and "active_windows" in sparse["reason"]
    assert recs[(f16, "sparse50", "dense[cuda]", "fwd")]["status"] == "ok"
    assert "forward-only" in recs[(f16, "sparse50", "dense[cuda]", "fwd+bwd")]["reason"]


# ---------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------
def _ready():
    if not HAS_CUDA:
        return False, "no CUDA device"
    from vitkern import _cext

    mod, why = _cext.load()
    if mod is None:
        return False, why
    return (True, "") if hasattr(mod, "window_fwd") else (False, "stale vitkern._C")


_READY = _ready()


@pytest.mark.gpu
@pytest.mark.skipif(not _READY[0], reason=_READY[1] or "ready")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda x: str(x)[6:])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cuda_window_matches_reference(case, dtype):
    from vitkern.ops import window as wc

    B, h, H, W, ws, shift, order, kind = case
    ews, es = effective((H, W), ws, shift)
    if ews not in (7, 12):
        pytest.skip("not a CUDA kernel size")
    q, k, v = (t.cuda() for t in _qkv(B, h, H * W, 32, dtype))
    bias = _bias(kind, ews, h)
    assert wc._cuda_reason(q, (ews, ews), (es, es), None, needs_grad=False) is None
    with torch.no_grad():
        out = wc.window_attention(q, k, v, hw=(H, W), window_size=ws, shift=shift, pad_order=order,
                                  rel_pos_bias=None if bias is None else bias.cuda(),
                                  backend="cuda")
    kw = dict(hw=(H, W), window_size=ws, shift=shift, pad_order=order)
    ref = R.window_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                             rel_pos_bias=None if bias is None else bias.double(), **kw)
    lowp = R.window_attention(q, k, v, rel_pos_bias=None if bias is None else bias.cuda().to(dtype), **kw)
    assert_close(out.cpu(), ref, lowp.cpu())
