"""The host path of an op call: what runs in Python between the call and the kernel launch.

Three mechanisms keep it short (issue 15: host overhead at ViT sizes, where kernels run for
microseconds): :class:`vitkern.ops._common.KernelOp` (plain eager calls skip the torch.library
dispatcher, and give the same bits as the dispatcher route), :class:`vitkern.ops._dispatch.
CallCache` (checks and dispatch once per call signature; invalid calls still raise) and
:meth:`vitkern.triton_kernels.tuning.Launcher.launch` (a launch's arguments bound once per launch
key; never a stale tensor).
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitkern import ops
from vitkern.ops import _dispatch
from vitkern.ops import hilo as hilo_op
from vitkern.ops import token as token_op
from vitkern.ops import window as window_op
from vitkern.triton_kernels import tuning
from vitkern.triton_kernels import window as window_tk


class _Passthrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: with it active, every op goes through the
    dispatcher (the route torch.compile, FakeTensorMode and FlopCounterMode see)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the interpreter


def _inputs(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(DEVICE) for _ in range(n)]


def _window(q, k, v, bias):
    return ops.window_attention(q, k, v, hw=(6, 6), window_size=3, shift=1, rel_pos_bias=bias,
                                backend="triton")


#: (name, op on leaves, leaves' shapes): one small call per family, Triton backend
CASES = [
    ("window", _window, [(1, 2, 36, 16)] * 3 + [(25, 2)]),
    ("hilo", lambda q, k, v: ops.hilo_attention(q, k, v, hw=(4, 6), window_size=2,
                                                num_lo_heads=1, backend="triton"),
     [(1, 2, 24, 16)] * 3),
    ("token", lambda q, k, v, b: ops.token_attention(q, k, v, key_bias=b, backend="triton"),
     [(1, 2, 20, 16)] * 3 + [(1, 20)]),
    ("xca", lambda q, k, v, t: ops.xca_attention(q, k, v, temperature=t, backend="triton"),
     [(1, 2, 20, 16)] * 3 + [(2, 1, 1)]),
    ("ppma", lambda q, k, v, a, g: ops.ppma_attention(q, k, v, a, g, hw=(4, 5),
                                                      backend="triton"),
     [(1, 2, 20, 16)] * 3 + [(1, 2, 20)] * 2),
]


def _leaves(shapes, seed=0):
    """Inputs of one case: q, k, v (B, h, N, d), then its other tensors (PPMA's log-decays
    <= 0)."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(*s, generator=g) for s in shapes]
    if len(shapes) == 5:
        out[3:] = [-x.abs() for x in out[3:]]
    return [x.to(DEVICE) for x in out]


def _run(fn, shapes, seed=0):
    leaves = [x.requires_grad_() for x in _leaves(shapes, seed)]
    o = fn(*leaves)
    grads = torch.autograd.grad(o, leaves, torch.ones_like(o))
    return o.detach(), grads


@pytest.mark.parametrize("name,fn,shapes", CASES, ids=[c[0] for c in CASES])
def test_eager_route_matches_dispatcher_route(name, fn, shapes):
    """The eager fast path (no dispatcher) and the dispatcher route run the same implementation
    and backward: the same bits, forward and every gradient."""
    o1, g1 = _run(fn, shapes)
    with _Passthrough():
        o2, g2 = _run(fn, shapes)
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    """A plain eager call, with or without gradients, never enters the custom op; a dispatch
    mode, or a tensor subclass, sends it there."""
    calls = []
    real = window_op._window_fwd.op
    monkeypatch.setattr(window_op._window_fwd, "op",
                        lambda *a: calls.append(1) or real(*a))
    q, k, v = _inputs((1, 2, 36, 16), 3)
    bias = torch.zeros(25, 2, device=DEVICE)
    with torch.no_grad():
        _window(q, k, v, bias)
    _window(q.requires_grad_(), k, v, bias).sum().backward()
    assert calls == []
    with _Passthrough():
        _window(q, k, v, bias)
    assert calls == [1]

    class Sub(torch.Tensor):
        pass

    with torch.no_grad():
        _window(q.detach().as_subclass(Sub), k, v, bias)
    assert calls == [1, 1]


