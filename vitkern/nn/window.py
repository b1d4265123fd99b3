"""Drop-in Swin window attention on vitkern's fused op, and SparseViT helpers.

* :class:`WindowAttention` — timm's Swin (V1) ``WindowAttention``: same constructor, parameters
  and ``state_dict`` (``qkv``, ``proj``, ``relative_position_bias_table``; the non-persistent
  ``relative_position_index`` buffer is recomputed), so timm / Swin checkpoints load unchanged.
  Called on the whole (B, H, W, C) map with the block's shift, it does roll / pad / partition /
  mask inside the op (no copies); called like timm's module on partitioned (B·nW, N, C) windows
  it gives timm's result too.
* :class:`WindowAttentionV2` / :class:`WindowAttentionV2Cr` — timm's Swin V2 and ``swinv2_cr``
  window attention (cosine attention, continuous position bias), the same way.
* Patching a timm model lives in :mod:`vitkern.integrations.timm.swin` (the ``from_timm``
  adapters, the fused Swin block classes and the block patches that
  :func:`vitkern.integrations.timm.patch_model` applies); this module imports no timm, and each
  ``from_timm`` here is an alias that loads that adapter when called.
* SparseViT (mit-han-lab/sparsevit): :func:`window_scores` (L2 norm over each window of the
  per-token mean |x|), :func:`keep_windows` (top-k per image) and :class:`SparseSwinBlock`, which
  runs a whole Swin block (norm, attention, MLP) only on the kept windows' tokens and passes the
  others through unchanged.

Windows follow timm exactly: the block's window and shift (timm clamps them per axis at
construction, or keeps them with ``always_partition``) go to the op with ``clamp=None``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern.ops.window import window_attention
from vitkern.reference import window as ref

__all__ = ["WindowAttention", "WindowAttentionV2", "WindowAttentionV2Cr", "SparseSwinBlock",
           "window_scores", "keep_windows"]


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def _split_heads(qkv: Tensor, heads: int, head_dim: int):
    """(B, N, 3·heads·d) -> q, k, v (B, heads, N, d) strided views (no copy)."""
    return qkv.unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)


class WindowAttention(nn.Module):
    """Swin window attention (W-MSA / SW-MSA) with relative position bias, timm-compatible.

    ``WindowAttention(dim, num_heads, head_dim=None, window_size=7, qkv_bias=True, attn_drop=0.,
    proj_drop=0., backend="auto")``. The fused op has no dropout on attention probabilities: with
    ``attn_drop > 0`` in training the module runs timm's eager math on partitioned windows (a
    patched timm block passes those, unfused, in training; eval mode is fused, as timm ignores
    dropout there).

    ``forward(x, mask=None, *, shift_size=0, active_windows=None)``:

    * x (B, H, W, C), the whole map: Swin's cyclic shift ``shift_size`` (int or pair) and timm's
      roll-then-pad for maps not divisible by the window are done inside the op, with this
      module's window as is (timm's block clamps it to small maps at construction; the bias
      table has its size). ``active_windows`` (B, K) keeps only those windows (see
      :func:`vitkern.ops.window_attention`); the other tokens get 0. Returns (B, H, W, C).
    * x (B·nW, ws², C), windows partitioned by the caller, as timm's module takes them; ``mask``
      is timm's (nW, ws², ws²) shift mask or None. Without a mask every window goes through the
      op; with one the module computes timm's math eagerly (the op derives the shift mask from
      the map geometry, which partitioned windows no longer carry). Returns (B·nW, ws², C).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None,
                 window_size=7, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.window_size = _pair(window_size)
        wh, ww = self.window_size
        self.window_area = wh * ww
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _rel_index(wh, ww), persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module: nn.Module, *, backend: str = "auto") -> "WindowAttention":
        """From timm's Swin ``WindowAttention``, sharing its parameters and buffers (no copies):
        :func:`vitkern.integrations.timm.swin.window_attention_from_timm`."""
        from vitkern.integrations.timm.swin import window_attention_from_timm
        return window_attention_from_timm(module, backend=backend, cls=cls)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"backend={self.backend!r}")

    def set_window_size(self, window_size) -> None:
        """timm's ``set_window_size`` (``set_input_size`` calls it): the bias table resized as
        timm does it, :func:`vitkern.integrations.timm.swin.set_window_size` (needs timm)."""
        from vitkern.integrations.timm.swin import set_window_size
        set_window_size(self, window_size)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, *, shift_size=0,
                active_windows: Optional[Tensor] = None) -> Tensor:
        if x.dim() == 4:
            _refuse_dropout_on_map(self)
            if mask is not None:
                raise ValueError("WindowAttention: pass shift_size, not a mask, with a (B, H, W, "
                                 "C) map (the op builds Swin's shift mask itself)")
            return self._forward_map(x, shift_size, active_windows)
        if x.dim() != 3 or x.shape[1] != self.window_area:
            raise ValueError(f"WindowAttention: x must be (B, H, W, C) or (B*nW, "
                             f"{self.window_area}, C) windows, got {tuple(x.shape)}")
        if active_windows is not None:
            raise ValueError("WindowAttention: active_windows needs the (B, H, W, C) map")
        if mask is not None or _dropout_active(self):
            return self._forward_windows_eager(x, mask)
        return self._attend(x, self.window_size, (0, 0))

    def _forward_map(self, x: Tensor, shift_size, active_windows: Optional[Tensor]) -> Tensor:
        B, H, W, C = x.shape
        o = self._attend(x.reshape(B, H * W, C), (H, W), _pair(shift_size), active_windows)
        return o.reshape(B, H, W, C)

    def fuses(self, hw) -> bool:
        """Every map takes the fused path (padding folds exactly, see :meth:`_folded_biases`)."""
        return True

    def _folded_biases(self, padded: bool):
        """(qkv bias, proj bias) to use with the op: timm's, or for a padded map the fold."""
        bias, proj_bias = self.qkv.bias, self.proj.bias
        if bias is not None and padded:
            # timm pads x with zeros *before* qkv, so its pad tokens carry k = b_k, v = b_v,
            # while the op pads k, v with zeros. Drop b_k, b_v from every token instead: b_k
            # shifts all logits of a query by scale·q·b_k (softmax-invariant; bias and mask
            # are per pair, unaffected), and b_v adds b_v to every output row (the weights sum
            # to 1), which folds into proj's bias. Exact, with no padded copy of x.
            a = bias.shape[0] // 3
            bias = torch.cat([bias[:a], bias[a:] * 0])
            fold = self.proj.weight @ self.qkv.bias[2 * a:]
            proj_bias = fold if proj_bias is None else proj_bias + fold
        return bias, proj_bias

    def _attend(self, x: Tensor, hw, shift, active_windows=None) -> Tensor:
        """(B, N, C) tokens of an H×W map -> attention + projection, (B, N, C). The module's
        window (the block's, already clamped by timm) is used as is: ``clamp=None``."""
        B, N, _ = x.shape
        (wh, ww) = self.window_size
        bias, proj_bias = self._folded_biases(bool(hw[0] % wh or hw[1] % ww))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = _split_heads(qkv, self.num_heads, self.head_dim)
        o = window_attention(q, k, v, hw=hw, window_size=self.window_size, shift=shift,
                             rel_pos_bias=self.relative_position_bias_table,
                             active_windows=active_windows, scale=self.scale, clamp=None,
                             backend=self.backend)
        o = F.linear(o.transpose(1, 2).reshape(B, N, -1), self.proj.weight, proj_bias)
        return self.proj_drop(o)

    def _forward_windows_eager(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """timm's math on partitioned windows with an explicit (nW, N, N) mask (or none), and
        dropout on the probabilities."""
        B_, N, C = x.shape
        q, k, v = _split_heads(self.qkv(x), self.num_heads, self.head_dim)
        idx = self.relative_position_index.reshape(-1)
        bias = self.relative_position_bias_table[idx].reshape(N, N, -1).permute(2, 0, 1)
        attn = _add_shift_mask((q * self.scale) @ k.transpose(-2, -1) + bias, mask)
        o = self.attn_drop(attn.softmax(-1)) @ v
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B_, N, -1)))


