"""The reduce-then-apply engine that linear attention, XCA and SOFT share.

Each of the three ops is a reduction over the tokens into a tiny per-(batch, head) state followed
by a per-token apply, so each is memory-bound: the target is one read of q, k, v and one write
of o. This module holds what they share: the jit helpers of a token-streaming kernel, the
token-streaming reduction ``gram_partials`` (φ(X)ᵀY, KᵀV-style) and the ``fold`` of its
partials, the split-N launch, the tile candidates and the ahead-of-time case builder.

Split-N reductions, deterministic. A reduction kernel runs on a (B·heads, n_split) grid; program
(bh, s) walks a contiguous chunk of token tiles (:func:`token_chunk`) and writes its fp32
partial state to its own slot of a workspace (bh, n_split, M) (:func:`partial_slot`). The
partials are then folded in split order (``fold``, or inside the consumer when it is one program
per head): no atomics, the same bits every run. The apply kernels use the same grid so each
program loads the state once for its whole chunk. ``n_split`` is chosen on the host to fill the
GPU (about 4 programs per SM): :func:`split_plan`, :func:`split_launch`.

Feature maps (``FEAT`` = 0 identity, 1 ReLU, 2 elu+1) are fused into every load of a token
tile; padded rows, padded channels and masked keys are forced to φ = 0 (elu+1 of a zero is 1,
not 0): :func:`phi_tile`.

Dots: fp32 inputs use ``tf32x3`` (IEEE-accurate, ``DOT_PRECISION`` from :func:`dots`); the
fp32 state times 16-bit tokens is a tf32 dot (the state can exceed the fp16 range, so it is
never cast down).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..attention_core import (aot_precision, bh_offset, block_d, cdiv, dot_precision, load_rows,
                              mma, strides_of)
from ..tuning import Launcher, capability_reason, check_no_tensors, launch_key

FEATURES = {"identity": 0, "relu": 1, "elu1": 2}

# --------------------------------------------------------------------------------------------
# jit helpers of a token-streaming kernel (grid axis 0: batch·head, axis 1: split)
# --------------------------------------------------------------------------------------------


@triton.jit
def phi(x, FEAT: tl.constexpr):
    """Feature map of an fp32 tile."""
    if FEAT == 1:
        return tl.maximum(x, 0.0)
    elif FEAT == 2:
        return tl.where(x > 0.0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        return x


@triton.jit
def dphi(f, FEAT: tl.constexpr):
    """φ'(x) from f = φ(x) (so the raw tile need not stay live): ReLU 1 where f > 0 (0 at the
    kink, as torch); elu+1: min(f, 1) (f = x + 1 > 1 for x > 0, f = exp(x) = φ'(x) below)."""
    if FEAT == 1:
        return tl.where(f > 0.0, 1.0, 0.0)
    elif FEAT == 2:
        return tl.minimum(f, 1.0)
    else:
        return tl.full(f.shape, 1.0, tl.float32)


@triton.jit
def phi_tile(x, valid, cmask, FEAT: tl.constexpr):
    """φ of a token tile in fp32, 0 at padded rows / channels and masked tokens."""
    return tl.where(valid[:, None] & cmask[None, :], phi(x.to(tl.float32), FEAT), 0.0)


@triton.jit
def head(n_heads):
    """(pid_bh (int64, for offsets), batch, head) of this program."""
    pid_bh = tl.program_id(0).to(tl.int64)
    return pid_bh, pid_bh // n_heads, pid_bh % n_heads


@triton.jit
def lanes(BLOCK: tl.constexpr, n):
    """(offsets, mask) of a BLOCK-wide channel (or landmark) axis holding ``n`` real entries."""
    offs = tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def token_chunk(N, tiles_per_split, BLOCK_M: tl.constexpr):
    """Token-tile range [t0, t1) of this program's split."""
    t0 = tl.program_id(1) * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(N, BLOCK_M))
    return t0, t1


