"""AOT compile check, with the installed Triton: every kernel specialisation vitkern declares has a
tile candidate that compiles for sm_80 and sm_90 without spills and within shared memory.

Specialisations come from ``vitkern.triton_kernels.aot.collect_specs()`` (the ``aot_specs()`` of
each module in ``vitkern.triton_kernels.KERNEL_MODULES``); a candidate that spills is only
reported (a GPU launch drops it, ``tuning.py``): the test fails when *no* candidate fits. The demo
kernel in ``_aot_demo_kernel.py`` proves the harness itself, including that spill detection
reports spills for a register-hungry config and that a launch whose only candidate spills still
runs and warns.
"""
import pytest

pytest.importorskip("triton")

from vitkern.triton_kernels import aot  # noqa: E402

import _aot_demo_kernel as demo  # noqa: E402

ARCHS = aot.ARCHS

_UNAVAILABLE = aot.cuda_backend_unavailable_reason()
needs_cuda_backend = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")

try:
    _SPECS, _COLLECT_ERROR = aot.collect_specs(), None
except Exception as e:  # reported by test_collect_cases, without hiding the demo tests
    _SPECS, _COLLECT_ERROR = [], e


def _check_no_spills(report):
    print("\n" + aot.format_report(report))
    assert report.n_regs > 0
    assert report.spill_stores == 0 and report.spill_loads == 0, (
        f"{report.case} spills on {aot.ptxas_arch(report.arch)}: {report.spill_stores} B stored, "
        f"{report.spill_loads} B loaded, {report.n_regs} registers\n{report.ptxas_log}")


def test_collect_cases():
    """Every module in KERNEL_MODULES imports and provides aot_specs(): unique names, each
    specialisation with at least one tile candidate."""
    if _COLLECT_ERROR is not None:
        raise _COLLECT_ERROR
    assert _SPECS
    for names in ([s.name for s in _SPECS], [c.name for s in _SPECS for c in s.candidates]):
        assert len(names) == len(set(names)), "duplicate AOT spec / case names"
    for spec in _SPECS:
        assert isinstance(spec, aot.AotSpec) and spec.candidates, spec
        for c in spec.candidates:
            assert isinstance(c, aot.AotCase), c


@needs_cuda_backend
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("spec", _SPECS, ids=[s.name for s in _SPECS])
def test_specialisation_has_a_candidate_that_fits(spec, arch):
    report, tried = aot.first_fit(spec, arch)
    lines = "\n".join(aot.format_report(r) if isinstance(r, aot.AotReport) else f"error: {r}"
                      for r in tried)
    print("\n" + lines)
    assert report is not None, (
        f"{spec.name}: no tile candidate compiles for {aot.ptxas_arch(arch)} without spills within "
        f"{aot.SMEM_LIMIT[arch]} B of shared memory; add a smaller candidate or narrow the declared "
        f"capability\n{lines}")
    assert report.n_regs > 0


@needs_cuda_backend
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("case", demo.aot_cases(), ids=lambda c: c.name)
def test_demo_kernel_compiles_without_spills(case, arch):
    report = aot.compile_case(case, arch)
    _check_no_spills(report)
    assert report.case == case.name and report.arch == arch
    assert f"for '{aot.ptxas_arch(arch)}'" in report.ptxas_log
    assert report.smem_bytes is not None and report.smem_bytes > 0  # tl.dot operands are staged in smem


@needs_cuda_backend
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_spill_detection_reports_spills(arch):
    # 64x128 fp32 accumulator on a single warp = 256 live accumulator values per thread,
    # more than the 255-register limit: this config must spill on every arch.
    report = aot.compile_case(demo.spill_case(), arch)
    print("\n" + aot.format_report(report))
    assert report.spills
    assert report.spill_stores > 0 and report.spill_loads > 0, report.ptxas_log
    assert "SPILLS" in aot.format_table([report])


