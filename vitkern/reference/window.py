"""Swin window attention (W-MSA / SW-MSA), the definition: pure PyTorch, differentiable, fp64.

Layout: q, k, v are (B, heads, N, d) with N = H·W tokens in raster order (n = r·W + c).
The math is Swin v1's ``WindowAttention`` (microsoft/Swin-Transformer, timm), applied to q, k, v
that are already projected. Windows are wh × ww (``window_size`` an int or a pair) with a cyclic
shift (sh, sw) (``shift`` an int or a pair, each smaller than its window side):

* Effective window (``clamp``): "swin" (default; Swin's rule for square windows): if
  min(H, W) <= ws the window becomes global (ws = min(H, W)) and the shift 0, e.g. a 7×7 map
  with ws = 7. "per_axis" (timm's ``SwinTransformerBlock``): along each axis whose extent is not
  larger than the window side, that side becomes the extent and that shift 0 (non-square windows
  on non-square small maps). None: the window and shift as given (timm's ``always_partition``:
  a window larger than the map is padded).
* Cyclic shift (SW-MSA): the map is rolled by (-sh, -sw) before partitioning and rolled back
  afterwards. Pairs of tokens from different regions of the rolled map get ``mask_value`` (-100,
  not -inf, as in every reference) added. Region ids are Swin's: on each axis of the (padded)
  grid the slices [0, P-w), [P-w, P-s), [P-s, P), id = 3·row_slice + col_slice (an axis without
  shift has one region inside every window).
* Padding when H or W is not a multiple of the window side (right / bottom, zero keys and values,
  unmasked — they take part in every softmax of their window; pad queries are dropped):
  ``pad_order="shift_then_pad"`` (timm: roll the H×W map, then pad) or ``"pad_then_shift"``
  (mmdet / SparseViT: pad, then roll the padded map). Both build the mask on the padded grid and
  are identical for divisible maps. timm's order lets real tokens from opposite edges share a
  window region for some sizes (H mod ws > shift); it is reproduced exactly, for parity.
* ``rel_pos_bias``: either Swin's learnable table ((2wh-1)(2ww-1), heads), indexed by
  idx(i, j) = (hi - hj + wh - 1)·(2ww - 1) + (wi - wj + ww - 1) for tokens i = (hi, wi),
  j = (hj, wj) of a window, or a dense (heads, wh·ww, wh·ww) bias (e.g. Swin V2's
  16·sigmoid(cpb_mlp(...))). Its size is that of the *effective* window. Added after scaling,
  before the mask.
* logits = scale · q·k + bias + mask, scale = d^-0.5 by default; softmax over the window's keys.
* ``active_windows`` (SparseViT): a (B, K) int tensor of window ids per image, in the windows of
  the shifted, padded frame (raster over its (Hp/wh) × (Wp/ww) window grid, the order Swin's
  ``window_partition`` gives after the roll). Only those windows are computed; the output of the
  tokens of every other window is 0 and no gradient flows through them. Windows do not interact,
  so this is the dense result times the kept-token mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["window_attention", "effective_window", "relative_position_index", "PAD_ORDERS",
           "CLAMPS", "window_grid", "window_token_ids", "active_token_mask", "pair"]

PAD_ORDERS = ("shift_then_pad", "pad_then_shift")
CLAMPS = ("swin", "per_axis", None)


def pair(x) -> tuple[int, int]:
    """An int or a pair of ints as a pair."""
    return (x[0], x[1]) if isinstance(x, (tuple, list)) else (x, x)


def effective_window(hw: tuple[int, int], window_size, shift=0, clamp="swin"
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((wh, ww), (sh, sw)) actually used on an H×W map (see ``clamp`` in the module docstring)."""
    (wh, ww), (sh, sw) = pair(window_size), pair(shift)
    H, W = hw
    if clamp == "swin":
        if wh != ww:
            raise ValueError(f"clamp='swin' takes a square window, got {(wh, ww)}")
        if min(H, W) <= wh:
            return (min(H, W),) * 2, (0, 0)
    elif clamp == "per_axis":
        if H <= wh:
            wh, sh = H, 0
        if W <= ww:
            ww, sw = W, 0
    return (wh, ww), (sh, sw)


def relative_position_index(window_size, device=None) -> torch.Tensor:
    """(wh·ww, wh·ww) int64 index into the ((2wh-1)(2ww-1), heads) bias table, Swin's
    construction (``window_size`` an int or a pair)."""
    wh, ww = pair(window_size)
    hi = torch.arange(wh, device=device).repeat_interleave(ww)  # token i = hi * ww + wi
    wi = torch.arange(ww, device=device).repeat(wh)
    dh = hi[:, None] - hi[None, :] + wh - 1
    dw = wi[:, None] - wi[None, :] + ww - 1
    return dh * (2 * ww - 1) + dw


