"""Tests of the benchmark package: the LITv2 baseline, the shape registry, the harness, the CLI.

``LITv2HiLo`` is both the benchmark baseline and the oracle the HiLo module tests compare
``vitkern.nn.HiLo`` with, so it is checked here against an independent token-by-token evaluation of
the spec (``specs/hilo-ppma.md`` section 1.3 / 1.5) and LITv2's FLOPs reference values.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitkern.bench import bench_hilo, harness
from vitkern.bench.litv2 import (LITv2HiLo, litv2_head_split, litv2_hifi_attention, litv2_hilo_attention,
                                 litv2_hilo_flops, litv2_lofi_attention, litv2_pool_kv, randomize_)
from vitkern.bench.shapes import (HILO_CASES, HILO_QUICK_CASES, HILO_TEST_CASES, HiLoCase, get_case,
                                  hilo_cases)

REPO = Path(__file__).resolve().parent.parent


def _has(module: str, attr: str | None = None) -> bool:
    try:
        mod = __import__(module, fromlist=["_"])
    except Exception:
        return False
    return attr is None or hasattr(mod, attr)


HAS_OPS = _has("vitkern.ops", "hilo_attention")
HAS_REF = _has("vitkern.reference.hilo", "hilo_attention")
HAS_NN = _has("vitkern.nn", "HiLo")


# ------------------------------------------------------------------------------------------------
# LITv2HiLo: constructor, FLOPs
# ------------------------------------------------------------------------------------------------

def test_litv2_flops_reference_values():
    # spec section 1.7: README demo, LITv2-S stage 3, single-layer benchmark setting
    assert LITv2HiLo(384, 12, window_size=2, alpha=0.5).flops(14, 14) == 83_467_776
    assert LITv2HiLo(384, 12, window_size=2, alpha=0.9).flops(14, 14) == 77_697_536
    assert LITv2HiLo(768, 12, window_size=2, alpha=0.9).flops(14, 14) == 298_296_320
    assert litv2_hilo_flops(14, 14, 768, 12, 2, 0.9) == 298_296_320
    # padded size: 15x15 counts like 16x16
    assert LITv2HiLo(384, 12, window_size=2, alpha=0.9).flops(15, 15) == \
        LITv2HiLo(384, 12, window_size=2, alpha=0.9).flops(16, 16)


@pytest.mark.parametrize("heads,alpha,ws,expect", [
    (12, 0.9, 2, (2, 10)), (16, 0.9, 2, (2, 14)), (12, 0.7, 2, (4, 8)), (12, 0.5, 2, (6, 6)),
    (3, 0.7, 3, (1, 2)), (4, 0.2, 2, (4, 0)), (4, 1.0, 2, (0, 4)), (24, 0.9, 1, (0, 24)),
    (12, 0.95, 2, (1, 11)),  # 11.4 -> 11: truncation, not round (12 * 0.9 = 10.8 -> 10 above)
])
def test_litv2_head_split(heads, alpha, ws, expect):
    h, l = expect
    m = LITv2HiLo(heads * 8, heads, window_size=ws, alpha=alpha)
    assert (m.h_heads, m.l_heads) == (h, l) == litv2_head_split(heads, alpha, ws)
    assert (m.h_dim, m.l_dim) == (h * 8, l * 8)


def test_litv2_submodules_and_scale():
    m = LITv2HiLo(384, 12, qkv_bias=True, window_size=2, alpha=0.9)
    assert sorted(m.state_dict()) == sorted(
        ["h_qkv.weight", "h_qkv.bias", "h_proj.weight", "h_proj.bias", "l_q.weight", "l_q.bias",
         "l_kv.weight", "l_kv.bias", "l_proj.weight", "l_proj.bias"])
    assert tuple(m.h_qkv.weight.shape) == (3 * 64, 384) and tuple(m.l_kv.weight.shape) == (2 * 320, 384)
    assert tuple(m.h_proj.weight.shape) == (64, 64) and tuple(m.l_proj.weight.shape) == (320, 320)
    assert isinstance(m.sr, torch.nn.AvgPool2d)
    assert m.scale == 32 ** -0.5
    assert LITv2HiLo(384, 12, qk_scale=0).scale == 32 ** -0.5      # `or`: 0 falls back
    assert LITv2HiLo(384, 12, qk_scale=0.1).scale == 0.1
    # no bias on the qkv projections without qkv_bias; projections always have one
    m = LITv2HiLo(64, 4, qkv_bias=False)
    assert m.h_qkv.bias is None and m.l_q.bias is None and m.l_kv.bias is None
    assert m.h_proj.bias is not None and m.l_proj.bias is not None
    # ws = 1: plain MHSA, no sr, no Hi-Fi modules
    m = LITv2HiLo(64, 4, window_size=1, alpha=0.5)
    assert not hasattr(m, "sr") and not hasattr(m, "h_qkv") and m.l_dim == 64
    # alpha small: no Lo-Fi modules
    m = LITv2HiLo(64, 4, window_size=2, alpha=0.2)
    assert not hasattr(m, "l_q") and not hasattr(m, "sr")
    # dropout arguments are accepted and unused
    m = LITv2HiLo(64, 4, attn_drop=0.5, proj_drop=0.5).train()
    assert not any(isinstance(x, torch.nn.Dropout) for x in m.modules())
    with pytest.raises(AssertionError):
        LITv2HiLo(100, 12)


# ------------------------------------------------------------------------------------------------
# LITv2HiLo: forward semantics against an independent token-by-token evaluation of the spec
# ------------------------------------------------------------------------------------------------

def _naive_hilo(m: LITv2HiLo, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Spec section 1.3 / 1.5 evaluated per token, in fp64, with explicit loops (no reshapes)."""
    B, N, C = x.shape
    s, d = m.ws, m.head_dim
    pad = m.pad
    Hp, Wp = (s * math.ceil(H / s), s * math.ceil(W / s)) if pad else (H, W)
    xm = torch.zeros(B, Hp, Wp, C, dtype=torch.float64)
    xm[:, :H, :W] = x.reshape(B, H, W, C).double()
    lin = lambda layer, t: F.linear(t, layer.weight.double(), None if layer.bias is None else layer.bias.double())  # noqa: E731
    out = torch.zeros(B, H, W, C, dtype=torch.float64)
    hd, ld = m.h_dim, m.l_dim
    if m.h_heads:
        qkv = lin(m.h_qkv, xm)                                  # (B, Hp, Wp, 3 h_dim), channel part*h_dim + head*d + j
        o = torch.zeros(B, H, W, hd, dtype=torch.float64)
        for b in range(B):
            for r in range(H):
                for c in range(W):
                    r0, c0 = (r // s) * s, (c // s) * s
                    keys = [(r0 + dy, c0 + dx) for dy in range(s) for dx in range(s)]
                    for h in range(m.h_heads):
                        sl = lambda part: slice(part * hd + h * d, part * hd + (h + 1) * d)  # noqa: E731
                        q = qkv[b, r, c, sl(0)]
                        K = torch.stack([qkv[b, kr, kc, sl(1)] for kr, kc in keys])
                        V = torch.stack([qkv[b, kr, kc, sl(2)] for kr, kc in keys])
                        a = torch.softmax(m.scale * (K @ q), dim=0)
                        o[b, r, c, h * d:(h + 1) * d] = a @ V
        out[..., :hd] = lin(m.h_proj, o)
    if m.l_heads:
        if s > 1:
            gh, gw = Hp // s, Wp // s                            # floor: drops a partial row/col
            pooled = torch.stack([torch.stack([xm[:, i * s:(i + 1) * s, j * s:(j + 1) * s].mean(dim=(1, 2))
                                               for j in range(gw)], 1) for i in range(gh)], 1)
            xk = pooled.reshape(B, gh * gw, C)
        else:
            xk = xm.reshape(B, Hp * Wp, C)
        kv = lin(m.l_kv, xk)                                    # channel part*l_dim + head*d + j
        qq = lin(m.l_q, xm)
        o = torch.zeros(B, H, W, ld, dtype=torch.float64)
        for h in range(m.l_heads):
            K = kv[:, :, h * d:(h + 1) * d]
            V = kv[:, :, ld + h * d: ld + (h + 1) * d]
            q = qq[:, :H, :W, h * d:(h + 1) * d].reshape(B, H * W, d)
            a = torch.softmax(m.scale * q @ K.transpose(1, 2), dim=-1)
            o[..., h * d:(h + 1) * d] = (a @ V).reshape(B, H, W, d)
        out[..., hd:] = lin(m.l_proj, o)
    return out.reshape(B, N, C)


@pytest.mark.parametrize("dim,heads,alpha,ws,bias,H,W,pad", [
    (32, 4, 0.5, 2, True, 4, 6, False),
    (32, 4, 0.5, 2, True, 5, 7, True),      # detection padding: pad tokens are k = b_k, v = b_v
    (48, 3, 0.7, 3, True, 7, 5, True),
    (32, 4, 0.9, 1, True, 3, 5, False),     # ws = 1: MHSA
    (32, 4, 1.0, 2, True, 5, 5, False),     # no Hi-Fi heads, no padding: floor pooling drops row/col 4
    (32, 4, 0.2, 2, False, 4, 4, False),    # no Lo-Fi heads
    (32, 4, 0.5, 2, True, 1, 1, True),      # one token padded to one 2x2 window
])
def test_litv2_forward_matches_spec(dim, heads, alpha, ws, bias, H, W, pad):
    m = randomize_(LITv2HiLo(dim, heads, qkv_bias=bias, window_size=ws, alpha=alpha, pad=pad), std=0.3).double()
    x = torch.randn(2, H * W, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = m(x, H, W)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _naive_hilo(m, x, H, W), rtol=1e-10, atol=1e-10)


def test_litv2_padding_behaviour():
    m = LITv2HiLo(64, 4, qkv_bias=True, window_size=2, alpha=0.5, pad=False)
    x = torch.randn(2, 5 * 7, 64)
    with pytest.raises(RuntimeError):   # Hi-Fi window reshape: element count mismatch
        m(x, 5, 7)
    mp = LITv2HiLo(64, 4, qkv_bias=True, window_size=2, alpha=0.5, pad=True)
    mp.load_state_dict(m.state_dict(), strict=True)
    assert mp(x, 5, 7).shape == (2, 35, 64)
    # on a divisible map padding is a no-op
    x = torch.randn(2, 4 * 6, 64)
    torch.testing.assert_close(mp(x, 4, 6), m(x, 4, 6), rtol=0, atol=0)
    # state_dicts are interchangeable between the two copies
    assert sorted(mp.state_dict()) == sorted(m.state_dict())


def test_litv2_op_math_matches_module():
    """The op-level baseline (litv2_hilo_attention on projected q, k, v) reproduces the module."""
    m = randomize_(LITv2HiLo(96, 12, qkv_bias=True, window_size=2, alpha=0.9), std=0.2).double()
    H, W = 6, 8
    x = torch.randn(2, H * W, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    B, N, d = 2, H * W, m.head_dim
    hq = m.h_qkv(x).reshape(B, N, 3, m.h_heads, d).permute(2, 0, 3, 1, 4)
    lq = m.l_q(x).reshape(B, N, m.l_heads, d).transpose(1, 2)
    lkv = m.l_kv(x).reshape(B, N, 2, m.l_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = (torch.cat([hq[i], t], dim=1) for i, t in enumerate((lq, lkv[0], lkv[1])))
    o = litv2_hilo_attention(q, k, v, hw=(H, W), window_size=2, num_lo_heads=m.l_heads)
    o = o.transpose(1, 2)  # (B, N, heads, d)
    y = torch.cat([m.h_proj(o[:, :, :m.h_heads].reshape(B, N, -1)),
                   m.l_proj(o[:, :, m.h_heads:].reshape(B, N, -1))], dim=-1)
    torch.testing.assert_close(y, m(x, H, W), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in HILO_TEST_CASES if c.N <= 64], ids=lambda c: c.name)
def test_baselines_match_reference(case):
    """LITv2 math and the SDPA composites agree with vitkern's reference (op-level semantics)."""
    if not HAS_REF:
        pytest.skip("vitkern.reference.hilo not available yet")
    import vitkern.reference.hilo as ref

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, case.heads, case.N, case.head_dim, dtype=torch.float64, generator=g)
               for _ in range(3))
    pad = "zero" if case.needs_pad else None
    kw = dict(hw=case.hw, window_size=case.window_size)
    want = ref.hilo_attention(q, k, v, num_lo_heads=case.num_lo_heads, pad=pad, **kw)
    scale = case.head_dim ** -0.5
    got = litv2_hilo_attention(q, k, v, num_lo_heads=case.num_lo_heads, pad=bool(pad), **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got = bench_hilo.sdpa_hilo(q, k, v, num_lo_heads=case.num_lo_heads, scale=scale, pad=bool(pad), **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if case.num_hi_heads and case.window_size > 1:
        torch.testing.assert_close(litv2_hifi_attention(q, k, v, pad=bool(pad), **kw),
                                   ref.hilo_attention(q, k, v, num_lo_heads=0, pad=pad, **kw))
    if case.window_size > 1:
        kp, vp = (litv2_pool_kv(t, case.hw, case.window_size, bool(pad)) for t in (k, v))
        torch.testing.assert_close(litv2_lofi_attention(q, kp, vp, kv_pooled=True, **kw),
                                   ref.hilo_attention(q, k, v, num_lo_heads=case.heads, pad=pad, **kw))


# ------------------------------------------------------------------------------------------------
# Shape registry
# ------------------------------------------------------------------------------------------------

def test_shape_registry():
    names = [c.name for c in HILO_CASES + HILO_TEST_CASES]
    assert len(names) == len(set(names))
    s = get_case("litv2s_s3_224")
    assert (s.H, s.W, s.dim, s.heads, s.head_dim, s.num_lo_heads, s.num_hi_heads, s.M) == \
        (14, 14, 384, 12, 32, 10, 2, 49)
    b = get_case("litv2b_s3_224")
    assert (b.dim, b.heads, b.head_dim, b.num_lo_heads, b.num_hi_heads) == (512, 16, 32, 14, 2)
    assert get_case("litv2b_s3_384").M == 144
    assert get_case("litv2s_s3_448_ws4").M == 49 and get_case("litv2s_s3_448_ws2").M == 196
    L = get_case("hilo_layer_bench")
    assert (L.head_dim, L.num_lo_heads) == (64, 10)
    assert litv2_hilo_flops(L.H, L.W, L.dim, L.heads, L.window_size, L.alpha) == 298_296_320
    assert get_case("litv2s_s4_224").num_lo_heads == 24
    det = get_case("litv2s_s3_det_ws4")
    assert det.needs_pad and (det.Hp, det.Wp) == (52, 84)
    for c in HILO_CASES + HILO_TEST_CASES:
        h, l = litv2_head_split(c.heads, c.alpha, c.window_size)
        assert (c.num_hi_heads, c.num_lo_heads) == (h, l)
        assert c.batch_for("cuda") == c.batch and c.batch_for(torch.device("cpu")) == c.cpu_batch
        assert c.as_dict()["num_lo_heads"] == l
    assert all(c.batch == 64 for c in HILO_CASES if "det" not in c.tags)
    assert [c.name for c in hilo_cases(quick=True)] == list(HILO_QUICK_CASES)
    assert {c.name for c in hilo_cases("litv2b")} == {"litv2b_s3_224", "litv2b_s3_384"}
    assert {c.name for c in hilo_cases("det")} >= {"litv2s_s3_det_ws4"}
    with pytest.raises(KeyError):
        get_case("nope")
    with pytest.raises(ValueError):
        HiLoCase("bad", 4, 4, 30, 4, 0.5, 2)


def test_flop_model_matches_litv2_count():
    """Useful attention FLOPs = 2 x LITv2's attention-matmul MACs (divisible maps)."""
    for c in HILO_CASES:
        if c.needs_pad:
            continue
        d = c.head_dim
        s = c.window_size
        Np, nW = c.Hp * c.Wp, c.M
        h_dim, l_dim = c.num_hi_heads * d, c.num_lo_heads * d
        macs = nW * (s * s) ** 2 * 2 * h_dim + Np * l_dim * nW * 2
        B = 3
        f = bench_hilo.attention_flops(c, B, hi_heads=c.num_hi_heads, lo_heads=c.num_lo_heads, mode="fwd")
        assert f == 2 * macs * B
        assert bench_hilo.attention_flops(c, B, hi_heads=c.num_hi_heads, lo_heads=c.num_lo_heads,
                                          mode="fwd+bwd") == 3.5 * f
    c = get_case("litv2s_s3_224")
    e = 2
    assert bench_hilo.attention_bytes(c, 4, 12, e, mode="fwd") == e * 4 * 12 * 32 * 4 * 196
    assert bench_hilo.attention_bytes(c, 4, 10, e, mode="fwd", pooled=True) == e * 4 * 10 * 32 * (2 * 196 + 2 * 49)
    assert bench_hilo.layer_flops(c, 2, "fwd") == 2 * 2 * 77_697_536


# ------------------------------------------------------------------------------------------------
# Harness
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,model", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB"), ("NVIDIA GH200 480GB", "GH200 (H100 SXM-class)"),
])
def test_peak_lookup(name, model):
    spec = harness.lookup_peak(name)
    assert spec is not None and spec.model == model