def test_in_place_out_bumps_the_version_counter():
    """An out= call writes ``out`` in place: autograd's version counter sees it on the eager
    route as the dispatcher's mutation registration would have shown it."""
    q, k, v = _inputs((1, 2, 36, 16), 3)
    out = torch.zeros_like(q)
    before = out._version
    with torch.no_grad():
        ops.window_attention(q, k, v, hw=(6, 6), window_size=3, out=out, backend="triton")
    assert out._version > before


def test_double_backward_still_refused():
    """create_graph=True differentiates the backward op, which has no autograd formula: the
    dispatcher says so (as before the fast path), rather than a silently wrong second
    derivative."""
    q, k, v = (x.requires_grad_() for x in _inputs((1, 2, 36, 16), 3))
    o = _window(q, k, v, None)
    (gq,) = torch.autograd.grad(o.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gq.sum(), q)


# --------------------------------------------------------------------------------------------
# CallCache: checks and dispatch once per call signature
# --------------------------------------------------------------------------------------------


def test_repeated_call_skips_checks_and_dispatch(monkeypatch):
    q, k, v = _inputs((1, 2, 36, 16), 3)
    with torch.no_grad():
        _window(q, k, v, None)  # plans the signature
        seen = []
        for module in (window_op, hilo_op):
            monkeypatch.setattr(module, "dispatch", lambda *a: seen.append(a) or "triton")
            monkeypatch.setattr(module, "_check", lambda *a, **kw: seen.append(a))
        q2, k2, v2 = _inputs((1, 2, 36, 16), 3, seed=1)
        o = _window(q2, k2, v2, None)
        assert seen == []
        monkeypatch.undo()
        ref = ops.window_attention(q2, k2, v2, hw=(6, 6), window_size=3, shift=1,
                                   backend="reference")
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(shift=True), dict(window_size=3.0), dict(hw=(6.0, 6)),
                                 dict(hw=[6, True])])
def test_cached_signature_does_not_admit_an_equal_but_invalid_call(bad):
    """True == 1 and 3.0 == 3 in Python, but only the ints are valid arguments: a cached valid
    call must not let the invalid one through."""
    q, k, v = _inputs((1, 2, 36, 16), 3)
    kw = dict(hw=(6, 6), window_size=3, shift=1, backend="triton")
    with torch.no_grad():
        ops.window_attention(q, k, v, **kw)
        with pytest.raises((TypeError, ValueError)):
            ops.window_attention(q, k, v, **{**kw, **bad})


def test_cache_follows_backend_environment(monkeypatch):
    """VITKERN_BACKEND is part of the signature: changing it between calls re-dispatches."""
    q, k, v = _inputs((1, 2, 20, 16), 3)
    chosen = []
    real = _dispatch.dispatch
    monkeypatch.setattr(token_op, "dispatch", lambda *a: chosen.append(real(*a)) or chosen[-1])
    with torch.no_grad():
        ops.token_attention(q, k, v)
        monkeypatch.setenv("VITKERN_BACKEND", "reference")
        ops.token_attention(q, k, v)
    assert chosen == ["eager", "reference"]


def test_value_checks_are_never_skipped():
    """Index tensors whose values the op checks (CPU tensors) are checked on every call, even
    after a valid call of the same signature (whose metadata checks are then looked up)."""
    q, k, v = (x.cpu() for x in _inputs((2, 2, 36, 16), 3))
    with torch.no_grad():
        keep = torch.tensor([[0, 3, 5], [1, 2, 4]])
        ops.token_attention(q, k, v, keep_idx=keep, backend="eager")
        with pytest.raises(ValueError, match="out-of-range"):
            ops.token_attention(q, k, v, keep_idx=torch.tensor([[0, 3, 50], [1, 2, 4]]),
                                backend="eager")
        with pytest.raises(ValueError, match="duplicate"):
            ops.token_attention(q, k, v, keep_idx=torch.tensor([[0, 3, 3], [1, 2, 4]]),
                                backend="eager")
        tokens = q.transpose(1, 2).reshape(72, 2, 16)
        cu, kw = torch.tensor([0, 30, 72]), dict(max_seqlen=42, backend="eager")
        ops.token_attention(tokens, tokens, tokens, cu_seqlens=cu, **kw)
        with pytest.raises(ValueError, match="shorter than the longest"):
            ops.token_attention(tokens, tokens, tokens, cu_seqlens=torch.tensor([0, 10, 72]), **kw)
        win = dict(hw=(6, 6), window_size=3, backend="reference")
        ops.window_attention(q, k, v, active_windows=torch.tensor([[0, 1], [2, 3]]), **win)
        with pytest.raises(ValueError, match="out-of-range"):
            ops.window_attention(q, k, v, active_windows=torch.tensor([[0, 9], [2, 3]]), **win)
        with pytest.raises(ValueError, match="twice"):
            ops.window_attention(q, k, v, active_windows=torch.tensor([[1, 1], [2, 3]]), **win)