@needs_cuda_backend
def test_cli_table_and_exit_code(capsys, monkeypatch):
    good, spill = demo.aot_cases()[0], demo.spill_case()
    # a spilling candidate beside one that fits: reported, and the run passes
    monkeypatch.setattr(aot, "collect_specs", lambda: [aot.AotSpec("demo", (spill, good))])
    assert aot.main(["--arch", "80"]) == 0
    out = capsys.readouterr().out
    assert "sm_80" in out and "<-- SPILLS" in out and "1 spilling" in out
    assert "0 specialisations with no candidate that fits" in out
    # a specialisation whose only candidate spills fails the run
    monkeypatch.setattr(aot, "collect_specs", lambda: [aot.AotSpec("demo", (good,)),
                                                       aot.AotSpec("hungry", (spill,))])
    assert aot.main(["--arch", "80"]) == 1
    captured = capsys.readouterr()
    assert "1 specialisations with no candidate that fits" in captured.out
    assert "NO FIT hungry sm_80" in captured.err
    monkeypatch.setattr(aot, "collect_specs", lambda: [aot.AotSpec("demo", tuple(demo.aot_cases()))])
    assert aot.main(["--arch", "80", "90"]) == 0
    print(capsys.readouterr().out)


@needs_cuda_backend
def test_first_fit_skips_a_spilling_candidate():
    spec = aot.AotSpec("demo", (demo.spill_case(), demo.aot_cases()[0]))
    report, tried = aot.first_fit(spec, 80)
    assert report is not None and report.case == demo.aot_cases()[0].name
    assert len(tried) == 2 and tried[0].spills and aot.fits(report)
    assert aot.first_fit(aot.AotSpec("hungry", (demo.spill_case(),)), 80)[0] is None


def test_bad_case_is_rejected():
    case = demo.aot_cases()[0]
    bad = aot.AotCase(case.name, case.fn, {k: v for k, v in case.signature.items() if k != "scale"},
                      case.constexprs)
    with pytest.raises(aot.AotCompileError, match="scale"):
        aot._resolved_constexprs(aot._as_jit_function(_jit_fn(case.fn)), bad)


def _jit_fn(fn):
    # Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction; validation only needs a JITFunction.
    if type(fn).__name__ == "InterpretedFunction":
        from triton.runtime.jit import JITFunction
        return JITFunction(fn.fn)
    return fn


_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'helper_user' for 'sm_80'
ptxas info    : Function properties for helper_user
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, 16 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'attn_fwd' for 'sm_90a'
ptxas info    : Function properties for attn_fwd
    96 bytes stack frame, 88 bytes spill stores, 120 bytes spill loads
ptxas info    : Function properties for noinline_helper
    0 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 512 bytes cmem[0]
"""


def test_parse_ptxas_log():
    assert aot.parse_ptxas_log(_LOG, "attn_fwd") == (255, 92, 128, None)
    # the other entry's spills are not counted; the non-inlined helper's are
    assert aot.parse_ptxas_log(_LOG, "helper_user") == (40, 4, 8, 16)
    with pytest.raises(aot.AotCompileError):
        aot.parse_ptxas_log(_LOG, None)  # two entries: must name one
    single = "\n".join(_LOG.splitlines()[:5])
    assert aot.parse_ptxas_log(single, "renamed") == (40, 0, 0, 16)


def test_signature_hints():
    case = aot.AotCase("x", None, {"P": "*fp16", "s": "i32:16", "n": "i64"}, {})
    assert aot._split_signature(case) == ({"P": "*fp16", "s": "i32", "n": "i64"}, {"P", "s"})
    with pytest.raises(aot.AotCompileError, match="hint"):
        aot._split_signature(aot.AotCase("x", None, {"s": "i32:8"}, {}))


def test_collect_cases_without_kernel_modules(monkeypatch):
    import vitkern.triton_kernels as pkg
    monkeypatch.delattr(pkg, "KERNEL_MODULES", raising=False)
    assert aot.collect_cases() == []
