"""Public ops ``vitkern.ops.<op>(...)``, each with ``backend="auto"|"triton"|"cuda"|"reference"``."""
from .hilo import hifi_attention, hilo_attention, lofi_attention
from .linear import linear_attention, newton_schulz_inverse, soft_attention, xca_attention
from .ppma import (ppma_attention, ppma_criss_cross_attention, ppma_decays, ppma_rel_pos,
                   ppma_rope)
from .token import token_attention
from .window import window_attention

__all__ = ["hilo_attention", "hifi_attention", "lofi_attention", "window_attention",
           "token_attention", "linear_attention", "xca_attention",
           "soft_attention", "newton_schulz_inverse", "ppma_attention",
           "ppma_criss_cross_attention", "ppma_decays", "ppma_rope", "ppma_rel_pos"]
