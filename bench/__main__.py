"""``python -m vitkern.bench``: run every available op family's benchmarks on one device.

Prints a table, writes ``<out>/<device-slug>-<YYYY-MM-DD>.json`` and a speedup plot
``<out>/<device-slug>-<YYYY-MM-DD>-<family>.png`` per family (``-quick`` is appended to both names for
``--quick`` runs, so a short smoke run never overwrites a full result). Exit status 1 when a vitkern
provider failed its correctness check or raised.

Examples::

    python -m vitkern.bench                      # everything, auto device, default dtypes
    python -m vitkern.bench --quick --out out/   # short CPU smoke run
    python -m vitkern.bench --device cuda --dtype bf16,fp16 --cases litv2s --groups hilo,layer
    python -m vitkern.bench --work               # counted kernel work + predicted H100 times
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import harness, registry
from .registry import FAMILIES  # op family -> the module of its registry entries

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vitkern.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--out", default=str(harness.RESULTS_DIR), help="output folder (default: bench/results)")
    p.add_argument("--quick", action="store_true", help="few cases, small batch, short timing (smoke run)")
    p.add_argument("--families", default=None, help=f"comma list of op families (default: all of {list(FAMILIES)})")
    p.add_argument("--cases", default=None, help="comma list of case names / substrings / tags")
    p.add_argument("--groups", default=None,
                   help="comma list of comparison groups (hilo: hilo,hifi,lofi,lofi_pooled,layer; "
                        "linear: xca,linear,soft; ppma: full,criss_cross; "
                        "window: attn,block_attn,sparse30,sparse50,sparse70; token: kept,cls,model)")
    p.add_argument("--dtype", default=None, help="comma list of fp32,fp16,bf16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--backward", dest="backward", action="store_true", default=None,
                   help="also time forward+backward (default on CUDA)")
    p.add_argument("--no-backward", dest="backward", action="store_false", help="forward only")
    p.add_argument("--backends", default=None, help="vitkern backends to time (default: auto on CPU, "
                   "every available compiled backend on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="override every case's batch size")
    p.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baseline (saves its compile time)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(LITv2HiLo) as a layer baseline")
    p.add_argument("--strict", action="store_true", help="stop at the first vitkern failure (raise)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for a CPU run (default 1: on a shared machine a second "
                        "busy core makes multi-threaded timings 10x noisier; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", action="store_true",
                   help="count each Triton kernel's HBM bytes, dot FLOPs, exps and launches under "
                        "the interpreter at the headline shapes, predict H100 times (bench/work.py); "
                        "writes <out>/work-h100-model.{json,md,png}")
    p.add_argument("--work-ops", default=None, help="with --work: comma list of ops / families")
    p.add_argument("--no-host", action="store_true", help="with --work: skip the host-overhead timing")
    return p.parse_args(argv)


def _work(args, argv) -> int:
    """``--work``: runs in a child process with ``TRITON_INTERPRET=1`` when this one was started
    without it (the interpreter must be chosen before triton is imported)."""
    import os
    import subprocess

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        env = dict(os.environ, TRITON_INTERPRET="1")
        argv_list = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "vitkern.bench", *argv_list], env=env).returncode
    from . import work

    t0 = time.perf_counter()
    records, meta = work.run(Path(args.out), host=not args.no_host, ops_filter=args.work_ops)
    work.print_table(records)
    base = Path(args.out) / "work-h100-model"
    for ext in (".json", ".md", ".png"):
        print(f"wrote {base.with_suffix(ext)}")
    print(f"elapsed {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv=None) -> int:
    args = _parse(argv)
    if args.work:
        return _work(args, argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    dev = harness.device_info(device)

    dtype_names = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")).split(",")
    try:
        dtypes = [DTYPES[d.strip()] for d in dtype_names if d.strip()]
    except KeyError as exc:
        print(f"error: unknown dtype {exc}; choose from {list(DTYPES)}", file=sys.stderr)
        return 2
    backward = args.backward if args.backward is not None else device.type == "cuda"
    modes = ("fwd", "fwd+bwd") if backward else ("fwd",)
    backends = tuple(b.strip() for b in args.backends.split(",")) if args.backends else None
    families = [f.strip() for f in args.families.split(",")] if args.families else list(FAMILIES)

    out_dir = Path(args.out)
    suffix = "-quick" if args.quick else ""
    meta = harness.environment(dev)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    # no absolute paths of this machine in result files: absolute paths are recorded as <path>
    shown = [("<path>" if Path(a).is_absolute() else
              (a.split("=", 1)[0] + "=<path>" if "=" in a and Path(a.split("=", 1)[1]).is_absolute() else a))
             for a in argv_list]
    meta.update(command=" ".join(["python -m vitkern.bench"] + shown),
                quick=args.quick, modes=list(modes), dtypes=[harness.dtype_name(d) for d in dtypes],
                families=families)
    print(f"vitkern.bench on {dev.name} ({dev.kind}); {harness.summarize_sys()}; modes {list(modes)}; "
          f"dtypes {meta['dtypes']}", flush=True)
    if dev.kind == "cuda" and dev.peak is None and dev.peak_override_tflops is None:
        print(f"note: no peak table entry for {dev.name!r}; set VITKERN_PEAK_TFLOPS / VITKERN_PEAK_GBPS "
              "for % of peak", flush=True)

    all_records: list[dict] = []
    failures: list[str] = []
    t_start = time.perf_counter()
    for fam in families:
        if fam not in FAMILIES:
            print(f"error: unknown family {fam!r}; known: {list(FAMILIES)}", file=sys.stderr)
            return 2
        try:
            spec = registry.get(fam)
        except Exception as exc:  # noqa: BLE001 - e.g. an op module that does not import
            print(f"[{fam}] skipped: {FAMILIES[fam]} not importable: {type(exc).__name__}: {exc}")
            continue
        cases = spec.cases_for(args.cases, args.quick)
        groups = tuple(g.strip() for g in args.groups.split(",")) if args.groups else spec.groups
        unknown = [g for g in groups if g not in spec.groups]
        if unknown:
            print(f"error: unknown group(s) {unknown} for {fam}; known: {list(spec.groups)}", file=sys.stderr)
            return 2
        tasks = spec.plan(cases, dtypes, groups)
        ctx = harness.Context(device=device, dev=dev, modes=modes, quick=args.quick, strict=args.strict,
                          backends=backends, batch=args.batch, seed=args.seed, flex=not args.no_flex,
                          compile_baselines=args.compile)
        bar = None
        if not args.no_progress:
            try:
                from tqdm import tqdm
                bar = tqdm(total=len(tasks), desc=fam, unit="task", dynamic_ncols=True, file=sys.stderr)
                ctx.log = bar.write
            except ImportError:
                bar = None
        for task in tasks:
            if bar is not None:
                bar.set_postfix_str(task.label, refresh=False)
            all_records.extend(spec.run_task(task, ctx))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        failures.extend(ctx.failures)

    meta["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    meta["failures"] = failures
    json_path = harness.write_results(harness.results_path(out_dir, dev.slug, meta["date"], suffix=suffix),
                                      meta, all_records)
    pngs = []
    if not args.no_plot:
        for fam in families:
            recs = [r for r in all_records if r.get("family") == fam]
            png = harness.plot_speedups(
                recs, harness.results_path(out_dir, dev.slug, meta["date"], suffix=f"{suffix}-{fam}", ext="png"),
                title=f"vitkern {fam} on {dev.name} ({', '.join(meta['dtypes'])}; higher is better)")
            if png is not None:
                pngs.append(png)

    timed = [r for r in all_records if r.get("status") != "skipped"]
    print(harness.format_table(timed))
    skipped = {}
    for r in all_records:
        if r.get("status") == "skipped":
            skipped.setdefault((r["provider"], r.get("reason")), 0)
            skipped[(r["provider"], r.get("reason"))] += 1
    for (prov, reason), n in skipped.items():
        print(f"skipped {prov} ({n}x): {reason}")
    print(f"wrote {json_path}")
    for png in pngs:
        print(f"wrote {png}")
    print(f"elapsed {meta['elapsed_s']:.1f} s")
    if failures:
        print("\n" + "!" * 80, file=sys.stderr)
        print(f"{len(failures)} vitkern provider failure(s):", file=sys.stderr)
        for f in failures:
            print("  - " + f, file=sys.stderr)
        print("!" * 80, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
