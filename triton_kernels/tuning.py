"""Tile candidates, chosen on the machine that runs them.

A kernel's tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) are *candidates*: pure tuning. Which
of them spill registers depends on the compiler that builds them (a Triton update changes register
allocation), so the choice is made where the kernel runs, and a candidate list never decides which
inputs the API accepts: each family declares its capabilities apart (``unsupported`` in its
module), and ``tests/test_aot_compile.py`` proves, with the installed compiler, that every declared
specialisation has at least one candidate that compiles for sm_80 and sm_90 without spills.

Per specialisation (the launch's constexprs) a :class:`Launcher`

* on a GPU compiles every candidate for the device, drops those whose compiled kernel spills
  (Triton's metadata: ``n_spills``) or does not fit (compile error, shared memory), and autotunes
  among the rest (``triton.autotune`` keyed by the launch's shape arguments; one survivor runs
  directly);
* when every candidate spills, runs the least-spilling one and warns once (:class:`SpillWarning`);
* under the interpreter runs the first candidate (there is no compiler to ask). A ``probe`` can be
  installed to apply the same choice there; the tests do, with the ahead-of-time compiler.

``VITKERN_AUTOTUNE=0`` compiles the candidates in preference order only until one fits and runs
that one without timing the others: one compile per specialisation instead of one per candidate
(short jobs, test suites on a GPU).

The spill check compiles with the first launch's arguments, i.e. for its specialisation (pointer
alignment, integer arguments equal to 1 or divisible by 16); later launches of the same
constexprs reuse the choice.
"""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Callable, Sequence

import torch
import triton

from . import interpreting

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles that every softmax kernel also tries after its
#: preferred ones: small enough to fit in registers with the compilers we have met (8 warps
#: spread a tile's registers: with triton 3.6 on sm_90 a 32×32 fp32 PPMA dK/dV tile fits on 8
#: and spills on 4; with triton 3.8 on sm_90 so does a 16×16 fp32 d = 128 HiLo tile, and 16×32
#: on 8 is the one fp32 d = 64 window bias-gradient tile that fits).
FALLBACK_TILES = ((32, 32, 4, 1), (32, 32, 8, 1), (16, 16, 4, 1), (16, 16, 8, 1), (16, 32, 8, 1))


class SpillWarning(RuntimeWarning):
    """Every tile candidate of a kernel spills registers on this machine: it runs, slower."""


def tiles(rows, fallback=FALLBACK_TILES) -> list:
    """``triton.Config``s from (BLOCK_M, BLOCK_N, num_warps, num_stages) rows, preferred first,
    then the ``fallback`` tiles not already listed."""
    seen = list(dict.fromkeys([*map(tuple, rows), *fallback]))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in seen]


def table_candidates(table: dict):
    """``candidates(**constexprs)`` from a ``{(BLOCK_D, fp32?): rows}`` table of preferred tiles
    (a missing key leaves the fallbacks: a table never limits what runs)."""
    def candidates(*, BLOCK_D, DOT_PRECISION, **_):
        return tiles(table.get((BLOCK_D, DOT_PRECISION != "native"), ()))
    return candidates


def capability_reason(what: str, head_dim: int, fp32: bool, max_head_dim: int, hint: str = "") -> str | None:
    """The refusal of a head dim beyond a family's declared capability (None within it).

    Declared capabilities stop where no tile candidate fits in registers for the compilers the
    suite is run with; the refusal says so, whatever tiles a machine has."""
    if head_dim <= max_head_dim:
        return None
    dtype = "float32" if fp32 else "16-bit"
    return (f"{dtype} head_dim {head_dim} is outside the declared capability of triton {what} "
            f"(up to {max_head_dim}: larger tiles spill registers){hint}")


def config_name(cfg) -> str:
    sizes = ",".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in cfg.kwargs.items())
    return f"{sizes},w{cfg.num_warps},s{cfg.num_stages}"