def window_grid(hw: tuple[int, int], window_size, shift=0, clamp="swin") -> tuple[int, int]:
    """(rows, cols) of the window grid of the padded frame, for the effective window."""
    (wh, ww), _ = effective_window(hw, window_size, shift, clamp)
    return -(-hw[0] // wh), -(-hw[1] // ww)


def window_token_ids(hw: tuple[int, int], window_size, shift=0,
                     pad_order: str = "shift_then_pad", device=None, clamp="swin"
                     ) -> torch.Tensor:
    """(nW, wh·ww) int64: the raster token (r·W + c) at each (window, slot) of the shifted,
    padded frame, -1 at pad positions (effective window / shift; see the module docstring)."""
    H, W = hw
    (wh, ww), (sh, sw) = effective_window(hw, window_size, shift, clamp)
    gh, gw = -(-H // wh), -(-W // ww)
    Hp, Wp = gh * wh, gw * ww
    rp = torch.arange(Hp, device=device)
    cp = torch.arange(Wp, device=device)
    if pad_order == "shift_then_pad":  # roll the H×W map, then pad: frame rows >= H are pad
        r = torch.where(rp < H, (rp + sh) % H, H)
        c = torch.where(cp < W, (cp + sw) % W, W)
    else:  # pad, then roll the padded map
        r, c = (rp + sh) % Hp, (cp + sw) % Wp
    tok = torch.where((r[:, None] < H) & (c[None, :] < W), r[:, None] * W + c[None, :], -1)
    return tok.reshape(gh, wh, gw, ww).transpose(1, 2).reshape(gh * gw, wh * ww)


def active_token_mask(hw: tuple[int, int], window_size, shift, active_windows: torch.Tensor,
                      pad_order: str = "shift_then_pad", clamp="swin") -> torch.Tensor:
    """(B, H·W) bool: the tokens that lie in one of the kept windows of each image."""
    ids = window_token_ids(hw, window_size, shift, pad_order, active_windows.device, clamp)
    B = active_windows.shape[0]
    kept = ids[active_windows.long()].reshape(B, -1)  # (B, K·wh·ww), -1 = pad
    mask = torch.zeros(B, hw[0] * hw[1] + 1, dtype=torch.bool, device=active_windows.device)
    mask.scatter_(1, torch.where(kept < 0, hw[0] * hw[1], kept), True)
    return mask[:, :-1]


def _region_ids(P: int, w: int, s: int, device) -> torch.Tensor:
    """Swin's per-axis slice id (0, 1, 2) of every position of a padded axis of length P."""
    ids = torch.zeros(P, dtype=torch.long, device=device)
    ids[P - w:] = 1
    ids[P - s:] = 2  # s = 0: nothing (one region inside every window)
    return ids


def dense_bias(rel_pos_bias: torch.Tensor, window_size, heads: int) -> torch.Tensor:
    """(heads, n, n) bias (n = wh·ww) from a table ((2wh-1)(2ww-1), heads) or a dense bias
    (returned as is)."""
    wh, ww = pair(window_size)
    n = wh * ww
    if rel_pos_bias.shape == (heads, n, n):
        return rel_pos_bias
    idx = relative_position_index((wh, ww), rel_pos_bias.device)
    return rel_pos_bias[idx.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)


def window_attention(q, k, v, *, hw, window_size, shift=0, rel_pos_bias=None, mask_value=-100.0,
                     scale=None, pad_order="shift_then_pad", active_windows=None, clamp="swin"):
    """Swin window attention of (B, heads, N, d) q, k, v. Returns (B, heads, N, d) (zeros at the
    tokens of windows not in ``active_windows``, when given)."""
    B, h, N, d = q.shape
    H, W = hw
    (wh, ww), (sh, sw) = effective_window((H, W), window_size, shift, clamp)
    gh, gw = -(-H // wh), -(-W // ww)
    Hp, Wp = gh * wh, gw * ww
    scale = d ** -0.5 if scale is None else scale
    shifted = bool(sh or sw)

    def to_windows(t):  # (B, h, N, d) -> (B, h, gh, gw, wh*ww, d) in the shifted, padded frame
        t = t.reshape(B, h, H, W, d)
        pad = (0, 0, 0, Wp - W, 0, Hp - H)
        if pad_order == "shift_then_pad":
            t = F.pad(torch.roll(t, (-sh, -sw), (2, 3)) if shifted else t, pad)
        else:
            t = F.pad(t, pad)
            t = torch.roll(t, (-sh, -sw), (2, 3)) if shifted else t
        t = t.reshape(B, h, gh, wh, gw, ww, d).transpose(3, 4)
        return t.reshape(B, h, gh, gw, wh * ww, d)

    logits = (to_windows(q) * scale) @ to_windows(k).transpose(-1, -2)
    if rel_pos_bias is not None:
        bias = dense_bias(rel_pos_bias, (wh, ww), h).to(logits.dtype)
        logits = logits + bias[None, :, None, None]
    if shifted:
        rid = (_region_ids(Hp, wh, sh, q.device)[:, None] * 3
               + _region_ids(Wp, ww, sw, q.device)[None, :])
        rid = rid.reshape(gh, wh, gw, ww).transpose(1, 2).reshape(gh, gw, wh * ww)
        mask = torch.where(rid[..., :, None] != rid[..., None, :],
                           torch.tensor(float(mask_value), dtype=logits.dtype, device=q.device),
                           torch.tensor(0.0, dtype=logits.dtype, device=q.device))
        logits = logits + mask
    o = torch.softmax(logits, dim=-1) @ to_windows(v)  # (B, h, gh, gw, wh*ww, d)
    o = o.reshape(B, h, gh, gw, wh, ww, d).transpose(3, 4).reshape(B, h, Hp, Wp, d)
    if pad_order == "shift_then_pad":
        o = o[:, :, :H, :W]
        o = torch.roll(o, (sh, sw), (2, 3)) if shifted else o
    else:
        o = torch.roll(o, (sh, sw), (2, 3)) if shifted else o
        o = o[:, :, :H, :W]
    o = o.reshape(B, h, N, d)
    if active_windows is not None:
        keep = active_token_mask((H, W), (wh, ww), (sh, sw), active_windows, pad_order, None)
        o = torch.where(keep[:, None, :, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
    return o
