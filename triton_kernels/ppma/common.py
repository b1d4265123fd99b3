"""What the PPMA kernels share: the packed prefix-sum tables of the log-decays, their jit readers,
the host side of their gradients, and the ahead-of-time signature convention.

With per-head log-decays a (along rows) and g (along columns) on the (H, W) map,

    P[r, c] = Σ_{c' <= c} a[r, c']  (along rows),   Q[r, c] = Σ_{r' <= r} g[r', c]  (along columns)

and the log-mask between two cells is a signed difference of P and Q values (``full.py``,
``criss_cross.py``). P and Q of a cell are packed in one 64-bit word, so a gather is one load.
Their gradients come back from the kernels as fp32 (B, h, N) tables; :func:`decay_grads` turns
them into log-decay gradients (reverse cumulative sums). Both directions are one launch of
:func:`ppma_scan_kernel` (instead of five or six torch ops: each a launch on a GPU, where the
attention kernel itself runs for microseconds at PPMA's late stages).
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from ..attention_core import LOG2E, strides_of
from ..tuning import Launcher, launch_key

LOG2E_JIT = tl.constexpr(LOG2E)  # jit code reads module globals only as constexprs


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def load_pq(PQ, off, mask):
    """(P, Q) at cells ``off``: one 64-bit load of the packed fp32 pair (P low word, Q high)."""
    x = tl.load(PQ + off, mask=mask, other=0)
    p = x.to(tl.int32).to(tl.float32, bitcast=True)  # the cast truncates: the low word
    q = (x >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return p, q


@triton.jit
def ppma_scan_kernel(
    A, A2, G, G2, OP, OG,
    sab, sah, san, sa2b, sa2h, sa2n, sgb, sgh, sgn, sg2b, sg2h, sg2n,
    sopb, soph, sopn, sogb, sogh, sogn,
    n_heads, H, W,
    REVERSE: tl.constexpr, TWO: tl.constexpr, OG_SHIFT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One (batch, head) per program: OP = cumulative sum of A (+ A2) along each row of the
    (H, W) map, OG = cumulative sum of G (+ G2) along each column (from the end with
    ``REVERSE``), fp32 math, row chunks of BLOCK_R carrying the column sums down (or up).
    A2, G2 are read only with ``TWO``; OG is offset by ``OG_SHIFT`` elements (1 writes the
    packed table's high words through the same pointer as OP)."""
    pid = tl.program_id(0).to(tl.int64)  # (b·h)·stride may pass 2**31 elements
    b = pid // n_heads
    h = pid % n_heads
    a_ptr = A + b * sab + h * sah
    g_ptr = G + b * sgb + h * sgh
    op_ptr = OP + b * sopb + h * soph
    og_ptr = OG + b * sogb + h * sogh + OG_SHIFT
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    carry = tl.zeros((BLOCK_W,), dtype=tl.float32)
    n_chunks = tl.cdiv(H, BLOCK_R)
    for i in range(0, n_chunks):
        chunk = n_chunks - 1 - i if REVERSE else i
        r = chunk * BLOCK_R + rows
        mask = (r[:, None] < H) & (cols[None, :] < W)
        cell = r[:, None] * W + cols[None, :]
        a = tl.load(a_ptr + cell * san, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + cell * sgn, mask=mask, other=0.0).to(tl.float32)
        if TWO:
            a += tl.load(A2 + b * sa2b + h * sa2h + cell * sa2n, mask=mask,
                         other=0.0).to(tl.float32)
            g += tl.load(G2 + b * sg2b + h * sg2h + cell * sg2n, mask=mask,
                         other=0.0).to(tl.float32)
        p = tl.cumsum(a, axis=1, reverse=REVERSE)
        q = tl.cumsum(g, axis=0, reverse=REVERSE) + carry[None, :]
        carry += tl.sum(g, axis=0)
        tl.store(op_ptr + cell * sopn, p, mask=mask)
        tl.store(og_ptr + cell * sogn, q, mask=mask)


# --------------------------------------------------------------------------------------------
# host
# --------------------------------------------------------------------------------------------

#: widest map the scan kernel takes in one row tile (wider maps scan with torch)
SCAN_MAX_WIDTH = 4096
#: cells per row chunk of the scan kernel
_SCAN_CELLS = 2048

ppma_scan = Launcher(ppma_scan_kernel, lambda **_: [triton.Config({}, num_warps=4)], [])


