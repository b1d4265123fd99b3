"""Patch a timm model in place with vitkern's fused attention.

``report = patch_model(model)`` walks ``model.named_modules()`` and swaps every attention module of a
class vitkern supports for the matching ``vitkern.nn`` module, built by that class's
``from_timm(module, backend=...)``. The new module reuses the timm module's parameter objects (no
copy), so an optimizer built before patching keeps training the same tensors and the model's
``state_dict`` keys are unchanged. Modules vitkern cannot serve are left in place and the report
says why.

This package holds every timm adapter, one module per family; ``vitkern.nn`` knows nothing of
timm (its ``from_timm`` classmethods are aliases that import the adapter here when called):

* :mod:`~vitkern.integrations.timm.swin` — Swin, Swin V2 and ``swinv2_cr`` window attention, the
  fused block classes (``FusedSwinTransformerBlock``, ...) and the block patches;
* :mod:`~vitkern.integrations.timm.xcit` — XCiT's ``XCA``;
* :mod:`~vitkern.integrations.timm.vit` — ViT token dropping (EViT) and merging (ToMe).

Each family module lists the timm classes it replaces in a ``TIMM_REPLACEMENTS`` dict (timm class
path -> a class with ``from_timm(module, backend=...)``) and those it leaves on purpose in
``TIMM_LEFT`` (timm class path -> the reason); :func:`patch_model` merges them.

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
from typing import Optional, Union

from torch import nn

from vitkern.errors import UnsupportedModule
from vitkern.integrations import papers
from vitkern.integrations._common import PatchReport, class_path
from vitkern.integrations.timm.vit import patch_tokens

__all__ = ["patch_model", "PatchReport", "UnsupportedModule"]


def _families() -> list:
    """The family adapter modules of this package (every module that has ``TIMM_REPLACEMENTS``)."""
    mods = (importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__))
    return [mod for mod in mods if hasattr(mod, "TIMM_REPLACEMENTS")]


def _replacements() -> dict[str, type]:
    """timm class path -> class that has ``from_timm(module, backend=...)``: every family's
    ``TIMM_REPLACEMENTS``, merged."""
    table: dict[str, type] = {}
    for family in _families():
        table.update(family.TIMM_REPLACEMENTS)
    return table


def _left_by_design() -> dict[str, str]:
    """timm attention classes left alone on purpose -> what the user needs to know: every
    family's ``TIMM_LEFT``, merged."""
    table: dict[str, str] = {}
    for family in _families():
        table.update(getattr(family, "TIMM_LEFT", {}))
    return table


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
        patch_tokens(model, token_drop, token_merge, backend, report)
    table, left_by_design = _replacements(), _left_by_design()
    whole: list[str] = []  # modules replaced with their submodules (EViT blocks)
    for name, module in list(model.named_modules()):
        path = class_path(module)
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
                report.left.append((name, path, left_by_design.get(
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
        report.replaced.append((name, path, class_path(new)))
    return report


def _patch_paper(model: nn.Module, name: str, module: nn.Module, path: str, backend: str,
                 report: PatchReport) -> Optional[bool]:
    """Replace a module of the papers' own models (LITv2, PPMA, EViT), recognised by class name
    and layout (:mod:`vitkern.integrations.papers`). None: not one of theirs; True: replaced;
    False: theirs by name, refused in ``report.left``."""
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
    report.replaced.append((name, path, class_path(hit.new)))
    report.replaced += [(f"{name}.{child}", old, new) for child, old, new in hit.children]
    if hit.tokens:
        report.tokens.append((name, hit.tokens))
    return True
