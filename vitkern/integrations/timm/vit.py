"""timm ViT adapters: :class:`vitkern.nn.TokenAttention` from timm's ``Attention``, and EViT token
dropping / ToMe token merging on a timm ``VisionTransformer`` (:func:`patch_tokens`, called by
:func:`vitkern.integrations.timm.patch_model` for ``token_drop=`` / ``token_merge=``).

``TIMM_REPLACEMENTS`` is deliberately empty: swapping *every* ViT attention for
``token_attention`` when no token is dropped buys nothing over PyTorch's fused SDPA
(FlashAttention on a GPU) for dense attention, so plain ``patch_model(model)`` leaves ViT
attention alone (``TIMM_LEFT`` says so in the report); only the token options install
:class:`~vitkern.nn.token.TokenBlock` with :class:`~vitkern.nn.token.TokenAttention`.
"""
from __future__ import annotations

from torch import nn

from vitkern.errors import UnsupportedModule
from vitkern.integrations._common import (PatchReport, as_options, block_indices, class_path,
                                          drop_options)
from vitkern.nn.token import TokenAttention, TokenBlock

__all__ = ["token_attention_from_timm", "patch_tokens", "TIMM_REPLACEMENTS", "TIMM_LEFT"]

#: timm classes :func:`vitkern.integrations.timm.patch_model` replaces (none: see above)
TIMM_REPLACEMENTS: dict[str, type] = {}

_SDPA_IS_RIGHT = ("kept on purpose: plain softmax attention over all tokens, which PyTorch's "
                  "fused SDPA already serves; vitkern replaces it in the blocks that drop or "
                  "merge tokens (patch_model(..., token_drop= / token_merge=))")
#: timm classes left alone on purpose -> what the report says
TIMM_LEFT = {
    "timm.layers.attention.Attention": _SDPA_IS_RIGHT,
    "timm.models.vision_transformer.Attention": _SDPA_IS_RIGHT,
}


def token_attention_from_timm(module: nn.Module, backend: str = "auto", *,
                              cls: type = TokenAttention) -> TokenAttention:
    """``cls`` (:class:`~vitkern.nn.token.TokenAttention`) from a
    ``timm.layers.attention.Attention`` (timm's ViT attention), reusing its submodules (its
    ``attn_drop`` too); :meth:`TokenAttention.from_timm <vitkern.nn.token.TokenAttention.from_timm>`
    calls this."""
    for name in ("qkv", "proj", "num_heads", "head_dim", "scale"):
        if not hasattr(module, name):
            raise UnsupportedModule(f"not a timm ViT Attention (no {name!r})")
    new = cls(module.qkv, module.proj, module.num_heads, module.head_dim, module.scale,
              getattr(module, "q_norm", nn.Identity()),
              getattr(module, "k_norm", nn.Identity()),
              getattr(module, "norm", nn.Identity()), getattr(module, "gate", None),
              getattr(module, "proj_drop", nn.Identity()), backend=backend,
              attn_drop=getattr(module, "attn_drop", None))
    return new.train(module.training)


# --------------------------------------------------------------------------------------------
# token reduction (EViT dropping, ToMe merging) for timm VisionTransformer
# --------------------------------------------------------------------------------------------

_TIMM_BLOCK = "timm.models.vision_transformer.Block"
_TIMM_ATTENTION = ("timm.layers.attention.Attention",
                   "timm.models.vision_transformer.Attention")


def patch_tokens(model: nn.Module, token_drop, token_merge, backend: str,
                 report: PatchReport) -> None:
    """EViT dropping (``token_drop``) or ToMe merging (``token_merge``) on a timm
    ``VisionTransformer``, in place: the chosen blocks become :class:`TokenBlock`; see
    :func:`vitkern.integrations.timm.patch_model` for the options."""
    if token_drop is not None and token_merge is not None:
        raise ValueError("patch_model: pass token_drop (EViT) or token_merge (ToMe), not both")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(f"patch_model: token_drop / token_merge need a timm VisionTransformer "
                         f"(blocks in an nn.Sequential), got {class_path(model)}")
    depth = len(blocks)
    n_prefix = model.num_prefix_tokens
    if token_drop is not None:
        opts = drop_options(token_drop)
        keep = opts.get("keep_rate", 1.0)
        layers = block_indices(opts, depth, (depth // 4, depth // 2, 3 * depth // 4))
        if n_prefix < 1 or getattr(model, "cls_token", None) is None:
            raise ValueError(f"patch_model: token_drop (EViT) needs a class token first (the "
                             f"importance is its attention); this model has none "
                             f"({n_prefix} prefix token(s))")
        pool = getattr(model, "global_pool", "token")
        if pool not in ("token", "") and not opts.get("allow_pool", False):
            raise ValueError(f"patch_model: token_drop with global_pool={pool!r} changes what the "
                             f"head sees (it pools the kept and fused tokens only, not every "
                             f"token); pass token_drop=dict(..., allow_pool=True) to accept that")
        # every prefix token (class, distillation, registers) is kept; importance from the
        # class token, EViT's rule
        kw = dict(mode="drop", keep=keep, fuse=opts.get("fuse", True),
                  order=opts.get("order", "score"), num_prefix=n_prefix)
        what = (f"EViT drop: keep {keep} of the image tokens, fuse={kw['fuse']}, "
                f"order={kw['order']}")
    else:
        opts = as_options(token_merge, "r", {"r", "layers", "prop_attn"}, "token_merge")
        r = opts.get("r", 0)
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"patch_model: token_merge r must be an int >= 0, got {r!r}")
        layers = block_indices(opts, depth, range(depth))
        # every prefix token (class, distillation, registers) is kept out of the matching
        kw = dict(mode="merge", r=r, prop_attn=opts.get("prop_attn", True), state={},
                  num_prefix=n_prefix)
        what = f"ToMe merge: r={r}, prop_attn={kw['prop_attn']}"
    first = True
    for i in layers:
        block, name = blocks[i], f"blocks.{i}"
        path = class_path(block)
        attn_path = class_path(getattr(block, "attn", block))
        if path != _TIMM_BLOCK or attn_path not in _TIMM_ATTENTION:
            report.left.append((name, path, f"token reduction needs {_TIMM_BLOCK} with timm's "
                                            f"ViT Attention (got {attn_path})"))
            continue
        try:
            attn = token_attention_from_timm(block.attn, backend=backend)
        except UnsupportedModule as exc:
            report.left.append((name, path, str(exc)))
            continue
        blocks[i] = TokenBlock(block, attn, first=first, **kw)
        first = False
        report.replaced.append((f"{name}.attn", attn_path, class_path(attn)))
        report.tokens.append((name, what))
