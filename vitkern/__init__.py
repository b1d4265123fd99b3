"""vitkern: fused GPU attention kernels for Vision Transformers.

``vitkern.ops`` (functional ops), ``vitkern.nn`` (drop-in modules), ``vitkern.reference``
(pure-PyTorch definitions), ``vitkern.backends`` (dispatch), ``python -m vitkern info``.
"""
__version__ = "0.1.0"

from . import backends, ops, reference  # noqa: E402,F401

__all__ = ["ops", "reference", "backends", "__version__"]
