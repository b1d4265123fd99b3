"""The family descriptors against what their backends do, and the generic dispatch itself.

The test matrix is generated from the declarations (``vitkern.ops._dispatch.FAMILIES``): for
each family, from a small base input, one factor at a time over the dtypes the declarations name
(plus float64, which no kernel takes), the head dims at and beyond each declared limit, and
inputs that need gradients. Every backend is forced on every input: where the descriptor says it
takes them the op runs (forward, and backward when gradients are needed) and agrees with the
reference; where it refuses them the op raises a BackendError whose line for that backend is
the descriptor's reason. Shapes are tiny; the Triton kernels run under the interpreter here.
"""
from __future__ import annotations

import functools

import pytest
import torch

from vitkern import backends, ops
from vitkern.ops import _dispatch as D

INTERPRETED = backends.interpreting()
#: the matrix runs where the kernels do: the CPU interpreter here, the GPU where there is one
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype, grad=False, seed=0):
    t = torch.randn(*shape, generator=_gen(seed + len(shape) + sum(shape)), dtype=torch.float64)
    return t.to(DEVICE, dtype).requires_grad_(grad)


def _qkv(dtype, d, grad, n=16, h=2):
    return tuple(_rand(1, h, n, d, dtype=dtype, grad=grad, seed=i) for i in range(3))


def _ppma_in(dtype, d, grad):
    q, k, v = _qkv(dtype, d, grad, n=12)
    decays = tuple((-torch.rand(1, 2, 12, generator=_gen(i))).to(DEVICE, dtype)
                   .requires_grad_(grad) for i in (5, 6))
    return (q, k, v, *decays)


def _decays_in(dtype, d, grad):
    x = _rand(1, 3, 4, 2 * d, dtype=dtype, grad=grad)
    return (x, _rand(2, d, dtype=dtype, grad=grad, seed=1),
            _rand(2, dtype=dtype, grad=grad, seed=2),
            (_rand(2, dtype=dtype, seed=3) * 0.1).requires_grad_(grad))


def _soft_in(dtype, d, grad):
    """q and landmarks already scaled by d**-0.25, as SOFT passes them."""
    q, landmarks, v = (_rand(1, 2, n, d, dtype=torch.float64, seed=i)
                       for i, n in enumerate((16, 4, 16)))
    return tuple(t.mul(d ** -0.25 if i < 2 else 1).to(dtype).requires_grad_(grad)
                 for i, t in enumerate((q, landmarks, v)))


def _rope_in(dtype, d, grad):
    g = _gen(d)
    sin, cos = (torch.rand(12, d, generator=g).to(DEVICE) for _ in range(2))
    return (_rand(1, 2, 12, d, dtype=dtype, grad=grad), sin, cos)


@functools.lru_cache(maxsize=None)
def _keep_idx():
    """The token case's kept tokens, built once (a copy to the GPU inside a call that
    tests/test_sync.py checks would be the test's own synchronisation)."""
    return torch.tensor([[0, 3, 4, 9, 15]], device=DEVICE)


#: family name -> (the op's name as errors call it, inputs(dtype, d, grad), call(inputs, backend)).
#: A family registered without an entry here fails ``test_every_family_has_a_matrix``.
CALLS = {
    "hilo": ("hilo_attention", _qkv, lambda x, b: ops.hilo_attention(
        *x, hw=(4, 4), window_size=2, num_lo_heads=1, backend=b)),
    "window": ("window_attention", _qkv, lambda x, b: ops.window_attention(
        *x, hw=(4, 4), window_size=2, shift=1, backend=b)),
    "token": ("token_attention", _qkv, lambda x, b: ops.token_attention(
        *x, keep_idx=_keep_idx(), backend=b)),
    "linear": ("linear_attention", _qkv, lambda x, b: ops.linear_attention(*x, backend=b)),
    "xca": ("xca_attention", _qkv, lambda x, b: ops.xca_attention(*x, temperature=1.5,
                                                                  backend=b)),
    "soft": ("soft_attention", _soft_in, lambda x, b: ops.soft_attention(*x, backend=b)),
    "ppma": ("ppma_attention", _ppma_in, lambda x, b: ops.ppma_attention(*x, hw=(3, 4),
                                                                         backend=b)),
    "ppma_criss_cross": ("ppma_criss_cross_attention", _ppma_in,
                         lambda x, b: ops.ppma_criss_cross_attention(*x, hw=(3, 4), backend=b)),
    "ppma_decays": ("ppma_decays", _decays_in, lambda x, b: ops.ppma_decays(
        *x, num_heads=2, backend=b)),
    "ppma_rope": ("ppma_rope", _rope_in, lambda x, b: ops.ppma_rope(*x, backend=b)),
}

