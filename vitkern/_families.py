"""One file per op family at each layer, and no list of them to keep: a layer's package exports
what each of its family modules lists in ``__all__`` (see CONTRIBUTING.md)."""
from __future__ import annotations

import importlib
import pkgutil


def export_families(package: str, path, namespace: dict) -> list:
    """Imports every public module of ``package`` (``path``: its ``__path__``; modules whose
    names start with "_" are private) and copies each one's ``__all__`` into ``namespace``.
    Returns the exported names, the package's ``__all__``."""
    names = []
    for info in pkgutil.iter_modules(path):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        namespace.update({name: getattr(module, name) for name in module.__all__})
        names += module.__all__
    return names