@triton.jit
def tile_rows(t, N, BLOCK_M: tl.constexpr):
    """(token rows, rows < N) of token tile ``t``."""
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < N


@triton.jit
def kept(MASK, b, rows, valid, smb, smn, HAS_MASK: tl.constexpr):
    """``valid`` less the padding tokens of a (B, N) uint8 mask (nonzero = padding)."""
    if HAS_MASK:
        pad = tl.load(MASK + b * smb + rows.to(tl.int64) * smn, mask=valid, other=1)
        valid = valid & (pad == 0)
    return valid


@triton.jit
def load_mat(base, offs_r, offs_c, R, C):
    """[len(offs_r), len(offs_c)] fp32 row-major (R, C) matrix at ``base``; zeros outside."""
    m = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    return tl.load(base + offs_r[:, None] * C + offs_c[None, :], mask=m, other=0.0)


@triton.jit
def store_mat(base, offs_r, offs_c, R, C, x):
    """Stores ``x`` as the row-major (R, C) matrix at ``base`` (the real entries)."""
    m = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    tl.store(base + offs_r[:, None] * C + offs_c[None, :], x, mask=m)


@triton.jit
def load_state(base, offs_d, offs_e, D, E):
    """(S [D, E], z [D]) of a state packed as (S row-major | z) fp32 at ``base``."""
    z = tl.load(base + D * E + offs_d, mask=offs_d < D, other=0.0)
    return load_mat(base, offs_d, offs_e, D, E), z


@triton.jit
def partial_slot(P, pid_bh, M):
    """This program's slot P[bh, split] of a (B·h, n_split, M) partial workspace."""
    return P + (pid_bh * tl.num_programs(1) + tl.program_id(1)) * M


@triton.jit
def fold_vec(base, pid_bh, n_split, M, offs, n):
    """Σ_s of the vector at ``base`` in every slot of (bh, split) partials, in split order."""
    acc = tl.zeros(offs.shape, tl.float32)
    for s in range(n_split):
        acc += tl.load(base + (pid_bh * n_split + s) * M + offs, mask=offs < n, other=0.0)
    return acc


@triton.jit
def fold_mat(P, pid_bh, n_split, M, offs_r, offs_c, R, C):
    """Σ_s of the (R, C) matrix leading every slot of (bh, split) partials, in split order."""
    acc = tl.zeros([offs_r.shape[0], offs_c.shape[0]], tl.float32)
    for s in range(n_split):
        acc += load_mat(P + (pid_bh * n_split + s) * M, offs_r, offs_c, R, C)
    return acc


# --------------------------------------------------------------------------------------------
# the token-streaming reduction and the fold
# --------------------------------------------------------------------------------------------