def test_call_cache_is_bounded_and_skips_unhashable():
    cache = _dispatch.CallCache(size=2)
    for i in range(5):
        cache.put(cache.key(i), i)
    assert len(cache._entries) <= 2
    key = cache.key([1, {2: 3}])
    assert cache.get(key) is None and cache.put(key, 7) == 7 and cache.get(key) is None


# --------------------------------------------------------------------------------------------
# Launcher.launch: bound once per key, tensors always the call's own
# --------------------------------------------------------------------------------------------


def test_launch_plan_binds_once_and_uses_each_calls_tensors(monkeypatch):
    q, k, v = _inputs((1, 2, 36, 16), 3)
    built = []
    real = window_tk._launch_args
    monkeypatch.setattr(window_tk, "_launch_args", lambda *a: built.append(1) or real(*a))
    window_tk.window_fwd._plans.clear()
    outs = []
    with torch.no_grad():
        for seed in range(3):
            q, k, v = _inputs((1, 2, 36, 16), 3, seed=seed)
            outs.append((_window(q, k, v, None), ops.window_attention(
                q, k, v, hw=(6, 6), window_size=3, shift=1, backend="reference")))
    assert len(built) == 1
    for o, ref in outs:
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


def test_launch_refuses_a_tensor_among_the_scalars():
    q, k, v = _inputs((1, 2, 36, 16), 3)
    o, lse = torch.empty_like(q), torch.empty(1, 2, 36, device=DEVICE)
    geo = window_tk.geometry(6, 6, 3, 3, 1, 1, False)
    with pytest.raises(TypeError, match=r"\['O'\]"):
        window_tk.window_fwd.launch(
            ("test", 1), lambda meta: (1,), dict(Q=q, K=k, V=v, LSE=lse, BIAS=lse, AW=lse),
            lambda: dict(O=o, **window_tk.strides_of("o", o), n_virt=geo["n_virt"],
                         NS=geo["NS"], **window_tk._launch_args(q, k, v, lse, None, geo, 0.25,
                                                                -100.0, None)))


def test_launch_key_follows_matmul_precision():
    q = torch.ones(2, 2)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        a = tuning.launch_key(1, q)
        torch.set_float32_matmul_precision("high")
        assert tuning.launch_key(1, q) != a
    finally:
        torch.set_float32_matmul_precision(old)


# --------------------------------------------------------------------------------------------
# the whole host path: how much Python a repeated forward call runs
# --------------------------------------------------------------------------------------------

#: vitkern / triton_kernels Python functions a repeated forward call may run (measured: 16-23
#: when this test was written; before the fast paths, 60-100 with checks, dispatch and ~50
#: keyword arguments per launch, plus the dispatcher's own Python)
MAX_VITKERN_CALLS = 30


@pytest.mark.parametrize("name,fn,shapes", CASES, ids=[c[0] for c in CASES])
def test_repeated_forward_runs_little_python(name, fn, shapes, monkeypatch):
    """A repeated forward call runs a bounded number of vitkern Python functions, and neither
    the checks nor the dispatch (the launch itself is stubbed under the interpreter)."""
    if DEVICE == "cpu":
        from triton.runtime import interpreter

        monkeypatch.setattr(interpreter.InterpretedFunction, "run", lambda *a, **kw: None)
    leaves = _leaves(shapes)
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_globals.get("__name__", "").startswith("vitkern"):
            calls.append(frame.f_code.co_name)

    with torch.no_grad():
        fn(*leaves)
        sys.setprofile(profile)
        try:
            fn(*leaves)
        finally:
            sys.setprofile(None)
    assert "dispatch" not in calls and "_check" not in calls, calls
    assert len(calls) <= MAX_VITKERN_CALLS, " ".join(calls)
