"""Counted work of vitkern's Triton kernels and an H100 roofline prediction from it.

``python -m vitkern.bench --work`` runs every Triton kernel launch of each op (forward and
backward) under the Triton interpreter on the CPU, at each family's headline benchmark shape with
one image, and counts exactly, per kernel:

* HBM bytes read / written by ``tl.load`` / ``tl.store`` (masked-off lanes excluded). A tile read
  twice counts twice: the count assumes **no L2 reuse** (an upper bound on HBM traffic);
* ``tl.dot`` FLOPs issued, 2·M·N·K per dot over the whole tile (masked rows included: the tensor
  core computes them);
* exp / exp2 / log / log2 elements (the MUFU work of the softmax);
* kernel launches and grid programs.

Beside the counts stands the minimum the op needs (useful FLOPs as the family's benchmark counts
them; q, k, v read once, o written once, plus biases and statistics). A roofline model of an H100
SXM turns counts into a time per kernel (the slowest of HBM, tensor core, MUFU and the launch
floor), summed per op, and the same model runs on explicit byte / FLOP lists of each baseline
(the eager code of the papers, SDPA). These are **predictions from counted work, not
measurements**: the GPU tier's timings replace them.

Host overhead: the Python cost of each op's call path up to the kernel launch, with the launch
stubbed, per call on the machine that runs this (a CPU; median of many calls).

Counting works by wrapping methods of Triton's interpreter (``InterpreterBuilder`` and
``GridExecutor`` in ``triton.runtime.interpreter``, the same names in Triton 3.6 to 3.9) inside
:class:`WorkCounter`, restored on exit; it needs ``TRITON_INTERPRET=1`` set before triton is
imported.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

# ---------------------------------------------------------------------------------------------
# H100 SXM model
# ---------------------------------------------------------------------------------------------
H100 = dict(
    name="H100 SXM (model)",
    hbm_Bps=3.35e12,
    tc16_flops=989e12,             # dense bf16 / fp16 tensor core
    tf32_flops=494e12,             # dense tf32; fp32 dots run tf32x3 at a third of it
    fp32_flops=67e12,              # fp32 non-tensor-core (an "ieee" dot)
    exp_per_s=16 * 132 * 1.83e9,   # MUFU: 16 ops / clk / SM x 132 SMs x 1.83 GHz
    launch_s=4e-6,                 # per kernel launch (host + driver), a floor per kernel
)

NOTE = ("PREDICTIONS from counted work (Triton interpreter counts of each kernel; explicit "
        "byte / FLOP models of the baselines), NOT measurements. HBM bytes assume no L2 reuse "
        "(a re-read tile counts again); the figures in parentheses assume a perfect cache "
        "(distinct bytes only): the truth lies between. Per-kernel time = max(HBM, tensor core, "
        "MUFU exp, launch floor), summed per op. To be replaced by the GPU tier's measured timings.")


def dot_class(a_bits: int, precision) -> str:
    """The tensor-core rate class of a dot: 16-bit inputs, or fp32 with its input precision."""
    if a_bits <= 16:
        return "tc16"
    p = str(precision).upper()
    if "X3" in p:
        return "tf32x3"
    if "IEEE" in p:
        return "fp32"
    return "tf32"


def dot_rate(cls: str, dev: dict = H100) -> float:
    return {"tc16": dev["tc16_flops"], "tf32": dev["tf32_flops"], "tf32x3": dev["tf32_flops"] / 3,
            "fp32": dev["fp32_flops"]}[cls]


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------
@dataclass
class KernelWork:
    """What one kernel (all its launches in a phase) did."""

    name: str
    launches: int = 0
    programs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    dot_flops: dict = field(default_factory=dict)   # rate class -> FLOPs
    exps: int = 0
    unique_read: int = 0      # distinct bytes read (a perfect-cache lower bound on HBM reads)
    unique_written: int = 0
    _addrs: dict = field(default_factory=dict, repr=False)  # (kind, elem bytes) -> [addresses]

    def _finish(self) -> None:
        import numpy as np
        totals = {"r": 0, "w": 0}
        for (kind, eb), arrs in self._addrs.items():
            totals[kind] += eb * int(np.unique(np.concatenate(arrs)).size)
        self.unique_read, self.unique_written = totals["r"], totals["w"]
        self._addrs = {}

    @property
    def flops(self) -> int:
        return sum(self.dot_flops.values())

    def scaled(self, f: float, launches: bool = False) -> "KernelWork":
        """Bytes, FLOPs, exps and programs times ``f`` (launches too when ``launches``)."""
        return KernelWork(self.name, round(self.launches * f) if launches else self.launches,
                          round(self.programs * f), round(self.bytes_read * f),
                          round(self.bytes_written * f),
                          {k: round(v * f) for k, v in self.dot_flops.items()}, round(self.exps * f),
                          round(self.unique_read * f), round(self.unique_written * f))

    def as_dict(self) -> dict:
        return dict(name=self.name, launches=self.launches, programs=self.programs,
                    bytes_read=self.bytes_read, bytes_written=self.bytes_written,
                    unique_read=self.unique_read, unique_written=self.unique_written,
                    dot_flops=dict(self.dot_flops), flops=self.flops, exps=self.exps)


def _elem_bytes(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _active(mask, ptrs):
    """The addresses of the lanes a load / store touches (its mask broadcast to the pointers)."""
    import numpy as np
    m = np.broadcast_to(mask.data, ptrs.data.shape)
    return np.asarray(ptrs.data)[m].astype(np.int64, copy=False).ravel()


class WorkCounter:
    """Context manager counting the work of interpreted Triton launches, per kernel name.

    ``counter.kernels`` maps a kernel name to its :class:`KernelWork`, in first-launch order;
    with ``per_launch`` each launch is its own entry (the second launch of ``k`` is ``k#2``).
    ``unique=True`` also counts distinct bytes (the perfect-cache bound; keeps every address of
    a phase in memory until exit).
    """

    _EXP = ("create_exp", "create_exp2", "create_log", "create_log2")

    def __init__(self, per_launch: bool = False, unique: bool = False):
        self.per_launch, self.unique = per_launch, unique
        self.kernels: "OrderedDict[str, KernelWork]" = OrderedDict()
        self._current: KernelWork | None = None
        self._saved: list = []

    def _k(self) -> KernelWork:
        if self._current is None:  # a builder call outside a launch (never seen): keep it
            self._current = self.kernels.setdefault("<outside>", KernelWork("<outside>"))
        return self._current

    def __enter__(self) -> "WorkCounter":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("WorkCounter needs TRITON_INTERPRET=1 set before triton is imported")
        try:
            from triton.runtime import interpreter as itp
            B, G = itp.InterpreterBuilder, itp.GridExecutor
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(f"this Triton's interpreter has no InterpreterBuilder / GridExecutor "
                               f"to count with ({exc}); supported: triton 3.6 to 3.9") from exc
        missing = [m for m in ("create_masked_load", "create_masked_store", "create_dot",
                               "set_grid_dim", *self._EXP) if not hasattr(B, m)]
        if missing:
            raise RuntimeError(f"this Triton's InterpreterBuilder lacks {missing}; "
                               "supported: triton 3.6 to 3.9")
        me = self

        def wrap(cls, name, make):
            orig = cls.__dict__.get(name, getattr(cls, name))
            self._saved.append((cls, name, orig))
            setattr(cls, name, make(orig))

        # create_load / create_store delegate to the masked forms through self: count those only
        def note(kind, ptrs, mask):
            addrs, eb, k = _active(mask, ptrs), _elem_bytes(ptrs), me._k()
            if kind == "r":
                k.bytes_read += addrs.size * eb
            else:
                k.bytes_written += addrs.size * eb
            if me.unique and addrs.size:
                k._addrs.setdefault((kind, eb), []).append(addrs)

        def load(orig):
            def f(b, ptrs, mask, *a, **kw):
                note("r", ptrs, mask)
                return orig(b, ptrs, mask, *a, **kw)
            return f

        def store(orig):
            def f(b, ptrs, value, mask, *a, **kw):
                note("w", ptrs, mask)
                return orig(b, ptrs, value, mask, *a, **kw)
            return f

        def dot(orig):
            def f(b, a, bb, d, input_precision=None, *rest, **kw):
                sa, sb = a.data.shape, bb.data.shape
                flops = 2 * math.prod(sa) * sb[-1]   # 2·(batch·M·K)·N
                cls = dot_class(a.dtype.primitive_bitwidth, input_precision)
                k = me._k()
                k.dot_flops[cls] = k.dot_flops.get(cls, 0) + int(flops)
                return orig(b, a, bb, d, input_precision, *rest, **kw)
            return f

        def exp(orig):
            def f(b, arg, *a, **kw):
                me._k().exps += int(arg.data.size)
                return orig(b, arg, *a, **kw)
            return f

        def grid_dim(orig):
            def f(b, nx, ny, nz):
                me._k().programs += int(nx) * int(ny) * int(nz)
                return orig(b, nx, ny, nz)
            return f

        def launch(orig):
            def f(ex, *a, **kw):
                name = getattr(ex.fn, "__name__", "kernel")
                if me.per_launch and name in me.kernels:
                    name = f"{name}#{sum(1 for n in me.kernels if n.split('#')[0] == name) + 1}"
                k = me.kernels.setdefault(name, KernelWork(name))
                k.launches += 1
                prev, me._current = me._current, k
                try:
                    return orig(ex, *a, **kw)
                finally:
                    me._current = prev
            return f

        wrap(B, "create_masked_load", load)
        wrap(B, "create_masked_store", store)
        wrap(B, "create_dot", dot)
        for m in self._EXP:
            wrap(B, m, exp)
        wrap(B, "set_grid_dim", grid_dim)
        wrap(G, "__call__", launch)
        return self

    def __exit__(self, *exc):
        while self._saved:
            cls, name, orig = self._saved.pop()
            setattr(cls, name, orig)
        if self.unique:
            for k in self.kernels.values():
                k._finish()
        return False

    def total(self) -> KernelWork:
        return _sum(list(self.kernels.values()))


def count(fn: Callable, *args, **kwargs) -> tuple[object, WorkCounter]:
    """``fn(*args, **kwargs)`` under a :class:`WorkCounter`; returns (result, counter)."""
    with WorkCounter() as c:
        out = fn(*args, **kwargs)
    return out, c


# ---------------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------------
def kernel_time(k: KernelWork, batch: int = 1, dev: dict = H100, unique: bool = False) -> dict:
    """Time bound of each resource for ``k`` (per-image counts) at ``batch`` images, and the
    binding one. Launches do not scale with the batch. ``unique``: HBM bytes are the distinct
    bytes (every re-read served by cache) instead of every load and store."""
    nbytes = (k.unique_read + k.unique_written) if unique else (k.bytes_read + k.bytes_written)
    t = {"hbm": batch * nbytes / dev["hbm_Bps"],
         "tensor": batch * sum(v / dot_rate(c, dev) for c, v in k.dot_flops.items()),
         "exp": batch * k.exps / dev["exp_per_s"],
         "launch": k.launches * dev["launch_s"]}
    bound = max(t, key=t.get)
    return dict(bounds_us={r: v * 1e6 for r, v in t.items()}, binding=bound, time_us=t[bound] * 1e6)


def op_time(kernels: list[KernelWork], batch: int, dev: dict = H100, unique: bool = False) -> dict:
    per = [dict(kernel_time(k, batch, dev, unique), name=k.name) for k in kernels]
    total = sum(p["time_us"] for p in per)
    by = {}
    for p in per:
        by[p["binding"]] = by.get(p["binding"], 0.0) + p["time_us"]
    binding = max(by, key=by.get) if by else "-"
    return dict(time_us=total, binding=binding, kernels=per)


def lower_bound_us(min_bytes: float, useful_flops: float, batch: int, dev: dict = H100) -> float:
    """The op's own bound: max(minimum bytes / HBM, useful FLOPs / 16-bit peak) at ``batch``."""
    return 1e6 * batch * max(min_bytes / dev["hbm_Bps"], useful_flops / dev["tc16_flops"])


# ---------------------------------------------------------------------------------------------
# Baselines: explicit per-image byte / FLOP lists of eager code (one kernel per PyTorch op)
# ---------------------------------------------------------------------------------------------
class Eager:
    """Builds the kernel list of an eager forward and of its autograd backward, op by op.

    Sizes are element counts per image; ``E`` is the activation element size (16-bit: 2). The
    backward of each op follows what autograd launches for it (a matmul: two matmuls; softmax:
    one kernel reading y and dy; a copy: a copy)."""

    def __init__(self, E: int = 2):
        self.E = E
        self.fwd: list[KernelWork] = []
        self.bwd: list[KernelWork] = []

    def _k(self, lst, name, r, w, flops=0, exps=0, ur=None, uw=None):
        """One kernel: ``r`` / ``w`` bytes counted like the interpreter counts a Triton kernel
        (every tile load); ``ur`` / ``uw`` the distinct bytes (default: the same)."""
        lst.append(KernelWork(name, 1, 0, int(r), int(w), {"tc16": int(flops)} if flops else {},
                              int(exps), int(r if ur is None else ur), int(w if uw is None else uw)))

    def copy(self, name, n, E=None, grad=True):
        E = E or self.E
        self._k(self.fwd, name, n * E, n * E)
        if grad:
            self._k(self.bwd, name + ".bwd", n * E, n * E)

    def ew(self, name, n_out, reads: float, E_out=None, grad=True, grad_reads=1):
        """Elementwise: reads ``reads`` bytes, writes n_out elements; its backward reads the
        incoming gradient (and ``grad_reads - 1`` saved tensors) and writes one gradient."""
        E_out = E_out or self.E
        self._k(self.fwd, name, reads, n_out * E_out)
        if grad:
            self._k(self.bwd, name + ".bwd", grad_reads * n_out * E_out, n_out * E_out)

    def mm(self, name, batch, M, N, K, grad=True):
        E = self.E
        self._k(self.fwd, name, batch * (M * K + K * N) * E, batch * M * N * E, 2 * batch * M * N * K)
        if grad:
            self._k(self.bwd, name + ".dA", batch * (M * N + K * N) * E, batch * M * K * E,
                    2 * batch * M * N * K)
            self._k(self.bwd, name + ".dB", batch * (M * N + M * K) * E, batch * K * N * E,
                    2 * batch * M * N * K)

    def softmax(self, name, rows, cols, E=None, grad=True):
        E = E or self.E
        n = rows * cols
        self._k(self.fwd, name, n * E, n * E, exps=n)
        if grad:
            self._k(self.bwd, name + ".bwd", 2 * n * E, n * E)

    def sdpa(self, name, bh, Lq, Lk, d, mask_elems=0, mask_grad=False, block=128):
        """A FlashAttention-2 style SDPA kernel counted as the interpreter counts vitkern's: the
        forward re-reads k, v (and the mask) for each ``block``-row query tile and writes o and
        the fp32 log-sum-exp; the backward (a delta pre-pass, then one program per key tile that
        re-reads q, dO, lse, delta and accumulates dq in fp32, then a dq conversion) runs 2.5x
        the forward FLOPs. Distinct bytes: every tensor once."""
        E = self.E
        f = 4 * bh * Lq * Lk * d
        nq, nk = -(-Lq // block), -(-Lk // block)
        qd, kd = bh * Lq * d, bh * Lk * d
        mb = mask_elems * E
        self._k(self.fwd, name, (qd + nq * 2 * kd) * E + mb, qd * E + 4 * bh * Lq, f, bh * Lq * Lk,
                ur=(qd + 2 * kd) * E + mb, uw=qd * E + 4 * bh * Lq)
        self._k(self.bwd, name + ".delta", 2 * qd * E, 4 * bh * Lq + 4 * qd)   # + zeroed dq acc
        dq_acc = nk * qd * 4
        self._k(self.bwd, name + ".bwd",
                nk * (2 * qd * E + 8 * bh * Lq) + 2 * kd * E + mb + dq_acc,
                2 * kd * E + (mb if mask_grad else 0) + dq_acc,
                2.5 * f, bh * Lq * Lk,
                ur=(2 * qd + 2 * kd) * E + 8 * bh * Lq + mb + 4 * qd,
                uw=2 * kd * E + (mb if mask_grad else 0) + 4 * qd)
        self._k(self.bwd, name + ".dq_convert", 4 * qd, qd * E)


def baseline_hilo_litv2(c) -> Eager:
    """LITv2's eager HiLo on q, k, v (the benchmark's ``litv2``): Hi-Fi windows partitioned,
    q@kᵀ, scale, softmax, @v, un-partitioned; Lo-Fi k, v average-pooled, the same chain; the two
    outputs concatenated."""
    e, d, N, s, M = Eager(), c.head_dim, c.N, c.window_size, c.M
    hh, hl = c.num_hi_heads, c.num_lo_heads
    if hh:
        n = hh * N * d
        for t in "qkv":
            e.copy(f"hifi.partition_{t}", n)
        e.mm("hifi.qk", hh * M, s * s, s * s, d)
        e.ew("hifi.scale", hh * M * s ** 4, hh * M * s ** 4 * e.E)
        e.softmax("hifi.softmax", hh * M * s * s, s * s)
        e.mm("hifi.pv", hh * M, s * s, d, s * s)
        e.copy("hifi.unpartition", n)
    if hl:
        e.ew("lofi.pool_k", hl * M * d, hl * N * d * e.E)
        e.ew("lofi.pool_v", hl * M * d, hl * N * d * e.E)
        e.mm("lofi.qk", hl, N, M, d)
        e.ew("lofi.scale", hl * N * M, hl * N * M * e.E)
        e.softmax("lofi.softmax", hl * N, M)
        e.mm("lofi.pv", hl, N, d, M)
        e.copy("lofi.transpose", hl * N * d)
    e.copy("cat", c.heads * N * d)
    return e


def _swin_partition(e: Eager, c, n_map, shift):
    for t in "qkv":
        if shift:
            e.copy(f"roll_{t}", n_map)
        e.copy(f"partition_{t}", n_map)


def _swin_reverse(e: Eager, n_map, shift):
    e.copy("reverse_partition", n_map)
    if shift:
        e.copy("roll_back", n_map)


def baseline_swin_timm(c) -> Eager:
    """timm WindowAttention's eager math with roll and window partition of q, k, v (the
    benchmark's ``timm_math``): scale, q@kᵀ, + bias, + shift mask, softmax, @v, reverse."""
    e, d, ws, h = Eager(), c.head_dim, c.window_size, c.heads
    nw, n = c.n_windows, ws * ws
    n_map = h * c.H * c.W * d
    _swin_partition(e, c, n_map, c.shift)
    e.ew("q_scale", n_map, n_map * e.E)
    e.mm("qk", h * nw, n, n, d)
    A = h * nw * n * n
    e.ew("bias_gather", h * n * n, (2 * ws - 1) ** 2 * h * e.E + 8 * n * n)  # table[index]
    e.ew("add_bias", A, A * e.E + h * n * n * e.E)
    if c.shift:
        e.ew("add_mask", A, A * e.E + nw * n * n * e.E, grad=False)  # grad passes through
    e.softmax("softmax", h * nw * n, n)
    e.mm("pv", h * nw, n, d, n)
    _swin_reverse(e, n_map, c.shift)
    e._k(e.bwd, "bias_grad_reduce", A * e.E, h * n * n * 4)  # sum over windows of d(attn)
    return e


def baseline_swin_sdpa(c) -> Eager:
    """SDPA (memory-efficient, float mask) on partitioned windows: roll / partition q, k, v,
    bias + shift mask materialised per window and head, reverse."""
    e, d, ws, h = Eager(), c.head_dim, c.window_size, c.heads
    nw, n = c.n_windows, ws * ws
    n_map = h * c.H * c.W * d
    A = h * nw * n * n
    _swin_partition(e, c, n_map, c.shift)
    e.ew("bias_gather", h * n * n, (2 * ws - 1) ** 2 * h * e.E + 8 * n * n)
    e.ew("attn_mask", A, h * n * n * e.E + nw * n * n * e.E, grad=False)
    e.sdpa("sdpa", h * nw, n, n, d, mask_elems=A, mask_grad=True)
    e._k(e.bwd, "bias_grad_reduce", A * e.E, h * n * n * 4)
    _swin_reverse(e, n_map, c.shift)
    return e


def baseline_token_gather_sdpa(c) -> Eager:
    """Gather the kept tokens of q, k, v (index_select) and run SDPA (flash) on them; the
    backward scatters the gradients into zeroed (N) maps."""
    e, d, h, K, N = Eager(), c.head_dim, c.heads, c.K, c.N
    for t in "qkv":
        e._k(e.fwd, f"gather_{t}", h * K * d * e.E + 8 * K, h * K * d * e.E)
        e._k(e.bwd, f"zeros_d{t}", 0, h * N * d * e.E)
        e._k(e.bwd, f"scatter_d{t}", h * K * d * e.E + 8 * K, h * K * d * e.E)
    e.sdpa("sdpa", h, K, K, d)
    return e


def baseline_ppma_original(c) -> Eager:
    """PPMA's ``MambaAttentionAllDouble`` core (bench/ppma_original.py): fp32 (heads, N, N)
    log-mask from segment sums, broadcast and permuted; logits + mask and + maskᵀ, two
    softmaxes averaged, @v."""
    e, d, h, N, H, W = Eager(), c.head_dim, c.heads, c.N, c.H, c.W
    A = h * N * N
    for name, L, R in (("seg_w", H, W), ("seg_h", W, H)):  # cumsum, differences, tri masks
        e.ew(f"{name}.cumsum", h * L * R, h * L * R * e.E, E_out=4)
        e.ew(f"{name}.down", h * L * R * R, 2 * h * L * R * 4, E_out=4)
        e.ew(f"{name}.up", h * L * R * R, 2 * h * L * R * 4, E_out=4)
        e.ew(f"{name}.add", h * L * R * R, 2 * h * L * R * R * 4, E_out=4)
    e.ew("mask_sum", A, 2 * h * H * W * W * 4, E_out=4)         # sw + sh, broadcast
    e.copy("mask_permute", A, E=4)
    e.ew("k_scale", h * N * d, h * N * d * e.E)
    e.mm("qk", h, N, N, d)
    e.ew("logits+mask", A, A * (e.E + 4), E_out=4)
    e.softmax("softmax1", h * N, N, E=4)
    e.ew("logits+maskT", A, A * (e.E + 4), E_out=4)
    e.softmax("softmax2", h * N, N, E=4)
    e.ew("avg", A, 2 * A * 4, E_out=4, grad_reads=1)
    e.ew("to_dtype", A, A * 4)
    e.mm("pv", h, N, d, N)
    e._k(e.bwd, "mask_grad_reduce", 2 * A * 4, 2 * h * H * W * W * 4)  # to the decays
    return e


def baseline_xca_timm(c) -> Eager:
    """timm's fused XCA path: F.normalize(qᵀ), F.normalize(kᵀ) (norm, then divide), q x
    temperature, SDPA with channels as the sequence (head dim N), output transposed back."""
    e, d, h, N = Eager(), c.head_dim, c.heads, c.N
    n = h * N * d
    for t in "qk":
        e._k(e.fwd, f"norm_{t}", n * e.E, h * d * 4)
        e.ew(f"div_{t}", n, n * e.E + h * d * 4, grad_reads=2)
        e._k(e.bwd, f"norm_{t}.bwd", 2 * n * e.E, n * e.E)
    e.ew("q_temperature", n, n * e.E)
    e.copy("v_transpose", n)   # SDPA wants a unit last stride
    e.sdpa("sdpa", h, d, d, N)
    e.copy("out_transpose", n)
    return e


# ---------------------------------------------------------------------------------------------
# The ops at their headline shapes
# ---------------------------------------------------------------------------------------------
@dataclass
class OpCase:
    """One op at one headline shape: inputs, the call, the minimum, the baselines."""

    name: str
    family: str
    shape: str
    case: object
    heads_run: int              # heads run under the interpreter
    heads: int                  # heads of the real layer (counts scale by heads / heads_run)
    gpu_batch: int
    make: Callable              # (dtype, heads) -> (tensors requiring grad, other args)
    call: Callable              # (tensors, other) -> output
    useful_fwd: float           # per image
    min_bytes: Callable         # (mode, E) -> bytes per image; mode "fwd" | "train_fwd" | "bwd"
    baselines: dict             # name -> Eager
    note: str = ""


def _qkv(B, h, N, d, dtype, g):
    return [torch.randn(B, h, N, d, generator=g).to(dtype) for _ in range(3)]


def _attn_min(h, Nq, Nk, d, extra_fwd=0, extra_bwd=0):
    """q, k, v read once, o written once (+ the fp32 lse in training); backward reads q, k, v,
    o, dO, lse and writes dq, dk, dv."""
    def f(mode, E):
        if mode == "fwd":
            return E * h * d * (2 * Nq + 2 * Nk) + extra_fwd
        if mode == "train_fwd":
            return E * h * d * (2 * Nq + 2 * Nk) + 4 * h * Nq + extra_fwd
        return E * h * d * (4 * Nq + 2 * Nk + Nq + 2 * Nk) + 4 * h * Nq + extra_bwd
    return f


def op_cases() -> list[OpCase]:
    from vitkern.bench import shapes as S
    from vitkern import ops

    out = []

    c = S.get_case("litv2s_s3_224")
    def mk_hilo(dtype, h, c=c):
        g = torch.Generator().manual_seed(0)
        return _qkv(1, h, c.N, c.head_dim, dtype, g), {}
    out.append(OpCase(
        "hilo_attention", "hilo", c.describe(), c, c.heads, c.heads, c.batch, mk_hilo,
        lambda t, o, c=c: ops.hilo_attention(*t, hw=c.hw, window_size=c.window_size,
                                             num_lo_heads=c.num_lo_heads, backend="triton"),
        float(c.N * (c.num_hi_heads * 4 * c.window_size ** 2 * c.head_dim
                     + c.num_lo_heads * 4 * c.M * c.head_dim)),
        _attn_min(c.heads, c.N, c.N, c.head_dim),
        {"litv2_eager": baseline_hilo_litv2(c)},
        note=f"{c.name}: kv_pooled=False (k, v pooled inside the kernel); each kernel's first "
             "launch is the 2 Hi-Fi heads, its #2 launch the 10 Lo-Fi heads"))

    w = next(x for x in S.WINDOW_CASES if x.name == "swin_t_224_s1")
    w = type(w)(w.name, w.H, w.W, w.heads, w.head_dim, w.window_size, w.window_size // 2,
                batch=w.batch, tags=w.tags)  # stage 1 shifted block (SW-MSA)
    nb = (2 * w.window_size - 1) ** 2 * w.heads

    def mk_win(dtype, h, w=w):
        g = torch.Generator().manual_seed(0)
        qkv = torch.randn(1, w.H * w.W, 3, h, w.head_dim, generator=g).to(dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        table = torch.randn((2 * w.window_size - 1) ** 2, h, generator=g).to(dtype)
        return [q, k, v, table], {}
    out.append(OpCase(
        "window_attention", "window", w.describe() + " (shifted)", w, 1, w.heads, w.batch,
        mk_win,
        lambda t, o, w=w: ops.window_attention(t[0], t[1], t[2], hw=(w.H, w.W),
                                               window_size=w.window_size, shift=w.shift,
                                               rel_pos_bias=t[3], backend="triton"),
        float(w.H * w.W * w.heads * 4 * w.window_size ** 2 * w.head_dim),
        _attn_min(w.heads, w.H * w.W, w.H * w.W, w.head_dim, extra_fwd=2 * nb, extra_bwd=2 * nb + 4 * nb),
        {"timm_roll_partition": baseline_swin_timm(w), "sdpa_windows": baseline_swin_sdpa(w)},
        note="swin_t_224_s1 with shift 3 (SW-MSA), relative position bias table; run with 1 of 3 "
             "heads (per-head work identical), counts scaled to all heads"))

    t = next(x for x in S.TOKEN_CASES if x.name == "vitb_n577_k70")
    h_run = 2

    def mk_tok(dtype, h, t=t):
        g = torch.Generator().manual_seed(0)
        qkv = _qkv(1, h, t.N, t.head_dim, dtype, g)
        idx = torch.cat([torch.zeros(1, dtype=torch.long),
                         1 + torch.randperm(t.N - 1, generator=g)[:t.K - 1]])[None]
        return qkv, {"idx": idx}
    out.append(OpCase(
        "token_attention", "token", t.describe(), t, h_run, t.heads, t.batch, mk_tok,
        lambda q, o: ops.token_attention(*q, keep_idx=o["idx"], backend="triton"),
        float(4 * t.heads * t.K * t.K * t.head_dim),
        _attn_min(t.heads, t.K, t.K, t.head_dim, extra_fwd=8 * t.K, extra_bwd=8 * t.K),
        {"gather_sdpa": baseline_token_gather_sdpa(t)},
        note=f"{t.name}: keep_idx (EViT keep 0.7, CLS first); run with {h_run} of {t.heads} heads "
             "(per-head work identical), counts scaled to all heads"))

    x = next(x for x in S.LINEAR_CASES if x.name == "xcit_s_p16_224")

    def mk_xca(dtype, h, x=x):
        g = torch.Generator().manual_seed(0)
        qkv = _qkv(1, h, x.N, x.head_dim, dtype, g)
        return qkv + [torch.rand(h, 1, 1, generator=g).add(0.5).to(dtype)], {}
    out.append(OpCase(
        "xca_attention", "linear", x.describe(), x, x.heads, x.heads, x.batch, mk_xca,
        lambda t, o: ops.xca_attention(t[0], t[1], t[2], temperature=t[3], backend="triton"),
        float(x.heads * 4 * x.N * x.head_dim ** 2),
        _attn_min(x.heads, x.N, x.N, x.head_dim),
        {"timm_xca": baseline_xca_timm(x)}, note=x.name))

    p = next(x for x in S.PPMA_CASES if x.name == "ppma_ts_s3")

    def mk_ppma(dtype, h, p=p):
        g = torch.Generator().manual_seed(0)
        qkv = _qkv(1, h, p.N, p.head_dim, dtype, g)
        dec = [(-torch.rand(1, h, p.N, generator=g) * 0.5).to(dtype) for _ in range(2)]
        return qkv + dec, {}
    out.append(OpCase(
        "ppma_attention", "ppma", p.describe(), p, 2, p.heads, p.batch, mk_ppma,
        lambda t, o, p=p: ops.ppma_attention(*t, hw=(p.H, p.W), backend="triton"),
        float(4 * p.heads * p.N * p.N * p.head_dim),
        _attn_min(p.heads, p.N, p.N, p.head_dim, extra_fwd=4 * p.heads * p.N,
                  extra_bwd=8 * p.heads * p.N),
        {"ppma_original": baseline_ppma_original(p)}, note=f"{p.name}: full (N x N) PPMA, PPMA-T stage 3; run with 2 of {p.heads} heads "
             "(per-head work identical), counts scaled to all heads"))
    return out


def count_op(oc: OpCase, dtype=torch.float16) -> dict:
    """Counted kernels of ``oc`` per phase ("fwd": inference, "train_fwd", "bwd"), scaled to the
    layer's heads, per image."""
    f = oc.heads / oc.heads_run
    res = {}
    tensors, other = oc.make(dtype, oc.heads_run)
    with torch.no_grad(), WorkCounter(per_launch=True, unique=True) as c:
        oc.call(tensors, other)
    res["fwd"] = [k.scaled(f) for k in c.kernels.values()]
    leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in tensors]
    with WorkCounter(per_launch=True, unique=True) as c:
        o = oc.call(leaves, other)
    res["train_fwd"] = [k.scaled(f) for k in c.kernels.values()]
    o = o[0] if isinstance(o, tuple) else o
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.dtype)
    need = [x for x in leaves if x.requires_grad]
    with WorkCounter(per_launch=True, unique=True) as c:
        torch.autograd.grad(o, need, do)
    res["bwd"] = [k.scaled(f) for k in c.kernels.values()]
    return res


# ---------------------------------------------------------------------------------------------
# Host overhead
# ---------------------------------------------------------------------------------------------
class StubbedLaunches:
    """Interpreted kernel launches become no-ops (the op's Python up to the launch still runs)."""

    def __enter__(self):
        from triton.runtime import interpreter as itp
        self._cls = itp.InterpretedFunction
        self._orig = self._cls.__dict__["run"]
        self._cls.run = lambda fn, *a, grid=None, warmup=False, **kw: None
        return self

    def __exit__(self, *exc):
        self._cls.run = self._orig
        return False


def _median_us(fn, n: int) -> float:
    for _ in range(10):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def host_calibration(n: int = 2000) -> float:
    """Median µs of one tiny eager PyTorch op (``x + x``, one element) on this CPU: the unit
    to read the host-overhead column in."""
    x = torch.ones(1)
    return _median_us(lambda: x + x, n)


class GpuValueChecks:
    """Index values are not read back, as on a GPU without ``VITKERN_DEBUG=1`` (on CPU tensors
    the ops always check them: a cost a GPU call does not pay)."""

    def __enter__(self):
        from vitkern.ops import token, window
        self._saved = [(m, m.check_values) for m in (token, window)]
        for m, _ in self._saved:
            m.check_values = lambda t: False
        return self

    def __exit__(self, *exc):
        for m, fn in self._saved:
            m.check_values = fn
        return False


def host_overhead(oc: OpCase, dtype=torch.float16, n: int = 200) -> dict:
    """Median µs per call of the op's Python path with launches stubbed, index values not read
    back (as on a GPU): inference forward, and training forward + backward."""
    tensors, other = oc.make(dtype, oc.heads)
    leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in tensors]
    need = [x for x in leaves if x.requires_grad]

    def fwd():
        with torch.no_grad():
            oc.call(tensors, other)

    def train():
        o = oc.call(leaves, other)
        o = o[0] if isinstance(o, tuple) else o
        torch.autograd.grad(o, need, torch.ones_like(o))

    with StubbedLaunches(), GpuValueChecks():
        return {name: _median_us(fn, n) for name, fn in (("fwd", fwd), ("fwd+bwd", train))}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _sum(ks: list[KernelWork]) -> KernelWork:
    t = KernelWork("total")
    for k in ks:
        t.launches += k.launches
        t.programs += k.programs
        t.bytes_read += k.bytes_read
        t.bytes_written += k.bytes_written
        t.exps += k.exps
        t.unique_read += k.unique_read
        t.unique_written += k.unique_written
        for c, v in k.dot_flops.items():
            t.dot_flops[c] = t.dot_flops.get(c, 0) + v
    return t