def test_peak_lookup_unknown_and_override(monkeypatch):
    assert harness.lookup_peak("NVIDIA GeForce RTX 3090") is None
    dev = harness.device_info("cpu")
    assert dev.kind == "cpu" and dev.slug.startswith("cpu-") and dev.peak_tflops(torch.float16) is None
    monkeypatch.setenv("VITKERN_PEAK_TFLOPS", "100")
    monkeypatch.setenv("VITKERN_PEAK_GBPS", "1000")
    dev = harness.device_info("cpu")
    m = harness.metrics(2.0, 1e11, 1e9, dev, torch.float32)   # 2 ms
    assert m["tflops"] == pytest.approx(50.0) and m["gbps"] == pytest.approx(500.0)
    assert m["pct_peak_tflops"] == pytest.approx(50.0) and m["pct_peak_gbps"] == pytest.approx(50.0)
    monkeypatch.setenv("VITKERN_PEAK_TFLOPS", "fast")
    with pytest.raises(ValueError):
        harness.device_info("cpu")


def test_slug_and_paths(tmp_path):
    assert harness.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    p = harness.results_path(tmp_path, "nvidia-h100-80gb-hbm3", "2025-01-02")
    assert p == tmp_path / "nvidia-h100-80gb-hbm3-2025-01-02.json"
    assert harness.results_path(tmp_path, "x", "2025-01-02", suffix="-hilo", ext="png").name == "x-2025-01-02-hilo.png"


