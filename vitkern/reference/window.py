"""Swin window attention (W-MSA / SW-MSA), the definition: pure PyTorch, differentiable, fp64.

Layout: q, k, v are (B, heads, N, d) with N = H·W tokens in raster order (n = r·W + c).
The math is Swin v1's ``WindowAttention`` (microsoft/Swin-Transformer, timm), applied to q, k, v
that are already projected:

* Effective window: if min(H, W) <= window_size, the window becomes global (ws = min(H, W)) and the
  shift becomes 0 (Swin's rule for the last stage, e.g. a 7×7 map with ws = 7).
* Cyclic shift by ``shift`` (SW-MSA): the map is rolled by (-shift, -shift) before partitioning
  and rolled back afterwards. Windows whose tokens come from different regions of the rolled map
  get ``mask_value`` (-100, not -inf, as in every reference) added to the logits of mixed pairs.
  Region ids are Swin's: on each axis of the (padded) grid the slices [0, P-ws), [P-ws, P-s),
  [P-s, P), id = 3·row_slice + col_slice.
* Padding when H or W is not a multiple of ws (right / bottom, zero keys and values, unmasked —
  they take part in every softmax of their window; pad queries are dropped):
  ``pad_order="shift_then_pad"`` (timm: roll the H×W map, then pad) or ``"pad_then_shift"``
  (mmdet / SparseViT: pad, then roll the padded map). Both build the mask on the padded grid and
  are identical for divisible maps. timm's order lets real tokens from opposite edges share a
  window region for some sizes (H mod ws > shift); it is reproduced exactly, for parity.
* ``rel_pos_bias``: either Swin's learnable table ((2ws-1)², heads), indexed by
  idx(i, j) = (hi - hj + ws - 1)·(2ws - 1) + (wi - wj + ws - 1) for tokens i = (hi, wi),
  j = (hj, wj) of a window, or a dense (heads, ws², ws²) bias (e.g. Swin V2's
  16·sigmoid(cpb_mlp(...))). Its size is that of the *effective* window. Added after scaling,
  before the mask.
* logits = scale · q·k + bias + mask, scale = d^-0.5 by default; softmax over the window's keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["window_attention", "effective_window", "relative_position_index", "PAD_ORDERS"]

PAD_ORDERS = ("shift_then_pad", "pad_then_shift")


def effective_window(hw: tuple[int, int], window_size: int, shift: int) -> tuple[int, int]:
    """(ws, shift) actually used: Swin's global window with no shift when min(H, W) <= ws."""
    if min(hw) <= window_size:
        return min(hw), 0
    return window_size, shift


def relative_position_index(ws: int, device=None) -> torch.Tensor:
    """(ws², ws²) int64 index into the ((2ws-1)², heads) bias table, Swin's construction."""
    r = torch.arange(ws, device=device)
    hi = r.repeat_interleave(ws)  # token i = hi * ws + wi
    wi = r.repeat(ws)
    dh = hi[:, None] - hi[None, :] + ws - 1
    dw = wi[:, None] - wi[None, :] + ws - 1
    return dh * (2 * ws - 1) + dw


def _region_ids(P: int, ws: int, s: int, device) -> torch.Tensor:
    """Swin's per-axis slice id (0, 1, 2) of every position of a padded axis of length P."""
    ids = torch.zeros(P, dtype=torch.long, device=device)
    ids[P - ws:] = 1
    ids[P - s:] = 2
    return ids


def dense_bias(rel_pos_bias: torch.Tensor, ws: int, heads: int) -> torch.Tensor:
    """(heads, ws², ws²) bias from a table ((2ws-1)², heads) or a dense bias (returned as is)."""
    n = ws * ws
    if rel_pos_bias.shape == (heads, n, n):
        return rel_pos_bias
    idx = relative_position_index(ws, rel_pos_bias.device)
    return rel_pos_bias[idx.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)


def window_attention(q, k, v, *, hw, window_size, shift=0, rel_pos_bias=None, mask_value=-100.0,
                     scale=None, pad_order="shift_then_pad"):
    """Swin window attention of (B, heads, N, d) q, k, v. Returns (B, heads, N, d)."""
    B, h, N, d = q.shape
    H, W = hw
    ws, s = effective_window((H, W), window_size, shift)
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    scale = d ** -0.5 if scale is None else scale

    def to_windows(t):  # (B, h, N, d) -> (B, h, nWh, nWw, ws*ws, d) in the shifted, padded frame
        t = t.reshape(B, h, H, W, d)
        pad = (0, 0, 0, Wp - W, 0, Hp - H)
        if pad_order == "shift_then_pad":
            t = F.pad(torch.roll(t, (-s, -s), (2, 3)) if s else t, pad)
        else:
            t = F.pad(t, pad)
            t = torch.roll(t, (-s, -s), (2, 3)) if s else t
        t = t.reshape(B, h, Hp // ws, ws, Wp // ws, ws, d).transpose(3, 4)
        return t.reshape(B, h, Hp // ws, Wp // ws, ws * ws, d)

    logits = (to_windows(q) * scale) @ to_windows(k).transpose(-1, -2)
    if rel_pos_bias is not None:
        bias = dense_bias(rel_pos_bias, ws, h).to(logits.dtype)
        logits = logits + bias[None, :, None, None]
    if s:
        rid = (_region_ids(Hp, ws, s, q.device)[:, None] * 3
               + _region_ids(Wp, ws, s, q.device)[None, :])
        rid = rid.reshape(Hp // ws, ws, Wp // ws, ws).transpose(1, 2)
        rid = rid.reshape(Hp // ws, Wp // ws, ws * ws)
        mask = torch.where(rid[..., :, None] != rid[..., None, :],
                           torch.tensor(float(mask_value), dtype=logits.dtype, device=q.device),
                           torch.tensor(0.0, dtype=logits.dtype, device=q.device))
        logits = logits + mask
    o = torch.softmax(logits, dim=-1) @ to_windows(v)  # (B, h, nWh, nWw, ws*ws, d)
    o = o.reshape(B, h, Hp // ws, Wp // ws, ws, ws, d).transpose(3, 4).reshape(B, h, Hp, Wp, d)
    if pad_order == "shift_then_pad":
        o = o[:, :, :H, :W]
        o = torch.roll(o, (s, s), (2, 3)) if s else o
    else:
        o = torch.roll(o, (s, s), (2, 3)) if s else o
        o = o[:, :, :H, :W]
    return o.reshape(B, h, N, d)
