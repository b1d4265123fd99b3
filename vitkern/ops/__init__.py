"""Public ops: ``vitkern.ops.<op>(...)``, each with ``backend="auto" | "triton" | "cuda" | "reference"``."""
from .hilo import hifi_attention, hilo_attention, lofi_attention

__all__ = ["hilo_attention", "hifi_attention", "lofi_attention"]
