"""Drop-in modules with the original papers' parameter names (checkpoints load unchanged)."""
from .hilo import HiLo

__all__ = ["HiLo"]
