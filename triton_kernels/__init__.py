"""Triton kernels of vitkern, installed as ``vitkern.triton_kernels``.

One module (or folder, one algorithm per file) per op family. ``attention_core`` is the engine:
the softmax-attention forward, dQ and dK/dV bodies every family kernel runs with the family's
``@triton.jit`` hooks, and the math they share. Each family declares its capability
(``unsupported``), its tile candidates, and the specialisations the ahead-of-time check proves in
``aot_specs()``; ``tuning`` chooses tiles and launches by keyword.
"""
import os

#: Modules of this package that are not an op family's kernels.
INFRASTRUCTURE = ("aot", "attention_core", "compat", "tuning")


def _family_modules() -> tuple:
    """Every family's kernel module or folder here (found by name, nothing imported: a new
    family's file is picked up by the ahead-of-time check without an edit here)."""
    import pkgutil

    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if m.name not in INFRASTRUCTURE and not m.name.startswith("_")))


KERNEL_MODULES = _family_modules()


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the Triton interpreter (importing this
    package does not import triton: ``vitkern.backends`` asks it cheaply)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