def analyse(oc: OpCase, counts: dict, host: dict | None, E: int = 2) -> dict:
    """One op's record: counts vs minimum per mode, predicted times, speedups per baseline."""
    B = oc.gpu_batch
    modes = {"fwd": counts["fwd"], "fwd+bwd": counts["train_fwd"] + counts["bwd"],
             "bwd": counts["bwd"]}
    useful = {"fwd": oc.useful_fwd, "fwd+bwd": 3.5 * oc.useful_fwd, "bwd": 2.5 * oc.useful_fwd}
    min_b = {"fwd": oc.min_bytes("fwd", E), "bwd": oc.min_bytes("bwd", E)}
    min_b["fwd+bwd"] = oc.min_bytes("train_fwd", E) + min_b["bwd"]
    rec = dict(op=oc.name, family=oc.family, shape=oc.shape, note=oc.note, gpu_batch=B,
               heads=oc.heads, heads_run=oc.heads_run, modes={})
    for m, ks in modes.items():
        tot = _sum(ks)
        pred = op_time(ks, B)
        pred_cached = op_time(ks, B, unique=True)
        lb = lower_bound_us(min_b[m], useful[m], B)
        r = dict(kernels=[k.as_dict() for k in ks], total=tot.as_dict(),
                 min_bytes=min_b[m], useful_flops=useful[m],
                 bytes_ratio=(tot.bytes_read + tot.bytes_written) / min_b[m],
                 useful_fraction=useful[m] / tot.flops if tot.flops else None,
                 unique_bytes_ratio=(tot.unique_read + tot.unique_written) / min_b[m],
                 predicted=pred, predicted_perfect_cache=pred_cached, lower_bound_us=lb,
                 vs_lower_bound=pred["time_us"] / lb if lb else None,
                 vs_lower_bound_perfect_cache=pred_cached["time_us"] / lb if lb else None,
                 baselines={})
        if m != "bwd":
            for name, e in oc.baselines.items():
                bks = e.fwd if m == "fwd" else e.fwd + e.bwd
                bt, bt_c = op_time(bks, B), op_time(bks, B, unique=True)
                bsum = _sum(bks)
                r["baselines"][name] = dict(
                    bytes=bsum.bytes_read + bsum.bytes_written, flops=bsum.flops, exps=bsum.exps,
                    unique_bytes=bsum.unique_read + bsum.unique_written,
                    launches=bsum.launches, time_us=bt["time_us"], binding=bt["binding"],
                    time_us_perfect_cache=bt_c["time_us"],
                    speedup=bt["time_us"] / pred["time_us"],
                    speedup_perfect_cache=bt_c["time_us"] / pred_cached["time_us"])
        rec["modes"][m] = r
    if host:
        rec["host_us"] = host
    return rec


