"""Patch a timm model in place with vitkern's fused attention.

``report = patch_model(model)`` walks ``model.named_modules()`` and swaps every attention module of a
class vitkern supports for the matching ``vitkern.nn`` module, built by that class's
``from_timm(module, backend=...)``. The new module reuses the timm module's parameter objects (no
copy), so an optimizer built before patching keeps training the same tensors and the model's
``state_dict`` keys are unchanged. Modules vitkern cannot serve are left in place and the report
says why.

The papers' own models are patched too: LITv2's ``HiLo`` (classification, detection and
segmentation copies), PPMA's ``MambaAttentionAllDouble`` / ``MambaAttentionChunkDouble`` and
EViT's ``Block`` / ``Attention``, recognised by class name plus layout wherever their module
lives (:mod:`vitkern.integrations.papers`); a module named like theirs whose layout differs is
listed in ``report.left`` with the reason.

Token reduction (timm ``VisionTransformer`` only): ``patch_model(model, token_drop=0.7)`` applies
EViT-style dropping (keep rate, at blocks depth//4, depth//2, 3·depth//4 unless ``layers`` says
otherwise) and ``patch_model(model, token_merge=8)`` ToMe-style merging (r tokens per block);
see :func:`patch_model`. The affected blocks become :class:`vitkern.nn.token.TokenBlock` (the
same submodules and parameters) with :class:`vitkern.nn.token.TokenAttention`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Optional, Union

from torch import nn

from vitkern.errors import UnsupportedModule

__all__ = ["patch_model", "PatchReport", "UnsupportedModule"]


@dataclass
class PatchReport:
    """What :func:`patch_model` did: ``replaced`` rows ``(name, timm class, vitkern class)``,
    ``left`` rows ``(name, timm class, reason)`` and ``tokens`` rows ``(block name, what it does
    to the tokens)`` for token_drop / token_merge."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)
    tokens: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"vitkern.patch_model: {len(self.replaced)} replaced, {len(self.left)} left"]
        lines += [f"  replaced {name}: {old} -> {new}" for name, old, new in self.replaced]
        lines += [f"  left     {name}: {old} ({why})" for name, old, why in self.left]
        lines += [f"  tokens   {name}: {what}" for name, what in self.tokens]
        return "\n".join(lines)


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _replacements() -> dict[str, type]:
    """timm class path -> vitkern module class that has ``from_timm(module, backend=...)``.

    Each family's ``vitkern.nn.<family>`` lists the timm classes it replaces in its
    ``TIMM_REPLACEMENTS`` dict; this merges them.
    """
    import vitkern.nn

    table: dict[str, type] = {}
    for info in pkgutil.iter_modules(vitkern.nn.__path__):
        family = importlib.import_module(f"vitkern.nn.{info.name}")
        table.update(getattr(family, "TIMM_REPLACEMENTS", {}))
    return table


#: timm attention classes left alone on purpose -> what the user needs to know
_SDPA_IS_RIGHT = ("kept on purpose: plain softmax attention over all tokens, which PyTorch's "
                  "fused SDPA already serves; vitkern replaces it in the blocks that drop or "
                  "merge tokens (patch_model(..., token_drop= / token_merge=))")