def test_cpu_timer_and_rotation():
    calls = []
    fn = harness.rotating(lambda a: calls.append(a), [(1,), (2,), (3,)])
    for _ in range(4):
        fn()
    assert calls == [1, 2, 3, 1]
    t = harness.bench_cpu(lambda: sum(range(1000)), warmup=1, min_reps=3, max_reps=5, min_time_s=0.0)
    assert 3 <= t.reps <= 5 and 0 < t.ms_p20 <= t.ms <= t.ms_p80
    ts = harness.bench_many({"a": lambda: None, "b": lambda: 1 / 0}, "cpu", quick=True)
    assert isinstance(ts["a"], harness.Timing) and isinstance(ts["b"], ZeroDivisionError)


def _fake_records():
    recs = []
    for case in ("litv2s_s3_224", "litv2b_s3_224"):
        for prov, kind, ms in (("vitkern[auto]", "vitkern", 0.5), ("litv2", "baseline", 1.0), ("sdpa", "baseline", 0.8)):
            recs.append({"family": "hilo", "case": case, "group": "hilo", "provider": prov, "kind": kind,
                         "mode": "fwd", "dtype": "bf16", "ms": ms, "tflops": 1.0, "gbps": 100.0,
                         "pct_peak_gbps": None, "status": "ok"})
        recs.append({"family": "hilo", "case": case, "group": "hifi", "provider": "flex", "kind": "baseline",
                     "mode": "fwd", "dtype": "bf16", "status": "skipped", "reason": "no CUDA"})
    harness.add_speedups([r for r in recs if r["case"] == "litv2s_s3_224"])
    harness.add_speedups([r for r in recs if r["case"] == "litv2b_s3_224"])
    return recs