def choose(candidates: Sequence, spills: Sequence) -> tuple[list, str | None]:
    """The candidates to tune among, from each one's probe result, and a warning (or None).

    ``spills[i]``: spilled bytes of candidate i (0 = fits; None = unknown, kept), or the exception
    its compile raised (dropped). No candidate compiles: the first error is raised. Every one
    spills: the least-spilling one alone, with a warning.
    """
    fits = [c for c, s in zip(candidates, spills) if s is None or (isinstance(s, int) and s == 0)]
    if fits:
        return fits, None
    spilled = [(s, i) for i, s in enumerate(spills) if isinstance(s, int)]
    if not spilled:
        errors = [s for s in spills if isinstance(s, BaseException)]
        if errors:
            raise errors[0]
        raise ValueError("no tile candidates")
    s, i = min(spilled)
    best = candidates[i]
    return [best], (f"every tile candidate spills registers on this machine; running the "
                    f"least-spilling one ({config_name(best)}: {s} B spilled), which is slower")


def autotuning() -> bool:
    """False when ``VITKERN_AUTOTUNE=0``: the first candidate that fits runs, untimed."""
    return os.environ.get("VITKERN_AUTOTUNE", "1") not in ("0", "")


def device_spills(fn, cfg, args, constexprs) -> int | None:
    """Spilled bytes of ``fn`` compiled for the current device with ``cfg`` and the
    specialisation of ``args`` (the JIT cache keeps it for the launch that follows)."""
    kernel = fn.warmup(*args, grid=(1,), **constexprs, **cfg.all_kwargs())
    init = getattr(kernel, "_init_handles", None)
    if init is not None:
        init()  # loads the binary: fills n_regs / n_spills, raises OutOfResources (smem)
    return getattr(kernel, "n_spills", None)


Probe = Callable[[object, object, tuple, dict], "int | None"]


