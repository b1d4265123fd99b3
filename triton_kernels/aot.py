"""Ahead-of-time compile harness: prove, without a GPU, that every kernel specialisation vitkern
declares has a tile candidate that compiles for sm_80 / sm_90 without spills.

Each kernel module listed in ``vitkern.triton_kernels.KERNEL_MODULES`` exposes ``aot_specs()``, a
list of :class:`AotSpec`: one per declared specialisation, holding an :class:`AotCase` per tile
candidate (preferred first). :func:`compile_case` runs the full Triton pipeline (TTIR -> TTGIR -> LLIR -> PTX -> cubin) for a ``GPUTarget`` of the requested
architecture, then re-assembles the PTX with Triton's bundled ``ptxas -v`` and parses registers,
spill stores/loads and shared memory from its log. No GPU or CUDA driver is involved.

Writing cases. Compile what a real launch compiles, or the numbers are off (a HiLo forward with
its unit strides left as runtime ``i64`` arguments reported 255 registers and spills on sm_90;
specialised like the launch: 110 registers, no spills). The JIT specialises runtime arguments:

* pointers to 16-byte aligned tensors get a divisibility-16 hint: the harness always adds it;
* python ints below 2**31 are ``i32`` (not ``i64``); a multiple of 16 gets the hint: write
  ``"i32:16"`` (the ``tools/compile.py`` convention); an int equal to 1 (a contiguous tensor's
  inner stride) becomes the constant 1: put it in ``constexprs`` (``{"stride_qd": 1}``);
* floats are ``fp32``, bools ``u1`` (not specialised).

Command line::

    python -m vitkern.triton_kernels.aot [--arch 80 90] [-k SUBSTRING]

prints every tile candidate of every specialisation (case, arch, registers, spills, smem) and
exits non-zero when a specialisation has no candidate that compiles without spills within shared
memory (a spilling candidate alone is only reported: a GPU launch drops it, see ``tuning.py``).

Interpreter mode. With ``TRITON_INTERPRET=1`` in effect when a ``@triton.jit`` function is defined,
Triton returns an ``InterpretedFunction`` instead of a ``JITFunction`` -- and that includes the
``@jit`` helpers of ``triton.language`` itself (``tl.max``, ``tl.sum``, ``tl.cdiv``...), which the code
generator then cannot inline. Such a process cannot compile kernels in-process, so
:func:`compile_case` hands the case to a persistent helper process started without
``TRITON_INTERPRET`` (kernel functions are re-imported there by module and qualified name).
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import importlib
import inspect
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

import triton

ARCHS = (80, 90)
_THIS_MODULE = "vitkern.triton_kernels.aot"


@dataclass(frozen=True)
class AotCase:
    name: str                 # e.g. "hilo.window_fwd[D=64,BM=64,BN=64,w4,s2]"
    fn: object                # a @triton.jit function (not an Autotuner: pass the inner jit fn)
    signature: dict           # runtime arg name -> triton type string, e.g. {"Q": "*fp16", "N": "i32"}
    constexprs: dict          # tl.constexpr arg name -> python value, e.g. {"BLOCK_M": 64}
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class AotSpec:
    """One specialisation of a kernel (a declared capability: mode, dtype, head-dim class...) and
    its tile candidates as cases, preferred first. It is proven when one candidate fits."""
    name: str                 # e.g. "hilo.fwd.hifi[fp16,D=64]"
    candidates: tuple         # AotCase, one per tile candidate


@dataclass
class AotReport:
    case: str
    arch: int
    n_regs: int
    spill_stores: int         # bytes, summed over the kernel and any non-inlined device functions
    spill_loads: int          # bytes, idem
    smem_bytes: int | None    # Triton's dynamic shared memory + any static smem ptxas reports
    ptxas_log: str

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


class AotCompileError(RuntimeError):
    """A case failed to compile (Triton front/back end or ptxas)."""


# ----------------------------------------------------------------------------------------------
# Triton version adapter (the only place that branches on the Triton version)
# ----------------------------------------------------------------------------------------------

def _make_ast_source(fn, signature: dict, constexprs: dict, divisible_by_16: set, backend):
    """Build ``triton.compiler.ASTSource`` the way ``JITFunction.run`` does for this Triton version.

    ``signature``: runtime arg name -> bare type string; ``divisible_by_16``: names of the runtime
    args that get the ``tt.divisibility = 16`` hint (what a launch gives aligned pointers and
    integers that are multiples of 16).

    * Triton >= 3.3 (``ASTSource(fn, signature, constexprs, attrs)``): ``signature`` is keyed by
      name and lists *every* parameter, constexprs with type ``"constexpr"``; ``constexprs`` is
      keyed by ``(arg_index,)``; ``attrs`` is ``{(arg_index,): [["tt.divisibility", 16]]}``
      (what ``backend.parse_attr("D")`` returns).
    * Triton 3.0 - 3.2 (``ASTSource(fn, signature, constants, attrs)``): ``signature`` is keyed by
      name and lists only runtime parameters; ``constants`` is keyed by name; ``attrs`` is an
      ``AttrsDescriptor`` whose divisible-by-16 set holds indices over *all* parameters
      (3.2: ``triton.backends.compiler.AttrsDescriptor.from_hints({idx: 16})``;
      3.0/3.1: ``triton.compiler.compiler.AttrsDescriptor(divisible_by_16=..., equal_to_1=...)``).
    """
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    aligned = [i for i, n in enumerate(names) if n in divisible_by_16]
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
        csts = {(i, ): constexprs[n] for i, n in enumerate(names) if n in constexprs}
        parse_attr = getattr(backend, "parse_attr", None)
        hint = parse_attr("D") if parse_attr is not None else [["tt.divisibility", 16]]
        attrs = {(i, ): hint for i in aligned}
        return ASTSource(fn, sig, csts, attrs)
    sig = {n: signature[n] for n in names if n not in constexprs}
    csts = {n: constexprs[n] for n in names if n in constexprs}
    try:
        from triton.backends.compiler import AttrsDescriptor  # 3.2
        attrs = AttrsDescriptor.from_hints({i: 16 for i in aligned})
    except ImportError:
        from triton.compiler.compiler import AttrsDescriptor  # 3.0 / 3.1
        attrs = AttrsDescriptor(divisible_by_16=set(aligned), equal_to_1=set())
    return ASTSource(fn, sig, csts, attrs)


# ----------------------------------------------------------------------------------------------
# ptxas
# ----------------------------------------------------------------------------------------------

def _is_executable(path) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def find_ptxas(arch: int = 80) -> str | None:
    """The ptxas Triton itself uses for ``arch`` (bundled or ``TRITON_PTXAS_PATH``), else ``ptxas`` on PATH."""
    try:
        from triton.backends.nvidia import compiler as nv
    except Exception:  # no CUDA backend in this Triton build
        nv = None
    if nv is not None:
        get_ptxas = getattr(nv, "get_ptxas", None)  # triton >= 3.4 (3.9: get_ptxas(arch))
        if get_ptxas is not None:
            try:
                try:
                    tool = get_ptxas(arch)
                except TypeError:
                    tool = get_ptxas()
                path = getattr(tool, "path", tool)
                if _is_executable(path):
                    return path
            except Exception:
                pass
        path_to_binary = getattr(nv, "_path_to_binary", None)  # triton 3.0 - 3.3
        if path_to_binary is not None:
            try:
                path = path_to_binary("ptxas")[0]
                if _is_executable(path):
                    return path
            except Exception:
                pass
        path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
        if _is_executable(path):
            return path
    return shutil.which("ptxas")


def ptxas_arch(arch: int) -> str:
    """``sm_80`` / ``sm_90a``: Triton targets the arch-specific ``a`` variant from sm_90 on."""
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability
        return sm_arch_from_capability(arch)
    except Exception:
        return f"sm_{arch}{'a' if arch >= 90 else ''}"


@functools.lru_cache(maxsize=None)
def _backend_extra_ptxas_flags() -> tuple:
    """Register-allocation flags Triton's own ``make_cubin`` passes (3.9: ``--regAllocOptLevel=2``)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend
        src = inspect.getsource(CUDABackend.make_cubin)
    except Exception:
        return ()
    return tuple(dict.fromkeys(re.findall(r"""['"](--regAllocOptLevel=\d+)['"]""", src)))