def _rel_index(wh: int, ww: int) -> Tensor:
    """timm's / Swin's (wh·ww, wh·ww) relative position index."""
    hh, cc = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    hh, cc = hh.reshape(-1), cc.reshape(-1)
    return ((hh[:, None] - hh[None, :] + wh - 1) * (2 * ww - 1)
            + (cc[:, None] - cc[None, :] + ww - 1))


def _dropout_active(module: nn.Module) -> bool:
    """Dropout on the attention probabilities is due: the fused op has none, so the module runs
    timm's eager math on partitioned windows instead."""
    return module.training and module.attn_drop.p > 0


def _refuse_dropout_on_map(module: nn.Module) -> None:
    if _dropout_active(module):
        raise RuntimeError(
            f"{type(module).__name__}: attn_drop={module.attn_drop.p} in training mode: the "
            "fused op has no dropout on attention probabilities, so this module applies it only "
            "on partitioned (B*nW, ws*ws, C) windows (a patched timm block passes those in "
            "training); call eval() for the fused path on the map")


def _add_shift_mask(attn: Tensor, mask: Optional[Tensor]) -> Tensor:
    """(B·nW, heads, N, N) logits plus timm's (nW, N, N) shift mask, if any."""
    if mask is None:
        return attn
    nw, heads, n = mask.shape[0], attn.shape[1], attn.shape[-1]
    return (attn.view(-1, nw, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)


class WindowAttentionV2(nn.Module):
    """Swin V2 window attention (cosine attention, continuous position bias), timm-compatible.

    ``WindowAttentionV2(dim, window_size, num_heads, qkv_bias=True, attn_drop=0., proj_drop=0.,
    pretrained_window_size=(0, 0), backend="auto")``: timm's ``swin_transformer_v2.WindowAttention``
    parameters (``logit_scale`` (heads, 1, 1), ``cpb_mlp``, ``qkv`` without bias, ``q_bias``,
    ``v_bias``, ``proj``) and buffers (``k_bias`` zeros, ``relative_coords_table``,
    ``relative_position_index``, all non-persistent).

    Swin V2's logits are ``cos(q_i, k_j) · exp(min(logit_scale_h, ln 100)) + 16·σ(cpb)[h, i, j]``
    (+ the shift mask). They are V1's op exactly with ``q̂ = normalize(q) · exp(min(logit_scale,
    ln 100))``, ``k̂ = normalize(k)``, ``scale = 1`` and the bias table ``16·σ(cpb_mlp(coords))``
    (σ is elementwise, so it commutes with Swin's index): the module normalises q and k in one
    pre-pass (a copy of q and k; the rest is fused) and calls :func:`window_attention`.
    Differentiable in every parameter. ``forward`` as :class:`WindowAttention` (full map with
    ``shift_size``, or timm's partitioned windows with an optional mask).
    """

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0,
                 pretrained_window_size=(0, 0), *, backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.window_size = _pair(window_size)
        self.pretrained_window_size = _pair(pretrained_window_size)
        self.num_heads = num_heads
        self.backend = backend
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        wh, ww = self.window_size
        self.register_buffer("relative_coords_table",
                             _v2_coords_table(self.window_size, self.pretrained_window_size),
                             persistent=False)
        self.register_buffer("relative_position_index", _rel_index(wh, ww), persistent=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def window_area(self) -> int:
        return self.window_size[0] * self.window_size[1]

    @classmethod
    def from_timm(cls, module: nn.Module, *, backend: str = "auto") -> "WindowAttentionV2":
        """From timm's Swin V2 ``WindowAttention``, sharing its parameters and buffers:
        :func:`vitkern.integrations.timm.swin.window_attention_v2_from_timm`."""
        from vitkern.integrations.timm.swin import window_attention_v2_from_timm
        return window_attention_v2_from_timm(module, backend=backend, cls=cls)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"backend={self.backend!r}")

    def set_window_size(self, window_size) -> None:
        """timm's ``set_window_size`` (called by ``set_input_size``): a new window; the
        coordinate table and index are rebuilt (the CPB MLP maps any window)."""
        window_size = _pair(window_size)
        if window_size == self.window_size:
            return
        coords = self.relative_coords_table
        self.window_size = window_size
        self.register_buffer("relative_coords_table", _v2_coords_table(
            window_size, self.pretrained_window_size).to(coords.device, coords.dtype),
            persistent=False)
        self.register_buffer("relative_position_index", _rel_index(*window_size).to(
            coords.device), persistent=False)

    def bias_table(self) -> Tensor:
        """Swin V2's ((2wh-1)(2ww-1), heads) bias table 16·σ(cpb_mlp(relative_coords_table))."""
        return 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(
            -1, self.num_heads))

    fuses = WindowAttention.fuses

    def _gain(self) -> Tensor:
        """(heads, 1, 1) cosine-logit gain exp(min(logit_scale, ln 100))."""
        return torch.clamp(self.logit_scale, max=math.log(100.0)).exp().reshape(-1, 1, 1)

    def _op_bias(self) -> Tensor:
        """The bias as the op takes it: the table (indexed the Swin way inside the op)."""
        return self.bias_table()

    def _window_bias(self) -> Tensor:
        """The (heads, N, N) bias of one window (the eager path)."""
        n = self.window_area
        idx = self.relative_position_index.reshape(-1)
        return self.bias_table()[idx].reshape(n, n, -1).permute(2, 0, 1)

    def _qkv_bias(self, padded: bool):
        """(qkv bias, proj bias): for a padded map b_v is folded into proj (see WindowAttention;
        k_bias is a zero buffer in Swin V2, so pad keys are 0 in timm too)."""
        if self.q_bias is None:
            return None, self.proj.bias
        if not padded:
            return torch.cat((self.q_bias, self.k_bias, self.v_bias)), self.proj.bias
        fold = self.proj.weight @ self.v_bias
        proj_bias = fold if self.proj.bias is None else self.proj.bias + fold
        return torch.cat((self.q_bias, self.k_bias, self.v_bias * 0)), proj_bias

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, *, shift_size=0,
                active_windows: Optional[Tensor] = None) -> Tensor:
        wh, ww = self.window_size
        if x.dim() == 4:
            _refuse_dropout_on_map(self)
            if mask is not None:
                raise ValueError("WindowAttentionV2: pass shift_size, not a mask, with a map")
            B, H, W, C = x.shape
            o = self._attend(x.reshape(B, H * W, C), (H, W), _pair(shift_size),
                             bool(H % wh or W % ww), active_windows)
            return o.reshape(B, H, W, C)
        if x.dim() != 3 or x.shape[1] != self.window_area:
            raise ValueError(f"WindowAttentionV2: x must be (B, H, W, C) or (B*nW, "
                             f"{self.window_area}, C) windows, got {tuple(x.shape)}")
        if active_windows is not None:
            raise ValueError("WindowAttentionV2: active_windows needs the (B, H, W, C) map")
        if mask is not None or _dropout_active(self):
            return self._forward_windows_eager(x, mask)
        return self._attend(x, self.window_size, (0, 0), False, None)

    def _forward_windows_eager(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """timm's Swin V2 math on partitioned windows with an explicit (nW, N, N) mask (or
        none), and dropout on the probabilities."""
        B_, N, C = x.shape
        bias, proj_bias = self._qkv_bias(False)
        q, k, v = _split_heads(F.linear(x, self.qkv.weight, bias), self.num_heads,
                               self.head_dim)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = _add_shift_mask(attn * self._gain() + self._window_bias(), mask)
        o = self.attn_drop(attn.softmax(-1)) @ v
        return self.proj_drop(F.linear(o.transpose(1, 2).reshape(B_, N, C), self.proj.weight,
                                       proj_bias))

    def _attend(self, x, hw, shift, padded, active_windows):
        B, N, C = x.shape
        bias, proj_bias = self._qkv_bias(padded)
        q, k, v = _split_heads(F.linear(x, self.qkv.weight, bias), self.num_heads,
                               self.head_dim)
        q = F.normalize(q, dim=-1) * self._gain().to(q.dtype)
        k = F.normalize(k, dim=-1)
        o = window_attention(q, k, v, hw=hw, window_size=self.window_size, shift=shift,
                             rel_pos_bias=self._op_bias(), active_windows=active_windows,
                             scale=1.0, clamp=None, backend=self.backend)
        o = F.linear(o.transpose(1, 2).reshape(B, N, C), self.proj.weight, proj_bias)
        return self.proj_drop(o)


class WindowAttentionV2Cr(WindowAttentionV2):
    """timm's ``swin_transformer_v2_cr.WindowMultiHeadAttention`` (the ``swinv2_cr_*`` models):
    Swin V2's cosine attention with ``logit_scale`` (heads,), a ``qkv`` with its own bias, and a
    dense (heads, N, N) position bias from the ``meta_mlp`` over log-spaced relative
    coordinates (the non-persistent ``relative_coordinates_log`` buffer). Built with
    :meth:`from_timm` (shares every parameter and buffer); ``forward`` as
    :class:`WindowAttentionV2`.

    A map not divisible by the window is not fused: timm pads x with zeros before ``qkv``, so
    its pad keys are ``normalize(b_k)``, which cosine attention does not let fold away (V1 and
    V2 fold it: a dot-product shift, or a zero k bias). The patched block then runs timm's own
    path (:meth:`fuses`).

    ``WindowAttentionV2Cr(dim, num_heads, window_size, drop_attn=0., drop_proj=0.,
    meta_hidden_dim=384, sequential_attn=False, backend="auto")``: timm's constructor and
    ``state_dict`` (``logit_scale`` starts at ln 10 as in timm).
    """

    def __init__(self, dim: int, num_heads: int, window_size, drop_attn: float = 0.0,
                 drop_proj: float = 0.0, meta_hidden_dim: int = 384,
                 sequential_attn: bool = False, *, backend: str = "auto"):
        nn.Module.__init__(self)
        self.dim, self.num_heads = dim, num_heads
        self.window_size = _pair(window_size)
        self.sequential_attn = sequential_attn  # stored, unused, as in timm
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(drop_attn)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop_proj)
        self.meta_mlp = _MetaMlp(meta_hidden_dim, num_heads)
        self.logit_scale = nn.Parameter(torch.full((num_heads,), math.log(10.0)))
        self.register_buffer("relative_coordinates_log", _cr_coords_log(self.window_size),
                             persistent=False)

    @classmethod
    def from_timm(cls, module: nn.Module, *, backend: str = "auto") -> "WindowAttentionV2Cr":
        """From timm's ``WindowMultiHeadAttention``, sharing its parameters and buffers:
        :func:`vitkern.integrations.timm.swin.window_attention_v2cr_from_timm`."""
        from vitkern.integrations.timm.swin import window_attention_v2cr_from_timm
        return window_attention_v2cr_from_timm(module, backend=backend, cls=cls)

    @property
    def in_features(self) -> int:  # timm's name for dim
        return self.dim

    def set_window_size(self, window_size) -> None:
        """timm's ``set_window_size``: a new window, its coordinates rebuilt (the meta MLP maps
        any window)."""
        window_size = _pair(window_size)
        if window_size == self.window_size:
            return
        old = self.relative_coordinates_log
        self.window_size = window_size
        self.register_buffer("relative_coordinates_log", _cr_coords_log(window_size).to(
            old.device, old.dtype), persistent=False)

    def fuses(self, hw) -> bool:
        """Whether a map of size ``hw`` takes the fused path (see the class docstring)."""
        return hw[0] % self.window_size[0] == 0 and hw[1] % self.window_size[1] == 0

    def _op_bias(self) -> Tensor:
        return self._window_bias()

    def _window_bias(self) -> Tensor:
        """The meta MLP's (heads, N, N) bias, as timm computes it (once per call)."""
        n = self.window_area
        return self.meta_mlp(self.relative_coordinates_log).transpose(0, 1).reshape(
            self.num_heads, n, n)

    def _qkv_bias(self, padded: bool):
        if padded:
            raise ValueError("WindowAttentionV2Cr: a map not divisible by the window is not "
                             "fused (timm's pad keys normalize(b_k) have no exact fold); the "
                             "patched timm block runs its own path there")
        return self.qkv.bias, self.proj.bias


