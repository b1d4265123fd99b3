"""Test harness: Triton interpreter on GPU-less machines, NaN-poisoned allocations, tolerances.

* No CUDA device -> ``TRITON_INTERPRET=1`` is set here, before anything imports triton, so every
  Triton kernel runs on CPU tensors (fp32 / fp16 only: the interpreter's bf16 ``tl.dot`` is wrong).
* ``torch.empty`` & co. called from vitkern code return NaN-filled tensors, so a kernel that
  leaves an output element unwritten fails loudly instead of passing on stale zeros.
"""
from __future__ import annotations

import os
import sys
import time

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

#: (device, dtype) pairs the kernel tests run on: CPU interpreter fp32/fp16, CUDA adds bf16.
KERNEL_DEVICES = [("cpu", torch.float32), ("cpu", torch.float16)]
if HAS_CUDA:
    KERNEL_DEVICES = [("cuda", dt) for dt in (torch.float32, torch.float16, torch.bfloat16)]
#: ``VITKERN_TEST_DTYPES=bfloat16[,float32...]``: only these (the GPU tier's first pass: bf16 is
#: what the CPU cannot test, and each dtype is another compile of every kernel specialisation)
if os.environ.get("VITKERN_TEST_DTYPES"):
    _wanted = set(os.environ["VITKERN_TEST_DTYPES"].split(","))
    KERNEL_DEVICES = [(dev, dt) for dev, dt in KERNEL_DEVICES if str(dt).split(".")[-1] in _wanted]


def _called_from_vitkern(depth: int = 2) -> bool:
    frame = sys._getframe(depth)
    return frame.f_globals.get("__name__", "").startswith("vitkern")


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if _called_from_vitkern() and out.is_floating_point():
            out.fill_(float("nan"))
        return out

    return wrapper


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config, items):
    """``VITKERN_TEST_LIMIT=N`` keeps the first N selected tests (the GPU tier's rehearsal and
    sanitizer cases)."""
    limit = int(os.environ.get("VITKERN_TEST_LIMIT", "0") or 0)
    if 0 < limit < len(items):
        config.hook.pytest_deselected(items=items[limit:])
        del items[limit:]


def pytest_runtest_setup(item):
    """``VITKERN_TEST_DEADLINE=<unix time>``: tests not started by then are skipped, so a GPU-tier
    stage that runs out of time still ends its session and writes its JUnit report."""
    deadline = float(os.environ.get("VITKERN_TEST_DEADLINE", "0") or 0)
    if deadline and time.time() > deadline:
        pytest.skip("GPU tier: this stage's time is spent")


@pytest.fixture(autouse=True)
def fresh_call_caches():
    """Each test dispatches its calls afresh (tests patch what dispatch reads: approvals, device
    rules), as a new process would."""
    from vitkern.ops._dispatch import CallCache

    CallCache.clear_all()
    yield


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    """Uninitialised memory handed out to vitkern code is NaN (FLA's trick)."""
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


def assert_close(out, ref, lowp_ref=None, *, name="out", rtol32=1e-5, factor=3.0):
    """FlashAttention's rule against an fp64 reference ``ref``.

    fp32: max error <= rtol32 * max|ref| (plus a tiny floor). fp16/bf16: max error <= ``factor`` ×
    the error of the same math done by PyTorch in that dtype (``lowp_ref``), plus a floor.
    NaN fails.
    """
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    ref = ref.to(torch.float64)
    err = (out.to(torch.float64) - ref).abs().max().item()
    mag = ref.abs().max().item()
    if out.dtype == torch.float32 or lowp_ref is None:
        bound = rtol32 * max(mag, 1.0)
    else:
        base = (lowp_ref.to(torch.float64) - ref).abs().max().item()
        floor = torch.finfo(out.dtype).eps * max(mag, 1.0)
        bound = factor * base + floor
    assert err <= bound, f"{name}: max abs error {err:.3g} > bound {bound:.3g} (max|ref| {mag:.3g})"


def check_against_reference(run_kernel, run_ref, inputs, dtype,
                            names=("dq", "dk", "dv", "dbias")):
    """Kernel output and every input gradient vs the fp64 CPU reference, each bounded by the
    error of the same PyTorch math in the kernel's dtype (fp32: by ``rtol32``)."""
    out = run_kernel(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(out.device)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref = run_ref(*ref_in)
    lowp_in = [t.detach().clone().requires_grad_() for t in inputs]
    lowp = run_ref(*lowp_in) if dtype != torch.float32 else None
    assert_close(out.cpu(), ref, None if lowp is None else lowp.cpu(), name="out")
    grads = torch.autograd.grad(out, inputs, grad.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_in, grad.cpu())
    lowp_grads = (torch.autograd.grad(lowp, lowp_in, grad.to(dtype)) if lowp is not None
                  else [None] * len(inputs))
    for name, g, rg, lg in zip(names, grads, ref_grads, lowp_grads):
        assert g.shape == rg.shape and g.dtype == dtype, name
        assert_close(g.cpu(), rg, None if lg is None else lg.cpu(), name=name)


class KernelSpy:
    """A jit kernel that records ``name`` in ``log`` each time it is bound to a grid
    (``spy[grid]``: once per launch plan). Installed by :func:`spy_on`."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]

    def __getattr__(self, attr):  # .fn (the python function), .warmup, ...: the kernel's
        return getattr(self.kernel, attr)


def spy_on(monkeypatch, launcher, name, log) -> None:
    """Record ``launcher``'s launch plans under ``name`` in ``log`` (the plans it had are
    forgotten, so the next launch of each signature binds the spy)."""
    monkeypatch.setattr(launcher, "fn", KernelSpy(launcher.fn, name, log))
    monkeypatch.setattr(launcher, "_plans", {})