@triton.jit
def gram_tiles(X, Y, MASK, b, sx, sy, smb, smn, N, t0, t1, offs_d, dmask, offs_e, emask,
               FEAT: tl.constexpr, HAS_MASK: tl.constexpr, COLSUM: tl.constexpr,
               SQ: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """(φ(X)ᵀY [BLOCK_D, BLOCK_E], Σφ(X) or ΣX² [BLOCK_D], ΣY² [BLOCK_E]) over token tiles
    [t0, t1) of one head (X, Y at this head; ``sx``, ``sy`` their (token, channel) strides),
    fp32, tiles in order."""
    acc = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    vec_x = tl.zeros([BLOCK_D], tl.float32)
    vec_y = tl.zeros([BLOCK_E], tl.float32)
    for t in range(t0, t1):
        rows, valid = tile_rows(t, N, BLOCK_M)
        valid = kept(MASK, b, rows, valid, smb, smn, HAS_MASK)
        x = load_rows(X, rows, offs_d, valid, dmask, sx)
        y = load_rows(Y, rows, offs_e, valid, emask, sy)
        xf = phi_tile(x, valid, dmask, FEAT)
        acc += mma(tl.trans(xf.to(x.dtype)), y, DOT_PRECISION)
        if COLSUM:
            vec_x += tl.sum(xf, 0)
        if SQ:
            vec_x += tl.sum(xf * xf, 0)
            yf = y.to(tl.float32)
            vec_y += tl.sum(yf * yf, 0)
    return acc, vec_x, vec_y


@triton.jit
def gram_partials_kernel(
    X, Y, MASK, P,
    sxb, sxh, sxn, sxd, syb, syh, syn, syd, smb, smn,
    n_heads, N, DX, DY, M, tiles_per_split,
    FEAT: tl.constexpr, HAS_MASK: tl.constexpr, COLSUM: tl.constexpr, SQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Partial (over this split's tokens) of φ(X)ᵀY [DX, DY], then Σφ(X) [DX] (COLSUM) or
    ΣX² [DX], ΣY² [DY] (SQ), packed row-major into P[bh, split, 0:M] (fp32).

    X: (B, h, N, DX), Y: (B, h, N, DY), MASK: (B, N) uint8, nonzero = padding token (skipped).
    """
    pid_bh, b, _ = head(n_heads)
    offs_d, dmask = lanes(BLOCK_D, DX)
    offs_e, emask = lanes(BLOCK_E, DY)
    t0, t1 = token_chunk(N, tiles_per_split, BLOCK_M)
    acc, vec_x, vec_y = gram_tiles(
        X + bh_offset(pid_bh, n_heads, sxb, sxh), Y + bh_offset(pid_bh, n_heads, syb, syh), MASK,
        b, (sxn, sxd), (syn, syd), smb, smn, N, t0, t1, offs_d, dmask, offs_e, emask, FEAT,
        HAS_MASK, COLSUM, SQ, DOT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_E)
    P = partial_slot(P, pid_bh, M)
    store_mat(P, offs_d, offs_e, DX, DY, acc)
    if COLSUM or SQ:
        tl.store(P + DX * DY + offs_d, vec_x, mask=dmask)
    if SQ:
        tl.store(P + DX * DY + DX + offs_e, vec_y, mask=emask)


@triton.jit
def fold_kernel(P, OUT, n_split, M, BLOCK: tl.constexpr):
    """OUT[r, :] = Σ_s P[r, s, :] summed in split order (deterministic)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + r * M + cols, fold_vec(P, r, n_split, M, cols, M), mask=cols < M)


# --------------------------------------------------------------------------------------------
# tile candidates (pure tuning) and declared capabilities
# --------------------------------------------------------------------------------------------

# Preferred tile (BLOCK_M, num_warps, num_stages) per token-streaming kernel and (BLOCK_D, fp32?),
# BLOCK_D the power-of-two class of max(d, e): the largest tile of the list (128, 4, 2),
# (64, 4, 2), (64, 8, 2), (32, 8, 2), (32, 8, 1), (16, 8, 1), (16, 16, 1) that compiled without
# register spills for sm_80 and sm_90 in a sweep (triton 3.9). A kernel's candidates are its
# preferred tile, then FALLBACK_TILES: which of them spill depends on the compiler, so the
# launcher keeps those that fit on the machine that runs them (tuning.py). Pure tuning: the
# inputs the backend takes are declared apart (each algorithm's ``MAX_HEAD_DIM``); a key missing
# here only means the fallbacks alone are candidates. Each algorithm has its own table; this one
# is the shared reduction's.
TILES = {
    "gram": {(16, False): (128, 4, 2), (32, False): (128, 4, 2), (64, False): (64, 4, 2),
             (128, False): (64, 8, 2),
             (16, True): (64, 4, 2), (32, True): (64, 4, 2), (64, True): (32, 8, 2)},
}

#: Candidates every token-streaming kernel also tries after its preferred tile: small enough to
#: fit in registers with the compilers we have met (8 warps: the d×d states held across the
#: token loop spread over more threads than with 4).
FALLBACK_TILES = ((32, 8, 1), (16, 8, 1))
FOLD_BLOCK = 1024
#: The hint of a refusal that only concerns the backward.
FORWARD_RUNS = "; the forward runs: call it without gradients"


def declared_reason(what: str, head_dim: int, fp32: bool, max_head_dim: dict,
                    backward: bool) -> str | None:
    """The refusal of ``head_dim`` by an algorithm that declares ``max_head_dim[pass, fp32]``
    (pass "forward" / "backward"; the backward only with ``backward``), or None."""
    reason = capability_reason(what, head_dim, fp32, max_head_dim["forward", fp32])
    if reason is None and backward:
        reason = capability_reason(f"{what} backward", head_dim, fp32,
                                   max_head_dim["backward", fp32], FORWARD_RUNS)
    return reason


def configs(preferred, fallback, name: str = "BLOCK_M") -> list:
    """``triton.Config``s from (tile, num_warps, num_stages) rows: ``preferred`` (None: none),
    then the ``fallback`` rows not already listed."""
    rows = dict.fromkeys(([tuple(preferred)] if preferred else []) + list(fallback))
    return [triton.Config({name: t}, num_warps=w, num_stages=s) for t, w, s in rows]


def dots(x: torch.Tensor) -> str:
    """DOT_PRECISION of a launch on ``x``: tf32x3 for fp32 inputs (fp32 accuracy), one TF32 pass
    where the user chose speed with torch's fp32 matmul precision, as every family does (see
    :func:`..attention_core.dot_precision`)."""
    return dot_precision(x.dtype)


def token_tiles(table: dict, kernel, floor: int = 0):
    """Candidates of a token-streaming kernel: its ``table`` entry for (max(floor, BLOCK_D,
    BLOCK_E, BLOCK_L), fp32?), then FALLBACK_TILES. ``kernel``: the table name, or a function of
    the launch's other constexprs that gives it (one jit kernel, several passes)."""
    def candidates(*, DOT_PRECISION, BLOCK_D, BLOCK_E=0, BLOCK_L=0, **flags):
        name = kernel(**flags) if callable(kernel) else kernel
        key = max(floor, BLOCK_D, BLOCK_E, BLOCK_L)
        return configs(table[name].get((key, DOT_PRECISION != "native")), FALLBACK_TILES)
    return candidates


def tile_launcher(kernel, candidates) -> Launcher:
    """The grids and partial buffers of this family depend on the tile, so its kernels are
    launched with Launcher.pick (see :func:`launch`), never autotuned: the key is unused."""
    return Launcher(kernel, candidates, ["N"])


gram_partials = tile_launcher(gram_partials_kernel, token_tiles(TILES, "gram"))
fold = tile_launcher(fold_kernel, lambda: [triton.Config({"BLOCK": FOLD_BLOCK}, num_warps=4)])


# --------------------------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_plan(t: torch.Tensor, bh: int, n: int, block_m: int) -> tuple[int, int]:
    """(n_split, tiles_per_split) for ``bh`` heads of ``n`` tokens: about 4 programs per SM on a
    GPU; under the interpreter up to 3 splits, so that small test shapes cross split boundaries."""
    return _split_sizes((t.device.index or 0) if t.is_cuda else None, bh, n, block_m)


@functools.lru_cache(maxsize=1024)
def _split_sizes(cuda_index: int | None, bh: int, n: int, block_m: int) -> tuple[int, int]:
    n_tiles = max(1, cdiv(n, block_m))
    want = 3 if cuda_index is None else max(1, cdiv(4 * _sm_count(cuda_index), max(bh, 1)))
    per = cdiv(n_tiles, min(want, n_tiles))
    return cdiv(n_tiles, per), per  # no empty split: each one writes its partial


def launch(launcher: Launcher, key, tensors: dict, setup, buffers=None):
    """Launch ``launcher``'s kernel with the candidate it picks (never autotuned: the grid, and
    buffers sized by it, depend on the tile).

    ``tensors``: this call's tensor arguments by name. ``setup()`` returns (constexprs,
    ``scalars(tile)``: the other runtime arguments, ``grid(tile)``) for a candidate's sizes
    ``tile``; it runs, with the choice of the candidate, once per ``key`` (a
    :func:`..tuning.launch_key` of everything it reads), so a repeated call binds nothing.
    ``buffers(tile)`` allocates this call's tile-sized buffers (a dict by name, passed to the
    kernel too), which are returned (None without)."""
    tile, kernel, static = launcher.memo(key, lambda: _plan(launcher, tensors, setup, buffers))
    extra = None if buffers is None else buffers(tile)
    if extra is None:
        kernel(**tensors, **static)
    else:
        kernel(**tensors, **extra, **static)
    return extra


def _plan(launcher: Launcher, tensors: dict, setup, buffers):
    """(tile, kernel bound to its grid, fixed keyword arguments) of :func:`launch`."""
    constexprs, scalars, grid = setup()

    def runtime():  # the preferred candidate's arguments: the spill probe's (first GPU call)
        tile = launcher.candidates(**constexprs)[0].kwargs
        return dict(scalars(tile), **tensors, **(buffers(tile) if buffers else {}))

    tile = launcher.pick(runtime, **constexprs)
    args = scalars(tile.kwargs)
    check_no_tensors(launcher.name, args)
    return (tile.kwargs, launcher.fn[grid(tile.kwargs)],
            dict(args, **constexprs, **tile.all_kwargs()))


def split_launch(launcher: Launcher, t: torch.Tensor, key, tensors: dict, setup,
                 part_len: int | None = None):
    """Split-N launch over the tokens of ``t`` (B, h, N, ·) (grid (B·h, n_split), see
    :func:`split_plan`): ``tensors`` this call's tensor arguments by name, ``setup()`` ->
    (the other runtime arguments but ``tiles_per_split``, constexprs), run once per ``key`` (see
    :func:`launch`). Returns ``P``, the (B·h, n_split, part_len) fp32 partial buffer allocated
    here when ``part_len`` is given (else None)."""
    bh, n = t.shape[0] * t.shape[1], t.shape[2]

    def sizes(tile):
        return split_plan(t, bh, n, tile["BLOCK_M"])

    def plan():
        args, constexprs = setup()
        return (constexprs, lambda tile: dict(args, tiles_per_split=sizes(tile)[1]),
                lambda tile: (bh, sizes(tile)[0]))

    def partials(tile):
        return dict(P=t.new_empty((bh, sizes(tile)[0], part_len), dtype=torch.float32))

    out = launch(launcher, key, tensors, plan, None if part_len is None else partials)
    return None if out is None else out["P"]


def head_args(t: torch.Tensor) -> dict:
    """The runtime arguments of a launch over the (B, h, N, ·) tokens of ``t``."""
    return dict(n_heads=t.shape[1], N=t.shape[2])


def stride_args(**tensors) -> dict:
    """The strides (``s<name>b``, …) of each (B, h, N, ·) tensor given by keyword."""
    out = {}
    for name, t in tensors.items():
        out.update(strides_of(name, t))
    return out


def mask_tensor(mask):
    """The (B, N) bool padding mask as the kernels read it (uint8, no copy), or None."""
    return None if mask is None else mask.view(torch.uint8)


def mask_strides(mask) -> dict:
    """The padding mask's strides (zero without one)."""
    return dict(smb=0, smn=0) if mask is None else dict(smb=mask.stride(0), smn=mask.stride(1))


def fold_partials(part: torch.Tensor) -> torch.Tensor:
    """(R, n_split, M) fp32 partials -> (R, M), in split order. One split: the partial itself."""
    r, n_split, m = part.shape
    if n_split == 1:
        return part[:, 0]
    out = part.new_empty((r, m))
    launch(fold, part.shape, dict(P=part, OUT=out),
           lambda: ({}, lambda tile: dict(n_split=n_split, M=m),
                    lambda tile: (r, cdiv(m, tile["BLOCK"]))))
    return out


def gram(x, y, mask, feat: int, colsum: bool, sq: bool) -> torch.Tensor:
    """(B·h, n_split, M) fp32 partials of φ(x)ᵀy (+ Σφ(x) or Σx², Σy²) — see the kernel."""
    dx, dy = x.shape[-1], y.shape[-1]
    m = dx * dy + (dx if (colsum or sq) else 0) + (dy if sq else 0)

    def setup():
        return (dict(stride_args(x=x, y=y), **mask_strides(mask), **head_args(x), DX=dx, DY=dy,
                     M=m),
                dict(FEAT=feat, HAS_MASK=mask is not None, COLSUM=colsum, SQ=sq,
                     DOT_PRECISION=dots(x), BLOCK_D=block_d(dx), BLOCK_E=block_d(dy)))
    return split_launch(gram_partials, x, launch_key(x, y, mask, feat, colsum, sq),
                        dict(X=x, Y=y, MASK=mask_tensor(mask)), setup, part_len=m)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specialisations (tests/test_aot_compile.py: one candidate of each fits)
# --------------------------------------------------------------------------------------------

_FP32_PTRS = ("P", "ST", "TEMP", "G", "GN", "NORMS", "A", "DG", "CQ", "CK", "CKP", "DTP",
              "OUT", "W2", "DW")


def _aot_signature(fn, ptr_dtype: str) -> tuple[dict, dict]:
    """Runtime-arg types of a launch on q, k, v viewed out of a packed projection (see
    :func:`..aot.launch_signature`); state / partial pointers fp32, the padding mask uint8, the
    mask's strides plain ints."""
    pointers = {n: f"*{ptr_dtype}"
                for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "X", "Y", "L")}
    pointers.update({n: "*fp32" for n in _FP32_PTRS}, MASK="*u8")
    from ..aot import launch_signature

    return launch_signature(fn, pointers, plain=("smb", "smn"))


def aot_spec(kname: str, launcher: Launcher, dtype: str, sizes: dict, flags: dict | None = None):
    """The AOT specialisation ``linear.<kname>[<dtype>,<sizes>]`` of ``launcher`` with the
    constexprs ``flags`` and block ``sizes`` (BLOCK_E follows BLOCK_D unless given; the
    DOT_PRECISION of ``dtype``)."""
    from ..aot import spec_from_launcher

    meta = {**(flags or {}), **sizes}
    if "DOT_PRECISION" in launcher.fn.arg_names:
        meta["DOT_PRECISION"] = aot_precision(dtype)
    if "BLOCK_E" in launcher.fn.arg_names and "BLOCK_E" not in sizes:
        meta["BLOCK_E"] = sizes["BLOCK_D"]
    shape = ",".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in sizes.items())
    sig, const = _aot_signature(launcher.fn, dtype)
    name = f"linear.{kname}[{dtype},{shape}]" if sizes else f"linear.{kname}"
    return spec_from_launcher(name, launcher, sig, const, meta)


def aot_specs():
    """The shared reduction in fp16 at BLOCK_D 64 with its most general specialisation (elu+1,
    mask, column sums) and in fp32 (tf32x3) at BLOCK_D 32, and the fold."""
    flags = dict(FEAT=2, HAS_MASK=True, COLSUM=True, SQ=False)
    return [aot_spec("gram", gram_partials, "fp16", dict(BLOCK_D=64), flags),
            aot_spec("gram", gram_partials, "fp32", dict(BLOCK_D=32), flags),
            aot_spec("fold", fold, "fp32", {})]