class _MetaMlp(nn.Module):
    """swinv2_cr's meta network: 2 -> hidden (ReLU, dropout 0.125) -> heads; timm's ``Mlp``
    submodule names, so checkpoints load."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(2, hidden), nn.ReLU(), nn.Dropout(0.125)
        self.fc2 = nn.Linear(hidden, heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop1(self.act(self.fc1(x))))


def _cr_coords_log(window_size) -> Tensor:
    """swinv2_cr's (N·N, 2) signed log(1 + |Δ|) relative coordinates of every pair of a window's
    tokens (row-major pairs, as its meta MLP expects)."""
    wh, ww = window_size
    hh, cc = torch.meshgrid(torch.arange(wh, dtype=torch.float32),
                            torch.arange(ww, dtype=torch.float32), indexing="ij")
    coords = torch.stack([hh.reshape(-1), cc.reshape(-1)])
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2)
    return torch.sign(rel) * torch.log1p(rel.abs())


def _v2_coords_table(window_size, pretrained_window_size) -> Tensor:
    """Swin V2's log-spaced relative coordinates (1, 2wh-1, 2ww-1, 2)."""
    wh, ww = window_size
    norm = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    ch = torch.arange(-(wh - 1), wh, dtype=torch.float32) / max(norm[0] - 1, 1)
    cw = torch.arange(-(ww - 1), ww, dtype=torch.float32) / max(norm[1] - 1, 1)
    t = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1)[None] * 8
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)


