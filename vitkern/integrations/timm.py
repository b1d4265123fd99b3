"""Patch a timm model in place with vitkern's fused attention.

``report = patch_model(model)`` walks ``model.named_modules()`` and swaps every attention module of a
class vitkern supports for the matching ``vitkern.nn`` module, built by that class's
``from_timm(module, backend=...)``. The new module reuses the timm module's parameter objects (no
copy), so an optimizer built before patching keeps training the same tensors and the model's
``state_dict`` keys are unchanged. Modules vitkern cannot serve are left in place and the report
says why.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

from torch import nn

__all__ = ["patch_model", "PatchReport", "UnsupportedModule"]


class UnsupportedModule(ValueError):
    """Raised by a ``from_timm`` that cannot reproduce the given timm module; the message says why."""


@dataclass
class PatchReport:
    """What :func:`patch_model` did: ``replaced`` rows ``(name, timm class, vitkern class)`` and
    ``left`` rows ``(name, timm class, reason)``."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"vitkern.patch_model: {len(self.replaced)} replaced, {len(self.left)} left"]
        lines += [f"  replaced {name}: {old} -> {new}" for name, old, new in self.replaced]
        lines += [f"  left     {name}: {old} ({why})" for name, old, why in self.left]
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


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Attention" in name or name in ("XCA",)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def patch_model(model: nn.Module, *, backend: str = "auto") -> PatchReport:
    """Replace, in place, every attention module of ``model`` that vitkern supports.

    Returns a :class:`PatchReport` listing what was replaced and what was left and why (an
    attention class vitkern has no module for, or a configuration its module refuses).
    """
    table = _replacements()
    report = PatchReport()
    for name, module in list(model.named_modules()):
        path = _class_path(module)
        cls = table.get(path)
        if cls is None:
            if _looks_like_attention(module) and not path.startswith("vitkern."):
                report.left.append((name, path, "no vitkern module for this class"))
            continue
        try:
            new = cls.from_timm(module, backend=backend)
        except UnsupportedModule as exc:
            report.left.append((name, path, str(exc)))
            continue
        _set_submodule(model, name, new)
        report.replaced.append((name, path, _class_path(new)))
    return report