def _fmt_b(x):
    return f"{x / 1e6:.2f} MB" if x >= 1e5 else f"{x / 1e3:.1f} kB"


def _fmt_f(x):
    return f"{x / 1e9:.3f} GF" if x >= 1e7 else f"{x / 1e6:.2f} MF"


def table_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        for m in ("fwd", "fwd+bwd"):
            x = r["modes"][m]
            t = x["total"]
            sp = "; ".join(f"{n} {b['speedup']:.2f}x ({b['speedup_perfect_cache']:.2f}x) "
                           f"[{b['time_us']:.1f} µs, {b['binding']}]"
                           for n, b in x["baselines"].items())
            host = r.get("host_us", {}).get(m)
            rows.append([r["op"], m,
                         f"{_fmt_b(t['bytes_read'] + t['bytes_written'])} / {_fmt_b(x['min_bytes'])}"
                         f" ({x['bytes_ratio']:.2f}x; distinct {x['unique_bytes_ratio']:.2f}x)",
                         f"{_fmt_f(t['flops'])} / {_fmt_f(x['useful_flops'])} "
                         f"({100 * (x['useful_fraction'] or 0):.0f}% useful)",
                         f"{t['exps'] / 1e6:.2f} M", f"{t['launches']} / {t['programs']}",
                         x["predicted"]["binding"],
                         f"{x['predicted']['time_us']:.1f} ({x['predicted_perfect_cache']['time_us']:.1f})",
                         f"{x['vs_lower_bound']:.2f}x ({x['vs_lower_bound_perfect_cache']:.2f}x)", sp,
                         "-" if host is None else f"{host:.0f}"])
    return rows


