"""Patch a Hugging Face transformers vision model in place with vitkern's fused attention.

``report = patch_model(model)`` is :func:`vitkern.integrations.timm.patch_model`'s contract for
transformers models: the model keeps its parameter objects (no copies), its ``state_dict`` keys and
``named_parameters()`` order, gives the same outputs, and the returned
:class:`PatchReport` (the same class as ``vitkern.integrations.timm.PatchReport``) says what changed
and what was left and why.
Task heads (``SwinForImageClassification``, ``ViTForImageClassification``, ...) are accepted: the
layers are found inside them.

* **Swin / Swin V2** (``SwinLayer``, ``Swinv2Layer``): transformers' layer pads the map, rolls it,
  partitions it into windows and builds the shift mask around its attention module. Each layer's
  class is switched in place to a subclass (:class:`FusedSwinLayer`, :class:`FusedSwinv2Layer`,
  built on first use so that transformers stays optional) whose ``forward`` projects the whole
  (B, H·W, C) map and calls :func:`vitkern.ops.window_attention`, which does the padding, shift,
  partition, relative position bias and mask by index math: no padded, rolled or partitioned copy
  and no N×N scores. Swin V2's cosine attention is V1's op with normalised q (times the clamped
  ``logit_scale``), normalised k, scale 1 and the bias table ``16·sigmoid(cpb_mlp(coords))``.
* **ViT / DINOv2 token dropping** (``token_drop=``): EViT at the chosen layers: the layer's
  attention runs on :func:`vitkern.ops.token_attention`, which also returns the class token's
  attention (the importance), and :func:`vitkern.tokens.evit_select` keeps every prefix token
  (class token, DINOv2's register tokens) and the most attended image tokens after the attention
  residual; the MLP and every later layer run on the kept tokens. ``last_hidden_state`` then has
  fewer tokens (prefix, kept, and EViT's fused token last); the pooler and the classifier read
  the class token, which is always first, so they work unchanged. Plain ``patch_model(vit)`` leaves
  ViT attention alone: dense softmax attention over every token is what PyTorch's SDPA already
  serves well.

What the fused paths cannot serve falls back to transformers' own code for that call:
``output_attentions=True`` (a fused kernel never forms the attention probabilities; Swin layers run
transformers' path, token-dropping layers raise), attention dropout in training mode (Swin layers
run transformers' path; token-dropping layers compute the probabilities eagerly), and window sizes
transformers itself cannot serve. The report lists the layers where attention dropout makes
training unfused.

Versions: the Swin / Swin V2 layers are driven in transformers 5's layout (``q_proj`` ... with
``**kwargs``) and in transformers 4's (``attention.self.query`` ..., explicit ``head_mask`` and
``output_attentions``: a head mask also runs transformers' path); token dropping drives
transformers 5's ViT / DINOv2 layers only. Each layer's ``forward`` signature and submodule names
are checked at patch time: a layer of another layout is left alone with that reason (Swin) or
refused (``token_drop``), never driven blindly.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern import tokens
from vitkern.errors import UnsupportedModule
from vitkern.integrations._common import (LazyClasses, PatchReport, block_indices, class_path,
                                          drop_options)
from vitkern.ops.token import token_attention
from vitkern.ops.window import window_attention

# the fused layer classes (FusedSwinLayer, FusedSwinv2Layer, TokenDropViTLayer, ...) are built
# on first use and importable from here (module __getattr__)
__all__ = ["patch_model", "PatchReport", "UnsupportedModule"]

_BACKENDS = ("auto", "triton", "cuda", "eager", "reference")


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------


def _wants_attentions(config, kwargs: dict) -> bool:
    """Whether this forward must return attention probabilities (``output_attentions``).

    transformers 5 records them with forward hooks set up by ``capture_outputs``; its collector,
    when active, says what is being recorded (the flag itself may come from the config and not
    reach the layer). Outside a recording forward the kwargs and the config decide."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers layout: kwargs and config only
        collector = None
    else:
        collector = _active_collector.get()
    if collector is not None:
        return "attentions" in collector
    return bool(getattr(config, "output_attentions", False))