class Launcher:
    """A jit kernel and its tile candidates (see the module docstring).

    ``candidates(**constexprs)`` returns ``triton.Config``s, preferred first; ``key`` names the
    launch arguments autotuning keys on. ``probe(fn, cfg, args, constexprs)`` returns a
    candidate's spilled bytes (default: :func:`device_spills` on a GPU, none under the
    interpreter).
    """

    def __init__(self, fn, candidates, key, probe: Probe | None = None):
        self.fn = fn
        self.candidates = candidates
        self.key = list(key)
        self.probe = probe
        self._kept: dict[tuple, list] = {}
        self._tuned: dict[tuple, object] = {}
        self._runtime_names: tuple | None = None
        self._plans: dict = {}

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", None) or getattr(self.fn.fn, "__name__", "kernel")

    def configs(self, args, constexprs: dict) -> list:
        """The candidates kept for this specialisation (chosen on the first call). ``args``:
        the launch's runtime arguments, or a function returning them, called only when the
        candidates are probed (the first call on a GPU)."""
        spec = tuple(sorted(constexprs.items()))
        kept = self._kept.get(spec)
        if kept is None:
            candidates = self.candidates(**constexprs)
            probe = self.probe or (None if interpreting() else device_spills)
            if probe is None:
                kept = candidates[:1]
            else:
                args = args() if callable(args) else args
                results = []
                for cfg in candidates:
                    try:
                        results.append(probe(self.fn, cfg, args, constexprs))
                    except Exception as e:  # does not compile / fit here: not a candidate
                        results.append(e)
                    if not autotuning() and results[-1] in (0, None):
                        candidates = candidates[:len(results)]  # first fit: stop probing
                        break
                kept, warning = choose(candidates, results)
                if warning is not None:
                    spec_text = ", ".join(f"{k}={v}" for k, v in spec)
                    warnings.warn(f"vitkern {self.name} [{spec_text}]: {warning}", SpillWarning,
                                  stacklevel=3)
            self._kept[spec] = kept
        return kept

    def pick(self, args, **constexprs):
        """The one config to run (the preferred kept candidate), for kernels whose grid or
        buffers depend on the tile and so cannot be autotuned by ``triton.autotune``.

        ``args`` (or what it returns, when a function): the runtime arguments, positionally
        (a tuple) or by keyword (a dict, as ``__call__`` takes them)."""
        def runtime():
            given = args() if callable(args) else args
            if not isinstance(given, dict):
                return given
            bound, rest = self._bind((), dict(given))
            if rest:
                raise TypeError(f"{self.name}: not runtime arguments: {sorted(rest)}")
            return bound
        return self.configs(runtime, constexprs)[0]

    def _bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """(runtime args in the kernel's order, constexprs) of a launch given by keyword
        (``launcher(grid, Q=q, sqb=..., BLOCK_D=64)``) or positionally."""
        names = self._runtime_names
        if names is None:
            fn = getattr(self.fn, "fn", self.fn)  # JITFunction / InterpretedFunction -> python fn
            params = inspect.signature(fn).parameters.values()
            names = self._runtime_names = tuple(
                p.name for p in params if "constexpr" not in str(p.annotation))
        if not kwargs.keys() & names:
            return args, kwargs
        missing = [n for n in names[len(args):] if n not in kwargs]
        if missing:
            raise TypeError(f"{self.name}: missing runtime arguments {missing}")
        runtime = (*args, *(kwargs.pop(n) for n in names[len(args):]))
        return runtime, kwargs

    def _bound(self, grid, args: tuple, constexprs: dict):
        """(the kernel bound to its grid, its keyword arguments) for a launch of ``args``."""
        kept = self.configs(args, constexprs)
        if len(kept) == 1 or interpreting():
            cfg = kept[0]
            return self.fn[grid(cfg.kwargs)], {**constexprs, **cfg.all_kwargs()}
        spec = tuple(sorted(constexprs.items()))
        tuned = self._tuned.get(spec)
        if tuned is None:
            tuned = self._tuned[spec] = triton.autotune(configs=kept, key=self.key)(self.fn)
        return tuned[grid], constexprs

    def __call__(self, grid, *args, **kwargs):
        """Launch on ``grid`` (a function of the chosen config); arguments by keyword or
        positionally, constexprs by keyword."""
        args, constexprs = self._bind(args, kwargs)
        kernel, kw = self._bound(grid, args, constexprs)
        return kernel(*args, **kw)

    def launch(self, key, grid, tensors: dict, scalars: Callable[[], dict]):
        """Launch with ``tensors`` (runtime arguments by keyword) and the rest from
        ``scalars()`` (strides, sizes, scalars, constexprs by keyword), which runs, with the
        binding, the config choice and ``grid``, once per ``key``: a host-side plan of the launch.

        ``key`` must determine ``scalars()`` and ``grid`` (e.g. the tensors' shapes, strides and
        dtypes, and the call's scalar arguments: :func:`launch_key`). A repeated call then costs
        a dict lookup and a list copy instead of building ~50 keyword arguments and binding them
        (~15 µs per launch on a 2-core CPU, at ViT sizes where a kernel runs for microseconds)."""
        def plan():
            args, constexprs = self._bind((), {**scalars(), **tensors})
            kernel, kw = self._bound(grid, args, constexprs)
            names = self._runtime_names
            slots = tuple((names.index(n), n) for n in tensors)
            check_no_tensors(self.name, {n: a for n, a in zip(names, args) if n not in tensors})
            template = list(args)
            for i, _ in slots:
                template[i] = None  # tensors are the call's own: a plan holds none
            return kernel, kw, template, slots

        kernel, kw, template, slots = self.memo(key, plan)
        args = template.copy()
        for i, name in slots:
            args[i] = tensors[name]
        return kernel(*args, **kw)

    def memo(self, key, build: Callable[[], object]):
        """``build()``'s result, kept per ``key`` (at most :data:`MAX_PLANS`): a launch plan."""
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = build()
        return plan


def check_no_tensors(name: str, args: dict) -> None:
    """A plan's fixed arguments must hold no tensor: it would be one call's, reused by the next
    (stale memory). Tensors go in a launch's ``tensors``."""
    baked = [n for n, a in args.items() if isinstance(a, torch.Tensor)]
    if baked:
        raise TypeError(f"{name}: tensors {baked} must be passed in `tensors`")


#: plans a Launcher keeps (one per distinct launch key; cleared when full: shapes that vary
#: call after call re-plan instead of growing without bound)
MAX_PLANS = 1024


def launch_key(*items) -> tuple:
    """A :meth:`Launcher.launch` key from tensors (their shape, strides and dtype; None stays
    None) and hashable values, plus what the launch reads from torch's global state (the fp32
    matmul precision, which sets ``DOT_PRECISION``)."""
    key = [torch.get_float32_matmul_precision()]
    for x in items:  # a loop, not a generator: this runs on every launch
        key.append((x.shape, x.stride(), x.dtype) if isinstance(x, torch.Tensor) else x)
    return tuple(key)