def _run_ptxas(ptx: str, arch: int, metadata) -> str:
    """Assemble ``ptx`` with ``ptxas -v`` using the flags Triton's backend uses; return the log."""
    ptxas = find_ptxas(arch)
    if ptxas is None:
        raise AotCompileError("ptxas not found (neither bundled with triton nor on PATH)")
    flags = ["-lineinfo"]
    if os.environ.get("TRITON_DISABLE_LINE_INFO", "0") == "1":
        flags += ["-suppress-debug-info"]
    if not getattr(metadata, "enable_fp_fusion", True):
        flags += ["--fmad=false"]
    flags += list(_backend_extra_ptxas_flags())
    ptx_options = getattr(metadata, "ptx_options", None)
    if ptx_options:
        flags += ptx_options.split()
    with tempfile.TemporaryDirectory(prefix="vitkern_aot_") as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, *flags, "-v", f"--gpu-name={ptxas_arch(arch)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AotCompileError(f"ptxas failed (exit {proc.returncode}) for {ptxas_arch(arch)}:\n{log}")
    return log


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str, kernel: str | None = None) -> tuple:
    """``(n_regs, spill_stores, spill_loads, static_smem)`` for entry ``kernel`` from a ``ptxas -v`` log.

    Registers and static smem are the entry function's (``static_smem`` is None when ptxas reports
    none); spill bytes are the entry's plus those of every non-entry (non-inlined device) function
    in the log. With ``kernel=None`` (or not found) the log must hold exactly one entry.
    """
    entries: dict = {}
    spills: dict = {}
    entry = props = None
    for line in log.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            entry = m.group(1)
            entries.setdefault(entry, {"regs": None, "smem": None})
            continue
        m = _RE_PROPS.search(line)
        if m:
            props = m.group(1)
            continue
        m = _RE_SPILL.search(line)
        if m and props is not None:
            spills[props] = (int(m.group(1)), int(m.group(2)))
            continue
        m = _RE_REGS.search(line)
        if m and entry is not None:
            entries[entry]["regs"] = int(m.group(1))
            s = _RE_SMEM.search(line)
            entries[entry]["smem"] = int(s.group(1)) if s else None
    if kernel not in entries:
        if len(entries) != 1:
            raise AotCompileError(f"cannot find entry {kernel!r} in ptxas log (entries: {sorted(entries)}):\n{log}")
        kernel = next(iter(entries))
    info = entries[kernel]
    if info["regs"] is None:
        raise AotCompileError(f"no 'Used N registers' line for {kernel!r} in ptxas log:\n{log}")
    counted = [v for f, v in spills.items() if f == kernel or f not in entries]
    stores = sum(s for s, _ in counted)
    loads = sum(ld for _, ld in counted)
    return info["regs"], stores, loads, info["smem"]


