"""The benchmark registry: one :class:`Family` per op family, one :class:`Entry` per op.

An entry says what ``python -m vitkern.bench`` needs to benchmark one op (a comparison group)
at a shape of ``bench/shapes.py``: how to build its inputs, the vitkern call (per backend), the
baselines' calls, the reference it is checked against, and its FLOP and byte models. The loop
(providers, correctness check, timing, speedup columns, records) is ``harness.run_entry``.

Adding an op: in ``bench/bench_<family>.py`` (a new family file also
declares ``FAM = registry.Family("myfam", cases_from_shapes, fields=lambda case: {...})``)::

    FAM.register("myop",
                 inputs=lambda r, g: ([r.randn(shape, g) for _ in range(3)], r.randn(shape, g)),
                 vitkern=lambda r, b: lambda q, k, v: ops.my_op(q, k, v, backend=b),
                 baselines={"sdpa": lambda r: F.scaled_dot_product_attention},
                 reference=lambda r, dtype: ref.my_op,
                 flops=lambda r, mode: ..., bytes=lambda r, mode: ...)

Callables receive a :class:`harness.Run` ``r`` (``r.case``, ``r.B``, ``r.dtype``, ``r.device``,
``r.ctx``, ``r.elem``, ``r.randn``, and whatever ``prepare`` set on it). A baseline factory
returns the callable, a ``harness.Provider`` (a module, ``check=False`` for another op), a list
of providers, None (not part of this run), or raises ``harness.Skip(reason)``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import harness
from .harness import Run, Task

#: op family -> the module that registers its entries: every ``bench/bench_<family>.py`` (found
#: by name, nothing imported; a new family's file needs no edit here)
FAMILIES = {p.stem.removeprefix("bench_"): f"vitkern.bench.{p.stem}"
            for p in sorted(Path(__file__).parent.glob("bench_*.py"))}
_REGISTERED: dict[str, "Family"] = {}


@dataclass
class Entry:
    """One op of a family: a comparison group of ``python -m vitkern.bench``."""

    group: str
    inputs: Callable[[Run, torch.Generator], tuple[list, Any]]   # -> (args, dO)
    vitkern: Callable[[Run, str], Any]                 # backend -> fn(*args) or Provider
    reference: Callable[[Run, torch.dtype], Any]       # fp64 / benchmark dtype -> fn or Provider
    baselines: dict[str, Callable[[Run], Any]] = field(default_factory=dict)
    flops: Callable[[Run, str], float] | None = None   # useful FLOPs of a mode ("fwd", "fwd+bwd")
    bytes: Callable[[Run, str], float] | None = None   # bytes of the model of a mode
    name: str = "vitkern[{b}]"      # provider name; {b} backend, {label} auto resolved, {case}
    per_backend: bool = True        # False: one vitkern provider (auto), e.g. a module
    applies: Callable[[Any], bool] = lambda case: True
    cases: Sequence | None = None   # its own cases instead of the selected ones
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    prepare: Callable[[Run], None] | None = None
    arg_names: tuple[str, ...] = ()  # names of the inputs' gradients in the check ("dq", ...)
    tol_scale: float = 1.0           # x the family's error floors
    throughput: str | None = None    # record field of B / seconds (e.g. "images_per_s")


@dataclass
class Family:
    """An op family: its cases, record fields, correctness floors and entries."""

    name: str
    cases: Callable[..., list]                 # cases(select, quick=...) from bench/shapes.py
    fields: Callable[[Any], dict]              # record fields describing a case (shape, ...)
    tol: dict[torch.dtype, float] = field(default_factory=lambda: dict(harness.ERR_FLOOR))  # error floors
    norm_floor: float = 1.0                    # errors / max(norm_floor, max|ref|)
    backends: tuple[str, ...] = ("triton",)    # compiled backends timed on CUDA by default
    eager: bool = False                        # auto runs a vitkern.eager path for CPU tensors
    quick_cpu_batch: int | None = None         # batch cap of --quick CPU runs
    check_batch: int | None = None             # check on the first check_batch images only
    entries: dict[str, Entry] = field(default_factory=dict)

    def __post_init__(self):
        _REGISTERED[self.name] = self

    def register(self, group: str, **kw) -> Entry:
        self.entries[group] = entry = Entry(group, **kw)
        return entry

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def cases_for(self, select: str | None, quick: bool) -> list:
        return self.cases(select, quick=quick)

    def plan(self, cases: list, dtypes: list[torch.dtype], groups: Sequence[str] | None = None) -> list[Task]:
        """Tasks case by case (dtype, then group); entries with their own cases come last."""
        entries = [self.entries[g] for g in (groups or self.groups)]
        return ([Task(self.name, c, dt, e.group) for c in cases for dt in dtypes for e in entries
                 if e.cases is None and e.applies(c)]
                + [Task(self.name, c, dt, e.group) for e in entries if e.cases is not None
                   for c in e.cases for dt in dtypes])

    def run_task(self, task: Task, ctx: harness.Context) -> list[dict]:
        return harness.run_entry(self, self.entries[task.group], task, ctx)


def get(name: str) -> Family:
    """The family ``name`` (its module imported, which registers it)."""
    importlib.import_module(FAMILIES[name])
    return _REGISTERED[name]