# --------------------------------------------------------------------------------------------
# SparseViT: window scores, kept windows, a block that runs only on kept windows
# --------------------------------------------------------------------------------------------


def window_scores(x: Tensor, window_size, shift=0, pad_order: str = "shift_then_pad",
                  clamp: Optional[str] = "swin") -> Tensor:
    """SparseViT's window importance: a[b, t] = mean_c |x[b, t, c]|, then the L2 norm of a over
    the tokens of each window of the shifted, padded frame (pad tokens count 0). ``window_size``,
    ``shift``, ``pad_order`` and ``clamp`` as for :func:`vitkern.ops.window_attention`.

    x: (B, H, W, C) -> (B, nW) float32, windows numbered as ``active_windows`` expects.
    """
    B, H, W, C = x.shape
    a = x.detach().abs().float().mean(-1).reshape(B, H * W)
    ids = ref.window_token_ids((H, W), window_size, shift, pad_order, x.device, clamp)
    a = torch.cat([a, a.new_zeros(B, 1)], 1)  # index -1 -> the zero column
    return torch.linalg.vector_norm(a[:, ids], ord=2, dim=-1)


def keep_windows(scores: Tensor, ratio: float) -> Tensor:
    """Top-k window ids per image, K = int(nW·(1 - ratio)) as SparseViT (the same K for every
    image), ordered by score, highest first. scores: (B, nW) -> (B, K) int64."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"keep_windows: ratio must lie in [0, 1], got {ratio}")
    k = int(scores.shape[1] * (1.0 - ratio))
    return torch.topk(scores, k, dim=1, sorted=True).indices


class SparseSwinBlock(nn.Module):
    """SparseViT's window-pruned Swin block around a timm ``SwinTransformerBlock`` (V1).

    ``forward(x, active_windows)``: x (B, H, W, C); ``active_windows`` (B, K) window ids of the
    block's (shifted, padded) frame, e.g. ``keep_windows(sparse_block.window_scores(x), ratio)``.
    The tokens of kept windows go through the whole block (norm1, window attention, residual,
    norm2, MLP, residual) and every other token is passed through unchanged (SparseViT's
    identity for pruned windows). Only kept tokens are normalised, projected and fed to the MLP;
    the attention op walks only the kept windows. Pad tokens follow timm (zero after norm1).
    With every window kept it equals the timm block. The timm block's parameters are shared.
    """

    def __init__(self, block: nn.Module, *, backend: str = "auto"):
        super().__init__()
        self.block = block
        attn = block.attn
        self.attn = attn if isinstance(attn, WindowAttention) else WindowAttention.from_timm(
            attn, backend=backend)

    @property
    def window_size(self) -> tuple[int, int]:
        """The block's window (timm clamps it per axis at construction; used as is)."""
        return _pair(self.block.window_size)

    @property
    def shift_size(self) -> tuple[int, int]:
        return _pair(self.block.shift_size)

    def window_scores(self, x: Tensor) -> Tensor:
        """:func:`window_scores` of x (B, H, W, C) for this block's windows: (B, nW)."""
        return window_scores(x, self.window_size, self.shift_size, clamp=None)

    def forward(self, x: Tensor, active_windows: Tensor) -> Tensor:
        blk = self.block
        B, H, W, C = x.shape
        N = H * W
        (wh, ww), shift = self.window_size, self.shift_size
        K = active_windows.shape[1]
        ids = ref.window_token_ids((H, W), (wh, ww), shift, "shift_then_pad", x.device, None)
        tok = ids[active_windows.long()].reshape(B, K * wh * ww)  # kept slots, -1 = pad
        real = tok >= 0
        src = tok.clamp(min=0)
        dst = torch.where(real, tok, N)  # pads go to a sink row N
        flat = x.reshape(B, N, C)
        xk = torch.gather(flat, 1, src[..., None].expand(-1, -1, C))  # (B, K·ws², C)
        # norm1 and qkv on the kept tokens only; scattered into a map the op reads in place
        # (it reads no token outside the kept windows; zeros keep the reference path finite)
        attn = self.attn
        bias, proj_bias = attn._folded_biases(bool(H % wh or W % ww))  # timm's zero pad tokens
        qkv_k = F.linear(blk.norm1(xk), attn.qkv.weight, bias)
        qkv = qkv_k.new_zeros(B, N + 1, qkv_k.shape[-1]).scatter(
            1, dst[..., None].expand(-1, -1, qkv_k.shape[-1]), qkv_k)[:, :N]
        q, k, v = _split_heads(qkv, attn.num_heads, attn.head_dim)
        o = window_attention(q, k, v, hw=(H, W), window_size=(wh, ww), shift=shift,
                             rel_pos_bias=attn.relative_position_bias_table,
                             active_windows=active_windows, scale=attn.scale, clamp=None,
                             backend=attn.backend)
        o = o.transpose(1, 2).reshape(B, N, -1)
        ok = torch.gather(o, 1, src[..., None].expand(-1, -1, o.shape[-1]))
        ok = attn.proj_drop(F.linear(ok, attn.proj.weight, proj_bias))
        yk = xk + blk.drop_path1(ok)
        yk = yk + blk.drop_path2(blk.mlp(blk.norm2(yk)))
        out = torch.cat([flat, flat.new_zeros(B, 1, C)], 1).scatter(
            1, dst[..., None].expand(-1, -1, C), yk)[:, :N]
        return out.reshape(B, H, W, C)
