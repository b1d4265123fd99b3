"""Tile candidates chosen on the machine that runs them (``vitkern.triton_kernels.tuning``), and
capabilities declared apart from them.

* :func:`tuning.choose` keeps the candidates that fit, drops those that do not compile and, when
  every one spills, keeps the least-spilling one with a warning.
* A launch whose only candidate spills (proven with the real compiler: the ahead-of-time harness
  is the probe) still runs under the interpreter, gives the right answer, and warns once.
* Each family's refusals come from its declared capability: emptying its candidate tables
  changes neither what it refuses nor why, nor what it accepts.
"""
import warnings

import pytest
import torch

pytest.importorskip("triton")

from vitkern import backends, ops  # noqa: E402
from vitkern.triton_kernels import aot, tuning  # noqa: E402
from vitkern.triton_kernels.attention_core import aot_precision  # noqa: E402

import _aot_demo_kernel as demo  # noqa: E402

_UNAVAILABLE = aot.cuda_backend_unavailable_reason()
needs_cuda_backend = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")
interpreter_only = pytest.mark.skipif(not tuning.interpreting(), reason="interpreter test")


def _cfg(m, n, w=4, s=1):
    import triton

    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def test_choose_keeps_fitting_candidates_in_order():
    a, b, c, d = _cfg(128, 64), _cfg(64, 64), _cfg(32, 32), _cfg(16, 16)
    kept, warning = tuning.choose([a, b, c, d], [12, 0, RuntimeError("smem"), None])
    assert kept == [b, d] and warning is None  # spilling and failing dropped, unknown kept


def test_choose_least_spilling_when_all_spill():
    a, b, c = _cfg(128, 64), _cfg(64, 64), _cfg(32, 32)
    kept, warning = tuning.choose([a, b, c], [64, 8, RuntimeError("no compile")])
    assert kept == [b]
    assert "least-spilling" in warning and "M=64,N=64,w4,s1" in warning and "8 B" in warning


def test_choose_raises_when_nothing_compiles():
    with pytest.raises(RuntimeError, match="first"):
        tuning.choose([_cfg(64, 64), _cfg(32, 32)], [RuntimeError("first"), RuntimeError("2nd")])


def test_tiles_appends_the_fallbacks_once():
    fallback = ((32, 32, 4, 1), (16, 16, 4, 1))
    cfgs = tuning.tiles([(64, 64, 4, 2), (32, 32, 4, 1)], fallback)
    rows = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in cfgs]
    assert rows == [(64, 64, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)]
    assert len(tuning.tiles(())) == len(tuning.FALLBACK_TILES)  # no table entry: still tiles


def _aot_probe(arch):
    """The real compiler as a probe: spilled bytes of the demo kernel for ``cfg`` on ``arch``."""
    def probe(fn, cfg, args, constexprs):
        case = aot.AotCase(f"probe[{tuning.config_name(cfg)}]", fn, dict(demo.DEMO_SIGNATURE),
                           {**demo.UNIT_STRIDES, **constexprs, **cfg.kwargs}, cfg.num_warps,
                           cfg.num_stages)
        report = aot.compile_case(case, arch)
        return report.spill_stores + report.spill_loads
    return probe


def _demo_launch(launcher, device="cpu"):
    M, N, K = 70, 100, 40
    g = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=g).half().to(device)
    b = torch.randn(K, N, generator=g).half().to(device)
    out = torch.full((M, N), float("nan"), dtype=torch.float16, device=device)
    launcher(lambda meta: (triton_cdiv(M, meta["BLOCK_M"]),), a, b, out, M, N, K,
             a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), 0.5)
    ref = torch.softmax(0.5 * (a.float() @ b.float()), dim=1)
    torch.testing.assert_close(out.float().cpu(), ref.cpu(), atol=2e-3, rtol=2e-2)


def triton_cdiv(a, b):
    return -(-a // b)


def _demo_candidates(*rows):
    import triton

    def candidates(**_):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                              num_stages=s) for m, n, k, w, s in rows]
    return candidates


_SPILLS = (64, 128, 16, 1, 1)  # demo.spill_case(): 256 accumulator values per thread
_FITS = (64, 128, 32, 4, 1)