def cuda_backend_unavailable_reason() -> str | None:
    """None when AOT compilation can work here, else why not (no CUDA backend / no ptxas)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        make_backend(GPUTarget("cuda", 80, 32))
    except Exception as e:  # pragma: no cover - depends on the triton build
        return f"triton CUDA backend unavailable: {type(e).__name__}: {e}"
    for arch in ARCHS:
        if find_ptxas(arch) is None:
            return f"ptxas for sm_{arch} not found (not bundled with triton, not on PATH)"
    return None


# ----------------------------------------------------------------------------------------------
# compile
# ----------------------------------------------------------------------------------------------

def _is_interpreted(obj) -> bool:
    return type(obj).__name__ == "InterpretedFunction"


def _interpreter_active(fn) -> bool:
    """True when this process cannot run the Triton code generator (see module docstring)."""
    if _is_interpreted(fn):
        return True
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        return True
    try:
        from triton import knobs
        if knobs.runtime.interpret:
            return True
    except Exception:
        pass
    import triton.language.standard as tl_standard
    return _is_interpreted(getattr(tl_standard, "cdiv", None))


def _as_jit_function(fn):
    from triton.runtime.jit import JITFunction
    seen = 0
    while not isinstance(fn, JITFunction):
        inner = getattr(fn, "fn", None)  # Autotuner / Heuristics wrap the JITFunction in .fn
        if inner is None or seen > 8:
            raise TypeError(f"AotCase.fn must be a @triton.jit function, got {type(fn).__name__}")
        fn, seen = inner, seen + 1
    return fn


def _resolved_constexprs(fn, case: AotCase) -> dict:
    """Validate the case against the kernel's parameters; fill defaulted constexprs."""
    params = inspect.signature(fn.fn).parameters
    unknown = (set(case.signature) | set(case.constexprs)) - set(params)
    if unknown:
        raise AotCompileError(f"{case.name}: unknown argument(s) {sorted(unknown)} for {fn.__name__}")
    both = set(case.signature) & set(case.constexprs)
    if both:
        raise AotCompileError(f"{case.name}: {sorted(both)} given both as runtime args and constexprs")
    constexprs = dict(case.constexprs)
    constexpr_params = {p.name for p in getattr(fn, "params", []) if getattr(p, "is_constexpr", False)}
    for name, p in params.items():
        if name in case.signature:
            if name in constexpr_params:
                raise AotCompileError(f"{case.name}: {name} is a tl.constexpr, pass it in constexprs")
        elif name not in constexprs:
            if name in constexpr_params and p.default is not inspect.Parameter.empty:
                constexprs[name] = p.default
            else:
                raise AotCompileError(f"{case.name}: no type/value for argument {name!r}")
    return constexprs