def _project_qkv(x: Tensor, q_lin: nn.Linear, k_lin: nn.Linear, v_lin: nn.Linear, heads: int,
                 head_dim: int, zero_kv_bias: bool = False):
    """transformers' separate q / k / v Linears on x (B, L, C) -> q, k, v (B, heads, L, d) views.

    Two ways to project with the weights as they are: three GEMMs read x three times; one GEMM
    on ``torch.cat`` of the weights reads x once but copies the 3·C'×C weights (and biases) on
    every forward. The extra bytes are 2·B·L·C reads of x against ~3·C'·C weight copies, so the
    single GEMM wins when the token count B·L is large against the width (early Swin stages, ViT
    at any real batch) and three GEMMs win on small late-stage maps (Swin stage 4 at batch 1).
    Pick per call by that byte count; both are exact projections with the original parameters
    (the cat's gradient splits back into each weight).

    ``zero_kv_bias``: the k and v biases are multiplied by 0 (kept in the graph, so their
    gradients are zeros rather than None): see :func:`_window_forward` on padded maps.
    """
    B, L, C = x.shape
    bq, bk, bv = q_lin.bias, k_lin.bias, v_lin.bias
    if zero_kv_bias:
        bk = None if bk is None else bk * 0
        bv = None if bv is None else bv * 0
    out = q_lin.out_features
    if 2 * B * L * C > 3 * out * C:
        w = torch.cat((q_lin.weight, k_lin.weight, v_lin.weight))
        if bq is None and bk is None and bv is None:
            b = None
        else:  # Swin V2's key has no bias: a zero block in its place
            b = torch.cat([t if t is not None else w.new_zeros(out) for t in (bq, bk, bv)])
        qkv = F.linear(x, w, b).unflatten(-1, (3, heads, head_dim))
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(F.linear(x, lin.weight, b).unflatten(-1, (heads, head_dim)).transpose(1, 2)
                 for lin, b in ((q_lin, bq), (k_lin, bk), (v_lin, bv)))


def _merge_heads(o: Tensor) -> Tensor:
    """(B, heads, L, d) -> (B, L, heads·d); the ops store (B, L, heads, d), so this is free."""
    B, h, L, d = o.shape
    return o.transpose(1, 2).reshape(B, L, h * d)


def _build_fused_class(name: str) -> type:
    """The fused subclass ``name`` of a transformers layer class (``_fused_class`` builds it on
    first use)."""
    mod_name, base_name, doc = _FUSED_SPECS[name]
    base = getattr(importlib.import_module(mod_name), base_name)
    layout = _layout(name, base)
    if layout is None:
        raise UnsupportedModule(_signature_reason(name, base))
    forward = layout[2]
    # transformers' GradientCheckpointingLayer wraps a subclass's forward for checkpointing
    # (__init_subclass__), so gradient checkpointing keeps working; ``_vitkern_base`` is the
    # transformers class whose own forward the fallbacks call
    return type(name, (base,), {"__module__": __name__, "__qualname__": name,
                                "__doc__": doc, "forward": forward, "_vitkern_base": base})


# --------------------------------------------------------------------------------------------
# Swin / Swin V2: the whole map into window_attention
# --------------------------------------------------------------------------------------------


def _window_forward(x: Tensor, hw, ws: int, shift: int, q_lin, k_lin, v_lin, o_lin,
                    heads: int, head_dim: int, *, table: Tensor, scale: Optional[float],
                    mask_value: float, cosine: Optional[Tensor], backend: str) -> Tensor:
    """Swin window attention of the (B, H·W, C) map x, output projection included: (B, H·W, C).

    transformers pads the map with zero tokens (right / bottom) *before* the projections, so its
    pad tokens carry k = b_k and v = b_v, and then rolls the padded map (pad, then shift); the op
    pads k and v with zeros. On a padded map the k and v biases are therefore dropped from every
    token and b_v is added back through the output projection: b_k adds scale·q_i·b_k to every
    logit of query i (softmax-invariant; Swin V2's key has no bias), and b_v adds b_v to every
    output row (the weights sum to 1), i.e. o_proj.weight @ b_v to the projection's bias. Exact,
    with no padded copy of x.

    ``cosine`` (Swin V2): the per-head gain exp(min(logit_scale, ln 100)) (heads, 1, 1); q and k
    are L2-normalised (one pre-pass: a copy of q and k) and q carries the gain, scale 1.
    """
    padded = bool(hw[0] % ws or hw[1] % ws)
    q, k, v = _project_qkv(x, q_lin, k_lin, v_lin, heads, head_dim, zero_kv_bias=padded)
    if cosine is not None:
        q = F.normalize(q, dim=-1) * cosine.to(q.dtype)
        k = F.normalize(k, dim=-1)
    o = window_attention(q, k, v, hw=tuple(hw), window_size=ws, shift=shift,
                         rel_pos_bias=table, mask_value=mask_value, scale=scale,
                         pad_order="pad_then_shift", clamp=None, backend=backend)
    proj_bias = o_lin.bias
    if padded and v_lin.bias is not None:
        fold = o_lin.weight @ v_lin.bias
        proj_bias = fold if proj_bias is None else proj_bias + fold
    return F.linear(_merge_heads(o), o_lin.weight, proj_bias)


