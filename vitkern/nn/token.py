"""Token dropping / merging modules for timm ViTs on :func:`vitkern.ops.token_attention`.

* :class:`TokenAttention` — timm's ViT ``Attention`` (same parameters: ``qkv``, ``q_norm``,
  ``k_norm``, ``norm``, ``gate``, ``proj``) whose attention is ``token_attention``; besides the
  plain ``forward(x)`` it can take a per-key bias (ToMe's log size) and return the CLS importance
  (EViT) or the head-averaged keys (ToMe's matching metric) from the same pass, without
  materialising the attention matrix.
* :class:`TokenBlock` — timm's ViT ``Block`` (same submodules) that reorganises its tokens after
  the attention residual: EViT-style dropping (``mode="drop"``) or ToMe-style merging
  (``mode="merge"``).

``vitkern.integrations.timm.patch_model(model, token_drop=..., token_merge=...)`` builds them
from a timm ``VisionTransformer``; ``from_timm`` reuses the timm modules' parameter objects. The
adapters live in :mod:`vitkern.integrations.timm.vit` (this module imports no timm); plain
``patch_model(model)`` leaves ViT attention alone (dense softmax attention over every token is what
PyTorch's fused SDPA already serves), so only the token options install these modules.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from vitkern import tokens
from vitkern.ops.token import token_attention

__all__ = ["TokenAttention", "TokenBlock"]


class TokenAttention(nn.Module):
    """timm ``Attention`` computed by :func:`vitkern.ops.token_attention`.

    Build it with :meth:`from_timm` (shares the timm module's submodules and parameters).
    ``forward(x)`` (B, N, C) -> (B, N, C) is a drop-in; :meth:`forward_tokens` adds the token
    options. ``token_attention`` has no dropout on the attention probabilities: in training
    with ``attn_drop.p > 0`` the module computes timm's eager attention instead (N×N
    probabilities, dropout applied, the importance taken after dropout as EViT's code does);
    in eval, or with p = 0, it is fused.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int,
                 scale: float, q_norm: nn.Module, k_norm: nn.Module, norm: nn.Module,
                 gate: Optional[nn.Module], proj_drop: nn.Module, backend: str = "auto",
                 attn_drop: Optional[nn.Module] = None):
        super().__init__()
        # timm's registration order, so that named_parameters() (an optimizer's state) line up
        self.qkv, self.q_norm, self.k_norm = qkv, q_norm, k_norm
        self.attn_drop = nn.Dropout(0.0) if attn_drop is None else attn_drop
        self.norm = norm
        self.gate, self.proj, self.proj_drop = gate, proj, proj_drop
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = scale
        self.backend = backend

    @classmethod
    def from_timm(cls, module: nn.Module, backend: str = "auto") -> "TokenAttention":
        """From timm's ViT ``Attention``, reusing its submodules (``attn_drop`` too):
        :func:`vitkern.integrations.timm.vit.token_attention_from_timm`."""
        from vitkern.integrations.timm.vit import token_attention_from_timm
        return token_attention_from_timm(module, backend=backend, cls=cls)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("TokenAttention: attn_mask / is_causal are not supported "
                             "(use key_bias in forward_tokens)")
        return self.forward_tokens(x)[0]

    def forward_tokens(self, x: Tensor, *, key_bias: Optional[Tensor] = None,
                       importance: Optional[str] = None, metric: bool = False):
        """x (B, N, C) -> (out (B, N, C), importance (B, N) or None, metric (B, N, d) or None).

        ``key_bias`` (B, N) is added to every head's logits (ToMe: ``size.log()``);
        ``importance`` "cls" / "colsum" as in :func:`~vitkern.ops.token_attention`; ``metric``
        returns the keys averaged over heads (ToMe's similarity features).
        """
        B, N, _ = x.shape
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, read in place
        q, k = self.q_norm(q), self.k_norm(k)
        if self.training and self.attn_drop.p > 0:
            o, imp = self._eager(q, k, v, key_bias, importance)
        else:
            res = token_attention(q, k, v, key_bias=key_bias, return_importance=importance,
                                  scale=self.scale, backend=self.backend)
            o, imp = res if importance is not None else (res, None)
        out = self.norm(o.transpose(1, 2).reshape(B, N, self.attn_dim))
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        out = self.proj_drop(self.proj(out))
        return out, imp, (k.mean(1) if metric else None)

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, key_bias: Optional[Tensor],
               importance: Optional[str]) -> tuple[Tensor, Optional[Tensor]]:
        """timm's eager attention with dropout on the (B, h, N, N) probabilities; the importance
        as ``token_attention`` defines it, from the dropped probabilities (EViT's code)."""
        logits = (q * self.scale) @ k.transpose(-1, -2)
        if key_bias is not None:
            logits = logits + key_bias[:, None, None, :]
        p = self.attn_drop(logits.softmax(-1))
        imp = None
        if importance == "cls":
            imp = p[:, :, 0, :].mean(1)
        elif importance == "colsum":
            imp = p.detach().sum(-2).mean(1)
        elif importance is not None:
            raise ValueError(f"importance must be None, 'cls' or 'colsum', got {importance!r}")
        return p @ v, imp


