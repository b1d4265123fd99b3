"""Benchmark harness: the loop, timers, device peaks, metrics, JSON results and speedup plots.

The loop (``run_entry``)
    One task = a registry entry (``bench/registry.py``: one op of a family) at one case and dtype.
    Providers: the vitkern call per backend (``vitkern[<backend>]``; CPU: ``auto``, CUDA: every
    compiled backend of the family that is available; ``--backends`` overrides) and the entry's
    baselines. Correctness first: before anything is timed every provider's outputs (and in
    fwd+bwd mode the gradients of every floating input and of its module's parameters) are
    compared with the entry's reference in fp64; the error, normalised by max(1, max|ref|) (by
    max|ref| where a family says so), must
    be at most ``max(floor[dtype], 4 * e_ref)``, ``e_ref`` the error of the reference math run in
    the benchmark dtype (the flash-attention rule). A wrong or raising vitkern provider is not
    timed, its record says ``wrong`` / ``error`` and the run fails; a backend that refuses by
    design (a ``BackendError``) is ``skipped`` with the reason. Then every runnable provider is
    timed per mode on the same rotated inputs, and each vitkern record gets ``speedup`` (baseline
    ms / its ms) and ``speedup_vs_vitkern`` (the other vitkern providers, e.g. cuda vs triton).

Timing
    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every repetition, warm-up
    excluded), 20/50/80 % quantiles, the median is reported. The timed callable rotates over a few
    copies of its inputs (``rotating``) so that consecutive calls never find their operands warm in
    L2 from the previous call.
    CPU: ``time.perf_counter`` around each call after a warm-up; median of the repetitions (the
    number of repetitions adapts to the call's duration). ``bench_many`` times the providers of one
    comparison round-robin (one call of each per round, as Liger interleaves its providers), so a
    load change on a shared machine hits every provider alike.

Metrics (``metrics``)
    ms (median), useful TFLOP/s = flops / time with ``flops`` the *useful* work of the op (each
    benchmark states its formula; masked or padded work is never counted), GB/s = bytes / time with
    ``bytes`` from an explicit byte model (each benchmark states it), and % of the device's peak
    where the peak is known.

Peaks
    Spec-sheet numbers (dense, no sparsity), looked up from ``torch.cuda.get_device_name()`` with an
    explicit name -> model mapping (``PEAK_RULES``; an H100 SXM calls itself
    "NVIDIA H100 80GB HBM3", which a naive "H100 SXM" substring match misses). Override with the
    environment variables ``VITKERN_PEAK_TFLOPS`` and ``VITKERN_PEAK_GBPS`` (they win over the table
    and apply to every dtype). For fp32 inputs the TF32 tensor-core peak is used when
    ``torch.backends.cuda.matmul.allow_tf32`` is on, else the FP32 CUDA-core peak.

Results
    ``write_results`` writes ``<out>/<device-slug>-<YYYY-MM-DD>.json`` (suffix ``-quick`` for quick
    runs): run metadata (device, peaks, torch / triton / python / vitkern versions, git commit,
    date, command line) plus one record per (family, case, group, provider, mode, dtype).
    ``plot_speedups`` writes a PNG beside it: per family, speedup of each vitkern provider over each
    baseline of its group, per case.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "PeakSpec", "PEAK_RULES", "DeviceInfo", "device_info", "lookup_peak", "slugify",
    "Timing", "bench_cpu", "bench_cuda", "bench", "bench_cpu_interleaved", "bench_many", "rotating",
    "n_rotations",
    "metrics", "environment", "git_commit", "results_path", "write_results", "plot_speedups",
    "format_table", "RESULTS_DIR", "dtype_name", "Context", "Task", "Run", "Provider", "Skip",
    "CorrectnessError", "ERR_FLOOR", "run_entry", "add_speedups", "is_refusal", "refusal_reason",
    "flex_attention",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# Device peaks
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeakSpec:
    """Dense spec-sheet peaks of one GPU model: TFLOP/s per math path and HBM GB/s."""

    model: str
    tflops_16: float      # fp16 / bf16 tensor cores, dense
    tflops_tf32: float    # tf32 tensor cores, dense
    tflops_fp32: float    # fp32 CUDA cores (non-tensor)
    gbps: float           # HBM bandwidth, GB/s (1e9 B/s)
    l2_mb: float          # L2 size in MB (sizes the input rotation)
    source: str = "NVIDIA datasheet (dense, no sparsity)"


# Ordered: the first rule whose regex matches the device name wins. Names are what
# torch.cuda.get_device_name() reports, e.g. "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe".
PEAK_RULES: tuple[tuple[str, PeakSpec], ...] = (
    (r"H100.*NVL", PeakSpec("H100 NVL", 835.0, 417.5, 60.0, 3900.0, 50.0)),
    (r"H100.*PCIe", PeakSpec("H100 PCIe", 756.0, 378.0, 51.2, 2000.0, 50.0)),
    (r"H100.*(SXM|HBM3)|H100$", PeakSpec("H100 SXM", 989.4, 494.7, 66.9, 3350.0, 50.0)),
    (r"GH200", PeakSpec("GH200 (H100 SXM-class)", 989.4, 494.7, 66.9, 4000.0, 50.0)),
    (r"H200.*NVL", PeakSpec("H200 NVL", 835.0, 417.5, 60.0, 4800.0, 50.0)),
    (r"H200", PeakSpec("H200 SXM", 989.4, 494.7, 66.9, 4800.0, 50.0)),
    (r"A100.*SXM.*80|A100.*80GB.*SXM", PeakSpec("A100 SXM 80GB", 312.0, 156.0, 19.5, 2039.0, 40.0)),
    (r"A100.*80GB.*PCIe|A100.*PCIe.*80", PeakSpec("A100 PCIe 80GB", 312.0, 156.0, 19.5, 1935.0, 40.0)),
    (r"A100.*(SXM|PCIE|PCIe).*40|A100.*40GB", PeakSpec("A100 40GB", 312.0, 156.0, 19.5, 1555.0, 40.0)),
    (r"A100", PeakSpec("A100 (variant unknown, 80GB SXM assumed)", 312.0, 156.0, 19.5, 2039.0, 40.0)),
)


def lookup_peak(name: str) -> PeakSpec | None:
    for pattern, spec in PEAK_RULES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return spec
    return None


def slugify(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return re.sub(r"-{2,}", "-", s) or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@dataclass
class DeviceInfo:
    kind: str                       # "cuda" | "cpu"
    name: str
    slug: str
    peak: PeakSpec | None = None
    peak_override_tflops: float | None = None
    peak_override_gbps: float | None = None
    details: dict = field(default_factory=dict)

    def peak_tflops(self, dtype: torch.dtype) -> float | None:
        if self.peak_override_tflops is not None:
            return self.peak_override_tflops
        if self.peak is None:
            return None
        if dtype in (torch.float16, torch.bfloat16):
            return self.peak.tflops_16
        if dtype == torch.float32:
            return self.peak.tflops_tf32 if torch.backends.cuda.matmul.allow_tf32 else self.peak.tflops_fp32
        return None

    def peak_gbps(self) -> float | None:
        if self.peak_override_gbps is not None:
            return self.peak_override_gbps
        return None if self.peak is None else self.peak.gbps

    def as_dict(self) -> dict:
        d = {"kind": self.kind, "name": self.name, "slug": self.slug,
             "peak": asdict(self.peak) if self.peak else None,
             "peak_override_tflops": self.peak_override_tflops,
             "peak_override_gbps": self.peak_override_gbps}
        d.update(self.details)
        return d


def _env_float(name: str) -> float | None:
    v = os.environ.get(name)
    if v is None or not v.strip():
        return None
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not a number") from None


def device_info(device: torch.device | str) -> DeviceInfo:
    device = torch.device(device)
    tfl, gbps = _env_float("VITKERN_PEAK_TFLOPS"), _env_float("VITKERN_PEAK_GBPS")
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        name = torch.cuda.get_device_name(idx)
        details = {
            "capability": ".".join(map(str, torch.cuda.get_device_capability(idx))),
            "sm_count": props.multi_processor_count,
            "memory_gb": round(props.total_memory / 1e9, 2),
            "cuda_runtime": torch.version.cuda,
        }
        return DeviceInfo("cuda", name, slugify(name), lookup_peak(name), tfl, gbps, details)
    name = _cpu_model()
    details = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "machine": platform.machine()}
    return DeviceInfo("cpu", name, "cpu-" + slugify(name), None, tfl, gbps, details)


# ---------------------------------------------------------------------------------------------
# What ``python -m vitkern.bench`` hands every task
# ---------------------------------------------------------------------------------------------
@dataclass
class Context:
    """The run's settings, passed to ``run_entry``; ``failures`` collects the vitkern providers
    that failed their correctness check (or raised), ``log`` prints above the bar."""

    device: torch.device
    dev: "DeviceInfo"
    modes: tuple[str, ...] = ("fwd",)
    quick: bool = False
    strict: bool = False
    backends: tuple[str, ...] | None = None
    batch: int | None = None
    seed: int = 0
    flex: bool = True                   # FlexAttention baselines (CUDA; compile once per shape)
    compile_baselines: bool = False     # torch.compile'd baselines where a family has them
    log: Callable[[str], None] = print
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Task:
    """One benchmark task of a family: a shape ``case`` (from ``bench/shapes.py``), a dtype and a
    comparison group."""

    family: str
    case: Any
    dtype: torch.dtype
    group: str

    @property
    def label(self) -> str:
        return f"{self.family}/{self.case.name}/{self.group}/{dtype_name(self.dtype)}"


# Timing
# ---------------------------------------------------------------------------------------------
@dataclass
class Timing:
    ms: float                 # median
    ms_p20: float
    ms_p80: float
    reps: int
    timer: str

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bench_cpu(fn: Callable[[], Any], *, warmup: int = 2, min_reps: int = 5, max_reps: int = 50,
              min_time_s: float = 0.25, max_time_s: float = 3.0) -> Timing:
    """Median wall time (ms) of ``fn()`` on the CPU, after ``warmup`` untimed calls.

    Runs at least ``min_reps`` repetitions, then keeps going until ``min_time_s`` of timed runs
    (at most ``max_reps`` repetitions or ``max_time_s`` seconds).
    """
    return bench_cpu_interleaved({"": fn}, warmup=warmup, min_reps=min_reps, max_reps=max_reps,
                                 min_time_s=min_time_s, max_time_s=max_time_s,
                                 timer="perf_counter median")[""]


def bench_cuda(fn: Callable[[], Any], *, warmup_ms: int = 25, rep_ms: int = 100,
               grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    """``triton.testing.do_bench`` quantiles (20/50/80 %), median reported; L2 flushed every rep."""
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                            quantiles=[0.2, 0.5, 0.8])
    # do_bench picks the repetition count from the estimated runtime
    return Timing(float(p50), float(p20), float(p80), -1, "triton.testing.do_bench median")


_CPU_QUICK = dict(warmup=1, min_reps=3, max_reps=10, min_time_s=0.05, max_time_s=0.5)


def bench(fn: Callable[[], Any], device: torch.device | str, *, quick: bool = False,
          grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    device = torch.device(device)
    if device.type == "cuda":
        return bench_cuda(fn, warmup_ms=10 if quick else 25, rep_ms=30 if quick else 100,
                          grad_to_none=grad_to_none)
    return bench_cpu(fn, **(_CPU_QUICK if quick else {}))


#: a provider whose call takes this many times the fastest one's is timed apart (see below)
APART = 20.0


def bench_cpu_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 2, min_reps: int = 5,
                          max_reps: int = 50, min_time_s: float = 0.25, max_time_s: float = 3.0,
                          timer: str = "perf_counter median (interleaved)") -> dict[str, Timing]:
    """Like ``bench_cpu`` for several callables at once, timed round-robin (one call of each per
    round) so that load changes on a shared CPU hit every provider alike; median per callable.

    A provider more than :data:`APART` times slower than the fastest (a baseline that
    materialises N×N, e.g. SDPA at 16k tokens: a second and gigabytes per call) is timed after
    the others, on its own: interleaved, the cold caches and freed pages it leaves made
    whichever provider ran next look up to 2x slower."""
    names = list(fns)
    last = {}
    for _ in range(warmup):
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            last[n] = time.perf_counter() - t0
    fastest = min(last.values())
    apart = [n for n in names if last[n] > APART * fastest]
    out = _rounds({n: fns[n] for n in names if n not in apart}, min_reps, max_reps, min_time_s,
                  max_time_s, timer)
    for n in apart:
        out.update(_rounds({n: fns[n]}, min_reps, max_reps, min_time_s, max_time_s, timer))
    return {n: out[n] for n in names}


def _rounds(fns, min_reps, max_reps, min_time_s, max_time_s, timer) -> dict[str, Timing]:
    """Rounds of one call of each of ``fns`` until the stopping rule: median per callable."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    t_all = 0.0
    while True:
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            times[n].append(dt * 1e3)
            t_all += dt
        reps = len(times[names[0]])
        per_fn = t_all / len(names)
        if reps >= max_reps or (reps >= min_reps and per_fn >= min_time_s) or (reps >= 3 and per_fn >= max_time_s):
            break
    return {n: Timing(statistics.median(ts), _quantile(ts, 0.2), _quantile(ts, 0.8), len(ts), timer)
            for n, ts in times.items()}


