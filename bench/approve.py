"""Approve CUDA C++ kernels for ``backend="auto"`` from a GPU-tier run (writes vitkern/cuda_auto.json).

    python -m vitkern.bench.approve --junit OUT/junit-hilo.xml [--junit ...] OUT/<device>-<date>.json [--write]

A (kernel, compute capability, dtype) is approved when, on that GPU:

1. the GPU test tier passed: the pytest JUnit report has no failure or error, and the kernel's own
   GPU tests (``TESTS``) ran and passed, none skipped;
2. every ``vitkern[cuda]`` record of the kernel (``RECORD_KERNEL``: family, group, mode) in that
   dtype passed its correctness check and was timed, next to a timed ``vitkern[triton]`` record
   of the same task and mode;
3. it is faster than triton: the geometric mean of ``speedup_vs_vitkern["vitkern[triton]"]`` is at
   least ``MIN_GEOMEAN`` and no case is below ``MIN_CASE``.

Everything else stays with triton under ``auto``. Without ``--write`` the verdicts are printed
only. Results files of CPU runs are ignored; results are kept per compute capability.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from vitkern import cuda_auto

MIN_GEOMEAN = 1.05
MIN_CASE = 0.9
#: (family, group, mode) of a bench record -> the vitkern._C kernel it times. The fwd+bwd Hi-Fi
#: record runs both Hi-Fi kernels; approving the backward needs the forward approved too.
RECORD_KERNEL = {("hilo", "hifi", "fwd"): "hifi_fwd", ("hilo", "hifi", "fwd+bwd"): "hifi_bwd",
                 ("hilo", "lofi", "fwd"): "lofi_fwd", ("hilo", "lofi_pooled", "fwd"): "lofi_fwd",
                 ("window", "attn", "fwd"): "window_fwd"}
#: kernel -> name prefix of its GPU-tier tests (tests/test_csrc_hilo.py, tests/test_csrc_window.py)
TESTS = {"hifi_fwd": "test_cuda_hifi", "hifi_bwd": "test_cuda_hifi", "lofi_fwd": "test_cuda_lofi",
         "window_fwd": "test_cuda_window"}
RULE = (f"a (kernel, compute capability, dtype) is listed only when the GPU test tier passed on "
        f"that GPU and the kernel's geometric-mean speedup over vitkern[triton] in the committed "
        f"results file is at least {MIN_GEOMEAN} with no case below {MIN_CASE}; written by python "
        f"-m vitkern.bench.approve")


def tier_verdicts(junit) -> dict[str, str]:
    """kernel -> '' when its GPU tests passed (and the whole tier did), else the reason.
    ``junit``: one pytest JUnit report or a list of them (the tier writes one per family)."""
    reports = [junit] if isinstance(junit, (str, Path)) else list(junit)
    cases = [tc for r in reports for tc in ET.parse(r).getroot().iter("testcase")]
    status: dict[str, list[str]] = defaultdict(list)
    broken = []
    for tc in cases:
        outcome = ("failed" if tc.find("failure") is not None or tc.find("error") is not None
                   else "skipped" if tc.find("skipped") is not None else "passed")
        name = tc.get("name", "")
        if outcome == "failed":
            broken.append(name)
        for kernel, prefix in TESTS.items():
            if name.startswith(prefix):
                status[kernel].append(outcome)
    out = {}
    for kernel in TESTS:
        got = status.get(kernel, [])
        if broken:
            out[kernel] = f"the GPU tier had failures ({', '.join(broken[:3])}...)"
        elif not got:
            out[kernel] = f"no {TESTS[kernel]}* test in the report"
        elif any(o != "passed" for o in got):
            out[kernel] = f"{got.count('skipped')} of its {len(got)} GPU tests were skipped"
        else:
            out[kernel] = ""
    return out


def speed_verdicts(results: list[dict]) -> dict[tuple[str, str, str], dict]:
    """(kernel, capability, dtype) -> {'speedups': [...], 'problems': [...], 'device', 'results'}."""
    out: dict[tuple[str, str, str], dict] = {}
    for res in results:
        dev = res["meta"]["device"]
        if dev.get("kind") != "cuda":
            continue
        cap = str(dev["capability"])
        for r in res["results"]:
            kernel = RECORD_KERNEL.get((r.get("family"), r.get("group"), r.get("mode")))
            if kernel is None or r.get("provider") != "vitkern[cuda]":
                continue
            v = out.setdefault((kernel, cap, r["dtype"]), {
                "speedups": [], "problems": [], "device": dev.get("name"), "results": res["path"]})
            where = f"{r['case']} {r['mode']}"
            if r.get("status") == "skipped" and str(r.get("reason", "")).startswith("refused by design"):
                continue  # a case the kernel does not take: auto never sends it there
            if r.get("status") != "ok":
                v["problems"].append(f"{where}: {r.get('status')} ({r.get('reason', '')[:80]})")
                continue
            sp = (r.get("speedup_vs_vitkern") or {}).get("vitkern[triton]")
            if sp is None:
                v["problems"].append(f"{where}: no vitkern[triton] timing beside it")
            else:
                v["speedups"].append(sp)
    return out


def approve(junit, result_files: list[Path]) -> tuple[list[dict], list[str]]:
    """The approved entries and one line per (kernel, capability, dtype) verdict."""
    tier = tier_verdicts(junit)
    results = []
    for f in result_files:
        data = json.loads(Path(f).read_text())
        data["path"] = f"bench/results/{Path(f).name}"
        results.append(data)
    speeds = speed_verdicts(results)
    approved, lines = [], []
    # in KERNELS order: a backward is judged after its forward
    for (kernel, cap, dtype), v in sorted(speeds.items(), key=lambda kv: (
            cuda_auto.KERNELS.index(kv[0][0]), kv[0][1], kv[0][2])):
        sp = v["speedups"]
        gmean = math.exp(sum(map(math.log, sp)) / len(sp)) if sp else None
        why = tier[kernel] or "; ".join(v["problems"][:3])
        if not why and gmean is None:
            why = "no timed case"
        if not why and gmean < MIN_GEOMEAN:
            why = f"geomean speedup over triton {gmean:.3f} < {MIN_GEOMEAN}"
        if not why and min(sp) < MIN_CASE:
            why = f"slowest case {min(sp):.3f}x triton < {MIN_CASE}"
        if kernel == "hifi_bwd" and not why and ("hifi_fwd", cap, _torch_dtype(dtype)) not in {
                (e["kernel"], e["capability"], e["dtype"]) for e in approved}:
            why = "hifi_fwd is not approved (the backward runs after it)"
        label = f"{kernel} sm_{cap.replace('.', '')} {dtype}"
        if why:
            lines.append(f"{label}: stays with triton: {why}")
            continue
        approved.append({"kernel": kernel, "capability": cap, "dtype": _torch_dtype(dtype),
                         "speedup_vs_triton": round(gmean, 4), "min_speedup": round(min(sp), 4),
                         "cases": len(sp), "device": v["device"], "results": v["results"],
                         "tests": "GPU tier passed (bench/gpu_tier.sh)"})
        lines.append(f"{label}: approved ({gmean:.2f}x triton over {len(sp)} cases, "
                     f"slowest {min(sp):.2f}x)")
    return approved, lines


def _torch_dtype(name: str) -> str:
    return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(name, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitkern.bench.approve", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="bench results JSON files of the GPU run")
    p.add_argument("--junit", type=Path, action="append", required=True,
                   help="a pytest --junitxml report of the GPU run (repeat: one per family)")
    p.add_argument("--write", action="store_true", help="write vitkern/cuda_auto.json")
    args = p.parse_args(argv)
    approved, lines = approve(args.junit, args.results)
    print("\n".join(lines) or "no vitkern[cuda] records in these results")
    if args.write:
        doc = {"schema": cuda_auto.SCHEMA, "rule": RULE, "approved": approved}
        cuda_auto.PATH.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote vitkern/{cuda_auto.PATH.name}: {len(approved)} approved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