def test_write_results_and_plot(tmp_path):
    recs = _fake_records()
    assert recs[0]["speedup"] == {"litv2": 2.0, "sdpa": pytest.approx(1.6)}
    dev = harness.device_info("cpu")
    meta = harness.environment(dev)
    for key in ("date", "device", "versions", "git"):
        assert key in meta
    assert {"python", "torch", "triton", "vitkern"} <= set(meta["versions"])
    path = harness.write_results(harness.results_path(tmp_path, dev.slug, meta["date"]), meta,
                                 recs + [{"x": float("nan")}])
    doc = json.loads(path.read_text())
    assert doc["meta"]["device"]["name"] == dev.name and len(doc["results"]) == len(recs) + 1
    assert doc["results"][-1]["x"] is None   # NaN -> null (strict JSON)
    png = harness.plot_speedups(recs, tmp_path / "p.png", title="t")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))
    assert harness.plot_speedups([r for r in recs if r["kind"] == "baseline"], tmp_path / "q.png") is None
    table = harness.format_table(recs)
    assert "vitkern[auto]" in table and "2.00x" in table


def test_wrong_provider_fails_loudly(monkeypatch):
    """A vitkern op that is off is not timed; the record says "wrong" and the run records a failure."""
    if not HAS_REF:
        pytest.skip("vitkern.reference.hilo not available yet")
    import vitkern.ops
    import vitkern.reference.hilo as ref

    def bad_hilo(q, k, v, **kw):
        kw.pop("backend", None)
        return ref.hilo_attention(q, k, v, **kw) + 0.05

    monkeypatch.setattr(vitkern.ops, "hilo_attention", bad_hilo)
    ctx = harness.Context(device=torch.device("cpu"), dev=harness.device_info("cpu"), quick=True,
                          batch=1, log=lambda s: None)
    task = harness.Task("hilo", get_case("t_small_even"), torch.float32, "hilo")
    recs = bench_hilo.run_task(task, ctx)
    vk = [r for r in recs if r["kind"] == "vitkern"]
    assert vk and all(r["status"] == "wrong" for r in vk) and ctx.failures
    assert vk[0]["max_abs_err"] == pytest.approx(0.05, rel=1e-4)
    assert all(r["status"] == "ok" for r in recs if r["kind"] == "baseline")
    ctx.strict = True
    with pytest.raises(harness.CorrectnessError):
        bench_hilo.run_task(task, ctx)


