"""Drop-in modules with the original papers' parameter names (checkpoints load unchanged)."""
from .hilo import HiLo
from .linear import XCA, LinearAttention
from .ppma import PolylinePathAttention

__all__ = ["HiLo", "XCA", "LinearAttention", "PolylinePathAttention"]
