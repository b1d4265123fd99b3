"""Drop-in modules with the original papers' parameter names (checkpoints load unchanged)."""
from .hilo import HiLo
from .linear import XCA, LinearAttention, SoftAttention
from .ppma import PolylinePathAttention
from .token import TokenAttention, TokenBlock
from .window import (SparseSwinBlock, WindowAttention, WindowAttentionV2, keep_windows,
                     window_scores)

__all__ = ["HiLo", "XCA", "LinearAttention", "SoftAttention", "TokenAttention", "TokenBlock", "PolylinePathAttention", "WindowAttention",
           "WindowAttentionV2", "SparseSwinBlock", "keep_windows", "window_scores"]
