"""timm XCiT adapter: :class:`vitkern.nn.XCA` from ``timm.models.xcit.XCA`` (cross-covariance
attention), sharing its parameters; XCiT's class-attention blocks are left on purpose."""
from __future__ import annotations

from torch import nn

from vitkern.errors import UnsupportedModule
from vitkern.nn.linear import XCA

__all__ = ["xca_from_timm", "TIMM_REPLACEMENTS", "TIMM_LEFT"]

#: timm classes :func:`vitkern.integrations.timm.patch_model` replaces
TIMM_REPLACEMENTS = {"timm.models.xcit.XCA": XCA}

#: timm classes left alone on purpose -> what the report says
TIMM_LEFT = {
    "timm.models.xcit.ClassAttentionBlock": (
        "kept on purpose: XCiT's class attention (one query, the class token, per image) is "
        "already cheap and runs PyTorch's SDPA; its XCA blocks are the ones vitkern replaces"),
}


def xca_from_timm(module: nn.Module, *, backend: str = "auto", cls: type = XCA) -> XCA:
    """A ``cls`` (:class:`~vitkern.nn.XCA`) sharing a timm ``XCA``'s submodules and parameters
    (no copies); refuses ``attn_drop > 0``. :meth:`XCA.from_timm <vitkern.nn.XCA.from_timm>`
    calls this."""
    p = getattr(getattr(module, "attn_drop", None), "p", 0.0)
    if p:
        raise UnsupportedModule(f"attn_drop={p} (dropout on the d×d attention map) is not "
                                "supported by the fused XCA op")
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.num_heads = module.num_heads
    new.backend = backend
    new.temperature = module.temperature
    new.qkv = module.qkv
    new.proj = module.proj
    new.proj_drop = module.proj_drop
    return new
