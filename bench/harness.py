"""Benchmark harness: timers, device peaks, metrics, JSON results and speedup plots.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "PeakSpec", "PEAK_RULES", "DeviceInfo", "device_info", "lookup_peak", "slugify",
    "Timing", "bench_cpu", "bench_cuda", "bench", "bench_cpu_interleaved", "bench_many", "rotating",
    "n_rotations",
    "metrics", "environment", "git_commit", "results_path", "write_results", "plot_speedups",
    "format_table", "RESULTS_DIR", "dtype_name", "Context", "Task",
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
# What ``python -m vitkern.bench`` hands every family module
# ---------------------------------------------------------------------------------------------
@dataclass
class Context:
    """The run's settings, passed to a family's ``run_task``; ``failures`` collects the vitkern
    providers that failed their correctness check (or raised), ``log`` prints above the bar."""

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
    for _ in range(warmup):
        fn()
    times: list[float] = []
    total = 0.0
    while True:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        total += dt
        n = len(times)
        if n >= max_reps or (n >= min_reps and total >= min_time_s) or (n >= 3 and total >= max_time_s):
            break
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  len(times), "perf_counter median")


def bench_cuda(fn: Callable[[], Any], *, warmup_ms: int = 25, rep_ms: int = 100,
               grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    """``triton.testing.do_bench`` quantiles (20/50/80 %), median reported; L2 flushed every rep."""
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                            quantiles=[0.2, 0.5, 0.8])
    # do_bench picks the repetition count from the estimated runtime
    return Timing(float(p50), float(p20), float(p80), -1, "triton.testing.do_bench median")


def bench(fn: Callable[[], Any], device: torch.device | str, *, quick: bool = False,
          grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    device = torch.device(device)
    if device.type == "cuda":
        return bench_cuda(fn, warmup_ms=10 if quick else 25, rep_ms=30 if quick else 100,
                          grad_to_none=grad_to_none)
    if quick:
        return bench_cpu(fn, warmup=1, min_reps=3, max_reps=10, min_time_s=0.05, max_time_s=0.5)
    return bench_cpu(fn)


def bench_cpu_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 2, min_reps: int = 5,
                          max_reps: int = 50, min_time_s: float = 0.25,
                          max_time_s: float = 3.0) -> dict[str, Timing]:
    """Like ``bench_cpu`` for several callables at once, timed round-robin (one call of each per
    round) so that load changes on a shared CPU hit every provider alike; median per callable."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
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
    return {n: Timing(statistics.median(ts), _quantile(ts, 0.2), _quantile(ts, 0.8), len(ts),
                      "perf_counter median (interleaved)") for n, ts in times.items()}


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
        kw = (dict(warmup=1, min_reps=3, max_reps=10, min_time_s=0.05, max_time_s=0.5) if quick
              else dict(warmup=1))
        out.update(bench_cpu_interleaved(ok, **kw))
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