def _swin_layer_forward(self, hidden_states: Tensor, input_dimensions, always_partition=False,
                        **kwargs):
    """transformers 5's ``SwinLayer.forward`` with the window attention fused (same arguments
    and return value: (hidden_states (B, H·W, C), None))."""
    base = self._vitkern_base
    attn = self.attention
    if (_wants_attentions(attn.config, kwargs) or kwargs.get("head_mask") is not None
            or (self.training and attn.attention_dropout > 0)):
        return base.forward(self, hidden_states, input_dimensions,
                            always_partition=always_partition, **kwargs)
    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)  # transformers' clamp, as it mutates it
    ws, shift = int(self.window_size), int(self.shift_size)
    rpb = attn.relative_position_bias
    if tuple(rpb.window_size) != (ws, ws):
        # a map smaller than the window: transformers clamps the window below its bias table's
        # size, which its own path cannot serve either; let it say so
        return base.forward(self, hidden_states, input_dimensions,
                            always_partition=always_partition, **kwargs)
    shortcut = hidden_states
    x = self.layernorm_before(hidden_states)
    out = _window_forward(x, input_dimensions, ws, shift, attn.q_proj, attn.k_proj, attn.v_proj,
                          attn.o_proj, attn.num_attention_heads, attn.head_dim,
                          table=rpb.relative_position_bias_table, scale=attn.scaling,
                          mask_value=-100.0, cosine=None, backend=self.vitkern_backend)
    hidden_states = shortcut + self.drop_path(self.dropout(out))
    residual = hidden_states
    hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states))) + residual
    return hidden_states, None


def _swin4_layer_forward(self, hidden_states: Tensor, input_dimensions, head_mask=None,
                         output_attentions: Optional[bool] = False,
                         always_partition: Optional[bool] = False):
    """transformers 4's ``SwinLayer.forward`` (attention.self / attention.output, explicit
    head_mask and output_attentions) with the window attention fused: (layer_output,)."""
    base = self._vitkern_base
    sa = self.attention.self
    if output_attentions or head_mask is not None or (self.training and sa.dropout.p > 0):
        return base.forward(self, hidden_states, input_dimensions, head_mask, output_attentions,
                            always_partition)
    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)  # transformers' clamp, as it mutates it
    ws, shift = int(self.window_size), int(self.shift_size)
    if tuple(sa.window_size) != (ws, ws):  # see _swin_layer_forward
        return base.forward(self, hidden_states, input_dimensions, head_mask, output_attentions,
                            always_partition)
    shortcut = hidden_states
    x = self.layernorm_before(hidden_states)
    out = _window_forward(x, input_dimensions, ws, shift, sa.query, sa.key, sa.value,
                          self.attention.output.dense, sa.num_attention_heads,
                          sa.attention_head_size, table=sa.relative_position_bias_table,
                          scale=sa.attention_head_size ** -0.5, mask_value=-100.0, cosine=None,
                          backend=self.vitkern_backend)
    hidden_states = shortcut + self.drop_path(self.attention.output.dropout(out))
    layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)))
    return (hidden_states + layer_output,)


def _swinv2_layer_forward(self, hidden_states: Tensor, input_dimensions,
                          output_attentions: Optional[bool] = False):
    """transformers 5's ``Swinv2Layer.forward`` with the window attention fused (same arguments
    and return value: (layer_output (B, H·W, C),))."""
    if output_attentions or not _swinv2_fusable(self, input_dimensions):
        return self._vitkern_base.forward(self, hidden_states, input_dimensions,
                                          output_attentions)
    return (_swinv2_body(self, hidden_states, input_dimensions),)