def _split_signature(case: AotCase) -> tuple:
    """``({name: type}, {names with the divisibility-16 hint})``.

    Pointers always carry the hint (a launch with 16-byte aligned tensors gives it). An integer
    gets it with a ``":16"`` suffix, e.g. ``"i32:16"`` (the convention of Triton's
    ``tools/compile.py``), modelling a launch where that value is a multiple of 16. An integer
    that is 1 at launch is specialised to a constant by the JIT: put it in ``constexprs``.
    """
    types, aligned = {}, set()
    for name, spec in case.signature.items():
        ty, _, hint = str(spec).partition(":")
        ty = ty.strip()
        if hint.strip() not in ("", "16"):
            raise AotCompileError(f"{case.name}: unsupported hint in {name}: {spec!r} (only ':16')")
        if ty.startswith("*") or hint.strip() == "16":
            aligned.add(name)
        types[name] = ty
    return types, aligned


def launch_signature(fn, pointers: dict, *, plain=(), zero=(), unit=None,
                     floats=("scale", "qk_scale_log2", "eps", "mask2")) -> tuple[dict, dict]:
    """``(signature, constexprs)`` of a typical launch of ``fn`` under vitkern's naming convention,
    for an :class:`AotCase`: tensors viewed out of a packed projection.

    - ``tl.constexpr`` parameters are left out (the case gives them);
    - pointers are typed by ``pointers`` (name -> ``"*fp16"``, ``"*fp32"``, ``"*i64"``, ...);
    - strides are named ``s<tensor><axis>``: channel strides (``unit(name)``, by default a name
      ending in ``d``) are 1, which the JIT turns into a constant; names in ``zero`` are 0 (a
      broadcast axis, also a JIT constant); names in ``plain`` are plain ``i32`` (e.g. strides of
      a small table); every other stride, and ``HEAD_DIM``, is a multiple of 16 (``"i32:16"``);
    - names in ``floats`` are fp32 scalars; every other argument a plain ``i32``.
    """
    raw = fn
    while hasattr(raw, "fn"):  # Launcher / Autotuner / JITFunction / InterpretedFunction
        raw = raw.fn
    unit = unit or (lambda name: name.endswith("d"))
    sig, const = {}, {}
    for name, param in inspect.signature(raw).parameters.items():
        if "constexpr" in str(param.annotation):
            continue
        if name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        elif name in plain:
            sig[name] = "i32"
        elif name in zero:
            const[name] = 0
        elif name == "HEAD_DIM":
            sig[name] = "i32:16"
        elif name.startswith("s") and len(name) > 2:
            if unit(name):
                const[name] = 1
            else:
                sig[name] = "i32:16"
        else:
            sig[name] = "i32"
    return sig, const


def _ptx_entry_name(ptx: str) -> str | None:
    m = re.search(r"\.entry\s+(\w+)\s*\(", ptx)
    return m.group(1) if m else None


