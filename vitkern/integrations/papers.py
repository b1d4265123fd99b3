"""Patch models built from the papers' own repositories: LITv2, PPMA and EViT.

Users have the papers' models, not ours, and their classes live wherever the user's copy of the
repository puts them (``models.litv2.HiLo``, ``mmdet.models.backbones.litv2.HiLo``,
``__main__.HiLo``). So these are recognised by **class name plus layout** (attributes, submodule
types, parameter shapes, the ``forward`` signature), never by module path:

* LITv2 ``HiLo`` with ``forward(x)`` (classification: square map, no padding) ->
  :class:`vitkern.nn.HiLo` with ``pad=None`` (its ``forward(x)`` takes the square map);
* LITv2 ``HiLo`` with ``forward(x, H, W)`` (detection / segmentation: zero padding) ->
  :class:`vitkern.nn.HiLo` with ``pad="zero"``;
* PPMA ``MambaAttentionAllDouble`` / ``MambaAttentionChunkDouble``, ``forward(x, rel_pos)`` ->
  :class:`vitkern.nn.PolylinePathAttention`, ``mode="full"`` / ``"criss_cross"``;
* EViT ``Block`` (with ``keep_rate``, ``fuse_token``) and its ``Attention`` (with
  ``keep_rate``) -> :class:`EViTBlock` with :class:`EViTAttention` (the model's own keep rates
  and fused token, the class attention from the fused op).

Every replacement reuses the original module's parameter objects (no copy): the same
``state_dict`` keys and the same ``named_parameters()`` order, checked on every replacement, so
a checkpoint loads unchanged and an optimizer built before patching still lines up. A module
whose class name matches but whose layout does not is refused with the reason
(:class:`~vitkern.errors.UnsupportedModule`); ``patch_model`` lists it in ``report.left``.

Where the patched model differs, it raises instead of answering differently: LITv2's root
``hilo.py`` demo (``forward(x, H, W)``, no padding) is patched like the detection copy, equal on
maps divisible by the window where the demo raises on the others; LITv2's classification HiLo
with only Lo-Fi heads (alpha = 1, no released config) on a map not divisible by the window drops
the last row / column from its keys, where the patched one raises. EViT's blocks keep its rule
that only token 0 is protected (a distillation token can be dropped), and in training with
attention dropout they run EViT's eager math (the fused op has no dropout).

:func:`replace` is the hook :func:`vitkern.integrations.timm.patch_model` consults for a module
whose class is not in its timm table.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from vitkern import tokens as _tokens
from vitkern.errors import UnsupportedModule
from vitkern.integrations._common import class_path
from vitkern.nn.hilo import HiLo
from vitkern.nn.ppma import PathEmbedding2D, PolylinePathAttention, _DWConv2d
from vitkern.ops.token import token_attention

__all__ = ["replace", "PaperPatch", "EViTAttention", "EViTBlock", "PAPER_CLASSES"]


@dataclass
class PaperPatch:
    """A recognised paper module and its replacement.

    ``children`` rows ``(suffix, old class path, new class path)`` name submodules replaced along
    with it (EViT's ``attn`` inside its ``Block``); ``tokens`` says what a block does to the
    tokens (EViT's keep rate), for ``report.tokens``."""

    new: nn.Module
    paper: str
    children: list[tuple[str, str, str]] = field(default_factory=list)
    tokens: Optional[str] = None


def _refuse(paper: str, cls_name: str, why: str) -> UnsupportedModule:
    return UnsupportedModule(f"named {cls_name} like {paper}'s, but {why}; left unpatched")


def _forward_args(module: nn.Module) -> list[str]:
    """Names of ``type(module).forward``'s parameters after ``self``."""
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return []
    return list(params)[1:]


def _linear(paper, cls_name, module, name, out_f, in_f, bias: Optional[bool]) -> nn.Linear:
    """Check that ``module.<name>`` is an nn.Linear(in_f -> out_f); bias True/False/None (any)."""
    lin = getattr(module, name, None)
    if not isinstance(lin, nn.Linear):
        raise _refuse(paper, cls_name, f"{name!r} is {type(lin).__name__}, not nn.Linear")
    if tuple(lin.weight.shape) != (out_f, in_f):
        raise _refuse(paper, cls_name, f"{name}.weight is {tuple(lin.weight.shape)}, expected "
                                       f"{(out_f, in_f)}")
    if bias is not None and (lin.bias is not None) != bias:
        raise _refuse(paper, cls_name, f"{name} {'has no' if bias else 'has a'} bias")
    return lin


def _no_other_parameters(paper, cls_name, module, known) -> None:
    """Refuse a module with parameters outside the submodules the replacement uses (it would
    silently stop using them)."""
    extra = [n for n, _ in module.named_parameters() if n.split(".")[0] not in known]
    if extra:
        raise _refuse(paper, cls_name, f"it has parameters the paper's layout lacks: {extra}")


def _rebuild(new: nn.Module, old: nn.Module, use: dict[str, nn.Module],
             skip: tuple = ()) -> nn.Module:
    """Give ``new`` the children of ``old`` in ``old``'s registration order (so that
    ``named_parameters()`` and ``state_dict()`` keep their order), taking ``use[name]`` where
    the replacement needs its own module holding the same parameters."""
    for name in list(new._modules):
        delattr(new, name)
    for name, child in old.named_children():
        if name not in skip:
            setattr(new, name, use.get(name, child))
    return new.train(old.training)


def _check_same_parameters(old: nn.Module, new: nn.Module, what: str) -> None:
    """The promise of every replacement: the very same parameter objects under the same names in
    the same order, and the same state_dict keys."""
    a, b = list(old.named_parameters()), list(new.named_parameters())
    if [n for n, _ in a] != [n for n, _ in b] or any(p is not q for (_, p), (_, q) in zip(a, b)):
        raise UnsupportedModule(f"{what}: internal error, the replacement would not reuse the "
                                f"original parameters in their order; left unpatched")
    if list(old.state_dict().keys()) != list(new.state_dict().keys()):
        raise UnsupportedModule(f"{what}: internal error, the replacement's state_dict keys "
                                f"differ; left unpatched")


# --------------------------------------------------------------------------------------------
# LITv2 HiLo (classification: forward(x); detection / segmentation: forward(x, H, W))
# --------------------------------------------------------------------------------------------


def _litv2_hilo(module: nn.Module, backend: str) -> PaperPatch:
    paper, name = "LITv2", "HiLo"
    need = ("dim", "l_heads", "l_dim", "h_heads", "h_dim", "ws", "scale")
    missing = [a for a in need if not hasattr(module, a)]
    if missing:
        raise _refuse(paper, name, f"it has no attribute(s) {missing}")
    dim, lh, ld, hh, hd, ws = (int(getattr(module, a)) for a in need[:6])
    args = _forward_args(module)
    if args == ["x"]:
        pad, flavour = None, "classification, forward(x) on a square map"
    elif args == ["x", "H", "W"]:
        # LITv2's detection / segmentation copies zero-pad non-divisible maps; the root demo
        # (same call) raises there instead, and agrees everywhere else
        pad, flavour = "zero", "detection / segmentation, forward(x, H, W), zero padding"
    else:
        raise _refuse(paper, name, f"forward takes {args}, not (x) or (x, H, W)")
    heads = lh + hh
    d = ld // lh if lh else (hd // hh if hh else 0)
    if heads <= 0 or d <= 0 or ld != lh * d or hd != hh * d or dim != heads * d:
        raise _refuse(paper, name, f"its head split is inconsistent (dim={dim}, Lo-Fi "
                                   f"{lh} heads / {ld} channels, Hi-Fi {hh} heads / {hd})")
    if ws < 1 or (ws == 1 and hh):
        raise _refuse(paper, name, f"window size {ws} with {hh} Hi-Fi heads")
    bias = None
    known = []
    if lh:
        bias = _linear(paper, name, module, "l_q", ld, dim, None).bias is not None
        _linear(paper, name, module, "l_kv", 2 * ld, dim, bias)
        _linear(paper, name, module, "l_proj", ld, ld, True)
        known += ["l_q", "l_kv", "l_proj"]
    if hh:
        if bias is None:
            bias = _linear(paper, name, module, "h_qkv", 3 * hd, dim, None).bias is not None
        _linear(paper, name, module, "h_qkv", 3 * hd, dim, bias)
        _linear(paper, name, module, "h_proj", hd, hd, True)
        known += ["h_qkv", "h_proj"]
    _no_other_parameters(paper, name, module, known)
    sr = getattr(module, "sr", None)
    if sr is not None:  # LITv2's pooling module (no parameters): vitkern pools in-op
        k = sr.kernel_size if isinstance(sr, nn.AvgPool2d) else None
        if not isinstance(sr, nn.AvgPool2d) or {k, sr.stride} - {ws, (ws, ws)} or sr.padding:
            raise _refuse(paper, name, f"'sr' is {sr!r}, not AvgPool2d({ws}, {ws})")
    with torch.device("meta"):  # no allocation: the children are the original ones
        new = HiLo(dim, heads, qkv_bias=bool(bias), window_size=ws, alpha=lh / heads, pad=pad,
                   backend=backend)
    # LITv2 truncates num_heads·alpha; set the split it made instead of re-deriving it
    new.l_heads, new.l_dim, new.h_heads, new.h_dim = lh, ld, hh, hd
    new.head_dim = d
    new.scale = float(module.scale)
    _rebuild(new, module, {}, skip=("sr",))
    return PaperPatch(new, f"{paper} HiLo ({flavour})")


# --------------------------------------------------------------------------------------------
# PPMA: MambaAttentionAllDouble (full) / MambaAttentionChunkDouble (criss-cross)
# --------------------------------------------------------------------------------------------


def _ppma(mode: str) -> Callable[[nn.Module, str], PaperPatch]:
    def build(module: nn.Module, backend: str) -> PaperPatch:
        paper, name = "PPMA", type(module).__name__
        for a in ("embed_dim", "num_heads"):
            if not isinstance(getattr(module, a, None), int):
                raise _refuse(paper, name, f"it has no int attribute {a!r}")
        C, h = module.embed_dim, module.num_heads
        if h <= 0 or C % h or (C // h) % 2:
            raise _refuse(paper, name, f"embed_dim {C} / num_heads {h} does not give an even "
                                       f"head dim")
        d = C // h
        if getattr(module, "factor", 1) != 1:
            raise _refuse(paper, name, f"value_factor={module.factor} (PPMA's code, and vitkern, "
                                       f"need 1)")
        if _forward_args(module)[:2] != ["x", "rel_pos"]:
            raise _refuse(paper, name, f"forward takes {_forward_args(module)}, not (x, rel_pos)")
        for lin in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(paper, name, module, lin, C, C, True)
        conv = getattr(getattr(module, "lepe", None), "conv", None)
        if not (isinstance(conv, nn.Conv2d) and conv.in_channels == C == conv.out_channels
                and conv.groups == C and conv.kernel_size == (5, 5) and conv.stride == (1, 1)
                and conv.padding == (2, 2) and conv.dilation == (1, 1)
                and conv.padding_mode == "zeros" and conv.bias is not None):
            raise _refuse(paper, name, "'lepe.conv' is not a 5x5 depthwise Conv2d with bias, "
                                       "stride 1, padding 2")
        pe = getattr(module, "path_embed", None)
        dt = getattr(pe, "dt_linear", None)
        if not (isinstance(dt, nn.Linear) and tuple(dt.weight.shape) == (2, d) and dt.bias is None):
            raise _refuse(paper, name, "'path_embed.dt_linear' is not Linear(head_dim, 2) "
                                       "without bias")
        for p in ("dt_bias", "A_log"):
            t = getattr(pe, p, None)
            if not isinstance(t, nn.Parameter) or tuple(t.shape) != (h,):
                raise _refuse(paper, name, f"'path_embed.{p}' is not a ({h},) parameter")
        if getattr(pe, "nheads", h) != h:
            raise _refuse(paper, name, f"path_embed.nheads {pe.nheads} != num_heads {h}")
        _no_other_parameters(paper, name, module,
                             ["q_proj", "k_proj", "v_proj", "out_proj", "lepe", "path_embed"])
        _no_other_parameters(paper, name, pe, ["dt_linear", "dt_bias", "A_log"])
        if sum(1 for _ in module.lepe.parameters()) != sum(1 for _ in conv.parameters()):
            raise _refuse(paper, name, "'lepe' has parameters besides its conv")
        with torch.device("meta"):
            new = PolylinePathAttention(C, h, mode=mode, backend=backend)
            path_embed = PathEmbedding2D(C, h)
            lepe = _DWConv2d(C, 5, 1, 2)
        # vitkern's own modules (the fused decays, the same depthwise conv) on the same
        # parameter objects; their registration order is PPMA's (dt_bias, A_log, dt_linear)
        path_embed.dt_linear, path_embed.dt_bias, path_embed.A_log = dt, pe.dt_bias, pe.A_log
        lepe.conv = conv
        new.scaling = float(getattr(module, "scaling", d ** -0.5))
        _rebuild(new, module, {"path_embed": path_embed.train(pe.training),
                               "lepe": lepe.train(module.lepe.training)})
        what = "full" if mode == "full" else "criss-cross"
        return PaperPatch(new, f"PPMA {what} attention")

    return build


# --------------------------------------------------------------------------------------------
# EViT (youweiliang/evit): Block(keep_rate, fuse_token) and its Attention(keep_rate)
# --------------------------------------------------------------------------------------------


def _left_tokens(n_img: int, own_rate: float, keep_rate: float,
                 tokens: Optional[int]) -> Optional[int]:
    """EViT's rule for how many of the ``n_img`` image tokens a block keeps: None keeps all.

    The module's own rate gates dropping (EViT checks both its own and the passed rate), an
    explicit ``tokens`` count overrides it; keeping all ``n_img`` is no drop."""
    if not ((own_rate < 1 and keep_rate < 1) or tokens is not None):
        return None
    left = int(tokens) if tokens is not None else math.ceil(keep_rate * n_img)
    if not 1 <= left <= n_img:
        raise ValueError(f"EViT: keeps {left} of {n_img} image tokens (keep_rate={keep_rate}, "
                         f"tokens={tokens}); it must keep between 1 and {n_img}")
    return None if left == n_img else left


class EViTAttention(nn.Module):
    """EViT's ``Attention`` on :func:`vitkern.ops.token_attention`: the same children (``qkv``,
    ``attn_drop``, ``proj``, ``proj_drop``) and parameters, the same call and results.

    ``forward(x, keep_rate=None, tokens=None)``: x (B, N, C), token 0 the class token ->
    ``(out (B, N, C), index (B, k, C), idx (B, k), cls_attn (B, N-1), k)`` when the block drops
    (k of the N-1 image tokens kept, ``idx`` by decreasing class attention), else
    ``(out, None, None, None, N-1)``, as EViT returns. The class attention comes from the fused
    pass (no N×N matrix). Attention dropout is applied only in training, where this module runs
    EViT's eager math instead (the fused op has no dropout).
    """

    def __init__(self, num_heads: int, scale: float, keep_rate: float, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.scale, self.keep_rate = num_heads, scale, keep_rate
        self.backend = backend

    @classmethod
    def from_evit(cls, module: nn.Module, backend: str = "auto") -> "EViTAttention":
        """From EViT's ``Attention``, reusing its children; raises UnsupportedModule with the
        reason when the layout is not EViT's."""
        paper, name = "EViT", type(module).__name__
        heads, C = getattr(module, "num_heads", None), None
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear):
            C = qkv.in_features
        if not isinstance(heads, int) or C is None or heads <= 0 or C % heads:
            raise _refuse(paper, name, "it has no 'qkv' nn.Linear / int 'num_heads' that "
                                       "divides its width")
        _linear(paper, name, module, "qkv", 3 * C, C, None)
        _linear(paper, name, module, "proj", C, C, None)
        for a in ("scale", "keep_rate"):
            if not isinstance(getattr(module, a, None), (int, float)):
                raise _refuse(paper, name, f"it has no number {a!r}")
        if not 0 < module.keep_rate <= 1:
            raise _refuse(paper, name, f"keep_rate {module.keep_rate} is not in (0, 1]")
        if _forward_args(module)[:3] != ["x", "keep_rate", "tokens"]:
            raise _refuse(paper, name, f"forward takes {_forward_args(module)}, not "
                                       f"(x, keep_rate, tokens)")
        _no_other_parameters(paper, name, module, ["qkv", "proj"])
        new = cls(heads, float(module.scale), float(module.keep_rate), backend=backend)
        return _rebuild(new, module, {})

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, keep_rate={self.keep_rate}, backend={self.backend!r}"

    def attend(self, x: Tensor, importance: bool) -> tuple[Tensor, Optional[Tensor]]:
        """x (B, N, C) -> (out (B, N, C), class attention (B, N) averaged over heads or None)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, C // self.num_heads)) \
            .permute(2, 0, 3, 1, 4).unbind(0)  # strided views, read in place
        p = getattr(getattr(self, "attn_drop", None), "p", 0.0)
        if self.training and p > 0:
            # the fused op has no attention dropout: EViT's eager math, dropped probabilities
            # both weight the values and give the importance, as in EViT
            attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            o, imp = attn @ v, (attn[:, :, 0].mean(dim=1) if importance else None)
        elif importance:
            o, imp = token_attention(q, k, v, scale=self.scale, return_importance="cls",
                                     backend=self.backend)
        else:
            o, imp = token_attention(q, k, v, scale=self.scale, backend=self.backend), None
        out = self.proj(o.transpose(1, 2).reshape(B, N, C))
        proj_drop = getattr(self, "proj_drop", None)
        return (proj_drop(out) if proj_drop is not None else out), imp

    def forward(self, x: Tensor, keep_rate: Optional[float] = None,
                tokens: Optional[int] = None):
        if keep_rate is None:
            keep_rate = self.keep_rate
        B, N, C = x.shape
        left = _left_tokens(N - 1, self.keep_rate, keep_rate, tokens)
        out, imp = self.attend(x, importance=left is not None)
        if left is None:
            return out, None, None, None, N - 1
        cls_attn = imp[:, 1:]
        idx = _tokens.topk_tokens(imp, left, num_prefix=1, order="score")[0][:, 1:] - 1
        return out, idx[..., None].expand(-1, -1, C), idx, cls_attn, left


class EViTBlock(nn.Module):
    """EViT's ``Block``: the same children (``norm1``, ``attn``, ``drop_path``, ``norm2``,
    ``mlp``) and parameters, the attention an :class:`EViTAttention`.

    ``forward(x, keep_rate=None, tokens=None, get_idx=False)`` -> ``(x, n_tokens, idx or
    None)`` as EViT: after the attention residual it keeps the class token and the ``keep_rate``
    (or ``tokens``) most attended image tokens, by decreasing class attention, plus, with
    ``fuse_token``, one token fusing the dropped ones weighted by their class attention
    (:func:`vitkern.tokens.evit_select`); the MLP runs on the kept tokens.
    """

    def __init__(self, keep_rate: float, fuse_token: bool):
        super().__init__()
        self.keep_rate, self.fuse_token = keep_rate, fuse_token

    @classmethod
    def from_evit(cls, module: nn.Module, backend: str = "auto") -> "EViTBlock":
        paper, name = "EViT", type(module).__name__
        for a in ("norm1", "attn", "drop_path", "norm2", "mlp"):
            if not isinstance(getattr(module, a, None), nn.Module):
                raise _refuse(paper, name, f"it has no {a!r} submodule")
        if type(module.attn).__name__ != "Attention":
            raise _refuse(paper, name, f"its attn is {type(module.attn).__name__}, not EViT's "
                                       f"Attention")
        if _forward_args(module)[:3] != ["x", "keep_rate", "tokens"]:
            raise _refuse(paper, name, f"forward takes {_forward_args(module)}, not "
                                       f"(x, keep_rate, tokens, get_idx)")
        _no_other_parameters(paper, name, module, ["norm1", "attn", "norm2", "mlp"])
        attn = EViTAttention.from_evit(module.attn, backend=backend)
        new = cls(float(module.keep_rate), bool(module.fuse_token))
        return _rebuild(new, module, {"attn": attn})

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse_token={self.fuse_token}"

    def forward(self, x: Tensor, keep_rate: Optional[float] = None,
                tokens: Optional[int] = None, get_idx: bool = False):
        if keep_rate is None:
            keep_rate = self.keep_rate
        left = _left_tokens(x.shape[1] - 1, self.attn.keep_rate, keep_rate, tokens)
        a, imp = self.attn.attend(self.norm1(x), importance=left is not None)
        x = x + self.drop_path(a)
        idx = None
        if left is not None:
            x, keep_idx = _tokens.evit_select(x, imp, left, fuse=self.fuse_token, order="score",
                                              num_prefix=1)
            idx = keep_idx[:, 1:] - 1  # EViT's indices count the image tokens only
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, x.shape[1] - 1, (idx if get_idx else None)


def _is_evit_attention(module: nn.Module) -> bool:
    return hasattr(module, "keep_rate") and hasattr(module, "qkv")


def _evit_attention(module: nn.Module, backend: str) -> Optional[PaperPatch]:
    if not _is_evit_attention(module):
        return None  # another model's "Attention": not EViT's, not ours to judge
    return PaperPatch(EViTAttention.from_evit(module, backend=backend), "EViT attention")


def _evit_block(module: nn.Module, backend: str) -> Optional[PaperPatch]:
    if not (hasattr(module, "keep_rate") and hasattr(module, "fuse_token")):
        return None  # a "Block" of some other model (not attention): silently not ours
    new = EViTBlock.from_evit(module, backend=backend)
    tokens = None
    if new.keep_rate < 1:
        tokens = (f"EViT drop (the model's own): keep_rate={new.keep_rate}, "
                  f"fuse_token={new.fuse_token}")
    return PaperPatch(new, "EViT block",
                      [("attn", class_path(module.attn), class_path(new.attn))], tokens)


# --------------------------------------------------------------------------------------------
# the hook
# --------------------------------------------------------------------------------------------

#: class name -> adapter(module, backend) -> PaperPatch, or None when a generic name ("Block",
#: "Attention") belongs to another model; raises UnsupportedModule on a layout mismatch
PAPER_CLASSES: dict[str, Callable[[nn.Module, str], Optional[PaperPatch]]] = {
    "HiLo": _litv2_hilo,
    "MambaAttentionAllDouble": _ppma("full"),
    "MambaAttentionChunkDouble": _ppma("criss_cross"),
    "Block": _evit_block,
    "Attention": _evit_attention,
}


def replace(module: nn.Module, backend: str = "auto") -> Optional[PaperPatch]:
    """The vitkern replacement of a LITv2 / PPMA / EViT module, recognised by class name and
    layout: a :class:`PaperPatch`, or None when the module is not one of theirs.

    Raises :class:`~vitkern.errors.UnsupportedModule` (with the reason) when the
    class name is theirs but the layout is not. vitkern's and timm's own classes are never
    matched here."""
    path = class_path(module)
    if path.startswith(("vitkern.", "timm.")):
        return None
    adapter = PAPER_CLASSES.get(type(module).__name__)
    if adapter is None:
        return None
    hit = adapter(module, backend)
    if hit is not None:
        _check_same_parameters(module, hit.new, f"{type(module).__name__} ({hit.paper})")
    return hit