def _swinv2_4_layer_forward(self, hidden_states: Tensor, input_dimensions, head_mask=None,
                            output_attentions: Optional[bool] = False):
    """transformers 4's ``Swinv2Layer.forward`` (with head_mask) with the attention fused."""
    if output_attentions or head_mask is not None or not _swinv2_fusable(self, input_dimensions):
        return self._vitkern_base.forward(self, hidden_states, input_dimensions, head_mask,
                                          output_attentions)
    return (_swinv2_body(self, hidden_states, input_dimensions),)


def _swinv2_fusable(self, input_dimensions) -> bool:
    """Whether the fused Swin V2 path reproduces this call (else transformers' own path)."""
    sa = self.attention.self
    ws = int(self.window_size)
    padded = bool(input_dimensions[0] % ws or input_dimensions[1] % ws)
    return not ((self.training and sa.dropout.p > 0) or tuple(sa.window_size) != (ws, ws)
                or (padded and sa.key.bias is not None))  # a k bias is not softmax-invariant


def _swinv2_body(self, hidden_states: Tensor, input_dimensions) -> Tensor:
    """Swin V2 layer (post-norm) with one window_attention call: (B, H·W, C)."""
    sa = self.attention.self
    ws, shift = int(self.window_size), int(self.shift_size)
    heads, d = sa.num_attention_heads, sa.attention_head_size
    gain = torch.clamp(sa.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (heads, 1, 1)
    # σ is elementwise, so 16·σ(table)[index] = (16·σ(table))[index]: the table form of the bias
    table = 16 * torch.sigmoid(sa.continuous_position_bias_mlp(sa.relative_coords_table)
                               .view(-1, heads))
    out = _window_forward(hidden_states, input_dimensions, ws, shift, sa.query, sa.key, sa.value,
                          self.attention.output.dense, heads, d, table=table, scale=1.0,
                          # transformers' Swinv2SelfAttention adds its -100 mask twice
                          mask_value=self.vitkern_mask_value, cosine=gain,
                          backend=self.vitkern_backend)
    out = self.attention.output.dropout(out)
    # Swin V2 is post-norm: layernorm_before acts on the attention output
    hidden_states = hidden_states + self.drop_path(self.layernorm_before(out))
    layer_output = self.output(self.intermediate(hidden_states))
    return hidden_states + self.drop_path(self.layernorm_after(layer_output))


# --------------------------------------------------------------------------------------------
# ViT / DINOv2: EViT token dropping on token_attention
# --------------------------------------------------------------------------------------------


def _token_attend(attn: nn.Module, x: Tensor, backend: str, training: bool):
    """transformers' ViT / DINOv2 attention of x (B, N, C) with the class token's importance:
    (out (B, N, C) after o_proj, importance (B, N), the head-mean of attention row 0).

    With attention dropout in training mode the (B, heads, N, N) probabilities are formed
    eagerly (the fused op has no dropout) and the importance is taken after the dropout, as
    EViT's code and vitkern's timm TokenAttention do."""
    heads, d = attn.num_attention_heads, attn.head_dim
    q, k, v = _project_qkv(x, attn.q_proj, attn.k_proj, attn.v_proj, heads, d)
    if training and attn.attention_dropout > 0:
        p = ((q @ k.transpose(-2, -1)) * attn.scaling).softmax(-1, dtype=torch.float32)
        p = F.dropout(p.to(q.dtype), attn.attention_dropout, training=True)
        imp = p[:, :, 0].mean(1)
        o = p @ v
    else:
        o, imp = token_attention(q, k, v, return_importance="cls", scale=attn.scaling,
                                 backend=backend)
    return attn.o_proj(_merge_heads(o)), imp


def _check_token_call(self, attention_mask, kwargs) -> None:
    if attention_mask is not None:
        raise ValueError(f"{type(self).__name__}: attention_mask is not supported by vitkern's "
                         "token-dropping layers (the tokens are re-selected per image; mask "
                         "them out before patching or leave token_drop off)")
    if _wants_attentions(self.attention.config, kwargs):
        raise ValueError(f"{type(self).__name__}: output_attentions=True cannot be served by "
                         "vitkern's fused token attention (it never forms the attention "
                         "probabilities, and this layer drops tokens); call the model without "
                         "output_attentions, or patch a fresh copy without token_drop")


def _select(self, hidden_states: Tensor, imp: Tensor) -> Tensor:
    opts = self.vitkern_token_drop
    out, _ = tokens.evit_select(hidden_states, imp, opts["keep"], fuse=opts["fuse"],
                                order=opts["order"], num_prefix=opts["num_prefix"])
    return out


def _vit_layer_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                       **kwargs) -> Tensor:
    """transformers' ``ViTLayer.forward`` that drops tokens after its attention residual (EViT):
    (B, N, C) -> (B, num_prefix + kept (+ 1 fused), C)."""
    _check_token_call(self, attention_mask, kwargs)
    a, imp = _token_attend(self.attention, self.layernorm_before(hidden_states),
                           self.vitkern_backend, self.training)
    hidden_states = _select(self, hidden_states + self.dropout(a), imp)
    residual = hidden_states
    hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
    return hidden_states + residual