class TokenBlock(nn.Module):
    """timm ViT ``Block`` that drops (EViT) or merges (ToMe) tokens after its attention.

    The ``num_prefix`` prefix tokens (class, distillation, register tokens; 0 for none) are
    always kept, first and in order.
    mode "drop": the attention also returns the CLS importance; after the attention residual
    the prefix tokens and ``keep`` of the image tokens are kept
    (:func:`vitkern.tokens.evit_select`, ``fuse`` adds EViT's fused token), then the MLP runs on
    the kept tokens.
    mode "merge": ToMe; ``r`` tokens merged away by bipartite soft matching on the head-averaged
    keys (:func:`vitkern.tokens.bipartite_soft_matching`), sizes tracked across blocks in
    ``state`` (shared by the model's merge blocks; the first one resets it), and with
    ``prop_attn`` the attention adds log(size) per key.
    """

    def __init__(self, block: nn.Module, attn: TokenAttention, *, mode: str,
                 keep: Union[int, float] = 1.0, fuse: bool = True, order: str = "score",
                 r: int = 0, prop_attn: bool = True, state: Optional[dict] = None,
                 first: bool = False, num_prefix: int = 1):
        super().__init__()
        if mode not in ("drop", "merge"):
            raise ValueError(f"TokenBlock: mode must be 'drop' or 'merge', got {mode!r}")
        # the block's own child order, so that named_parameters() (an optimizer's state saved
        # before patching) line up with the original model's
        needed = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
        children = [n for n, _ in block.named_children() if n in needed]
        for name in children + [n for n in needed if n not in children]:
            setattr(self, name, attn if name == "attn" else getattr(block, name))
        self.mode, self.keep, self.fuse, self.order = mode, keep, fuse, order
        self.num_prefix = num_prefix
        self.r, self.prop_attn = r, prop_attn
        self.state = {} if state is None else state
        self.first = first
        self._size_in: Optional[Tensor] = None  # ToMe sizes the last forward consumed

    def extra_repr(self) -> str:
        if self.mode == "drop":
            return f"mode=drop, keep={self.keep}, fuse={self.fuse}, order={self.order!r}"
        return f"mode=merge, r={self.r}, prop_attn={self.prop_attn}"

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("TokenBlock: attn_mask / is_causal are not supported")
        if self.mode == "drop":
            a, imp, _ = self.attn.forward_tokens(self.norm1(x), importance="cls")
            x = x + self.drop_path1(self.ls1(a))
            x, _ = tokens.evit_select(x, imp, self.keep, fuse=self.fuse, order=self.order,
                                      num_prefix=self.num_prefix)
        else:
            recompute = _in_backward()
            if recompute:  # activation checkpointing: the sizes this block's forward consumed
                size = self._size_in
            else:
                if self.first:
                    self.state["size"] = None
                size = self._size_in = self.state.get("size")
            bias = size.log()[..., 0] if (self.prop_attn and size is not None) else None
            a, _, metric = self.attn.forward_tokens(self.norm1(x), key_bias=bias, metric=True)
            x = x + self.drop_path1(self.ls1(a))
            merge = tokens.bipartite_soft_matching(metric, self.r, num_prefix=self.num_prefix)
            if merge is not tokens._identity_merge:
                x, size = tokens.merge_wavg(merge, x, size)
                if not recompute:
                    self.state["size"] = size
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _in_backward() -> bool:
    """Whether this forward is a recomputation inside the backward pass (activation
    checkpointing, reentrant or not): ToMe's shared size state then holds the *last* block's
    sizes, so a merge block reuses the sizes its own forward consumed."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
