"""What the patchers of :mod:`vitkern.integrations` share (timm, transformers, the papers' models).

* :class:`PatchReport` — what a ``patch_model`` did (re-exported as
  ``vitkern.integrations.timm.PatchReport`` and ``vitkern.integrations.transformers.PatchReport``);
* :func:`class_path` — a module's (or class's) ``module.qualname``, the key of every table;
* :func:`as_options`, :func:`drop_options`, :func:`block_indices` — the ``token_drop`` /
  ``token_merge`` options, checked when ``patch_model`` is called rather than at the first forward;
* :class:`LazyClasses` — the fused subclasses of a library's layer classes, built on first use.

Imports only downward (``vitkern.tokens``); no third-party model library.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vitkern import tokens

__all__ = ["PatchReport", "class_path", "as_options", "drop_options", "block_indices",
           "LazyClasses"]


@dataclass
class PatchReport:
    """What ``patch_model`` did: ``replaced`` rows ``(name, original class, vitkern class)``,
    ``left`` rows ``(name, original class, reason)`` and ``tokens`` rows ``(block name, what it
    does to the tokens)`` for token_drop / token_merge."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)
    tokens: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"vitkern.patch_model: {len(self.replaced)} replaced, {len(self.left)} left"]
        lines += [f"  replaced {name}: {old} -> {new}" for name, old, new in self.replaced]
        lines += [f"  left     {name}: {old} ({why})" for name, old, why in self.left]
        lines += [f"  tokens   {name}: {what}" for name, what in self.tokens]
        return "\n".join(lines)


def class_path(obj) -> str:
    """``module.qualname`` of a class, or of an object's class."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def as_options(value, key: str, allowed: set[str], what: str) -> dict:
    """``value`` as an option dict (a bare value is ``{key: value}``); unknown keys raise."""
    opts = dict(value) if isinstance(value, dict) else {key: value}
    unknown = set(opts) - allowed
    if unknown:
        raise ValueError(f"patch_model: unknown {what} option(s) {sorted(unknown)}; allowed: "
                         f"{sorted(allowed)}")
    return opts


def drop_options(token_drop) -> dict:
    """``token_drop`` (EViT) as an option dict, checked now rather than at the first forward:
    a bare int is refused as ambiguous, and a bad keep rate / count or order raises."""
    if isinstance(token_drop, int) and not isinstance(token_drop, bool):
        raise ValueError(f"patch_model: token_drop={token_drop} is ambiguous: pass a keep rate "
                         f"as a float (1.0 keeps every token) or a count of image tokens as "
                         f"token_drop=dict(keep_rate={token_drop})")
    opts = as_options(token_drop, "keep_rate",
                      {"keep_rate", "layers", "fuse", "order", "allow_pool"}, "token_drop")
    tokens.keep_count(1, opts.get("keep_rate", 1.0))
    tokens._check_order(opts.get("order", "score"))
    return opts


def block_indices(opts: dict, depth: int, default) -> list[int]:
    """The sorted block indices ``opts["layers"]`` (or ``default``), each in ``[0, depth)``."""
    layers = sorted(set(opts.get("layers", default)))
    bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < depth)]
    if bad:
        raise ValueError(f"patch_model: layers {bad} out of range for a model of {depth} blocks")
    return layers


class LazyClasses:
    """Subclasses of a third-party library's classes, built by ``build(name)`` on first use (so
    that the library stays optional) and cached. Calling it gives the class; ``module_getattr``
    is the owning module's PEP 562 ``__getattr__``, so the classes are importable from there
    (pickle, isinstance)."""

    def __init__(self, module: str, names, build: Callable[[str], type]):
        self.module, self.names, self.build = module, names, build
        self.built: dict[str, type] = {}

    def __call__(self, name: str) -> type:
        cls = self.built.get(name)
        if cls is None:
            cls = self.built[name] = self.build(name)
        return cls

    def module_getattr(self, name: str) -> type:
        if name in self.names:
            return self(name)
        raise AttributeError(f"module {self.module!r} has no attribute {name!r}")