def _dinov2_layer_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                          **kwargs) -> Tensor:
    """transformers' ``Dinov2Layer.forward`` (and the register variant's) that drops tokens after
    its attention residual (EViT): (B, N, C) -> (B, num_prefix + kept (+ 1 fused), C)."""
    _check_token_call(self, attention_mask, kwargs)
    a, imp = _token_attend(self.attention, self.norm1(hidden_states), self.vitkern_backend,
                           self.training)
    hidden_states = _select(self, self.drop_path(self.layer_scale1(a)) + hidden_states, imp)
    out = self.layer_scale2(self.mlp(self.norm2(hidden_states)))
    return self.drop_path(out) + hidden_states


#: fused class name -> (transformers module, base class, docstring)
_FUSED_SPECS = {
    "FusedSwinLayer": (
        "transformers.models.swin.modeling_swin", "SwinLayer",
        "transformers' SwinLayer whose window attention (pad, shift, partition, bias, mask) is "
        "one vitkern.ops.window_attention call on the whole map; same parameters and "
        "state_dict."),
    "FusedSwinv2Layer": (
        "transformers.models.swinv2.modeling_swinv2", "Swinv2Layer",
        "transformers' Swinv2Layer whose cosine window attention is one "
        "vitkern.ops.window_attention call on the whole map; same parameters and state_dict."),
    "TokenDropViTLayer": (
        "transformers.models.vit.modeling_vit", "ViTLayer",
        "transformers' ViTLayer that drops tokens after its attention (EViT) using "
        "vitkern.ops.token_attention's class-token importance; same parameters."),
    "TokenDropDinov2Layer": (
        "transformers.models.dinov2.modeling_dinov2", "Dinov2Layer",
        "transformers' Dinov2Layer that drops tokens after its attention (EViT); same "
        "parameters."),
    "TokenDropDinov2WithRegistersLayer": (
        "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
        "Dinov2WithRegistersLayer",
        "transformers' Dinov2WithRegistersLayer that drops tokens after its attention (EViT), "
        "keeping the class and register tokens; same parameters."),
}
#: the fused classes, built on first use and importable from this module (pickle, isinstance)
_fused_class = LazyClasses(__name__, _FUSED_SPECS, _build_fused_class)
__getattr__ = _fused_class.module_getattr

#: transformers layer class path -> fused class name (window attention, patched by default)
_WINDOW_LAYERS = {
    "transformers.models.swin.modeling_swin.SwinLayer": "FusedSwinLayer",
    "transformers.models.swinv2.modeling_swinv2.Swinv2Layer": "FusedSwinv2Layer",
}
#: token-dropping layers (only with token_drop=)
_TOKEN_LAYERS = {
    "transformers.models.vit.modeling_vit.ViTLayer": "TokenDropViTLayer",
    "transformers.models.dinov2.modeling_dinov2.Dinov2Layer": "TokenDropDinov2Layer",
    "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers."
    "Dinov2WithRegistersLayer": "TokenDropDinov2WithRegistersLayer",
}
_PATH_OF = {v: k for k, v in {**_WINDOW_LAYERS, **_TOKEN_LAYERS}.items()}

_SDPA_IS_RIGHT = ("kept on purpose: plain softmax attention over all tokens, which PyTorch's "
                  "fused SDPA already serves; vitkern replaces it in the layers that drop tokens "
                  "(patch_model(..., token_drop=))")
_LEFT_BY_DESIGN = {
    "transformers.models.vit.modeling_vit.ViTAttention": _SDPA_IS_RIGHT,
    "transformers.models.dinov2.modeling_dinov2.Dinov2Attention": _SDPA_IS_RIGHT,
    "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers."
    "Dinov2WithRegistersAttention": _SDPA_IS_RIGHT,
}