# ------------------------------------------------------------------------------------------------
# End to end: python -m vitkern.bench --quick
# ------------------------------------------------------------------------------------------------

def test_registry_groups_match_the_cli():
    """Every family registers the comparison groups that ``--groups`` documents, in that order."""
    from vitkern.bench import registry
    from vitkern.bench.__main__ import FAMILIES

    assert {f: registry.get(f).groups for f in FAMILIES} == {
        "hilo": ("hilo", "hifi", "lofi", "lofi_pooled", "layer"), "linear": ("xca", "linear", "soft"),
        "ppma": ("full", "criss_cross"), "token": ("kept", "cls", "model"),
        "window": ("attn", "block_attn", "sparse30", "sparse50", "sparse70")}


def test_registry_eager_flags_match_the_op_descriptors():
    """A benchmark family labels ``auto`` on a CPU as the eager path exactly when one of its ops
    declares an eager module (vitkern.ops' descriptors)."""
    from vitkern.bench import registry
    from vitkern.bench.__main__ import FAMILIES
    from vitkern.ops._dispatch import FAMILIES as OPS

    ops_of = {"linear": ("linear", "xca", "soft"), "ppma": ("ppma", "ppma_criss_cross")}
    for f in FAMILIES:
        declared = any(OPS[o].eager is not None for o in ops_of.get(f, (f,)))
        assert registry.get(f).eager == declared, f