_LEFT_BY_DESIGN = {
    "timm.layers.attention.Attention": _SDPA_IS_RIGHT,
    "timm.models.vision_transformer.Attention": _SDPA_IS_RIGHT,
    "timm.models.xcit.ClassAttentionBlock": (
        "kept on purpose: XCiT's class attention (one query, the class token, per image) is "
        "already cheap and runs PyTorch's SDPA; its XCA blocks are the ones vitkern replaces"),
}


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Attention" in name or name in ("XCA",)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:  # the model itself, patched in place (a Swin block's class switch)
        assert new is model
        return
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def patch_model(model: nn.Module, *, backend: str = "auto",
                token_drop: Union[None, float, dict] = None,
                token_merge: Union[None, int, dict] = None) -> PatchReport:
    """Replace, in place, every attention module of ``model`` that vitkern supports.

    Returns a :class:`PatchReport` listing what was replaced and what was left and why (an
    attention class vitkern has no module for, or a configuration its module refuses).

    Token reduction, for a timm ``VisionTransformer`` (one of the two at a time):

    * ``token_drop``: EViT. A keep rate (float), or a dict with ``keep_rate`` (float rate or int
      count of image tokens), ``layers`` (block indices; default depth//4, depth//2,
      3·depth//4: EViT's 3, 6, 9 for 12 blocks), ``fuse`` (EViT's fused token of the dropped
      ones, default True), ``order`` ("score", EViT's, or "index"), ``allow_pool`` (accept a
      model whose head pools tokens, ``global_pool != "token"``: it then pools the kept ones;
      refused by default). Needs a class token. With keep rate 1.0 nothing is dropped and the
      logits equal the unpatched model's. A bare int is refused as ambiguous (``1`` would keep
      one token): use a float rate or ``dict(keep_rate=count)``. Every prefix token (class,
      distillation, register tokens) is kept; the importance is the class token's attention.
    * ``token_merge``: ToMe. ``r`` (int, tokens merged away per block), or a dict with ``r``,
      ``layers`` (default every block) and ``prop_attn`` (proportional attention, log(size)
      key bias, default True). Prefix tokens are never merged and stay first.

    The chosen blocks become :class:`vitkern.nn.token.TokenBlock` (the timm block's own
    submodules and parameters) with :class:`vitkern.nn.token.TokenAttention`; ``report.tokens``
    lists them.
    """
    report = PatchReport()
    if token_drop is not None or token_merge is not None:
        _patch_tokens(model, token_drop, token_merge, backend, report)
    table = _replacements()
    whole: list[str] = []  # modules replaced with their submodules (EViT blocks)
    for name, module in list(model.named_modules()):
        path = _class_path(module)
        cls = table.get(path)
        if cls is None:
            if any(name.startswith(f"{done}.") for done in whole):
                continue  # a submodule of one replaced above, already reported there
            paper = _patch_paper(model, name, module, path, backend, report)
            if paper is not None:  # one of the papers' modules: replaced, or left with a reason
                if paper:
                    whole.append(name)
                continue
            if _looks_like_attention(module) and not path.startswith("vitkern."):
                report.left.append((name, path, _LEFT_BY_DESIGN.get(
                    path, "no vitkern module for this class")))
            continue
        try:
            new = cls.from_timm(module, backend=backend)
        except UnsupportedModule as exc:
            report.left.append((name, path, str(exc)))
            continue
        if not name and new is not model:
            report.left.append(("<model>", path, f"the model is this module itself, which cannot "
                                f"be replaced in place: use {cls.__name__}.from_timm(model)"))
            continue
        _set_submodule(model, name, new)
        report.replaced.append((name, path, _class_path(new)))
    return report


def _patch_paper(model: nn.Module, name: str, module: nn.Module, path: str, backend: str,
                 report: PatchReport) -> Optional[bool]:
    """Replace a module of the papers' own models (LITv2, PPMA, EViT), recognised by class name
    and layout (:mod:`vitkern.integrations.papers`). None: not one of theirs; True: replaced;
    False: theirs by name, refused in ``report.left``."""
    from vitkern.integrations import papers  # imports this module: load it on first use

    try:
        hit = papers.replace(module, backend=backend)
    except UnsupportedModule as exc:
        report.left.append((name or "<model>", path, str(exc)))
        return False
    if hit is None:
        return None
    if not name:
        report.left.append(("<model>", path, f"the model is this {hit.paper} module itself, "
                                             f"which cannot be replaced in place"))
        return False
    _set_submodule(model, name, hit.new)
    report.replaced.append((name, path, _class_path(hit.new)))
    report.replaced += [(f"{name}.{child}", old, new) for child, old, new in hit.children]
    if hit.tokens:
        report.tokens.append((name, hit.tokens))
    return True