BASE_DIM = 16
#: probes for families whose head-dim limits live only in their kernel module's check
PROBE_DIMS = (12, 264)


def _declared(family: D.Family):
    """(dtypes, head dims) the family's declarations name: every declared dtype (bf16 only on a
    GPU: the interpreter's bf16 dot is wrong) plus float64, and per declared head-dim rule its
    limit, the next size past it and a size off its multiple."""
    dtypes, dims = {torch.float32, torch.float64}, set()
    for cap in family.caps.values():
        dtypes |= set(cap.dtypes or ())
        if cap.head_dim is not None:
            hd = cap.head_dim
            dims |= {hd.max, hd.max + max(hd.multiple, 2)}
            if hd.multiple > 2:
                dims.add(hd.multiple + hd.multiple // 2)
    if INTERPRETED:
        dtypes.discard(torch.bfloat16)
    return sorted(dtypes, key=str), sorted(dims or PROBE_DIMS)


def _matrix():
    """(family, dtype, head_dim, needs_grad): the base input, then one factor at a time."""
    out = []
    for name, family in sorted(D.FAMILIES.items()):
        dtypes, dims = _declared(family)
        specs = {(torch.float32, BASE_DIM, False), (torch.float32, BASE_DIM, True)}
        specs |= {(dt, BASE_DIM, False) for dt in dtypes}
        specs |= {(dt, d, False) for d in dims for dt in (torch.float32, torch.float16)}
        out += [(name, *s) for s in sorted(specs, key=str)]
    return out


def _id(case):
    name, dtype, d, grad = case
    return f"{name}-{str(dtype)[6:]}-d{d}{'-grad' if grad else ''}"


def _tol(dtype):
    return {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 3e-2}.get(dtype, 8e-2)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("case", _matrix(), ids=_id)
def test_declaration_agrees_with_backend(case, backend, monkeypatch):
    monkeypatch.delenv("VITKERN_BACKEND", raising=False)
    name, dtype, d, grad = case
    family = D.FAMILIES[name]
    op, make, call = CALLS[name]
    x = make(dtype, d, grad)
    captured = []
    real = D.dispatch

    def spy(fam, op_, backend_, inp):  # the Inputs the op builds, to ask its declaration
        captured.append(inp)
        return real(fam, op_, backend_, inp)

    monkeypatch.setattr(D, "dispatch", spy)
    for mod in (ops.hilo, ops.window, ops.token, ops.linear, ops.ppma):
        monkeypatch.setattr(mod, "dispatch", spy)
    try:
        out = call(x, backend)
    except backends.BackendError as exc:
        (inp,) = captured
        why = family.reason(op, backend, inp, True)
        assert why is not None, f"{backend} declares it takes these inputs, but: {exc}"
        assert f"\n  {backend}: {why}\n" in f"{exc}\n", exc
        assert str(exc).startswith(f"{op}: backend '{backend}' cannot run these inputs:"), exc
        return
    (inp,) = captured
    assert family.reason(op, backend, inp, True) is None, "refused by its declaration, yet ran"
    assert inp.dtype == dtype and inp.needs_grad == grad and inp.head_dim == d
    o = _first(out)
    with torch.no_grad():
        ref = _first(call(tuple(t.detach().double() for t in x), "reference"))
    assert torch.isfinite(o).all()
    tol = _tol(dtype)
    torch.testing.assert_close(o.detach().double(), ref, rtol=tol, atol=tol)
    if grad:
        o.float().sum().backward()
        leaves = [t for t in x if t.requires_grad]
        assert leaves and all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_every_family_has_a_matrix():
    assert set(D.FAMILIES) == set(CALLS)
    for family in D.FAMILIES.values():
        assert family.caps["reference"].open  # the definition takes every input
        assert ("eager" in family.caps) == (family.eager is not None)
        assert set(family.caps) <= set(backends.BACKENDS)
        for cap in family.caps.values():
            assert cap.deterministic  # no kernel uses atomics (see triton_kernels/*.py)
            if cap.backend == "triton":
                assert cap.dtypes == D.TRITON_DTYPES and (cap.check or cap.head_dim)


# --------------------------------------------------------------------------------------------
# the generic walk: priority order, each reason asked once, the error text
# --------------------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """A throw-away family whose checks count their calls (kept out of the registry)."""
    monkeypatch.setattr(D, "FAMILIES", dict(D.FAMILIES))
    monkeypatch.delenv("VITKERN_BACKEND", raising=False)
    calls = {"cuda": 0, "triton": 0}

    def check(backend, refuse):
        def fn(inp):
            calls[backend] += 1
            return refuse(inp)
        return fn

    family = D.Family("counted", lambda *a: None, (
        D.Capability("cuda", check=check("cuda", lambda inp: "no such kernel"),
                     kernels=lambda inp: ("k",)),
        D.Capability.triton(head_dim=D.HeadDims(64),
                            check=check("triton", lambda inp: "too odd" if inp.args[0] else None)),
    ))
    return family, calls


def test_each_reason_is_asked_once(counted, monkeypatch):
    family, calls = counted
    monkeypatch.setattr(backends, "device_reason", lambda name, dev, explicit: None)
    x = torch.empty(1, 2, 4, 16)
    with pytest.raises(backends.BackendError) as info:
        D.dispatch(family, "op", "triton", D.inputs(x, True))
    assert calls == {"cuda": 1, "triton": 1}  # triton while walking, cuda for the error text
    assert str(info.value) == ("op: backend 'triton' cannot run these inputs:\n"
                               "  cuda: no such kernel\n  triton: too odd\n"
                               "  eager: accepts these inputs\n  reference: accepts these inputs")
    calls.update(cuda=0, triton=0)
    assert D.dispatch(family, "op", "auto", D.inputs(x, False)) == "triton"
    assert calls == {"cuda": 1, "triton": 1}
    # the declared rules come first, all of them; the kernel check only when they pass
    calls.update(cuda=0, triton=0)
    with pytest.raises(backends.BackendError) as info:
        D.dispatch(family, "op", "triton", D.inputs(x.double(), True, head_dim=72))
    assert calls["triton"] == 0
    assert ("triton: dtype torch.float64 not supported by triton (float32, float16, bfloat16); "
            "head_dim 72 not supported by triton (multiples of 8 up to 64)") in str(info.value)
    # no eager module: auto passes over eager, backend="eager" runs the reference
    assert D.dispatch(family, "op", "auto", D.inputs(x, True)) == "reference"
    assert D.dispatch(family, "op", "eager", D.inputs(x, True)) == "reference"


def test_auto_takes_cuda_only_where_approved(counted, monkeypatch):
    family, calls = counted
    from vitkern import cuda_auto

    object.__setattr__(family.caps["cuda"], "check", lambda inp: None)
    monkeypatch.setattr(backends, "device_reason", lambda name, dev, explicit: None)
    asked = []
    monkeypatch.setattr(cuda_auto, "reason", lambda kernels, device, dtype: asked.append(kernels)
                        or "not approved")
    x = torch.empty(1, 2, 4, 16)
    assert D.dispatch(family, "op", "auto", D.inputs(x, False)) == "triton"
    assert asked == [("k",)]
    assert D.dispatch(family, "op", "cuda", D.inputs(x, False)) == "cuda"  # explicit: no approval
    assert asked == [("k",)]


def test_forward_only_and_determinism_rules(monkeypatch):
    x = torch.empty(1, 2, 4, 16)
    cap = D.Capability("cuda", training=False, forward_only="inference only",
                       deterministic=False)
    assert cap.not_supported_reasons(D.inputs(x, needs_grad=False)) == []
    assert cap.not_supported_reasons(D.inputs(x, needs_grad=True)) == ["inference only"]
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert "not deterministic" in cap.not_supported_reasons(D.inputs(x))[0]
    assert D.HeadDims(1024, multiple=1).reason(1026, "triton") == \
        "head_dim 1026 > 1024 not supported by triton"
    assert D.HeadDims(128).reason(96, "triton") is None


def test_select_asks_each_backend_at_most_once():
    asked = []

    def reason(name, explicit):
        asked.append(name)
        return f"no {name}"

    with pytest.raises(backends.BackendError):
        backends.select("op", "auto", reason)
    assert asked == list(backends.AUTO_ORDER)
    asked.clear()
    with pytest.raises(backends.BackendError):
        backends.select("op", "eager", reason)
    assert sorted(asked) == sorted(backends.BACKENDS) and asked[0] == "eager"


def test_auto_on_cpu_follows_the_declarations(monkeypatch):
    """CPU tensors: auto runs the eager module where a family declares one, else the
    reference (the device rules refuse cuda and triton before any family check)."""
    monkeypatch.delenv("VITKERN_BACKEND", raising=False)
    x = torch.empty(1, 2, 16, 16)
    for name, family in D.FAMILIES.items():
        got = D.dispatch(family, CALLS[name][0], "auto", D.inputs(x, 2, 1, False))
        assert got == ("eager" if family.eager is not None else "reference"), name
