"""Triton kernels of vitkern, installed as ``vitkern.triton_kernels``.

One module per op family; ``attention_core`` holds the softmax-attention math they share.
Each family module declares its capability (``unsupported``), its tile candidates, and the
specialisations the ahead-of-time check proves in ``aot_specs()``; ``tuning`` chooses tiles.
"""
import os

KERNEL_MODULES = ("hilo", "window", "token", "linear", "ppma")


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the Triton interpreter (importing this
    package does not import triton: ``vitkern.backends`` asks it cheaply)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