# --------------------------------------------------------------------------------------------
# token reduction (EViT dropping, ToMe merging) for timm VisionTransformer
# --------------------------------------------------------------------------------------------

_TIMM_BLOCK = "timm.models.vision_transformer.Block"
_TIMM_ATTENTION = ("timm.layers.attention.Attention",
                   "timm.models.vision_transformer.Attention")


def _as_options(value, key: str, allowed: set[str], what: str) -> dict:
    opts = dict(value) if isinstance(value, dict) else {key: value}
    unknown = set(opts) - allowed
    if unknown:
        raise ValueError(f"patch_model: unknown {what} option(s) {sorted(unknown)}; allowed: "
                         f"{sorted(allowed)}")
    return opts


def _drop_options(token_drop) -> dict:
    """``token_drop`` (EViT) as an option dict, checked now rather than at the first forward:
    a bare int is refused as ambiguous, and a bad keep rate / count or order raises."""
    from vitkern import tokens

    if isinstance(token_drop, int) and not isinstance(token_drop, bool):
        raise ValueError(f"patch_model: token_drop={token_drop} is ambiguous: pass a keep rate "
                         f"as a float (1.0 keeps every token) or a count of image tokens as "
                         f"token_drop=dict(keep_rate={token_drop})")
    opts = _as_options(token_drop, "keep_rate",
                       {"keep_rate", "layers", "fuse", "order", "allow_pool"}, "token_drop")
    tokens.keep_count(1, opts.get("keep_rate", 1.0))
    tokens._check_order(opts.get("order", "score"))
    return opts


def _layers(opts: dict, depth: int, default) -> list[int]:
    layers = sorted(set(opts.get("layers", default)))
    bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < depth)]
    if bad:
        raise ValueError(f"patch_model: layers {bad} out of range for a model of {depth} blocks")
    return layers


def _patch_tokens(model: nn.Module, token_drop, token_merge, backend: str,
                  report: PatchReport) -> None:
    from vitkern.nn.token import TokenAttention, TokenBlock

    if token_drop is not None and token_merge is not None:
        raise ValueError("patch_model: pass token_drop (EViT) or token_merge (ToMe), not both")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(f"patch_model: token_drop / token_merge need a timm VisionTransformer "
                         f"(blocks in an nn.Sequential), got {_class_path(model)}")
    depth = len(blocks)
    n_prefix = model.num_prefix_tokens
    if token_drop is not None:
        opts = _drop_options(token_drop)
        keep = opts.get("keep_rate", 1.0)
        layers = _layers(opts, depth, (depth // 4, depth // 2, 3 * depth // 4))
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
        opts = _as_options(token_merge, "r", {"r", "layers", "prop_attn"}, "token_merge")
        r = opts.get("r", 0)
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"patch_model: token_merge r must be an int >= 0, got {r!r}")
        layers = _layers(opts, depth, range(depth))
        # every prefix token (class, distillation, registers) is kept out of the matching
        kw = dict(mode="merge", r=r, prop_attn=opts.get("prop_attn", True), state={},
                  num_prefix=n_prefix)
        what = f"ToMe merge: r={r}, prop_attn={kw['prop_attn']}"
    first = True
    for i in layers:
        block, name = blocks[i], f"blocks.{i}"
        path = _class_path(block)
        attn_path = _class_path(getattr(block, "attn", block))
        if path != _TIMM_BLOCK or attn_path not in _TIMM_ATTENTION:
            report.left.append((name, path, f"token reduction needs {_TIMM_BLOCK} with timm's "
                                            f"ViT Attention (got {attn_path})"))
            continue
        try:
            attn = TokenAttention.from_timm(block.attn, backend=backend)
        except UnsupportedModule as exc:
            report.left.append((name, path, str(exc)))
            continue
        blocks[i] = TokenBlock(block, attn, first=first, **kw)
        first = False
        report.replaced.append((f"{name}.attn", attn_path, _class_path(attn)))
        report.tokens.append((name, what))