def bench_many(fns: dict[str, Callable[[], Any]], device: torch.device | str, *, quick: bool = False,
               grad_to_none: dict[str, Sequence[torch.Tensor]] | None = None) -> dict[str, Timing]:
    """Time several providers of one comparison: ``do_bench`` each on CUDA, interleaved on CPU.

    A callable that raises is reported as the exception object instead of a Timing.
    """
    device = torch.device(device)
    grad_to_none = grad_to_none or {}
    out: dict[str, Any] = {}
    if device.type == "cuda":
        for n, fn in fns.items():
            try:
                out[n] = bench(fn, device, quick=quick, grad_to_none=grad_to_none.get(n))
            except Exception as exc:  # noqa: BLE001 - reported per provider
                out[n] = exc
        return out
    ok: dict[str, Callable[[], Any]] = {}
    for n, fn in fns.items():  # one untimed call each: a provider that raises drops out here
        try:
            fn()
            ok[n] = fn
        except Exception as exc:  # noqa: BLE001
            out[n] = exc
    if ok:
        out.update(bench_cpu_interleaved(ok, **(_CPU_QUICK if quick else dict(warmup=1))))
    return {n: out[n] for n in fns}


def n_rotations(bytes_per_call: int, device: DeviceInfo | None, *, max_copies: int = 4) -> int:
    """How many input copies to rotate through so the set of them is larger than the L2 cache.

    On CUDA ``do_bench`` flushes L2 between repetitions already; rotation additionally keeps the
    warm-up and any in-call reuse honest. Capped at ``max_copies`` to bound memory.
    """
    if device is None or device.kind != "cuda":
        return 1
    l2 = (device.peak.l2_mb if device.peak else 50.0) * 1e6
    return int(max(2, min(max_copies, math.ceil(2 * l2 / max(bytes_per_call, 1)))))