HEADER = ["op", "mode", "HBM bytes counted / min (per image)", "dot FLOPs issued / useful",
          "exps", "launches / programs", "binding", "pred. µs @ GPU batch (perfect cache)",
          "vs own bound (perfect cache)",
          "predicted speedup vs baseline (perfect cache) [baseline µs, binding]",
          "host µs/call (CPU)"]


def kernel_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        for m in ("fwd", "bwd"):
            x = r["modes"][m]
            for k, p in zip(x["kernels"], x["predicted"]["kernels"]):
                b = p["bounds_us"]
                rows.append([r["op"], m, k["name"], str(k["launches"]), str(k["programs"]),
                             _fmt_b(k["bytes_read"]), _fmt_b(k["bytes_written"]),
                             _fmt_b(k["unique_read"] + k["unique_written"]),
                             _fmt_f(k["flops"]), f"{k['exps'] / 1e6:.3f} M",
                             f"{b['hbm']:.1f}", f"{b['tensor']:.1f}", f"{b['exp']:.1f}",
                             f"{b['launch']:.1f}", p["binding"]])
    return rows


KHEADER = ["op", "phase", "kernel", "launches", "programs", "read", "written", "distinct r+w",
           "dot FLOPs",
           "exps", "HBM µs", "TC µs", "exp µs", "launch µs", "binding"]


