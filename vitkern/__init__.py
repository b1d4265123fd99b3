"""vitkern: fused GPU attention kernels for Vision Transformers.

``vitkern.ops`` (functional ops), ``vitkern.nn`` (drop-in modules), ``vitkern.tokens`` (token
selection and merging helpers), ``vitkern.integrations.timm`` (timm model patching),
``vitkern.reference`` (pure-PyTorch definitions), ``vitkern.backends`` (dispatch),
``python -m vitkern info``.
"""
__version__ = "0.1.0"

from . import backends, ops, reference, tokens  # noqa: E402,F401

__all__ = ["ops", "reference", "backends", "tokens", "__version__"]