@pytest.mark.parametrize("autotune", ["1", "0"])
def test_probe_every_candidate_or_stop_at_the_first_fit(monkeypatch, autotune):
    """Autotuning probes every candidate and keeps all that fit; VITKERN_AUTOTUNE=0 stops at the
    first that fits (one compile per specialisation when the preferred tile fits)."""
    monkeypatch.setenv("VITKERN_AUTOTUNE", autotune)
    spills = {64: 12, 32: 0, 16: 0}
    probed = []

    def probe(fn, cfg, args, constexprs):
        probed.append(cfg.kwargs["BLOCK_M"])
        return spills[cfg.kwargs["BLOCK_M"]]

    cands = [_cfg(64, 64), _cfg(32, 32), _cfg(16, 16)]
    launcher = tuning.Launcher(None, lambda **_: cands, ["N"], probe=probe)
    kept = launcher.configs((), {"BLOCK_D": 32})
    assert launcher.configs((), {"BLOCK_D": 32}) is kept  # chosen once per specialisation
    if autotune == "1":
        assert probed == [64, 32, 16] and kept == cands[1:]
    else:
        assert probed == [64, 32] and kept == cands[1:2]


@needs_cuda_backend
@interpreter_only
def test_launch_whose_only_candidate_spills_runs_and_warns_once():
    launcher = tuning.Launcher(demo.demo_scores_softmax_kernel, _demo_candidates(_SPILLS), ["M"],
                               probe=_aot_probe(80))
    with pytest.warns(tuning.SpillWarning, match="every tile candidate spills") as record:
        _demo_launch(launcher)
    assert len([w for w in record if issubclass(w.category, tuning.SpillWarning)]) == 1
    assert "demo_scores_softmax_kernel" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tuning.SpillWarning)  # once: the second launch is quiet
        _demo_launch(launcher)