#: base models token_drop accepts -> (prefix tokens (class + registers), head reads only them)
_TOKEN_MODELS = ("ViTModel", "Dinov2Model", "Dinov2WithRegistersModel")
#: task models whose head reads only the class token
_CLS_HEADS = ("ViTForImageClassification",)
#: task models whose head pools the patch tokens (token_drop needs allow_pool=True)
_POOL_HEADS = ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")


#: fused class -> the transformers layouts its forward can drive: (the layer forward's parameter
#: names, attributes the fused forward reads, the fused forward). The forward signature tells the
#: transformers generation (4: attention.self / attention.output, explicit head_mask and
#: output_attentions; 5: q_proj / k_proj / v_proj / o_proj, **kwargs); a layer of another layout
#: is left alone with a reason instead of being mis-driven.
_SWIN4_ATTRS = ("layernorm_before", "layernorm_after", "intermediate", "output", "drop_path",
                "window_size", "shift_size", "attention.self.query", "attention.self.key",
                "attention.self.value", "attention.self.dropout", "attention.self.window_size",
                "attention.self.num_attention_heads", "attention.self.attention_head_size",
                "attention.output.dense", "attention.output.dropout")
_LAYOUTS = {
    "FusedSwinLayer": [
        (("self", "hidden_states", "input_dimensions", "always_partition", "kwargs"),
         ("layernorm_before", "layernorm_after", "mlp", "dropout", "drop_path", "window_size",
          "shift_size", "set_shift_and_window_size", "attention.q_proj", "attention.k_proj",
          "attention.v_proj", "attention.o_proj", "attention.scaling", "attention.head_dim",
          "attention.num_attention_heads", "attention.attention_dropout", "attention.config",
          "attention.relative_position_bias.relative_position_bias_table",
          "attention.relative_position_bias.window_size"),
         _swin_layer_forward),
        (("self", "hidden_states", "input_dimensions", "head_mask", "output_attentions",
          "always_partition"),
         _SWIN4_ATTRS + ("set_shift_and_window_size",
                         "attention.self.relative_position_bias_table"),
         _swin4_layer_forward),
    ],
    "FusedSwinv2Layer": [
        (("self", "hidden_states", "input_dimensions", "output_attentions"),
         _SWIN4_ATTRS + ("attention.self.logit_scale",
                         "attention.self.continuous_position_bias_mlp",
                         "attention.self.relative_coords_table"),
         _swinv2_layer_forward),
        (("self", "hidden_states", "input_dimensions", "head_mask", "output_attentions"),
         _SWIN4_ATTRS + ("attention.self.logit_scale",
                         "attention.self.continuous_position_bias_mlp",
                         "attention.self.relative_coords_table"),
         _swinv2_4_layer_forward),
    ],
    # token dropping: transformers 5 only (transformers 4 records attentions by patching the
    # attention modules' forward, which a dropping layer could not detect reliably)
    "TokenDropViTLayer": [
        (("self", "hidden_states", "attention_mask", "kwargs"),
         ("layernorm_before", "layernorm_after", "mlp", "dropout"), _vit_layer_forward),
    ],
    "TokenDropDinov2Layer": [
        (("self", "hidden_states", "attention_mask", "kwargs"),
         ("norm1", "norm2", "layer_scale1", "layer_scale2", "mlp", "drop_path"),
         _dinov2_layer_forward),
    ],
}
_LAYOUTS["TokenDropDinov2WithRegistersLayer"] = _LAYOUTS["TokenDropDinov2Layer"]
_TOKEN_ATTENTION = ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                    "attention.o_proj", "attention.scaling", "attention.head_dim",
                    "attention.num_attention_heads", "attention.attention_dropout",
                    "attention.config")


def _layout(fused: str, base: type):
    """(params, attrs, forward) of the layout of transformers class ``base`` (None: unknown)."""
    import inspect

    got = tuple(inspect.signature(base.forward).parameters)
    return next((alt for alt in _LAYOUTS[fused] if alt[0] == got), None)


def _signature_reason(fused: str, base: type) -> str:
    import inspect

    got = tuple(inspect.signature(base.forward).parameters)
    known = " or ".join(str(alt[0]) for alt in _LAYOUTS[fused])
    return (f"this transformers version's {base.__name__}.forward{got} is not a layout vitkern "
            f"drives ({known})")


