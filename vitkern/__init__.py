"""vitkern: fused GPU attention kernels for Vision Transformers.

``vitkern.ops`` (functional ops), ``vitkern.nn`` (drop-in modules), ``vitkern.tokens`` (token
selection and merging helpers), ``vitkern.integrations.timm`` (timm model patching),
``vitkern.reference`` (pure-PyTorch definitions), ``vitkern.backends`` (dispatch),
``python -m vitkern info``.
"""
__version__ = "0.1.0"

#: The release ranges the test suite runs with in CI (.ci/run: the README's install, the oldest
#: supported pair torch 2.11 + triton 3.6, and the newest releases). Others may work; untested.
TESTED = {"python": ("3.11", "3.11"), "torch": ("2.11", "2.15"), "triton": ("3.6", "3.9")}

from . import backends, ops, reference, tokens  # noqa: E402,F401

__all__ = ["ops", "reference", "backends", "tokens", "__version__"]