def rotating(call: Callable[..., Any], arg_sets: Sequence[tuple]) -> Callable[[], Any]:
    """A zero-argument callable that calls ``call(*args)`` with the next copy of the arguments."""
    if len(arg_sets) == 1:
        args = arg_sets[0]
        return lambda: call(*args)
    cyc = itertools.cycle(arg_sets)
    return lambda: call(*next(cyc))


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.float64: "fp64"}.get(dtype, str(dtype).replace("torch.", ""))


def metrics(ms: float, flops: float | None, nbytes: float | None, dev: DeviceInfo,
            dtype: torch.dtype) -> dict:
    """TFLOP/s, GB/s and % of peak for one timing."""
    out: dict[str, Any] = {"ms": ms}
    s = ms * 1e-3
    tflops = flops / s / 1e12 if flops and s > 0 else None
    gbps = nbytes / s / 1e9 if nbytes and s > 0 else None
    out["tflops"] = tflops
    out["gbps"] = gbps
    pt, pb = dev.peak_tflops(dtype), dev.peak_gbps()
    out["pct_peak_tflops"] = 100.0 * tflops / pt if (tflops is not None and pt) else None
    out["pct_peak_gbps"] = 100.0 * gbps / pb if (gbps is not None and pb) else None
    return out


# ---------------------------------------------------------------------------------------------
# The loop: one task of a registry entry (bench/registry.py), correctness first, then timing
# ---------------------------------------------------------------------------------------------
ERR_MULT = 4.0     # the flash-attention rule: error <= max(floor, ERR_MULT * the reference's own)
#: default error floors (normalised max abs error); fp32 allows TF32 tensor-core dots (Triton's default)
ERR_FLOOR = {torch.float64: 1e-9, torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class CorrectnessError(AssertionError):
    """A vitkern provider is off against the reference (raised with ``--strict``)."""


class Skip(Exception):
    """Raised by a provider factory: the provider is recorded as ``skipped`` with this reason."""


@dataclass
class Provider:
    """One timed callable of a task: ``fn(*inputs)`` returns a tensor or a tuple of them (the
    gradient flows from the first)."""

    name: str = ""
    kind: str = "baseline"                  # "vitkern" | "baseline" | "reference"
    fn: Callable | None = None
    skip: str = ""                          # why it is not run
    backend: str | None = None
    module: torch.nn.Module | None = None   # its parameters' gradients: checked, reset when timed
    check: bool | Callable = True           # False: another op, timed only; a callable: checked instead
    reference: Callable | None = None       # (run, dtype) -> what it is checked against instead
    fwd_only: str = ""                      # why only its forward is timed (an inference kernel)
    fields: dict = field(default_factory=dict)   # added to its records


class Run:
    """One task being run: what an entry's callables receive. ``backends``: (label, backend) of
    the vitkern providers (label ``auto:<resolved>`` for auto). An entry's ``prepare`` may set
    attributes (modules, masks), replace ``case`` / ``B`` and fill ``fields`` (added to every
    record of the task)."""

    def __init__(self, task: Task, ctx: Context, family: Any, entry: Any):
        self.task, self.ctx, self.family, self.case, self.dtype = task, ctx, family, task.case, task.dtype
        self.device, self.fields = ctx.device, {}
        on_cuda = ctx.device.type == "cuda"
        self.B = ctx.batch or (task.case.batch if on_cuda else task.case.cpu_batch)
        if ctx.quick and not on_cuda and not ctx.batch and family.quick_cpu_batch:
            self.B = min(self.B, family.quick_cpu_batch)
        self.resolved = resolve_backend(ctx.device, family.eager)
        wanted = ((list(ctx.backends) if ctx.backends else default_backends(ctx.device, family.backends))
                  if entry.per_backend else ["auto"])
        self.backends = [(f"auto:{self.resolved}" if b == "auto" and self.resolved else b, b) for b in wanted]

    @property
    def label(self) -> str:
        return f"{self.task.family}/{self.case.name}/{self.task.group}/{dtype_name(self.dtype)}"

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def gen(self, *parts: Any) -> torch.Generator:
        """A generator seeded by the run's seed, the case, the group and ``parts``."""
        h = self.ctx.seed
        for ch in "/".join(map(str, (self.case.name, self.task.group) + parts)):
            h = (h * 131 + ord(ch)) % (2 ** 31)
        return torch.Generator().manual_seed(h)

    def randn(self, shape, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * scale).to(self.device, self.dtype)


def _fail(ctx: Context, msg: str, exc: BaseException) -> None:
    ctx.failures.append(msg)
    if ctx.strict:
        raise exc


def is_refusal(exc: BaseException) -> bool:
    """A ``BackendError``: the backend declares it does not take these inputs (by design)."""
    from vitkern.errors import BackendError

    return isinstance(exc, BackendError)


def refusal_reason(exc: BaseException, backend: str) -> str:
    """The ``<backend>: reason`` line of a BackendError (the whole message if absent)."""
    for line in str(exc).splitlines():
        if line.strip().startswith(f"{backend}:"):
            return line.strip()[len(backend) + 1:].strip()
    return str(exc)


def default_backends(device: torch.device, compiled: Sequence[str]) -> list[str]:
    """``auto`` on CPU; on CUDA every backend of ``compiled`` that is available."""
    if device.type != "cuda":
        return ["auto"]
    from vitkern.backends import backend_status

    status = backend_status()
    return [b for b in compiled if status.get(b, (False, ""))[0]] or ["auto"]


def resolve_backend(device: torch.device, eager: bool) -> str | None:
    """The backend ``auto`` picks for tensors on ``device`` (by device only, as
    ``vitkern.backends.select`` decides before any shape-specific refusal); ``eager``: whether the
    op has a ``vitkern.eager`` path. None if unknown."""
    try:
        from vitkern import backends
        return backends.select("bench", "auto", lambda name, explicit: (
            "no eager path" if name == "eager" and not eager
            else backends.device_reason(name, device, explicit)))
    except Exception:  # noqa: BLE001 - reported as unknown
        return None


def flex_attention(ctx: Context) -> Callable:
    """``torch.compile``'d FlexAttention (compiled once per process), or Skip with why not."""
    if ctx.device.type != "cuda":
        raise Skip("FlexAttention baseline runs on CUDA only (compiled Triton kernels)")
    if not ctx.flex:
        raise Skip("disabled (--no-flex)")
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention as fa
        _FLEX = torch.compile(fa, dynamic=False)
    return _FLEX


_FLEX = None


def _providers(entry: Any, r: Run) -> list[Provider]:
    """The vitkern provider of each backend to time, then the entry's baselines."""
    name = entry.name if "{" in entry.name or len(r.backends) == 1 else entry.name + "[{b}]"
    provs = []
    for label, b in r.backends:
        p = Provider(name.format(b=b, label=label, case=r.case), "vitkern", backend=b,
                     fields={"resolved_backend": r.resolved} if b == "auto" else {})
        try:
            got = entry.vitkern(r, b)
            p = replace(got, name=p.name, kind="vitkern", backend=b, fields={**p.fields, **got.fields}) \
                if isinstance(got, Provider) else replace(p, fn=got)
        except Skip as why:
            p.skip = str(why)
        except Exception as exc:  # noqa: BLE001
            p.skip = f"{r.label} {p.name}: setup failed: {type(exc).__name__}: {exc}"
            _fail(r.ctx, p.skip, exc)
        provs.append(p)
    for bname, make in entry.baselines.items():
        try:
            got = make(r)
        except Skip as why:
            got = Provider(bname, skip=str(why))
        except Exception as exc:  # noqa: BLE001
            got = Provider(bname, skip=f"setup failed: {type(exc).__name__}: {exc}")
        for p in got if isinstance(got, list) else [] if got is None else [got]:
            provs.append((p if p.name else replace(p, name=bname)) if isinstance(p, Provider)
                         else Provider(bname, fn=p))
    return provs


def _outputs(p: Provider, inputs: list, dout: torch.Tensor | None, with_grad: bool,
             names: Sequence[str], fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """``out`` (``out1``, ... for a tuple), and with ``with_grad`` ``d<name>`` of every floating
    input and ``d:<parameter>`` of the provider's module: the gradients of the first output."""
    leaves = [t.detach().clone().requires_grad_(with_grad and t.is_floating_point()) for t in inputs]
    with torch.enable_grad() if with_grad else torch.no_grad():
        out = (fn or p.fn)(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    res = {("out" if i == 0 else f"out{i}"): o.detach() for i, o in enumerate(outs)}
    if with_grad:
        wrt = [(f"d{names[i] if i < len(names) else i}", t) for i, t in enumerate(leaves) if t.requires_grad]
        if p.module is not None:  # torch.compile wraps a module as _orig_mod
            wrt += [("d:" + n.removeprefix("_orig_mod."), t) for n, t in p.module.named_parameters()
                    if t.requires_grad]
        grads = torch.autograd.grad(outs[0], [t for _, t in wrt], dout.to(outs[0].dtype), allow_unused=True)
        res.update({n: g for (n, _), g in zip(wrt, grads) if g is not None})
    return res


def _norm_err(a: torch.Tensor, ref: torch.Tensor, floor: float) -> tuple[float, float]:
    """(max abs error, max abs error / max(floor, max|ref|)); NaN/inf -> inf."""
    a64, r64 = a.detach().to(torch.float64), ref.detach().to(torch.float64)
    if a64.shape != r64.shape:
        raise CorrectnessError(f"shape {tuple(a64.shape)} != reference {tuple(r64.shape)}")
    if not torch.isfinite(a64).all():
        return math.inf, math.inf
    e = (a64 - r64).abs().max().item() if a64.numel() else 0.0
    return e, e / max(floor, r64.abs().max().item() if r64.numel() else 0.0)


def _compare(got: dict, exact: dict, lowp: dict, floor: float, norm_floor: float) -> dict:
    """Every output and gradient of ``exact`` (fp64) against ``got``: the normalised error must be
    at most ``max(floor, ERR_MULT * e_ref)``, ``e_ref`` the error of the reference math run in the
    benchmark dtype (``lowp``). A provider may return fewer outputs than the reference (a
    baseline without a by-product), never fewer gradients."""
    info: dict[str, Any] = {"max_abs_err": {}, "norm_err": {}, "tol": {}, "ref_err": {}}
    bad = []
    for nm, r in exact.items():
        if nm not in got:
            if nm.startswith("d"):
                bad.append(f"{nm}: missing gradient")
            continue
        e_abs, e_norm = _norm_err(got[nm], r, norm_floor)
        e_ref = _norm_err(lowp[nm], r, norm_floor)[1] if nm in lowp else 0.0
        tol = max(floor, ERR_MULT * e_ref)
        info["max_abs_err"][nm], info["norm_err"][nm] = e_abs, e_norm
        info["ref_err"][nm], info["tol"][nm] = e_ref, tol
        if not e_norm <= tol:
            bad.append(f"{nm}: normalised error {e_norm:.3g} > tol {tol:.3g} (max abs {e_abs:.3g})")
    info["ok"], info["message"] = not bad, "; ".join(bad)
    return info


def _check_all(entry: Any, r: Run, provs: list[Provider], args: list, dout, with_grad: bool) -> dict:
    """Check every runnable provider before anything is timed.

    A wrong or raising vitkern provider is recorded in ``ctx.failures`` and not timed; a baseline
    that raises is skipped with the reason, one that differs is noted and still timed. A backend
    that refuses only the gradients by design (a ``BackendError``: an inference kernel, a map too
    wide for a backward) gets its forward checked and timed alone; the CUDA C++ backend covers
    part of each family by design, so where it refuses the forward it is skipped with the reason,
    as is a requested backend that is not available here.
    """
    from vitkern.backends import backend_status

    ctx, fam, status = r.ctx, r.family, backend_status()
    if fam.check_batch:  # an fp64 reference of the whole batch would not fit
        args = [t[:fam.check_batch] for t in args]
        dout = None if dout is None else dout[:fam.check_batch]
    floor = fam.tol.get(r.dtype, 1e-2) * entry.tol_scale
    expected: dict = {}

    def check(p: Provider, grad: bool) -> dict:
        make = p.reference or entry.reference
        if (make, grad) not in expected:
            refs = [make(r, dt) for dt in (torch.float64, r.dtype)]
            refs = [x if isinstance(x, Provider) else Provider("reference", "reference", x) for x in refs]
            hi = [t.detach().to(torch.float64) if t.is_floating_point() else t for t in args]
            exact = _outputs(refs[0], hi, None if dout is None else dout.double(), grad, entry.arg_names)
            try:
                lowp = _outputs(refs[1], args, dout, grad, entry.arg_names)
            except Exception:  # noqa: BLE001 - e.g. no low-precision CPU kernel for the reference
                lowp = {}
            expected[(make, grad)] = exact, lowp
        got = _outputs(p, args, dout, grad, entry.arg_names, None if p.check is True else p.check)
        return _compare(got, *expected[(make, grad)], floor, fam.norm_floor)

    checks: dict[str, dict] = {}
    for p in provs:
        if p.fn is None or p.check is False:
            continue
        explicit = p.backend not in (None, "auto")
        try:
            try:
                info = check(p, with_grad)
            except Exception as exc:  # noqa: BLE001
                if not (with_grad and explicit and is_refusal(exc)):
                    raise
                p.fwd_only = f"refused by design: {refusal_reason(exc, p.backend)}"
                info = check(p, False)
        except Exception as exc:  # noqa: BLE001
            if p.backend == "cuda" and is_refusal(exc):
                p.fn, p.skip = None, f"refused by design: {refusal_reason(exc, 'cuda')}"
            elif explicit and is_refusal(exc) and not status.get(p.backend, (True, ""))[0]:
                p.fn, p.skip = None, f"backend {p.backend} unavailable: {status[p.backend][1]}"
            elif p.kind != "vitkern":
                p.fn, p.skip = None, f"raised {type(exc).__name__}: {exc}"
            else:
                msg = f"{r.label} {p.name}: raised {type(exc).__name__}: {exc}"
                checks[p.name] = {"ok": False, "error": True, "message": msg,
                                  "traceback": traceback.format_exc(limit=4)}
                p.fn = None
                _fail(ctx, msg, exc)
            continue
        checks[p.name] = info
        if info["ok"]:
            continue
        if p.kind != "vitkern":
            ctx.log(f"note: {r.label} baseline {p.name} differs from the reference: {info['message']}")
            continue
        msg = f"{r.label} {p.name}: WRONG vs reference: {info['message']}"
        ctx.log("!!! " + msg)
        p.fn = None
        _fail(ctx, msg, CorrectnessError(msg))
    return checks


def _timed(p: Provider, sets: list, mode: str, device: torch.device) -> tuple[Callable, list]:
    """The zero-argument callable to time (rotating over the input copies) and its grad_to_none."""
    if mode == "fwd":
        def call(*args):
            with torch.no_grad():
                return p.fn(*args)
        return rotating(call, [tuple(a) for a, _ in sets]), []
    leaves = [[t.detach().clone().requires_grad_(t.is_floating_point()) for t in a] for a, _ in sets]
    grad_none = [t for ls in leaves for t in ls if t.requires_grad]
    grad_none += [t for t in p.module.parameters() if t.requires_grad] if p.module is not None else []
    on_cuda = device.type == "cuda"

    def call_bwd(*args):
        if not on_cuda:  # do_bench resets grad_to_none itself on CUDA
            for t in grad_none:
                t.grad = None
        *xs, dout = args
        out = p.fn(*xs)
        (out[0] if isinstance(out, tuple) else out).backward(dout)

    return rotating(call_bwd, [tuple(ls) + (d,) for ls, (_, d) in zip(leaves, sets)]), grad_none


def _peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def run_entry(family: Any, entry: Any, task: Task, ctx: Context) -> list[dict]:
    """Check and time every provider of one (case, dtype, group); one record per provider and
    mode, with ``speedup`` columns (see ``add_speedups``)."""
    r = Run(task, ctx, family, entry)
    if entry.prepare is not None:
        entry.prepare(r)
    modes = [m for m in ctx.modes if m in entry.modes]
    provs = _providers(entry, r)
    flops = (lambda mode: entry.flops(r, mode)) if entry.flops else (lambda mode: None)
    nbytes = (lambda mode: entry.bytes(r, mode)) if entry.bytes else (lambda mode: None)
    copies = n_rotations(int(nbytes("fwd") or 0), ctx.dev)
    sets = [entry.inputs(r, r.gen(i)) for i in range(copies)]
    checks = _check_all(entry, r, provs, *sets[0], with_grad="fwd+bwd" in modes)
    records = []
    for mode in modes:
        fns, g2n, recs = {}, {}, {}
        for p in provs:
            rec = recs[p.name] = {
                "family": task.family, "case": r.case.name, "group": task.group, "provider": p.name,
                "kind": p.kind, "backend": p.backend, "mode": mode, "dtype": dtype_name(r.dtype),
                "batch": r.B, **family.fields(r.case), **r.fields, **p.fields}
            chk = checks.get(p.name)
            if chk is not None:
                rec["check"] = chk
                rec["max_abs_err"] = max(chk.get("max_abs_err", {}).values(), default=None)
            if p.fn is None:
                failed = chk is not None and not chk.get("ok", True)
                rec.update(status=("error" if chk.get("error") else "wrong") if failed else "skipped",
                           reason=chk.get("message") if failed else p.skip)
            elif p.fwd_only and mode != "fwd":
                rec.update(status="skipped", reason=p.fwd_only)
            else:
                fns[p.name], g2n[p.name] = _timed(p, sets, mode, ctx.device)
        timings = bench_many(fns, ctx.device, quick=ctx.quick, grad_to_none=g2n) if fns else {}
        for name, t in timings.items():
            rec = recs[name]
            if isinstance(t, Exception):  # e.g. a baseline's N x N mask out of memory
                vk = rec["kind"] == "vitkern"
                rec.update(status="error" if vk else "skipped", reason=f"{type(t).__name__}: {str(t)[:300]}")
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                if vk:
                    _fail(ctx, f"{r.label} {name} [{mode}]: {rec['reason']}", t)
                continue
            rec.update(metrics(t.ms, flops(mode), nbytes(mode), ctx.dev, r.dtype))
            rec.update(status="ok", ms_p20=t.ms_p20, ms_p80=t.ms_p80, reps=t.reps, timer=t.timer,
                       flops=flops(mode), bytes=nbytes(mode), rotated_copies=copies,
                       peak_mem_mb=_peak_mb(fns[name], ctx.device))
            if entry.throughput:
                rec[entry.throughput] = r.B / (t.ms * 1e-3)
        records.extend(recs.values())
    add_speedups(records)
    return records


def add_speedups(records: list[dict]) -> None:
    """``speedup[baseline]`` = baseline ms / vitkern ms, same task and mode; ``speedup_vs_vitkern``
    the same against the other vitkern providers (e.g. cuda vs triton)."""
    for r in records:
        if r.get("kind") != "vitkern" or r.get("status") != "ok":
            continue
        sp, vs = {}, {}
        for b in records:
            if b.get("status") != "ok" or b["mode"] != r["mode"] or b is r:
                continue
            ratio = b["ms"] / r["ms"] if r["ms"] > 0 else None
            if b.get("kind") == "baseline":
                sp[b["provider"]] = ratio
            elif b.get("kind") == "vitkern":
                vs[b["provider"]] = ratio
        r["speedup"], r["speedup_vs_vitkern"] = sp, vs


# ---------------------------------------------------------------------------------------------
# Run metadata and result files
# ---------------------------------------------------------------------------------------------
def git_commit(repo_dir: Path | None = None) -> dict:
    repo_dir = repo_dir or Path(__file__).resolve().parent.parent
    info: dict[str, Any] = {"commit": None, "dirty": None}
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                           timeout=10)
        if r.returncode == 0:
            info["commit"] = r.stdout.strip()
            d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10)
            if d.returncode == 0:
                info["dirty"] = bool(d.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _version(mod_name: str) -> str | None:
    try:
        mod = __import__(mod_name)
        v = getattr(mod, "__version__", None)
        if v:
            return str(v)
    except Exception:
        pass
    try:
        from importlib.metadata import version
        return version(mod_name)
    except Exception:
        return None


def environment(dev: DeviceInfo) -> dict:
    env = {
        "date": _dt.date.today().isoformat(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.as_dict(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "vitkern": _version("vitkern"),
            "cuda": torch.version.cuda,
        },
        "git": git_commit(),
        "platform": platform.platform(terse=True),
        "env": {k: os.environ[k] for k in ("VITKERN_BACKEND", "VITKERN_PEAK_TFLOPS", "VITKERN_PEAK_GBPS",
                                           "TRITON_INTERPRET") if k in os.environ},
    }
    try:
        from vitkern.backends import backend_status  # may not exist yet
        env["backends"] = {k: {"available": bool(v[0]), "reason": str(v[1])}
                           for k, v in backend_status().items()}
    except Exception as exc:  # noqa: BLE001 - informational only
        env["backends"] = {"error": f"{type(exc).__name__}: {exc}"}
    return env


def results_path(out_dir: Path | str, dev_slug: str, date: str | None = None, *, suffix: str = "",
                 ext: str = "json") -> Path:
    date = date or _dt.date.today().isoformat()
    return Path(out_dir) / f"{dev_slug}-{date}{suffix}.{ext}"


def _jsonable(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    return o


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_results(path: Path | str, meta: dict, records: list[dict]) -> Path:
    """Write ``{"meta": ..., "results": [...]}`` as indented JSON (atomically)."""
    path = Path(path)
    doc = _jsonable({"schema": "vitkern.bench/1", "meta": meta, "results": records})
    _atomic_write(path, lambda p: p.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n"))
    return path


# ---------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def format_table(records: Iterable[dict]) -> str:
    """A fixed-width text table of the records (one row per timed provider)."""
    cols = [("family", 5, "s"), ("case", 18, "s"), ("group", 11, "s"), ("provider", 30, "s"),
            ("mode", 7, "s"), ("dtype", 5, "s"), ("ms", 9, ".4f"), ("tflops", 7, ".3f"),
            ("gbps", 8, ".1f"), ("pct_peak_gbps", 6, ".1f"), ("speedup", 18, "s"), ("status", 8, "s")]
    heads = {"tflops": "TFLOP/s", "gbps": "GB/s", "pct_peak_gbps": "%BW", "speedup": "speedup vs base"}
    lines = ["  ".join(heads.get(c, c).ljust(w) if f == "s" else heads.get(c, c).rjust(w)
                       for c, w, f in cols)]
    for r in records:
        cells = []
        for c, w, f in cols:
            if c == "speedup":
                sp = r.get("speedup") or {}
                v = ", ".join(f"{v:.2f}x" for v in sp.values() if v is not None)
                cells.append(v[:w].ljust(w))
            elif f == "s":
                cells.append(str(r.get(c) if r.get(c) is not None else "-")[:w].ljust(w))
            else:
                cells.append(_fmt(r.get(c), f).rjust(w))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def plot_speedups(records: list[dict], path: Path | str, *, title: str = "") -> Path | None:
    """PNG of speedups: one panel per (family, group), x = case, one bar per (vitkern provider,
    baseline, mode, dtype); bar height = baseline ms / vitkern ms (log scale, 1x line).

    Returns the path, or None when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    rows = [r for r in records if r.get("status") == "ok" and r.get("speedup")]
    panels: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        panels.setdefault((r["family"], r["group"]), []).append(r)
    path = Path(path)
    if not panels:
        return None

    n = len(panels)
    ncols = 2 if n > 1 else 1
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, ((family, group), rs) in zip(axes.flat, panels.items()):
        cases = list(dict.fromkeys(r["case"] for r in rs))
        series: dict[str, dict[str, float]] = {}
        for r in rs:
            for base, sp in r["speedup"].items():
                if sp is None:
                    continue
                label = f"{r['provider']} vs {base}"
                if len({x['mode'] for x in rs}) > 1 or len({x['dtype'] for x in rs}) > 1:
                    label += f" [{r['mode']}, {r['dtype']}]"
                series.setdefault(label, {})[r["case"]] = sp
        k = max(len(series), 1)
        width = 0.8 / k
        for i, (label, vals) in enumerate(series.items()):
            xs = [j + (i - (k - 1) / 2) * width for j, c in enumerate(cases) if c in vals]
            ys = [vals[c] for c in cases if c in vals]
            bars = ax.bar(xs, ys, width=width, label=label)
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=6, rotation=90)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        allv = [v for vals in series.values() for v in vals.values() if v and v > 0] or [1.0]
        lo, hi = min(min(allv), 1.0) / 1.6, max(max(allv), 1.0) * 1.8
        ax.set_ylim(lo, hi)
        ticks = [m * 10.0 ** e for e in range(-3, 4) for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
        ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=25, ha="right", fontsize=7)
        ax.set_ylabel("speedup (baseline ms / vitkern ms)", fontsize=7)
        ax.set_title(f"{family}: {group}", fontsize=9)
        ax.legend(fontsize=6, loc="best")
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path


def summarize_sys() -> str:
    return f"python {platform.python_version()} torch {torch.__version__} ({sys.platform})"