def markdown(records: list[dict], meta: dict) -> str:
    def tab(h, rows):
        return "\n".join(["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
                         + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows])
    lines = ["# vitkern: counted work and predicted H100 times", "",
             f"**{NOTE}**", "",
             f"Counts: Triton interpreter, {meta['count_dtype']} inputs (the byte and FLOP counts "
             f"of bf16), one image, scaled to the layer's heads where fewer were run. Predicted "
             f"times at each family's GPU benchmark batch. Model: {meta['model_text']}. "
             f"Host µs/call: {meta['host_note']}.", "",
             "Per-image counts; \"min\" = q, k, v read once, o written once (+ biases, decays, "
             "indices; training adds the fp32 log-sum-exp; backward reads q, k, v, o, dO, lse and "
             "writes dq, dk, dv); useful FLOPs as the family's benchmark counts them "
             "(backward 2.5x, fwd+bwd 3.5x the forward). fwd = inference forward; fwd+bwd = "
             "training forward + backward. Tiles: under the interpreter each kernel runs its "
             "first (preferred) tile candidate; on a GPU autotuning may pick another, which "
             "changes the re-read counts (not the distinct bytes or the useful work).", "",
             tab(HEADER, table_rows(records)), "", "## Per kernel", "",
             tab(KHEADER, kernel_rows(records)), "",
             "## Cases", ""]
    lines += [f"- `{r['op']}`: {r['shape']}, GPU batch {r['gpu_batch']}; {r['note']}" for r in records]
    lines += ["", f"Versions: {meta['versions']}. Command: `{meta['command']}`; counted in "
              f"{meta['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels, vals, cached = [], [], []
    for r in records:
        for m in ("fwd", "fwd+bwd"):
            for n, b in r["modes"][m]["baselines"].items():
                labels.append(f"{r['op']} {m}\nvs {n}")
                vals.append(b["speedup"])
                cached.append(b["speedup_perfect_cache"])
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(vals) + 1.5))
    y = list(range(len(vals)))
    ax.barh(y, vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals],
            label="no L2 reuse (every load counted)")
    ax.scatter(cached, y, color="k", marker="|", s=120, zorder=3,
               label="perfect cache (distinct bytes)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("predicted speedup of vitkern (log scale; > 1: vitkern faster)")
    ax.set_title("PREDICTED H100 SXM speedups from counted work, not measurements\n"
                 "(interpreter counts, roofline: HBM / tensor core / MUFU / launch; GPU batch)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out_dir: Path, *, host: bool = True, ops_filter: str | None = None,
        command: str = "python -m vitkern.bench --work") -> tuple[list[dict], dict]:
    """Count every op, predict, measure host overhead; write JSON, markdown and PNG."""
    import platform

    import triton

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    cases = op_cases()
    if ops_filter:
        keep = [s.strip() for s in ops_filter.split(",") if s.strip()]
        cases = [c for c in cases if any(k in c.name or k == c.family for k in keep)]
    records = []
    for oc in cases:
        t1 = time.perf_counter()
        counts = count_op(oc)
        h = host_overhead(oc) if host else None
        records.append(analyse(oc, counts, h))
        print(f"[work] {oc.name}: counted in {time.perf_counter() - t1:.1f} s", flush=True)
    dev = H100
    calib = host_calibration() if host else None
    meta = dict(
        note=NOTE, model=dev, count_dtype="fp16",
        model_text=(f"HBM {dev['hbm_Bps'] / 1e12:.2f} TB/s, 16-bit tensor core "
                    f"{dev['tc16_flops'] / 1e12:.0f} TFLOP/s, fp32 dots tf32x3 at "
                    f"{dev['tf32_flops'] / 3e12:.0f} TFLOP/s, MUFU exp "
                    f"{dev['exp_per_s'] / 1e12:.2f} T/s, launch floor {dev['launch_s'] * 1e6:.0f} µs "
                    "per kernel; per kernel max of the four, summed per op"),
        host_note=(f"median µs per call of the op's Python path with the kernel launch stubbed "
                   f"(the interpreter's launch made a no-op; the launch itself, ~10-30 µs in "
                   f"Triton's JIT launcher on a GPU, is not included) and index values not read "
                   f"back (as on a GPU); the tensors are CPU tensors, so the torch ops on the path "
                   f"(allocations, and in backward small reductions) run on the CPU; on this "
                   f"machine's CPU "
                   f"({platform.processor() or platform.machine()}, 2 cores shared, 1 torch thread; "
                   f"one tiny eager op, x + x, takes {calib or float('nan'):.1f} µs here)"),
        host_calibration_us=calib,
        versions=f"torch {torch.__version__}, triton {triton.__version__}", command=command,
        elapsed_s=time.perf_counter() - t0)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / "work-h100-model"
    base.with_suffix(".json").write_text(json.dumps(dict(meta=meta, ops=records), indent=1,
                                                    default=float) + "\n")
    base.with_suffix(".md").write_text(markdown(records, meta))
    plot(records, base.with_suffix(".png"))
    return records, meta


def print_table(records: list[dict]) -> None:
    rows = [HEADER] + table_rows(records)
    print(NOTE)
    for r in rows:
        print(" | ".join(r))