def test_cli_quick_end_to_end(tmp_path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "vitkern.bench", "--quick", "--out", str(tmp_path), "--no-progress"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from vitkern.bench.__main__ import FAMILIES

    jsons = list(tmp_path.glob("*-quick.json"))
    pngs = {p.name.rsplit("-quick-", 1)[1][:-len(".png")]: p for p in tmp_path.glob("*-quick-*.png")}
    assert len(jsons) == 1 and set(pngs) == set(FAMILIES), (list(tmp_path.iterdir()), r.stdout[-2000:])
    text = jsons[0].read_text()
    assert str(tmp_path) not in text and str(REPO) not in text   # no absolute paths of this machine
    doc = json.loads(text)
    assert doc["meta"]["quick"] is True and doc["meta"]["device"]["kind"] in ("cpu", "cuda")
    assert doc["meta"]["failures"] == []
    assert {r["family"] for r in doc["results"]} == set(FAMILIES)   # the main job runs every family
    res = [r for r in doc["results"] if r["family"] == "hilo"]
    cases = {r["case"] for r in res}
    assert cases == set(HILO_QUICK_CASES)
    base = [r for r in res if r["provider"] in ("litv2", "litv2_module") and r["status"] == "ok"]
    assert base and all(r["ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0 for r in base)
    vk = [r for r in res if r["kind"] == "vitkern"]
    if HAS_OPS and HAS_REF:
        assert all(r["status"] == "ok" for r in vk), [(r["provider"], r.get("reason")) for r in vk]
        assert all(r["max_abs_err"] is not None and r["speedup"] for r in vk)
        assert {r["group"] for r in vk} >= {"hilo", "hifi", "lofi", "lofi_pooled"}
    if HAS_NN:
        assert any(r["group"] == "layer" and r["status"] == "ok" for r in vk)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs.values())


# ------------------------------------------------------------------------------------------------
# pytest-benchmark: one CPU microbenchmark, vitkern.nn.HiLo vs LITv2HiLo at LITv2-S stage 3
# ------------------------------------------------------------------------------------------------

def _layer_pair():
    c = get_case("litv2s_s3_224")
    lit = randomize_(LITv2HiLo(c.dim, c.heads, qkv_bias=True, window_size=c.window_size, alpha=c.alpha)).eval()
    x = torch.randn(2, c.N, c.dim, generator=torch.Generator().manual_seed(0))
    return c, lit, x


@pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None, reason="pytest-benchmark not installed")
@pytest.mark.parametrize("impl", ["litv2", "vitkern"])
def test_microbench_hilo_layer_cpu(benchmark, impl):
    c, lit, x = _layer_pair()
    if impl == "vitkern":
        if not HAS_NN:
            pytest.skip("vitkern.nn.HiLo not available yet")
        from vitkern.nn import HiLo

        m = HiLo(c.dim, c.heads, qkv_bias=True, window_size=c.window_size, alpha=c.alpha).eval()
        m.load_state_dict(lit.state_dict(), strict=True)
    else:
        m = lit
    benchmark.group = "hilo-layer litv2s_s3_224 cpu B=2 fp32 1 thread"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # multi-threaded CPU timings are erratic on a shared machine
    try:
        with torch.no_grad():
            out = benchmark.pedantic(m, args=(x, c.H, c.W), rounds=10, iterations=1, warmup_rounds=2)
            torch.testing.assert_close(out, lit(x, c.H, c.W), rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# python -m vitkern.bench.approve: which CUDA C++ kernels backend="auto" may pick
# ------------------------------------------------------------------------------------------------

def _junit(path, outcomes):
    cases = "".join(
        f'<testcase classname="tests.test_csrc_hilo" name="{n}">'
        + {"passed": "", "failed": "<failure message='x'/>", "skipped": "<skipped message='x'/>"}[o]
        + "</testcase>" for n, o in outcomes.items())
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}'
                    "</testsuite></testsuites>")
    return path