def _scan(a, g, a2, g2, op, og, H: int, W: int, reverse: bool, packed: bool = False) -> None:
    """One launch of :func:`ppma_scan_kernel`: (B, h, N) inputs, any strides, into op, og;
    a2, g2 None or added to a, g. ``packed``: op and og are the same (B, h, 2N) fp32 view of
    the packed table, P in the even elements, Q in the odd ones."""
    b, h, n = a.shape
    two = a2 is not None
    tensors = dict(A=a, G=g, OP=op, OG=og, **(dict(A2=a2, G2=g2) if two else {}))
    block_w = triton.next_power_of_2(W)

    def scalars():
        pair = (a2, g2) if two else (a, g)  # strides of the unread A2, G2: any ints
        out = dict(**strides_of("op", op, "bhn"), **strides_of("og", og, "bhn"))
        if packed:
            out.update(sopn=2, sogn=2)
        return dict(**strides_of("a", a, "bhn"), **strides_of("a2", pair[0], "bhn"),
                    **strides_of("g", g, "bhn"), **strides_of("g2", pair[1], "bhn"), **out,
                    **({} if two else dict(A2=None, G2=None)),
                    n_heads=h, H=H, W=W, REVERSE=reverse, TWO=two, OG_SHIFT=int(packed),
                    BLOCK_R=max(1, _SCAN_CELLS // block_w), BLOCK_W=block_w)

    ppma_scan.launch(launch_key(H, W, reverse, packed, a, g, a2, g2, op, og),
                     lambda _: (b * h,), tensors, scalars)


def prefix_table(log_decay_h: torch.Tensor, log_decay_v: torch.Tensor, H: int, W: int):
    """(B, h, N) int64 words, each packing the fp32 pair (P, Q) of a cell: P the row prefix sums
    of a, Q the column prefix sums of g (little-endian: P in the low word). One launch, any
    strides and float dtype in."""
    b, h, n = log_decay_h.shape
    if W > SCAN_MAX_WIDTH or n == 0:
        p = torch.cumsum(log_decay_h.float().reshape(b, h, H, W), dim=3)
        q = torch.cumsum(log_decay_v.float().reshape(b, h, H, W), dim=2)
        return torch.stack([p, q], dim=-1).reshape(b, h, n, 2).view(torch.int64).squeeze(-1)
    table = log_decay_h.new_empty((b, h, n), dtype=torch.int64)
    pairs = table.view(torch.float32)  # (B, h, 2N): P, Q interleaved
    _scan(log_decay_h, log_decay_v, None, None, pairs, pairs, H, W, reverse=False, packed=True)
    return table


def decay_grads(d_p: torch.Tensor, d_q: torch.Tensor, H: int, W: int, dtypes: tuple,
                d_p2: torch.Tensor | None = None, d_q2: torch.Tensor | None = None):
    """Prefix-table gradients -> log-decay gradients (da, dg) in ``dtypes``: reverse cumulative
    sums of d_p (+ d_p2) along rows (a) and of d_q (+ d_q2) along columns (g). (B, h, N) fp32
    in; one launch."""
    b, h, n = d_p.shape
    if W > SCAN_MAX_WIDTH or n == 0:
        if d_p2 is not None:
            d_p, d_q = d_p + d_p2, d_q + d_q2
        da = d_p.reshape(b, h, H, W).flip(3).cumsum(3).flip(3)
        dg = d_q.reshape(b, h, H, W).flip(2).cumsum(2).flip(2)
        return da.reshape(b, h, n).to(dtypes[0]), dg.reshape(b, h, n).to(dtypes[1])
    da, dg = (d_p.new_empty((b, h, n), dtype=t) for t in dtypes)
    _scan(d_p, d_q, d_p2, d_q2, da, dg, H, W, reverse=True)
    return da, dg


# --------------------------------------------------------------------------------------------
# ahead-of-time signatures
# --------------------------------------------------------------------------------------------

_POINTERS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "X", "DX", "Y", "X1", "X2", "ADD",
             "OUT1", "OUT2")
_F32_POINTERS = ("O1", "LSE", "DELTA", "GPQ", "GQQ", "GPK", "GQK", "OUT_T", "ACC_Q", "ACC_K",
                 "ACC_V", "GZ")


def aot_signature(fn, ptr_dtype: str) -> tuple[dict, dict]:
    """Runtime-arg types of a launch on q, k, v viewed out of packed projections (see
    :func:`..aot.launch_signature`); per-token statistics and intermediates are fp32, the packed
    prefix-sum table is i64."""
    from ..aot import launch_signature

    pointers = {n: f"*{ptr_dtype}" for n in _POINTERS}
    pointers.update({n: "*fp32" for n in _F32_POINTERS}, PQ="*i64")
    return launch_signature(fn, pointers)


def aot_specs():
    """The prefix scans at PPMA-T stage 1 (56×56 map): fp16 log-decays into the packed table,
    and the two-sided reverse scan of fp32 table gradients into fp16 log-decay gradients."""
    from ..aot import AotCase, AotSpec, launch_signature

    specs = []
    strides = [n for n in inspect.signature(ppma_scan_kernel.fn).parameters if n.startswith("s")]
    for reverse, dtype_in, dtype_out in ((False, "fp16", "fp32"), (True, "fp32", "fp16")):
        ptrs = {**{n: f"*{dtype_in}" for n in ("A", "A2", "G", "G2")},
                **{n: f"*{dtype_out}" for n in ("OP", "OG")}}
        sig, const = launch_signature(ppma_scan_kernel, ptrs, plain=strides)
        name = f"ppma.scan[{'reverse,two' if reverse else 'forward'},{dtype_in}->{dtype_out}]"
        specs.append(AotSpec(name, (AotCase(
            name=name, fn=ppma_scan_kernel, signature=sig, num_warps=4, num_stages=1,
            constexprs={**const, "REVERSE": reverse, "TWO": reverse,
                        "OG_SHIFT": int(not reverse), "BLOCK_R": 32, "BLOCK_W": 64}),)))
    return specs