def _compile_in_process(case: AotCase, arch: int) -> AotReport:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    fn = _as_jit_function(case.fn)
    constexprs = _resolved_constexprs(fn, case)
    target = GPUTarget("cuda", arch, 32)
    types, aligned = _split_signature(case)
    src = _make_ast_source(fn, types, constexprs, aligned, make_backend(target))
    try:
        compiled = triton.compile(src, target=target,
                                  options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    except Exception as e:
        raise AotCompileError(f"{case.name} [sm_{arch}]: triton.compile failed: {type(e).__name__}: {e}") from e
    ptx = compiled.asm["ptx"]
    metadata = compiled.metadata
    log = _run_ptxas(ptx, arch, metadata)
    n_regs, stores, loads, static_smem = parse_ptxas_log(log, getattr(metadata, "name", None) or _ptx_entry_name(ptx))
    dynamic_smem = getattr(metadata, "shared", None)
    smem = None if static_smem is None and dynamic_smem is None else (static_smem or 0) + (dynamic_smem or 0)
    return AotReport(case.name, arch, n_regs, stores, loads, smem, log)


#: Largest dynamic shared memory one block may use (A100: 163 KiB, H100: 227 KiB).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def fits(report: AotReport) -> bool:
    """No spills and within the arch's shared memory: a candidate a GPU launch would keep."""
    return not report.spills and (report.smem_bytes or 0) <= SMEM_LIMIT.get(report.arch, 0)


def spec_from_launcher(name: str, launcher, signature: dict, constexprs: dict, meta: dict) -> AotSpec:
    """The :class:`AotSpec` of ``launcher`` (a :class:`.tuning.Launcher`) specialised by ``meta``
    (its constexprs), with runtime ``signature`` / ``constexprs`` from :func:`launch_signature`."""
    from .tuning import config_name

    return AotSpec(name, tuple(
        AotCase(name=f"{name}[{config_name(cfg)}]", fn=launcher.fn, signature=signature,
                constexprs={**constexprs, **meta, **cfg.kwargs}, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
        for cfg in launcher.candidates(**meta)))


def first_fit(spec: AotSpec, arch: int) -> tuple:
    """``(report of the first candidate that fits or None, reports of those tried)``: candidates
    are compiled in preference order until one fits, as a GPU launch would keep it."""
    tried = []
    for case in spec.candidates:
        try:
            report = compile_case(case, arch)
        except AotCompileError as e:
            tried.append(e)
            continue
        tried.append(report)
        if fits(report):
            return report, tried
    return None, tried


def compile_case(case: AotCase, arch: int) -> AotReport:
    """Compile ``case`` for ``sm_<arch>`` (80, 90, ...) and report registers, spills and smem."""
    if _interpreter_active(case.fn):
        return _worker_compile(case, arch)
    return _compile_in_process(case, arch)


# ----------------------------------------------------------------------------------------------
# helper process for interpreter-mode callers
# ----------------------------------------------------------------------------------------------

def _write_msg(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read_msg(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    (n, ) = struct.unpack("<Q", head)
    data = stream.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def _fn_location(fn) -> tuple:
    raw = fn
    for _ in range(8):  # InterpretedFunction / JITFunction / Autotuner -> the plain python function
        if inspect.isfunction(raw):
            break
        raw = getattr(raw, "fn", None)
    if not inspect.isfunction(raw) or raw.__module__ in (None, "__main__") or "<locals>" in raw.__qualname__:
        raise AotCompileError(f"cannot locate kernel {fn!r} by module/qualname for the compile helper process")
    return raw.__module__, raw.__qualname__


class _Worker:
    _lock = threading.Lock()
    _proc = None

    @classmethod
    def request(cls, req: dict):
        with cls._lock:
            if cls._proc is None or cls._proc.poll() is not None:
                env = dict(os.environ)
                env.pop("TRITON_INTERPRET", None)
                cls._proc = subprocess.Popen([sys.executable, "-m", _THIS_MODULE, "--serve"], env=env,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                _write_msg(cls._proc.stdin, req)
                resp = _read_msg(cls._proc.stdout)
            except (BrokenPipeError, OSError):
                resp = None
            if resp is None:
                cls.close()
                raise AotCompileError("AOT compile helper process died")
            return resp

    @classmethod
    def close(cls) -> None:
        proc, cls._proc = cls._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait()


atexit.register(_Worker.close)


def _worker_compile(case: AotCase, arch: int) -> AotReport:
    module, qualname = _fn_location(case.fn)
    req = {"module": module, "qualname": qualname, "sys_path": list(sys.path), "arch": arch,
           "case": {f.name: getattr(case, f.name) for f in dataclasses.fields(case) if f.name != "fn"}}
    kind, *payload = _Worker.request(req)
    if kind == "ok":
        return AotReport(**payload[0])
    message, tb = payload
    raise AotCompileError(f"{message}\n(in the compile helper process)\n{tb}")


def _serve() -> None:
    proto_in = sys.stdin.buffer
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints (triton, ptxas dumps) must not corrupt the protocol stream
    sys.stdout = sys.stderr
    while True:
        req = _read_msg(proto_in)
        if req is None:
            return
        try:
            for p in req["sys_path"]:
                if p not in sys.path:
                    sys.path.append(p)
            obj = importlib.import_module(req["module"])
            for part in req["qualname"].split("."):
                obj = getattr(obj, part)
            case = AotCase(fn=obj, **req["case"])
            resp = ("ok", dataclasses.asdict(_compile_in_process(case, req["arch"])))
        except BaseException as e:  # report, keep serving
            resp = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
        _write_msg(proto_out, resp)


# ----------------------------------------------------------------------------------------------
# case collection, table, CLI
# ----------------------------------------------------------------------------------------------

def collect_specs() -> list:
    """Concatenate ``aot_specs()`` of every module in ``vitkern.triton_kernels.KERNEL_MODULES``."""
    pkg = importlib.import_module("vitkern.triton_kernels")
    specs = []
    for name in getattr(pkg, "KERNEL_MODULES", ()):
        mod = importlib.import_module(f"{pkg.__name__}.{name}")
        aot_specs = getattr(mod, "aot_specs", None)
        if aot_specs is None:
            raise AttributeError(f"kernel module {mod.__name__} (in KERNEL_MODULES) defines no aot_specs()")
        specs.extend(aot_specs())
    return specs


def collect_cases() -> list:
    """Every tile candidate of every specialisation, as :class:`AotCase` (the full report)."""
    return [case for spec in collect_specs() for case in spec.candidates]


_HEADER = ("case", "arch", "regs", "spill st/ld (B)", "smem (B)")


def _row(r: AotReport) -> tuple:
    smem = "-" if r.smem_bytes is None else str(r.smem_bytes)
    return (r.case, ptxas_arch(r.arch), str(r.n_regs), f"{r.spill_stores}/{r.spill_loads}", smem)


def format_report(r: AotReport) -> str:
    case, arch, regs, spills, smem = _row(r)
    flag = "  SPILLS" if r.spills else ""
    return f"{case} {arch}: {regs} regs, spill {spills} B, smem {smem} B{flag}"


def format_table(reports) -> str:
    rows = [_HEADER] + [_row(r) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        line = "  ".join(cells)
        if k > 0 and reports[k - 1].spills:
            line += "  <-- SPILLS"
        lines.append(line)
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {_THIS_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (default: 80 90)")
    parser.add_argument("-k", dest="filter", default=None, help="only cases whose name contains this")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve()
        return 0
    reason = cuda_backend_unavailable_reason()
    if reason is not None:
        print(f"cannot AOT-compile: {reason}", file=sys.stderr)
        return 2
    try:
        specs = collect_specs()
    except Exception as e:
        print(f"cannot collect AOT cases: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    specs = [AotSpec(sp.name, tuple(c for c in sp.candidates if args.filter is None or args.filter in c.name))
             for sp in specs]
    specs = [sp for sp in specs if sp.candidates]
    if not specs:
        print("no AOT cases (vitkern.triton_kernels.KERNEL_MODULES is empty or matched nothing)")
        return 0
    reports, failures, unfit = [], [], []
    t0 = time.perf_counter()
    for spec in specs:
        for arch in args.arch:
            fit = False
            for case in spec.candidates:
                try:
                    report = compile_case(case, arch)
                except Exception as e:
                    failures.append(f"{case.name} sm_{arch}: {e}")
                    continue
                reports.append(report)
                fit = fit or fits(report)
            if not fit:
                unfit.append(f"{spec.name} sm_{arch}")
    print(format_table(reports))
    n_spill = sum(r.spills for r in reports)
    print(f"\n{len(specs)} specialisations, {len(reports)} candidates compiled, {n_spill} spilling, "
          f"{len(failures)} failed, {len(unfit)} specialisations with no candidate that fits "
          f"({time.perf_counter() - t0:.1f}s)")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    for u in unfit:
        print(f"NO FIT {u}", file=sys.stderr)
    return 1 if unfit else 0


if __name__ == "__main__":
    sys.exit(main())
