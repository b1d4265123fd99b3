"""timm Swin adapters: Swin (V1), Swin V2 and ``swinv2_cr`` window attention and blocks.

* ``*_from_timm`` build :class:`vitkern.nn.WindowAttention`, :class:`vitkern.nn.WindowAttentionV2`
  and :class:`vitkern.nn.window.WindowAttentionV2Cr` from timm's modules, sharing their
  submodules, parameters and buffers (no copies); the nn classes' ``from_timm`` call these.
* Blocks: timm's ``SwinTransformerBlock._attn`` (and its V2 / ``swinv2_cr`` counterparts) rolls,
  pads and partitions around ``self.attn``. The block entries of :data:`TIMM_REPLACEMENTS`
  (:class:`SwinBlockPatch`, ...) switch each block's class in place to a subclass
  (``FusedSwinTransformerBlock``, ``FusedSwinTransformerV2Block``,
  ``FusedSwinTransformerV2CrBlock``, built on first use so that timm stays optional, and
  importable from this module for pickling) whose ``_attn`` hands the full map to the vitkern
  module. Parameters, buffers and ``state_dict`` keys are untouched.
* :func:`set_window_size`: timm's bias-table resize for ``WindowAttention.set_window_size``
  (timm's ``set_input_size`` calls it on a patched model).
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from vitkern.integrations._common import LazyClasses
from vitkern.nn.window import (WindowAttention, WindowAttentionV2, WindowAttentionV2Cr,
                               _dropout_active, _pair, _rel_index)

__all__ = ["window_attention_from_timm", "window_attention_v2_from_timm",
           "window_attention_v2cr_from_timm", "set_window_size", "SwinBlockPatch",
           "SwinV2BlockPatch", "SwinV2CrBlockPatch", "TIMM_REPLACEMENTS"]


def _shell(cls: type, module: nn.Module, dim: int, backend: str) -> nn.Module:
    """A ``cls`` with no submodules yet and the attributes every Swin adapter copies."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.dim, new.window_size = dim, _pair(module.window_size)
    new.num_heads, new.backend = module.num_heads, backend
    return new


def window_attention_from_timm(module: nn.Module, *, backend: str = "auto",
                               cls: type = WindowAttention) -> WindowAttention:
    """A ``cls`` sharing a timm ``swin_transformer.WindowAttention``'s submodules, parameters
    and buffers (no copies)."""
    new = _shell(cls, module, module.dim, backend)
    new.window_area = module.window_area
    new.head_dim = module.qkv.out_features // (3 * module.num_heads)
    new.scale = float(module.scale)
    new.relative_position_bias_table = module.relative_position_bias_table
    new.register_buffer("relative_position_index", module.relative_position_index,
                        persistent=False)
    new.qkv = module.qkv
    new.attn_drop = module.attn_drop
    new.proj = module.proj
    new.proj_drop = module.proj_drop
    new.train(module.training)
    return new


def set_window_size(module: WindowAttention, window_size) -> None:
    """timm's ``set_window_size`` for :class:`~vitkern.nn.WindowAttention`: a new window, the
    bias table resized as timm resizes it (``timm.layers.resize_rel_pos_bias_table``, so timm
    must be installed for a changed window) and the index rebuilt."""
    window_size = _pair(window_size)
    if window_size == module.window_size:
        return
    from timm.layers import resize_rel_pos_bias_table

    wh, ww = window_size
    old = module.relative_position_bias_table
    with torch.no_grad():
        table = resize_rel_pos_bias_table(old, new_window_size=window_size,
                                          new_bias_shape=((2 * wh - 1) * (2 * ww - 1),
                                                          module.num_heads),
                                          old_window_size=module.window_size)
    module.relative_position_bias_table = nn.Parameter(table, requires_grad=old.requires_grad)
    module.window_size, module.window_area = window_size, wh * ww
    module.register_buffer("relative_position_index", _rel_index(wh, ww).to(table.device),
                           persistent=False)


def window_attention_v2_from_timm(module: nn.Module, *, backend: str = "auto",
                                  cls: type = WindowAttentionV2) -> WindowAttentionV2:
    """A ``cls`` sharing a timm ``swin_transformer_v2.WindowAttention``'s submodules, parameters
    and buffers."""
    new = _shell(cls, module, module.dim, backend)
    new.pretrained_window_size = _pair(module.pretrained_window_size)
    new.logit_scale = module.logit_scale
    new.cpb_mlp = module.cpb_mlp
    new.qkv = module.qkv
    new.q_bias, new.v_bias = module.q_bias, module.v_bias
    new.register_buffer("k_bias", module.k_bias, persistent=False)
    new.attn_drop = module.attn_drop
    new.proj = module.proj
    new.proj_drop = module.proj_drop
    new.register_buffer("relative_coords_table", module.relative_coords_table,
                        persistent=False)
    new.register_buffer("relative_position_index", module.relative_position_index,
                        persistent=False)
    new.train(module.training)
    return new