@needs_cuda_backend
@interpreter_only
def test_spilling_candidate_is_dropped_for_one_that_fits():
    launcher = tuning.Launcher(demo.demo_scores_softmax_kernel,
                               _demo_candidates(_SPILLS, _FITS), ["M"], probe=_aot_probe(80))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tuning.SpillWarning)
        _demo_launch(launcher)
    (kept,) = launcher._kept.values()
    assert [c.kwargs["BLOCK_K"] for c in kept] == [32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_probe_drops_spilling_candidates_and_warns_when_all_spill():
    """On a GPU the default probe compiles each candidate for the device and reads its spills."""
    both = tuning.Launcher(demo.demo_scores_softmax_kernel, _demo_candidates(_SPILLS, _FITS),
                           ["M"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", tuning.SpillWarning)
        _demo_launch(both, "cuda")
    assert [c.kwargs["BLOCK_K"] for c in both._kept[()]] == [32]
    only = tuning.Launcher(demo.demo_scores_softmax_kernel, _demo_candidates(_SPILLS), ["M"])
    with pytest.warns(tuning.SpillWarning, match="every tile candidate spills"):
        _demo_launch(only, "cuda")


@interpreter_only
def test_interpreter_runs_the_first_candidate_without_probing():
    launcher = tuning.Launcher(demo.demo_scores_softmax_kernel, _demo_candidates(_FITS, _SPILLS),
                               ["M"])
    _demo_launch(launcher)  # no probe under the interpreter: the spilling one is never compiled
    assert [c.kwargs["BLOCK_K"] for c in launcher._kept[()]] == [32]


# --------------------------------------------------------------------------------------------
# capabilities are declared, not derived from candidate tables
# --------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _empty_tables(monkeypatch, module, *names):
    for name in names:
        table = getattr(module, name)
        monkeypatch.setattr(module, name, {k: {} for k in table})


def test_hilo_capability_independent_of_candidates(monkeypatch):
    from vitkern.triton_kernels import hilo as tk

    x256, x128 = _t(1, 2, 16, 256), _t(1, 2, 16, 128)
    before = tk.unsupported(256, True, 2, 1)
    monkeypatch.setattr(tk, "TILES", {k: {m: {} for m in v} for k, v in tk.TILES.items()})
    assert tk.unsupported(256, True, 2, 1) == before
    with pytest.raises(backends.BackendError, match="float32 head_dim 256 is outside the declared "
                                                    "capability of triton HiLo in window mode"):
        ops.hifi_attention(x256, x256, x256, hw=(4, 4), window_size=2, backend="triton")
    assert ops.hilo._backend("x", "triton", x128, 2, 0, False) == "triton"
    assert tk.hilo_fwd.candidates(BLOCK_D=128, DOT_PRECISION="tf32x3", WINDOW=2,
                                     POOL=1)  # fallbacks
    # fp32 Lo-Fi on keys as given: d = 128 runs forward, its training is refused (declared)
    assert tk.unsupported(128, True, 0, 1, backward=False) is None
    assert "inference works" in tk.unsupported(128, True, 0, 1, backward=True)
    assert ops.hilo._backend("x", "triton", x128, 1, 2, False, needs_grad=False) == "triton"
    with pytest.raises(backends.BackendError, match="HiLo's backward in direct mode"):
        ops.hilo._backend("x", "triton", x128, 1, 2, False, needs_grad=True)


def test_window_capability_independent_of_candidates(monkeypatch):
    from vitkern.triton_kernels import window as tk

    before = [tk.unsupported(d, fp32, 7) for d in (64, 128) for fp32 in (False, True)]
    _empty_tables(monkeypatch, tk, "TILES")
    assert [tk.unsupported(d, fp32, 7) for d in (64, 128) for fp32 in (False, True)] == before
    assert "float32 head_dim 128 is outside the declared capability" in before[3]
    assert before[:3] == [None, None, None]


def test_token_capability_independent_of_candidates(monkeypatch):
    from vitkern.triton_kernels import token as tk

    cases = [(d, fp32, bwd) for d in (64, 128, 256) for fp32 in (False, True)
             for bwd in (False, True)]
    before = [tk.unsupported(*c) for c in cases]
    _empty_tables(monkeypatch, tk, "TILES")
    monkeypatch.setattr(tk, "CLS_TILES", {})
    assert [tk.unsupported(*c) for c in cases] == before
    assert "inference works" in tk.unsupported(128, True, True)
    assert tk.unsupported(128, True, False) is None


def test_ppma_capability_independent_of_candidates(monkeypatch):
    from vitkern.triton_kernels import ppma as tk

    cases = [(d, fp32, W) for d in (32, 64, 128) for fp32 in (False, True) for W in (16, 32, 40)]
    before = [tk.unsupported(*c) for c in cases]
    _empty_tables(monkeypatch, tk, "TILES")
    assert [tk.unsupported(*c) for c in cases] == before
    assert "whole image rows" in tk.unsupported(32, False, 40)
    # the backward's candidates still hold whole rows of the widest declared map
    for fp32 in (False, True):
        for kernel in (tk.ppma_bwd_dq, tk.ppma_bwd_dkdv):
            wp = tk.max_width(32, fp32)
            assert kernel.candidates(BLOCK_D=32, DOT_PRECISION=aot_precision(
                "fp32" if fp32 else "fp16", "ieee"), WP=wp)


def test_launches_take_keywords():
    """No kernel launch in triton_kernels/ passes more than a few positional arguments (issue 14:
    launches name their arguments, strides by ``strides_of``): a call of a ``Launcher``, of its
    ``.launch`` (a planned launch) or of ``kernel[grid]``. The launcher's own generic calls in
    tuning.py forward what they are given."""
    import ast
    import pathlib

    root = pathlib.Path(tuning.__file__).parent
    checked = 0
    for path in sorted(root.rglob("*.py")):
        if path.name == "tuning.py":
            continue
        tree = ast.parse(path.read_text())
        launchers = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Call)
                     and getattr(n.value.func, "id", None) == "Launcher"
                     for t in n.targets if isinstance(t, ast.Name)}
        for n in ast.walk(tree):
            if not isinstance(n, ast.Call):
                continue
            f = n.func
            planned = (isinstance(f, ast.Attribute) and f.attr == "launch"
                       and isinstance(f.value, ast.Name) and f.value.id in launchers)
            if (isinstance(f, ast.Subscript) or (isinstance(f, ast.Name) and f.id in launchers)
                    or planned):
                checked += 1
                where = f"{path.relative_to(root)}:{n.lineno}"
                assert not any(isinstance(a, ast.Starred) for a in n.args), where
                assert len(n.args) <= 20, where
    assert checked >= 20  # every family's launches were seen


def test_keyword_launch_names_missing_arguments():
    """A keyword launch without one of the kernel's runtime arguments says which (not a bare
    KeyError from inside the binder)."""
    import inspect

    launcher = tuning.Launcher(demo.demo_scores_softmax_kernel, _demo_candidates(_FITS), ["M"])
    first = next(iter(inspect.signature(demo.demo_scores_softmax_kernel.fn).parameters))
    with pytest.raises(TypeError, match="missing runtime arguments"):
        launcher._bind((), {first: None})