def _gpu_results(path, records, kind="cuda"):
    rec = []
    for group, mode, dtype, cuda_ms, triton_ms, extra in records:
        base = {"family": "window" if group == "attn" else "hilo", "case": f"c{len(rec)}",
                "group": group, "mode": mode, "dtype": dtype, "kind": "vitkern"}
        pair = [dict(base, provider="vitkern[triton]", status="ok", ms=triton_ms),
                {**base, "provider": "vitkern[cuda]", "status": "ok", "ms": cuda_ms, **extra}]
        harness.add_speedups(pair)  # per task, as the benchmark does
        rec += pair
    meta = {"device": {"kind": kind, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}}
    path.write_text(json.dumps({"schema": "vitkern.bench/1", "meta": meta, "results": rec}))
    return path


def test_approve_rule(tmp_path, monkeypatch):
    from vitkern import cuda_auto
    from vitkern.bench import approve

    tests = {"test_cuda_hifi_matches_reference[a-fp16]": "passed",
             "test_cuda_lofi_matches_reference[a-fp16]": "passed",
             "test_cuda_window_matches_reference[a-fp16]": "skipped",
             "test_other": "passed"}
    junit = _junit(tmp_path / "j.xml", tests)
    res = _gpu_results(tmp_path / "h100-2026-11-21.json", [
        ("hifi", "fwd", "fp16", 1.0, 2.0, {}), ("hifi", "fwd", "fp16", 1.0, 1.5, {}),
        ("hifi", "fwd+bwd", "fp16", 1.0, 1.02, {}),                  # too little: stays triton
        ("hifi", "fwd", "bf16", 1.0, 3.0, {}), ("hifi", "fwd", "bf16", 1.0, 0.8, {}),  # slow case
        ("lofi", "fwd", "fp16", 1.0, 1.2, {}),
        ("lofi", "fwd+bwd", "fp16", 1.0, 1.0,                         # refused: not a lofi record
         {"status": "skipped", "reason": "refused by design: forward-only"}),
        ("lofi_pooled", "fwd", "fp16", 1.0, 1.3,
         {"status": "skipped", "reason": "refused by design: window_size 9"}),
        ("attn", "fwd", "fp16", 1.0, 2.0, {})])                      # its GPU tests were skipped
    cpu = _gpu_results(tmp_path / "cpu.json", [("hifi", "fwd", "fp32", 1.0, 9.0, {})], kind="cpu")
    approved, lines = approve.approve(junit, [res, cpu])
    got = {(e["kernel"], e["dtype"]): e for e in approved}
    assert set(got) == {("hifi_fwd", "float16"), ("lofi_fwd", "float16")}, lines
    assert got[("hifi_fwd", "float16")]["speedup_vs_triton"] == pytest.approx(math.sqrt(3.0), rel=1e-3)
    assert got[("hifi_fwd", "float16")]["results"] == "bench/results/h100-2026-11-21.json"
    assert got[("lofi_fwd", "float16")]["cases"] == 1 and all(e["capability"] == "9.0" for e in approved)
    text = "\n".join(lines)
    assert "hifi_bwd sm_90 fp16: stays with triton: geomean speedup over triton 1.020 < 1.05" in text
    assert "hifi_fwd sm_90 bf16: stays with triton: slowest case 0.800x triton < 0.9" in text
    assert "window_fwd sm_90 fp16: stays with triton: 1 of its 1 GPU tests were skipped" in text
    assert "fp32" not in text  # the CPU run is ignored

    # a failure anywhere in the tier approves nothing; a wrong record blocks its kernel
    bad = _junit(tmp_path / "bad.xml", dict(tests, test_other="failed"))
    assert approve.approve(bad, [res])[0] == []
    wrong = _gpu_results(tmp_path / "w.json", [("hifi", "fwd", "fp16", 1.0, 2.0,
                                                  {"status": "wrong", "reason": "off"})])
    assert approve.approve(junit, [wrong])[0] == []
    # the backward is approved only with the forward
    fast_bwd = _gpu_results(tmp_path / "b.json", [("hifi", "fwd+bwd", "fp16", 1.0, 2.0, {}),
                                                   ("hifi", "fwd", "fp16", 1.0, 1.01, {})])
    approved, lines = approve.approve(junit, [fast_bwd])
    assert approved == [] and "hifi_fwd is not approved" in "\n".join(lines)
    both = _gpu_results(tmp_path / "b2.json", [("hifi", "fwd+bwd", "fp16", 1.0, 2.0, {}),
                                                ("hifi", "fwd", "fp16", 1.0, 1.5, {})])
    assert [e["kernel"] for e in approve.approve(junit, [both])[0]] == ["hifi_fwd", "hifi_bwd"]

    # --write: the file that dispatch reads
    out = tmp_path / "cuda_auto.json"
    monkeypatch.setattr(cuda_auto, "PATH", out)
    assert approve.main(["--junit", str(junit), str(res), "--write"]) == 0
    monkeypatch.setattr(cuda_auto, "capability", lambda index: "9.0")
    cuda_auto._approved.cache_clear()
    try:
        assert {(e["kernel"], e["dtype"]) for e in cuda_auto.approvals()} == set(got)
        assert cuda_auto._reason("hifi_fwd,lofi_fwd", 0, "float16") == ""
        assert "window_fwd not approved" in cuda_auto._reason("hifi_fwd,window_fwd", 0, "float16")
    finally:
        cuda_auto._approved.cache_clear()


def test_committed_cuda_auto_file():
    """vitkern/cuda_auto.json parses, and every approval cites a committed GPU results file."""
    from vitkern import cuda_auto

    cuda_auto._approved.cache_clear()
    doc = json.loads(cuda_auto.PATH.read_text())
    assert doc["schema"] == cuda_auto.SCHEMA and "rule" in doc
    for e in cuda_auto.approvals():
        results = json.loads((Path(__file__).resolve().parents[1] / e["results"]).read_text())
        assert results["meta"]["device"]["kind"] == "cuda"
        assert results["meta"]["device"]["capability"] == e["capability"]
        assert e["speedup_vs_triton"] >= 1.05