def window_attention_v2cr_from_timm(module: nn.Module, *, backend: str = "auto",
                                    cls: type = WindowAttentionV2Cr) -> WindowAttentionV2Cr:
    """A ``cls`` sharing a timm ``swin_transformer_v2_cr.WindowMultiHeadAttention``'s
    submodules, parameters and buffers."""
    new = _shell(cls, module, module.in_features, backend)
    new.sequential_attn = module.sequential_attn
    # timm's registration order: qkv, attn_drop, proj, proj_drop, meta_mlp, logit_scale
    new.qkv, new.attn_drop = module.qkv, module.attn_drop
    new.proj, new.proj_drop = module.proj, module.proj_drop
    new.meta_mlp, new.logit_scale = module.meta_mlp, module.logit_scale
    new.register_buffer("relative_coordinates_log", module.relative_coordinates_log,
                        persistent=False)
    return new.train(module.training)


# --------------------------------------------------------------------------------------------
# the Swin block: full map into the op
# --------------------------------------------------------------------------------------------


#: fused block class name -> (timm module, timm block class, vitkern attention class, the
#: block's method that rolls, pads and partitions around its attention)
_FUSED_SPECS = {
    "FusedSwinTransformerBlock": ("timm.models.swin_transformer", "SwinTransformerBlock",
                                  WindowAttention, "_attn"),
    "FusedSwinTransformerV2Block": ("timm.models.swin_transformer_v2", "SwinTransformerV2Block",
                                    WindowAttentionV2, "_attn"),
    "FusedSwinTransformerV2CrBlock": ("timm.models.swin_transformer_v2_cr",
                                      "SwinTransformerV2CrBlock", WindowAttentionV2Cr,
                                      "_shifted_window_attn"),
}


def _build_fused_block(name: str) -> type:
    """timm's Swin (V2) block with ``_attn`` on the full map (``_fused_block_class`` builds it on
    first use: timm stays an optional dependency)."""
    mod_name, base_name, attn_cls, method = _FUSED_SPECS[name]
    base = getattr(importlib.import_module(mod_name), base_name)
    timm_path = getattr(base, method)

    def _attn(self, x: Tensor) -> Tensor:
        """The block's attention on the full (B, H, W, C) map with the block's (timm-clamped)
        window and shift: no roll / pad / partition copies, the op does them by index math
        (timm's own path when ``attn`` is not a vitkern module)."""
        if (not isinstance(self.attn, attn_cls) or _dropout_active(self.attn)
                or not self.attn.fuses(x.shape[1:3])):
            return timm_path(self, x)  # attention dropout in training, or not fusable
        return self.attn(x, shift_size=self.shift_size)

    return type(name, (base,), {
        "__module__": __name__, "__qualname__": name,
        "__doc__": f"timm's {base_name} whose window attention takes the full map "
                   "(vitkern); same parameters and state_dict.",
        method: _attn})


#: the fused block classes, built on first use and importable from this module (pickle,
#: isinstance)
_fused_block_class = LazyClasses(__name__, _FUSED_SPECS, _build_fused_block)
__getattr__ = _fused_block_class.module_getattr


class SwinBlockPatch:
    """Patch entry for timm's ``SwinTransformerBlock``: switches the block's class in place to
    ``FusedSwinTransformerBlock`` (same object, parameters and state_dict) so that its ``_attn``
    passes the full map to a patched :class:`~vitkern.nn.WindowAttention`."""

    fused = "FusedSwinTransformerBlock"

    @classmethod
    def from_timm(cls, block: nn.Module, *, backend: str = "auto") -> nn.Module:
        block.__class__ = _fused_block_class(cls.fused)
        return block


class SwinV2BlockPatch(SwinBlockPatch):
    """:class:`SwinBlockPatch` for timm's ``SwinTransformerV2Block``."""

    fused = "FusedSwinTransformerV2Block"


class SwinV2CrBlockPatch(SwinBlockPatch):
    """:class:`SwinBlockPatch` for timm's ``SwinTransformerV2CrBlock`` (``swinv2_cr_*``)."""

    fused = "FusedSwinTransformerV2CrBlock"


#: timm classes :func:`vitkern.integrations.timm.patch_model` replaces (the block entries switch
#: the block's class in place; see the module docstring)
TIMM_REPLACEMENTS = {
    "timm.models.swin_transformer.WindowAttention": WindowAttention,
    "timm.models.swin_transformer.SwinTransformerBlock": SwinBlockPatch,
    "timm.models.swin_transformer_v2.WindowAttention": WindowAttentionV2,
    "timm.models.swin_transformer_v2.SwinTransformerV2Block": SwinV2BlockPatch,
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention": WindowAttentionV2Cr,
    "timm.models.swin_transformer_v2_cr.SwinTransformerV2CrBlock": SwinV2CrBlockPatch,
}