def _layout_reason(fused: str, layer: nn.Module) -> Optional[str]:
    """Why ``layer`` does not have a layout ``fused``'s forward drives (None when it has)."""
    base = layer._vitkern_base if type(layer).__module__ == __name__ else type(layer)
    layout = _layout(fused, base)
    if layout is None:
        return _signature_reason(fused, base)
    attrs = layout[1] + (_TOKEN_ATTENTION if fused.startswith("TokenDrop") else ())
    for attr in attrs:
        obj = layer
        for part in attr.split("."):
            if not hasattr(obj, part):
                return (f"this transformers version's {type(layer).__name__} has no {attr!r}: "
                        f"not a layout vitkern drives")
            obj = getattr(obj, part)
    return None


def _swinv2_mask_value(layer: nn.Module) -> Optional[float]:
    """The shift-mask value transformers' Swin V2 attention applies: its
    ``Swinv2SelfAttention.forward`` adds the -100 mask twice (transformers 5), so -200; read from
    its source so that a version adding it once gets -100."""
    import inspect

    try:
        src = inspect.getsource(type(layer.attention.self).forward)
    except (OSError, TypeError):
        return None
    count = src.count("+ attention_mask.unsqueeze(1).unsqueeze(0)")
    return -100.0 * count if count in (1, 2) else None


def _layer_path(module: nn.Module) -> str:
    """The transformers class path of a layer, also for an already fused one (so that patching
    twice only updates the options)."""
    if type(module).__module__ == __name__:
        return _PATH_OF.get(type(module).__name__, class_path(module))
    return class_path(module)


# --------------------------------------------------------------------------------------------
# patch_model
# --------------------------------------------------------------------------------------------


