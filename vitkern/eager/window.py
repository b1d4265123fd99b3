"""Swin window attention, eager backend: :func:`vitkern.reference.window.window_attention` as one
row gather per input, ``F.scaled_dot_product_attention`` per group of equally-masked windows, and
one row gather back.

The reference (and timm's eager path) roll, pad and partition each of q, k, v (three copies
each), materialise the (B, heads, nW, T, T) logits, add the bias and the shift mask to them (two
more passes), softmax them and undo the partition (three copies again). Here:

* The roll, the padding and the window partition are one index: every token row (heads·d
  values, a view of the packed projection) is gathered once, by ``index_select``, into
  (windows, T, heads, d) order, handed to SDPA as a strided view. Pad slots are zeroed in k and
  v in place (pad queries are never read back).
* PyTorch's fused CPU attention (SDPA's flash kernel) does q·kᵀ, the mask, the softmax and ·v
  per block without writing the logits to memory.
* The shift mask takes at most four patterns (interior windows, the last window row, the last
  window column, the corner). Windows are gathered grouped by pattern, and each group runs one
  SDPA call whose additive mask, bias + that pattern, is a single (1, heads, T, T) tensor
  broadcast over the group's windows: no (nW, heads, T, T) mask is ever built (at 384² it would
  be 21 MB per call).
  Patterns of few windows are merged into one call with a mask per window (see _schedule): a
  2×2 window grid (Swin's third stage) runs one call instead of four, measured ~8 % faster on
  one core; one call with a mask per window for the whole map measured up to 30 % slower at
  56² and 96².
* The output rows (d values per head) are gathered back into raster order by one
  ``index_select``, stored (B, N, heads, d) and returned as a (B, heads, N, d) view, so
  ``o.transpose(1, 2).reshape(B, N, heads * d)`` is free (the layout of the GPU kernels).
* A map that is one window without shift or padding (the last Swin stage) needs no gather at
  all: SDPA runs on q, k, v as given (and its (B, heads, N, d) output is returned).

Measured on one CPU core (fp32 forward, batch 1, every Swin-T / Swin-B stage at 224² and 384²
of ``bench/bench_window.py``): 0.2-0.5x the reference's time, and 0.3-0.65x that of the
fastest PyTorch baseline (timm's math on rolled, partitioned windows, or SDPA on them with
timm's bias + shift mask).

Index tensors depend only on the geometry and are cached per (map, window, shift, pad order,
batch, heads, device). The bias gathered from the table and the masks are built per call (the
table is a parameter that can change between calls). With ``active_windows`` only the listed
windows are gathered and computed, and the tokens of the others are zeroed.

Gradients: autograd through ``index_select``, SDPA and the bias gather. While the bias needs a
gradient, SDPA runs its composite math path (its fused CPU kernel has no mask gradient), whose
batched small matmuls dominate as in the reference: forward + backward measured as fast as the
reference then; with a frozen bias (or none) SDPA's fused forward and backward run, ~1.5x faster.

Same arguments, dtypes and results as the reference (see its module docstring).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern.reference import window as ref

__all__ = ["window_attention"]

#: extra mask elements (fp32: 256 KiB, cache-resident) a pattern may add to join the merged SDPA
#: call (see :func:`_schedule`). On Swin's shapes (one CPU core) merging the 4- and 7-window
#: border patterns this allows measured within noise of separate calls (±3 %), merging the
#: 1-window patterns ~8 % faster, and merging the 49-window interior 10-30 % slower.
_MERGE_ELEMS = 1 << 16


def _cached(fn):
    """``functools.lru_cache``, building the cached tensors as normal tensors even when the first
    call runs under ``torch.inference_mode`` (autograd cannot save an inference tensor, e.g. the
    index of an ``index_select``, for a later training call)."""
    @functools.lru_cache(maxsize=64)
    @functools.wraps(fn)
    def build(*args):
        with torch.inference_mode(False):
            return fn(*args)
    return build


class _Geometry(NamedTuple):
    """Index tensors of one (map, effective window, shift, pad order) on one device."""

    N: int                     # tokens of the map
    T: int                     # slots per window (wh·ww)
    tok: Tensor                # (nW, T) raster token of each window slot, -1 at pad slots
    padded: bool               # some slot is pad
    group: Tensor              # (nW,) int64 shift-mask pattern of each window
    differ: Optional[Tensor]   # (G, T, T) bool: slot pairs in different regions; None: no shift
    rel_index: Tensor          # (T·T,) int64 Swin's relative-position index into the table
    identity: bool             # one window, no shift, no pad: the gather would be a no-op


@_cached
def _geometry(H: int, W: int, wh: int, ww: int, sh: int, sw: int, pad_order: str,
              device: torch.device) -> _Geometry:
    tok = ref.window_token_ids((H, W), (wh, ww), (sh, sw), pad_order, device, clamp=None)
    nW, T = tok.shape
    if sh or sw:
        gh, gw = -(-H // wh), -(-W // ww)
        rid = (ref._region_ids(gh * wh, wh, sh, device)[:, None] * 3
               + ref._region_ids(gw * ww, ww, sw, device)[None, :])
        rid = rid.reshape(gh, wh, gw, ww).transpose(1, 2).reshape(nW, T)
        # windows with the same region ids per slot have the same mask (at most 4 patterns)
        patterns, group = torch.unique(rid, dim=0, return_inverse=True)
        differ = patterns[:, :, None] != patterns[:, None, :]
    else:
        group, differ = torch.zeros(nW, dtype=torch.long, device=device), None
    identity = nW == 1 and not (sh or sw) and bool(
        (tok[0] == torch.arange(H * W, device=device)).all())
    return _Geometry(H * W, T, tok, bool((tok < 0).any()), group, differ,
                     ref.relative_position_index((wh, ww), device).reshape(-1), identity)


class _Plan(NamedTuple):
    """Which windows run, in which order and which SDPA call, and where their rows come from and
    go to. A unit is one window of one image."""

    rows: Tensor               # (U·T,) rows of the (B·N, heads·d) token matrix, unit-major
    pad: Optional[Tensor]      # positions in ``rows`` that are pad slots (k, v zeroed there)
    calls: tuple               # ((units, pattern), ...): consecutive units per SDPA call;
    #                            pattern None: the merged call, one mask per unit (``merged``)
    merged: Optional[Tensor]   # (units of the merged call,) the mask pattern of each
    src: Tensor                # (B·N·heads,) row of the (U·heads·T, d) output per (b, n, head)
    missing: Optional[Tensor]  # (B, N, 1, 1) bool: token in no computed window (active only)


def _schedule(counts: list, h: int, T: int) -> tuple[list, list]:
    """The SDPA calls for ``counts[g]`` units of each mask pattern g: (pattern order, calls).

    A pattern's units share one (1, heads, T, T) mask broadcast over them. Small patterns (the
    border rows and columns of the window grid hold few windows) are merged into one call with a
    mask per unit instead: that mask costs (units - 1)·heads·T² more elements than the shared
    one. Patterns of one window always merge (no extra mask; one call instead of several)."""
    alone = [g for g, c in enumerate(counts) if c and (c - 1) * h * T * T > _MERGE_ELEMS]
    merged = [g for g, c in enumerate(counts) if c and g not in alone]
    if len(merged) == 1:
        alone, merged = alone + merged, []
    calls = [(counts[g], g) for g in alone]
    if merged:
        calls.append((sum(counts[g] for g in merged), None))
    return alone + merged, calls


def _make_plan(geo: _Geometry, ub: Tensor, uw: Tensor, counts: list, B: int, h: int,
               sparse: bool) -> _Plan:
    """The plan of units (image ``ub[u]``, window ``uw[u]``), in any order; ``counts[g]``: how
    many have mask pattern g."""
    N, T = geo.N, geo.T
    device = ub.device
    order, calls = _schedule(counts, h, T)
    rank = torch.empty(len(counts), dtype=torch.long, device=device)
    rank[torch.tensor(order, dtype=torch.long, device=device)] = torch.arange(
        len(order), device=device)
    pattern = geo.group[uw]
    by_call = torch.argsort(rank[pattern], stable=True)  # units in call order
    ub, uw, pattern = ub[by_call], uw[by_call], pattern[by_call]
    merged = None
    if calls and calls[-1][1] is None:
        merged = pattern[pattern.numel() - calls[-1][0]:]
    slots = geo.tok[uw]  # (U, T)
    rows = (ub[:, None] * N + slots.clamp(min=0)).reshape(-1)
    is_pad = (slots < 0).reshape(-1)
    pad = is_pad.nonzero().squeeze(1) if geo.padded else None
    # pos[b·N + n] = u·T + t: the unit and slot that hold token n of image b (-1: none)
    pos = torch.full((B * N,), -1, dtype=torch.long, device=device)
    real = ~is_pad
    pos[rows[real]] = torch.arange(rows.numel(), device=device)[real]
    missing = None
    if sparse:
        missing = (pos < 0).view(B, N, 1, 1)
        pos = pos.clamp(min=0)
    heads = torch.arange(h, device=device)
    src = (((pos // T)[:, None] * h + heads) * T + (pos % T)[:, None]).reshape(-1)
    return _Plan(rows, pad, tuple(calls), merged, src, missing)


def _n_patterns(geo: _Geometry) -> int:
    return 1 if geo.differ is None else geo.differ.shape[0]


@_cached
def _dense_plan(key: tuple, B: int, h: int) -> _Plan:
    """Every window of every image (cached: geometry only)."""
    geo = _geometry(*key)
    device = geo.tok.device
    nW = geo.tok.shape[0]
    ub = torch.arange(B, device=device).repeat_interleave(nW)
    uw = torch.arange(nW, device=device).repeat(B)
    counts = (torch.bincount(geo.group, minlength=_n_patterns(geo)) * B).tolist()
    return _make_plan(geo, ub, uw, counts, B, h, sparse=False)


def _sparse_plan(geo: _Geometry, active: Tensor, h: int) -> _Plan:
    """The windows of ``active`` (B, K) (per call: the ids are data)."""
    B, K = active.shape
    uw = active.long().reshape(-1)
    counts = torch.bincount(geo.group[uw], minlength=_n_patterns(geo)).tolist()
    ub = torch.arange(B, device=uw.device).repeat_interleave(K)
    return _make_plan(geo, ub, uw, counts, B, h, sparse=True)


@_cached
def _pattern_masks(key: tuple, dtype: torch.dtype, mask_value: float) -> Tensor:
    """(G, 1, 1, T, T) additive shift masks (0 / ``mask_value``) in ``dtype``."""
    geo = _geometry(*key)
    zero = torch.zeros((), dtype=dtype, device=geo.differ.device)
    return torch.where(geo.differ, torch.full((), mask_value, dtype=dtype,
                                              device=zero.device), zero)[:, None, None]


def _bias(rel_pos_bias: Optional[Tensor], geo: _Geometry, h: int, dtype) -> Optional[Tensor]:
    """(1, heads, T, T) bias in the compute dtype (the reference adds it in the logits' dtype),
    contiguous (SDPA would copy a strided mask)."""
    if rel_pos_bias is None:
        return None
    T = geo.T
    if rel_pos_bias.shape == (h, T, T):  # dense, as the reference tells them apart
        return rel_pos_bias.to(dtype).reshape(1, h, T, T)
    # the table's columns gathered by the relative index: (heads, T·T) in one pass
    return rel_pos_bias.to(dtype).t().index_select(1, geo.rel_index).view(1, h, T, T)


def _token_rows(t: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B·N, heads·d): a view for q, k, v sliced from one packed projection
    (and any (B, N, heads, d)-stored tensor), a copy otherwise."""
    B, h, N, d = t.shape
    return t.transpose(1, 2).reshape(B * N, h * d)


def window_attention(q: Tensor, k: Tensor, v: Tensor, *, hw, window_size, shift=0,
                     rel_pos_bias: Optional[Tensor] = None, mask_value: float = -100.0,
                     scale: Optional[float] = None, pad_order: str = "shift_then_pad",
                     active_windows: Optional[Tensor] = None, clamp="swin") -> Tensor:
    """:func:`vitkern.reference.window.window_attention`, fast: (B, heads, N, d), zeros at the
    tokens of windows not in ``active_windows`` (stored (B, N, heads, d))."""
    B, h, N, d = q.shape
    if q.numel() == 0:
        return ref.window_attention(q, k, v, hw=hw, window_size=window_size, shift=shift,
                                    rel_pos_bias=rel_pos_bias, mask_value=mask_value,
                                    scale=scale, pad_order=pad_order,
                                    active_windows=active_windows, clamp=clamp)
    H, W = hw
    (wh, ww), (sh, sw) = ref.effective_window((H, W), window_size, shift, clamp)
    scale = d ** -0.5 if scale is None else scale
    key = (H, W, wh, ww, sh, sw, pad_order, q.device)  # the caches' key: geometry only
    geo = _geometry(*key)
    bias = _bias(rel_pos_bias, geo, h, q.dtype)
    masks = None if geo.differ is None else _pattern_masks(key, q.dtype, float(mask_value))

    def mask_of(g: int) -> Optional[Tensor]:
        if masks is None:
            return bias
        return masks[g] if bias is None else masks[g] + bias  # (1, heads or 1, T, T)

    if geo.identity and active_windows is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_of(0), scale=scale)

    if active_windows is None:
        plan = _dense_plan(key, B, h)
    else:
        plan = _sparse_plan(geo, active_windows, h)
        if not plan.calls:  # K = 0: zeros, still on the inputs' graph (zero gradients)
            o = q.new_zeros((B, N, h, d))
            for t in (q, k, v, rel_pos_bias):
                if t is not None and t.requires_grad:
                    o = o + t[:0].sum()  # an empty slice: exactly 0, no 0·inf
            return o.transpose(1, 2)
    U = plan.rows.numel() // geo.T

    def gather(t: Tensor, zero_pad: bool) -> Tensor:
        rows = _token_rows(t).index_select(0, plan.rows)
        if zero_pad and plan.pad is not None:
            rows.index_fill_(0, plan.pad, 0.0)  # pad keys / values are zeros
        return rows.view(U, geo.T, h, d).transpose(1, 2)  # (U, heads, T, d), strided

    qw, kw, vw = gather(q, False), gather(k, True), gather(v, True)
    outs, u0 = [], 0
    for n, g in plan.calls:
        s = slice(u0, u0 + n)
        if g is None:  # merged call: each unit's pattern, plus the bias (n, heads or 1, T, T)
            mask = masks[plan.merged, 0]
            mask = mask if bias is None else mask + bias
        else:
            mask = mask_of(g)
        outs.append(F.scaled_dot_product_attention(qw[s], kw[s], vw[s], attn_mask=mask,
                                                   scale=scale))
        u0 += n
    o = outs[0] if len(outs) == 1 else torch.cat(outs)  # (U, heads, T, d)
    out = o.reshape(-1, d).index_select(0, plan.src).view(B, N, h, d)
    if plan.missing is not None:
        out.masked_fill_(plan.missing, 0.0)
    return out.transpose(1, 2)
