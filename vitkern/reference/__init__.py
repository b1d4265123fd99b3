"""Pure-PyTorch definitions of every vitkern op (the kernels are tested against these).

One module per op family; each one's ``__all__`` is exported here.
"""
from vitkern._families import export_families

__all__ = export_families(__name__, __path__, globals())
