"""The work counter (bench/work.py): exact counts on hand-written kernels, sane counts on a real op,
and the roofline model's arithmetic."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("the work counter runs under the Triton interpreter", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from vitkern.bench import work  # noqa: E402


@triton.jit
def _copy(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=m), mask=m)


@triton.jit
def _copy2d(X, Y, R, C, BR: tl.constexpr, BC: tl.constexpr):
    r = tl.arange(0, BR)[:, None]
    c = tl.arange(0, BC)[None, :]
    m = (r < R) & (c < C)   # a broadcast 2-D mask
    x = tl.load(X + r * C + c, mask=m, other=0.0)
    tl.store(Y + r * C + c, x, mask=m)


@triton.jit
def _dot(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    tl.store(C + rm[:, None] * N + rn[None, :], tl.dot(a, b))


@triton.jit
def _dot32(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    tl.store(C + rm[:, None] * N + rn[None, :], tl.dot(a, b, input_precision="tf32x3"))


@triton.jit
def _exps(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m, other=1.0)
    y = tl.exp(x) + tl.exp2(x) + tl.log(x + 2.0)   # the full tile: masked lanes are computed
    tl.store(Y + offs, y, mask=m)


def test_masked_copy_exact():
    x = torch.arange(10, dtype=torch.float32)
    y = torch.empty_like(x)
    with work.WorkCounter() as c:
        _copy[(2,)](x, y, 10, BLOCK=8)
        _copy[(2,)](x, y, 10, BLOCK=8)
    assert torch.equal(x, y)
    k = c.kernels["_copy"]
    assert (k.launches, k.programs) == (2, 4)
    assert (k.bytes_read, k.bytes_written) == (2 * 10 * 4, 2 * 10 * 4)
    assert k.flops == 0 and k.exps == 0


@triton.jit
def _reread(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs) + tl.load(X + offs))


def test_per_launch_and_distinct_bytes():
    x, y = torch.ones(8), torch.empty(8)
    with work.WorkCounter(per_launch=True, unique=True) as c:
        _reread[(1,)](x, y, BLOCK=8)
        _reread[(3,)](x, y, BLOCK=8)     # three programs read and write the same 8 elements
    assert list(c.kernels) == ["_reread", "_reread#2"]
    k1, k2 = c.kernels.values()
    assert (k1.bytes_read, k1.unique_read, k1.bytes_written, k1.unique_written) == (64, 32, 32, 32)
    assert (k2.bytes_read, k2.unique_read, k2.bytes_written, k2.unique_written) == (192, 32, 96, 32)
    assert c.total().launches == 2 and c.total().programs == 4


def test_masked_2d_fp16_exact():
    x = torch.randn(3, 5).half()
    y = torch.zeros_like(x)
    with work.WorkCounter() as c:
        _copy2d[(1,)](x, y, 3, 5, BR=4, BC=8)
    assert torch.equal(x, y)
    k = c.kernels["_copy2d"]
    assert (k.bytes_read, k.bytes_written, k.programs) == (15 * 2, 15 * 2, 1)


def test_dot_exact():
    a, b = torch.randn(16, 32).half(), torch.randn(32, 16).half()
    out = torch.empty(16, 16)
    with work.WorkCounter() as c:
        _dot[(3,)](a, b, out, M=16, N=16, K=32)
    k = c.kernels["_dot"]
    assert k.dot_flops == {"tc16": 3 * 2 * 16 * 16 * 32}
    assert k.bytes_read == 3 * (16 * 32 + 32 * 16) * 2
    assert k.bytes_written == 3 * 16 * 16 * 4
    torch.testing.assert_close(out, (a.float() @ b.float()), atol=1e-2, rtol=1e-2)


def test_dot_fp32_precision_class():
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    out = torch.empty(16, 16)
    with work.WorkCounter() as c:
        _dot32[(1,)](a, b, out, M=16, N=16, K=16)
    assert c.kernels["_dot32"].dot_flops == {"tf32x3": 2 * 16 ** 3}


def test_exp_log_exact():
    x = torch.rand(5)
    y = torch.empty_like(x)
    with work.WorkCounter() as c:
        _exps[(1,)](x, y, 5, BLOCK=8)
    torch.testing.assert_close(y, x.exp() + torch.exp2(x) + torch.log(x + 2))
    assert c.kernels["_exps"].exps == 3 * 8


def test_restores_interpreter():
    from triton.runtime import interpreter as itp
    before = {m: itp.InterpreterBuilder.__dict__.get(m) for m in
              ("create_masked_load", "create_masked_store", "create_dot", "create_exp",
               "create_exp2", "create_log", "create_log2", "set_grid_dim")}
    call = itp.GridExecutor.__dict__["__call__"]
    with pytest.raises(ZeroDivisionError):
        with work.WorkCounter():
            1 / 0
    assert {m: itp.InterpreterBuilder.__dict__.get(m) for m in before} == before
    assert itp.GridExecutor.__dict__["__call__"] is call
    run = itp.InterpretedFunction.__dict__["run"]
    with work.StubbedLaunches():
        y = torch.zeros(4)
        _copy[(1,)](torch.ones(4), y, 4, BLOCK=4)
        assert y.sum() == 0     # launch stubbed
    assert itp.InterpretedFunction.__dict__["run"] is run


def test_real_op_counts_are_sane():
    from vitkern import ops

    B, heads, H, W, s, d, n_lo = 1, 2, 4, 6, 2, 16, 1
    N, M = H * W, (H // s) * (W // s)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, N, d, generator=g).half().requires_grad_() for _ in range(3))
    with work.WorkCounter() as c:
        o = ops.hilo_attention(q, k, v, hw=(H, W), window_size=s, num_lo_heads=n_lo,
                               backend="triton")
    fwd = c.total()
    with work.WorkCounter() as cb:
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    bwd = cb.total()
    E = 2
    min_fwd = E * heads * N * d * 4                    # q, k, v read, o written
    useful = B * N * ((heads - n_lo) * 4 * s * s * d + n_lo * 4 * M * d)
    assert fwd.bytes_read + fwd.bytes_written >= min_fwd
    assert fwd.flops >= useful and fwd.exps >= N * heads
    assert fwd.launches >= 1 and fwd.programs >= fwd.launches
    min_bwd = E * heads * N * d * 8                    # q, k, v, o, dO read; dq, dk, dv written
    assert bwd.bytes_read + bwd.bytes_written >= min_bwd
    assert bwd.flops >= 2.5 * useful
    # the roofline of these counts: positive, and the binding resource is one of the four
    t = work.op_time(list(c.kernels.values()), batch=64)
    assert t["time_us"] > 0 and t["binding"] in ("hbm", "tensor", "exp", "launch")


def test_roofline_arithmetic():
    k = work.KernelWork("k", launches=1, programs=1, bytes_read=int(3.35e6), bytes_written=0,
                        dot_flops={"tc16": int(989e6)}, exps=0)
    t = work.kernel_time(k, batch=1)
    assert t["bounds_us"]["hbm"] == pytest.approx(1.0) and t["bounds_us"]["tensor"] == pytest.approx(1.0)
    assert t["binding"] == "launch" and t["time_us"] == pytest.approx(4.0)
    t = work.kernel_time(k, batch=100)
    assert t["time_us"] == pytest.approx(100.0)
    e = work.Eager()
    e.mm("mm", 1, 8, 8, 8)
    assert e.fwd[0].flops == 2 * 8 ** 3 and sum(x.flops for x in e.bwd) == 2 * 2 * 8 ** 3


@pytest.mark.parametrize("precision,cls", [("highest", "tf32x3"), ("high", "tf32"),
                                           ("medium", "tf32")])
def test_fp32_dots_follow_matmul_precision(precision, cls):
    """fp32 inputs keep fp32 accuracy (tf32x3 dots) by default; torch's matmul precision "high" /
    "medium" (the user choosing speed, as torch.matmul and SDPA do) makes them one TF32 pass, in
    every family (the linear family too)."""
    from vitkern.ops import linear_attention, soft_attention, token_attention, window_attention
    from vitkern.ops import xca_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 36, 16, generator=g) for _ in range(3))
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        for op in (lambda: window_attention(q, k, v, hw=(6, 6), window_size=3, shift=1,
                                            backend="triton"),
                   lambda: token_attention(q, k, v, backend="triton"),
                   lambda: linear_attention(q, k, v, backend="triton"),
                   lambda: xca_attention(q, k, v, temperature=1.0, backend="triton"),
                   lambda: soft_attention(q, q[:, :, :4], v, backend="triton")):
            _, c = work.count(op)
            classes = {name for kw in c.kernels.values() for name in kw.dot_flops}
            assert classes == {cls}, classes
    finally:
        torch.set_float32_matmul_precision(old)