def patch_model(model: nn.Module, *, backend: str = "auto",
                token_drop: Union[None, float, dict] = None) -> PatchReport:
    """Patch a transformers Swin / Swin V2 / ViT / DINOv2 model (or a task model around one) in
    place; returns a :class:`PatchReport`.

    * Every ``SwinLayer`` / ``Swinv2Layer`` becomes :class:`FusedSwinLayer` /
      :class:`FusedSwinv2Layer` (the same object, its class switched): window attention on the
      whole map in one :func:`vitkern.ops.window_attention` call. Outputs equal transformers'
      (fp32 rounding), at any input size transformers accepts (padding, its window clamp,
      ``interpolate_pos_encoding``).
    * ``token_drop`` (``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel`` and
      ``ViTForImageClassification``): EViT at blocks depth//4, depth//2, 3·depth//4. A keep rate
      (float in (0, 1]: the share of image tokens kept, ``ceil(rate·n)``), or a dict with
      ``keep_rate`` (float rate, or int count of image tokens), ``layers`` (layer indices),
      ``fuse`` (EViT's fused token of the dropped ones, appended last, default True), ``order``
      ("score", EViT's, or "index") and ``allow_pool`` (accept DINOv2's classification heads,
      which average the patch tokens: they then average the kept and fused ones). A bare int is
      refused as ambiguous (``1`` would keep one token). Every prefix token (class token,
      registers) is kept. At keep rate 1.0 nothing is dropped and the outputs equal the
      unpatched model's; below it ``last_hidden_state`` has fewer tokens (class token first, so
      ``pooler_output`` and the ViT classifier work as before). ``attention_mask`` and
      ``output_attentions`` are refused by the dropping layers.

    ``backend``: "auto", "triton", "cuda" or "reference", passed to the ops. Parameters, buffers,
    ``state_dict`` keys and ``named_parameters()`` order are unchanged.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"patch_model: unknown backend {backend!r}; choose one of {_BACKENDS}")
    report = PatchReport()
    served: set[str] = set()  # layers handled (patched, or left with a reason)
    if token_drop is not None:
        served |= _patch_tokens(model, token_drop, backend, report)
    for name, module in model.named_modules():
        path = _layer_path(module)
        fused = _WINDOW_LAYERS.get(path)  # exact classes: a subclass may change forward
        if fused is None:
            continue
        why = _layout_reason(fused, module)
        if why is None and fused == "FusedSwinv2Layer":
            mask_value = _swinv2_mask_value(module)
            if mask_value is None:
                why = ("cannot tell how this transformers version applies Swin V2's shift mask "
                       "(Swinv2SelfAttention.forward's source)")
            else:
                module.vitkern_mask_value = mask_value
        if why is not None:
            report.left.append((name, path, why))
            served.add(name)  # reported: its attention needs no row of its own
            continue
        module.__class__ = _fused_class(fused)
        module.vitkern_backend = backend
        report.replaced.append((name, path, class_path(module)))
        served.add(name)
        p = (module.attention.self.dropout.p if hasattr(module.attention, "self")
             else module.attention.attention_dropout)
        if p > 0:
            report.left.append((f"{name}.attention", class_path(module.attention),
                                f"attention dropout p={p}: in training mode this layer runs "
                                "transformers' own (unfused) path, as the fused op has no "
                                "dropout on the probabilities; eval mode is fused"))
    for name, module in model.named_modules():
        path = class_path(module)
        if "Attention" not in type(module).__name__ or not path.startswith("transformers."):
            continue
        if any(name.startswith(f"{s}.") for s in served):
            continue  # inside a handled layer (Swin V2's attention.self too)
        report.left.append((name, path, _LEFT_BY_DESIGN.get(
            path, "no vitkern patch for this class")))
    return report


def _patch_tokens(model: nn.Module, token_drop, backend: str, report: PatchReport) -> set[str]:
    """EViT token dropping on a transformers ViT / DINOv2; returns the patched layers' names."""
    opts = drop_options(token_drop)
    keep, order = opts.get("keep_rate", 1.0), opts.get("order", "score")
    fuse = bool(opts.get("fuse", True))

    top = type(model).__name__
    base = getattr(model, "base_model", model)
    base_name = type(base).__name__
    if base_name not in _TOKEN_MODELS or not type(base).__module__.startswith("transformers."):
        raise ValueError(f"patch_model: token_drop (EViT) supports transformers' "
                         f"{', '.join(_TOKEN_MODELS)} and their image classifiers, got "
                         f"{class_path(model)}")
    if top in _POOL_HEADS and not opts.get("allow_pool", False):
        raise ValueError(f"patch_model: {top}'s head averages the patch tokens, and with "
                         f"token_drop it would average the kept and fused ones only; pass "
                         f"token_drop=dict(..., allow_pool=True) to accept that")
    if base is not model and top not in _CLS_HEADS + _POOL_HEADS:
        raise ValueError(f"patch_model: token_drop changes the number of tokens {top}'s head "
                         f"receives (it needs every patch token); patch the base model "
                         f"(model.{model.base_model_prefix}) only if you use just its class "
                         f"token")
    # the layer list: the ModuleList whose children are the model's transformer layers
    layer_list, list_name = None, ""
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
                _layer_path(m) in _TOKEN_LAYERS for m in module):
            layer_list, list_name = module, name
            break
    if layer_list is None:
        raise ValueError(f"patch_model: no ViT / DINOv2 layer list found in {class_path(base)} "
                         f"(supported layers: {', '.join(_TOKEN_LAYERS)})")
    prefix = (f"{model.base_model_prefix}." if base is not model else "") + list_name
    depth = len(layer_list)
    layers = block_indices(opts, depth, (depth // 4, depth // 2, 3 * depth // 4))
    num_prefix = 1 + int(getattr(base.config, "num_register_tokens", 0) or 0)
    what = (f"EViT drop: keep {keep} of the image tokens, fuse={fuse}, order={order}, "
            f"{num_prefix} prefix token(s) kept")
    for i in layers:  # every layer checked before any is patched: all or nothing
        why = _layout_reason(_TOKEN_LAYERS[_layer_path(layer_list[i])], layer_list[i])
        if why is not None:
            raise UnsupportedModule(f"patch_model: token_drop cannot patch {prefix}.{i}: {why}")
    served = set()
    for i in layers:
        layer, name = layer_list[i], f"{prefix}.{i}"
        path = _layer_path(layer)
        layer.__class__ = _fused_class(_TOKEN_LAYERS[path])
        layer.vitkern_backend = backend
        layer.vitkern_token_drop = dict(keep=keep, fuse=fuse, order=order, num_prefix=num_prefix)
        report.replaced.append((name, path, class_path(layer)))
        report.tokens.append((name, what))
        served.add(name)
        p = layer.attention.attention_dropout
        if p > 0:
            report.left.append((f"{name}.attention", class_path(layer.attention),
                                f"attention dropout p={p}: in training mode this layer forms "
                                "the attention probabilities eagerly (the fused op has no "
                                "dropout on them); eval mode is fused"))
    return served
