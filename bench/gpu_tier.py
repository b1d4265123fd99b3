"""The GPU tier: prove every kernel on one GPU in a short, cut-off-safe window.

    bash bench/gpu_tier.sh OUT_DIR [--budget SECONDS] [--rehearse] [--stages a,b,...]

Runs stages, most valuable first, each in its own processes under its own timeout, each writing
its results into OUT_DIR as soon as it ends (a run cut off by the machine's limit still returns
everything done so far), and skips the stages whose estimate no longer fits the budget, saying
so. ``--rehearse`` runs the same stages on a machine without a GPU (interpreter, a few tests per
family, a CPU smoke benchmark; the CUDA-only stages report "no device"), which CI does on every
submission so the tier never rots.

Stages (estimates for one H100 / for the rehearsal, seconds):

1. ``build``: install without network, ``vitkern._C`` for sm_90 only, ``python -m vitkern info``;
2. ``correctness``: one pytest process per family, side by side (a fault in one cannot hide the
   others' results; Triton compiles one kernel per core), on CUDA in bf16 (what the CPU cannot
   test), JUnit per family; tiles probed first-fit (``VITKERN_AUTOTUNE=0``: one compile per
   specialisation);
3. ``sanitizer``: ``compute-sanitizer`` memcheck (and racecheck for the CUDA C++ kernels) on one
   small case per kernel;
4. ``bench``: ``python -m vitkern.bench --quick`` per family, bf16, forward and forward+backward,
   JSON written after each family;
5. ``approve``: ``python -m vitkern.bench.approve --write`` on what ran (which CUDA C++ kernels
   ``auto`` may pick; ``vitkern/cuda_auto.json``, copied to OUT_DIR; the rehearsal only prints);
6. ``suite``: with whatever budget is left, the rest of the test suite and every family in every
   dtype on CUDA (compiles of stage 2 are cached).

It ends with one summary line per stage (``passed`` / ``failed`` / ``timeout`` / ``skipped``,
seconds), also written to ``OUT_DIR/summary.txt`` and ``summary.json`` after every stage. This
file imports nothing of vitkern: it runs before vitkern is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: family -> the test files of its correctness process (its kernels' CUDA C++ tests included, so
#: that approve sees them)
FAMILIES = {
    "hilo": ["tests/test_hilo.py", "tests/test_csrc_hilo.py"],
    "window": ["tests/test_window.py", "tests/test_csrc_window.py"],
    "token": ["tests/test_token.py"],
    "linear": ["tests/test_linear.py"],
    "ppma": ["tests/test_ppma.py"],
    "tuning": ["tests/test_tuning.py"],
}
#: the rest of the suite (stage 6); the ahead-of-time compiles are not GPU work
REST = ["tests/test_window_nn.py", "tests/test_token_nn.py", "tests/test_training.py",
        "tests/test_integrations.py", "tests/test_papers.py", "tests/test_transformers.py",
        "tests/test_bench.py", "tests/test_csrc_build.py", "tests/test_sync.py"]
#: the sanitizer's cases: (label, test file, -k expression); the first matching test runs (one
#: small case per kernel family: forward and backward of each Triton family, each CUDA kernel)
SANITIZE = [
    ("hilo", "tests/test_hilo.py", "test_triton_hilo and s3 and float16"),
    ("window", "tests/test_window.py", "test_triton_window and float16"),
    ("token", "tests/test_token.py", "test_triton_token_attention and float16"),
    ("linear", "tests/test_linear.py", "test_triton_linear_attention and float16"),
    ("ppma", "tests/test_ppma.py", "test_triton_ppma_attention and float16"),
    ("cuda-hifi", "tests/test_csrc_hilo.py", "test_cuda_hifi_matches_reference"),
    ("cuda-lofi", "tests/test_csrc_hilo.py", "test_cuda_lofi_matches_reference"),
    ("cuda-window", "tests/test_csrc_window.py", "test_cuda_window"),
]
#: tests per family in the rehearsal (the interpreter is slow; the point is that every stage
#: starts, honours its timeout and budget, and writes its files)
REHEARSAL_TESTS = 3


@dataclass
class Stage:
    name: str
    estimate: dict            # {"gpu": s, "rehearse": s}
    timeout: dict             # {"gpu": s, "rehearse": s}
    needs_gpu: bool = False   # the rehearsal reports "no device" instead of running it
    result: dict = field(default_factory=dict)


STAGES = [
    Stage("build", {"gpu": 75, "rehearse": 25}, {"gpu": 240, "rehearse": 120}),
    Stage("correctness", {"gpu": 200, "rehearse": 80}, {"gpu": 300, "rehearse": 150}),
    Stage("sanitizer", {"gpu": 60, "rehearse": 0}, {"gpu": 120, "rehearse": 10}, needs_gpu=True),
    Stage("bench", {"gpu": 90, "rehearse": 30}, {"gpu": 180, "rehearse": 90}),
    Stage("approve", {"gpu": 5, "rehearse": 5}, {"gpu": 60, "rehearse": 60}),
    Stage("suite", {"gpu": 60, "rehearse": 0}, {"gpu": 600, "rehearse": 10}, needs_gpu=True),
]


class Tier:
    def __init__(self, out: Path, budget: float, rehearse: bool, stages: list[str] | None,
                 python: str = sys.executable):
        self.out, self.budget, self.rehearse, self.python = out, budget, rehearse, python
        self.mode = "rehearse" if rehearse else "gpu"
        self.selected = stages
        self.t0 = time.monotonic()
        self.stages = [s for s in STAGES if stages is None or s.name in stages]
        out.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, VITKERN_AUTOTUNE="0", PYTHONUNBUFFERED="1")
        if rehearse:
            self.env["VITKERN_TEST_LIMIT"] = str(REHEARSAL_TESTS)

    # ---------------------------------------------------------------------------- helpers
    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def run_many(self, jobs: dict, timeout: float) -> dict:
        """Run ``{name: (cmd, env)}`` side by side (one log each: OUT/<name>.log), all within
        ``timeout`` and the budget; returns ``{name: passed / failed (exit N) / timeout}``."""
        limit = max(1.0, min(timeout, self.left()))
        end, procs, results = time.monotonic() + limit, {}, {}
        for name, (cmd, env) in jobs.items():
            log = open(self.out / f"{name}.log", "w")
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=log,
                                            stderr=subprocess.STDOUT), log)
        for name, (proc, log) in procs.items():
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
                results[name] = ("passed" if proc.returncode == 0
                                 else f"failed (exit {proc.returncode})")
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                log.write(f"\n[gpu_tier] timeout after {limit:.0f} s\n")
                results[name] = "timeout"
            log.close()
        return results

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> str:
        """One command (log: OUT/<name>.log) within ``timeout`` and the budget."""
        return self.run_many({name: (cmd, env)}, timeout)[name]

    def pytest_job(self, name: str, files: list[str], timeout: float, env=None) -> tuple:
        """(cmd, env) of one pytest process with a JUnit report; tests not started 15 s before
        its limit are skipped (tests/conftest.py), so the session still ends and writes it."""
        limit = min(timeout, self.left())
        env = dict(env or self.env, VITKERN_TEST_DEADLINE=str(time.time() + max(1.0, limit - 15)))
        return [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                f"--junitxml={self.out / f'junit-{name}.xml'}", *files], env

    def pytest(self, name: str, files: list[str], timeout: float) -> str:
        cmd, env = self.pytest_job(name, files, timeout)
        return self.run(name, cmd, timeout, env)

    def gpu_available(self) -> bool:
        code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
        return subprocess.run([self.python, "-c", code], cwd=ROOT, env=self.env,
                              capture_output=True).returncode == 0

    def write_summary(self) -> None:
        lines = [f"{s.name:<12} {s.result.get('status', 'not run'):<28} "
                 f"{s.result.get('seconds', 0):6.0f} s  {s.result.get('detail', '')}".rstrip()
                 for s in self.stages]
        (self.out / "summary.txt").write_text("\n".join(lines) + "\n")
        (self.out / "summary.json").write_text(json.dumps(
            {"mode": self.mode, "budget_s": self.budget,
             "stages": {s.name: s.result for s in self.stages}}, indent=2) + "\n")

    # ---------------------------------------------------------------------------- stages
    def stage_build(self, timeout: float) -> tuple[str, str]:
        env = dict(self.env, VITKERN_CUDA="1", VITKERN_CUDA_ARCHS="90")
        # the rehearsal resolves the install (--dry-run) but keeps the one it runs in
        dry = ["--dry-run"] if self.rehearse else []
        status = self.run("build", [self.python, "-m", "pip", "install", "--no-build-isolation",
                                    "--no-deps", *dry, "-e", "."], timeout * 0.9, env)
        if status == "passed":
            status = self.run("info", [self.python, "-m", "vitkern", "info"], 60)
        return status, ""

    def stage_correctness(self, timeout: float) -> tuple[str, str]:
        # every family in its own process, side by side: Triton compiles one kernel per core,
        # and a fault in one family cannot hide the others' results. On the GPU bf16 only (what
        # the CPU cannot test; every dtype is another compile of each specialisation): the
        # suite stage runs every dtype with what budget is left.
        env = dict(self.env) if self.rehearse else dict(self.env, VITKERN_TEST_DTYPES="bfloat16")
        results = self.run_many({fam: self.pytest_job(fam, files, timeout, env)
                                 for fam, files in FAMILIES.items()}, timeout)
        bad = {f: r for f, r in results.items() if r != "passed"}
        detail = ", ".join(f"{f}: {r}" for f, r in results.items())
        return ("passed" if not bad else f"failed ({len(bad)} of {len(results)} families)"), detail

    def stage_sanitizer(self, timeout: float) -> tuple[str, str]:
        tool = shutil.which("compute-sanitizer")
        if tool is None:
            return "skipped (no compute-sanitizer)", ""
        runs = [("memcheck", *case) for case in SANITIZE]
        runs += [("racecheck", *case) for case in SANITIZE if case[0].startswith("cuda")]
        env = dict(self.env, VITKERN_TEST_LIMIT="1")  # one small case each
        end, results = time.monotonic() + timeout, {}
        for i, (tool_name, label, path, select) in enumerate(runs):
            results[f"{tool_name}-{label}"] = self.run(
                f"sanitizer-{tool_name}-{label}",
                [tool, "--tool", tool_name, "--error-exitcode", "1", self.python, "-m", "pytest",
                 "-q", "-p", "no:cacheprovider", path, "-k", select],
                (end - time.monotonic()) / (len(runs) - i), env)
        bad = [k for k, r in results.items() if r != "passed"]
        return ("passed" if not bad else f"failed ({', '.join(bad)})"), ""

    def stage_bench(self, timeout: float) -> tuple[str, str]:
        if self.rehearse:  # a CPU smoke run of one family: the stage starts and writes its JSON
            families, extra = ["hilo"], ["--device", "cpu", "--dtype", "fp32", "--cases",
                                         "litv2s", "--groups", "hifi", "--no-backward"]
        else:
            families, extra = ["hilo", "window", "token", "linear", "ppma"], [
                "--dtype", "bf16", "--backward", "--no-flex"]
        end, results = time.monotonic() + timeout, {}
        for i, fam in enumerate(families):
            results[fam] = self.run(f"bench-{fam}", [
                self.python, "-m", "vitkern.bench", "--quick", "--families", fam, "--out",
                str(self.out / "bench" / fam), "--no-progress", "--no-plot", *extra],
                (end - time.monotonic()) / (len(families) - i))
        bad = [f for f, r in results.items() if r != "passed"]
        return ("passed" if not bad else f"failed ({', '.join(bad)})"), ""

    def stage_approve(self, timeout: float) -> tuple[str, str]:
        results = sorted((self.out / "bench").glob("*/*.json"))
        junits = sorted(self.out.glob("junit-*.xml"))
        if not results or not junits:
            return "skipped (no bench results or JUnit reports)", ""
        cmd = [self.python, "-m", "vitkern.bench.approve"]
        for j in junits:
            cmd += ["--junit", str(j)]
        if not self.rehearse:  # the verdicts go into vitkern/cuda_auto.json, and a copy to OUT
            cmd.append("--write")
        status = self.run("approve", cmd + [str(r) for r in results], timeout)
        if status == "passed" and not self.rehearse:
            shutil.copy(ROOT / "vitkern" / "cuda_auto.json", self.out / "cuda_auto.json")
        return status, ""

    def stage_suite(self, timeout: float) -> tuple[str, str]:
        files = REST + [f for files in FAMILIES.values() for f in files]  # every dtype now
        return self.pytest("suite", files, timeout), ""

    # ---------------------------------------------------------------------------- driver
    def main(self) -> int:
        has_gpu = self.gpu_available() if not self.rehearse else False
        if not self.rehearse and not has_gpu:
            print("gpu_tier: no CUDA device (use --rehearse on a machine without a GPU)")
        failed = False
        for stage in self.stages:
            est, timeout = stage.estimate[self.mode], stage.timeout[self.mode]
            t = time.monotonic()
            if stage.needs_gpu and self.rehearse:
                status, detail = "skipped (no device)", ""
            elif stage.name != "suite" and est > self.left():
                status, detail = (f"skipped (budget: needs ~{est} s, "
                                  f"{max(0, self.left()):.0f} s left)"), ""
            elif self.left() < 5:
                status, detail = "skipped (budget spent)", ""
            else:
                status, detail = getattr(self, f"stage_{stage.name}")(timeout)
            stage.result = {"status": status, "seconds": round(time.monotonic() - t, 1),
                            "detail": detail}
            failed |= not status.startswith(("passed", "skipped"))
            self.write_summary()
            print(f"gpu_tier {stage.name}: {status} ({stage.result['seconds']:.0f} s)",
                  flush=True)
        print("\n" + (self.out / "summary.txt").read_text(), end="")
        return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bash bench/gpu_tier.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="bench/results/gpu-tier", type=Path,
                   help="output folder (default: bench/results/gpu-tier)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for the whole tier (default 480): stages whose estimate no "
                        "longer fits are skipped, each stage's timeout is cut to what is left")
    p.add_argument("--rehearse", action="store_true",
                   help="rehearse on a machine without a GPU (interpreter, few tests)")
    p.add_argument("--stages", default=None,
                   help=f"comma list of stages to run (default: all of {[s.name for s in STAGES]})")
    args = p.parse_args(argv)
    stages = args.stages.split(",") if args.stages else None
    unknown = set(stages or ()) - {s.name for s in STAGES}
    if unknown:
        p.error(f"unknown stages: {sorted(unknown)}")
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    return Tier(out, args.budget, args.rehearse, stages).main()


if __name__ == "__main__":
    sys.exit(main())
