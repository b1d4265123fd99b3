"""Linear / softmax-free attention ops: checks, backend dispatch, ``torch.library`` registration
and autograd.

Public ops (q, k, v are (B, heads, N, d); strided views, e.g. permuted out of a packed qkv
projection, are read in place):

* :func:`linear_attention` — non-causal kernelized linear attention (fast-transformers'
  "Transformers are RNNs", L2ViT, EfficientViT; presets in :data:`PRESETS`);
* :func:`xca_attention` — XCiT's cross-covariance attention (timm ``XCA``);
* :func:`soft_attention` — SOFT's Gaussian-kernel Nyström attention ``K1·(Ainv·(K1ᵀV))``
  (``vitkern::soft_attn_fwd`` / ``_bwd``: two token passes forward, two backward, K1 recomputed
  per tile; landmarks m <= 64 and head dims <= 64, query head dim <= 32 in fp32), and
  :func:`newton_schulz_inverse`, SOFT's shipped inverse iteration with its custom backward.

The Triton backend is ``vitkern::linear_attn_fwd`` / ``_bwd`` and ``vitkern::xca_fwd`` / ``_bwd``.
Both forwards save only a tiny fp32 state per (batch, head) for the backward (linear: φ(K)ᵀV
and Σφ(K); XCA: the cosine Gram matrix and the channel norms), never an N×N or N×d copy.
Outputs are stored (B, N, heads, d) and returned as a (B, heads, N, d) view, so
``o.transpose(1, 2).reshape(B, N, heads * d)`` is free.

Head dims the triton backend declares (d, or max(d, e) for linear attention; within them every
kernel has a tile candidate that compiles without spills on sm_80 and sm_90, beyond them no tile
fits: the input is refused with the reason and ``auto`` falls back to the reference):

==================  ==================  ===================
op                  fp16 / bf16         fp32
==================  ==================  ===================
linear, forward     d <= 128            d <= 64
linear, backward    d <= 64             d <= 32
XCA, fwd and bwd    d <= 128            d <= 64
==================  ==================  ===================

A call whose inputs need no gradient only needs the forward kernels to fit.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from vitkern.eager import linear as eager
from vitkern.reference import linear as ref
from vitkern.reference.linear import FEATURE_MAPS, PRESETS

from ._common import bhnd_empty, check_qkv, kernel_op, needs_grad, on_device
from ._dispatch import CallCache, Capability, Family, dispatch, inputs

__all__ = ["linear_attention", "xca_attention", "soft_attention", "newton_schulz_inverse",
           "PRESETS", "FEATURE_MAPS"]

DENOMS = ("add", "clamp")


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _check_float(op: str, name: str, x, *, positive: bool = False) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        raise TypeError(f"{op}: {name} must be a finite float, got {x!r}")
    if x < 0 or (positive and x == 0):
        raise ValueError(f"{op}: {name} must be {'> 0' if positive else '>= 0'}, got {x!r}")
    return float(x)


def _check_temperature(op: str, temperature, q: Tensor, required: bool) -> Optional[Tensor]:
    """A per-head temperature: a tensor of ``heads`` elements (any shape, e.g. timm's
    (heads, 1, 1) parameter) or a python float; returned as a (heads,) view / tensor."""
    h = q.shape[1]
    if temperature is None:
        if required:
            raise TypeError(f"{op}: temperature is required (a tensor of {h} per-head values "
                            "or a float)")
        return None
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        return _temperature(temperature, q)
    if not isinstance(temperature, Tensor):
        raise TypeError(f"{op}: temperature must be a torch.Tensor, a float or None, got "
                        f"{type(temperature).__name__}")
    if not temperature.is_floating_point():
        raise TypeError(f"{op}: temperature must be floating-point, got {temperature.dtype}")
    if temperature.numel() != h:
        raise ValueError(f"{op}: temperature must have one value per head ({h}), got shape "
                         f"{tuple(temperature.shape)}")
    if temperature.device != q.device:
        raise ValueError(f"{op}: temperature is on {temperature.device}, q on {q.device}")
    return _temperature(temperature, q)


def _temperature(temperature, q: Tensor) -> Tensor:
    """A checked temperature (float or tensor) as the (heads,) tensor the kernels index."""
    if isinstance(temperature, Tensor):
        return temperature.reshape(q.shape[1]).contiguous()  # the kernels index with stride 1
    return torch.full((q.shape[1],), float(temperature), device=q.device, dtype=torch.float32)


def _check_linear(op, q, k, v, feature_map, scale, denom, eps, key_padding_mask):
    check_qkv(op, q, k, v)
    B, h, N, d = q.shape
    if k.shape[:2] != q.shape[:2] or k.shape[3] != d:
        raise ValueError(f"{op}: k must have shape (B={B}, heads={h}, M, d={d}), got "
                         f"{tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: v must have shape (B={B}, heads={h}, M={k.shape[2]}, e) to "
                         f"match k, got {tuple(v.shape)}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"{op}: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if denom not in DENOMS:
        raise ValueError(f"{op}: denom must be one of {DENOMS}, got {denom!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise TypeError(f"{op}: scale must be a finite float, got {scale!r}")
    eps = _check_float(op, "eps", eps)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{op}: key_padding_mask must be a bool tensor (True = padding key)")
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"{op}: key_padding_mask must have shape (B, M) = "
                             f"{(B, k.shape[2])}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"{op}: key_padding_mask is on {key_padding_mask.device}, q on "
                             f"{q.device}")
    return float(scale), eps


# --------------------------------------------------------------------------------------------
# backend declarations: the LINEAR, XCA and SOFT descriptors (dispatch: vitkern.ops._dispatch)
# --------------------------------------------------------------------------------------------


def _triton_check(inp) -> Optional[str]:
    """vitkern.triton_kernels.linear's declared capability for linear attention or XCA (args:
    v's head dim or None, whether XCA): max(d, e) per pass, the backward only when training."""
    from vitkern.triton_kernels import linear as tk

    v_dim, xca = inp.args
    return tk.unsupported(inp.head_dim, inp.dtype == torch.float32, v_dim, xca=xca,
                          backward=inp.needs_grad)


def _soft_check(inp) -> Optional[str]:
    """vitkern.triton_kernels.linear's declared capability for SOFT (args: landmarks m, v's e)."""
    from vitkern.triton_kernels import linear as tk

    m, e = inp.args
    return tk.soft_unsupported(m, inp.head_dim, e, inp.dtype == torch.float32, inp.needs_grad)


#: The linear-attention family (linear_attention) and XCA (xca_attention): triton (the head-dim
#: table of this module's docstring), no CUDA C++ kernel; eager (vitkern.eager.linear) is auto's
#: CPU path.
LINEAR = Family("linear", ref.linear_attention, (Capability.triton(check=_triton_check),),
                eager=eager.linear_attention)
XCA = Family("xca", ref.xca_attention, (Capability.triton(check=_triton_check),),
             eager=eager.xca_attention)
#: SOFT's Nyström core (soft_attention): triton up to 64 landmarks / head dims (32 in fp32).
SOFT = Family("soft", ref.soft_attention, (Capability.triton(check=_soft_check),),
              eager=eager.soft_attention)


def _backend(op, backend, q, v_dim, xca, backward=True):
    """The backend that runs ``op`` (:func:`~vitkern.ops._dispatch.dispatch` over LINEAR, or XCA
    with ``xca``; ``v_dim``: v's head dim); ``backward``: inputs need gradients."""
    return dispatch(XCA if xca else LINEAR, op, backend,
                    inputs(q, v_dim, xca, needs_grad=backward))


# --------------------------------------------------------------------------------------------
# Triton custom ops: linear attention
# --------------------------------------------------------------------------------------------


def _state_empty(q: Tensor, v: Tensor) -> Tensor:
    b, h, _, d = q.shape
    return q.new_empty((b * h, d * v.shape[-1] + d), dtype=torch.float32)


@kernel_op("linear_attn_fwd")
def _linear_fwd(q: Tensor, k: Tensor, v: Tensor, temperature: Optional[Tensor],
                key_padding_mask: Optional[Tensor], feature_map: str, scale: float, clamp: bool,
                eps: float) -> tuple[Tensor, Tensor]:
    """Triton linear-attention forward: (o, state); state = (φ(K)ᵀV | Σφ(K)) fp32 (B·h, d·e+d)."""
    from vitkern.triton_kernels import linear as tk

    o = bhnd_empty(v, q.shape[2])
    with on_device(q):
        state = tk.la_forward(q, k, v, temperature, key_padding_mask, o, feature_map, scale,
                              clamp, eps)
    return o, state.contiguous()


@_linear_fwd.register_fake
def _(q, k, v, temperature, key_padding_mask, feature_map, scale, clamp, eps):
    return bhnd_empty(v, q.shape[2]), _state_empty(q, v)


@kernel_op("linear_attn_bwd")
def _linear_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, temperature: Optional[Tensor],
                key_padding_mask: Optional[Tensor], state: Tensor, feature_map: str,
                scale: float, clamp: bool, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton linear-attention backward: (dq, dk, dv, dtemperature); dtemperature is (heads,)
    in the temperature's dtype, or empty without a temperature."""
    from vitkern.triton_kernels import linear as tk

    dq, dk, dv = (bhnd_empty(t, t.shape[2]) for t in (q, k, v))
    with on_device(q):
        dt = tk.la_backward(do, q, k, v, temperature, key_padding_mask, state, dq, dk, dv,
                            feature_map, scale, clamp, eps)
    if temperature is None:
        dtemp = q.new_zeros((0,))
    else:
        dtemp = dt.view(q.shape[0], q.shape[1]).sum(0).to(temperature.dtype)
    return dq, dk, dv, dtemp


@_linear_bwd.register_fake
def _(do, q, k, v, temperature, key_padding_mask, state, feature_map, scale, clamp, eps):
    dtemp = q.new_empty((0,)) if temperature is None else torch.empty_like(temperature)
    return bhnd_empty(q, q.shape[2]), bhnd_empty(k, k.shape[2]), bhnd_empty(v, v.shape[2]), dtemp


def _linear_setup(ctx, inputs, output):
    q, k, v, temperature, mask, feature_map, scale, clamp, eps = inputs
    o, state = output
    ctx.save_for_backward(q, k, v, temperature, mask, state)
    ctx.args = (feature_map, scale, clamp, eps)
    ctx.mark_non_differentiable(state)


def _linear_backward(ctx, do, _dstate):
    q, k, v, temperature, mask, state = ctx.saved_tensors
    dq, dk, dv, dtemp = _linear_bwd(do, q, k, v, temperature, mask, state,
                                                          *ctx.args)
    return dq, dk, dv, (dtemp if temperature is not None else None), None, None, None, None, None


_linear_fwd.register_autograd(_linear_backward, _linear_setup)


# --------------------------------------------------------------------------------------------
# Triton custom ops: XCA
# --------------------------------------------------------------------------------------------


@kernel_op("xca_fwd")
def _xca_fwd(q: Tensor, k: Tensor, v: Tensor, temperature: Tensor,
             eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Triton XCA forward: (o, gn, norms); gn = cosine Gram (B·h, d, d), norms = channel L2
    norms of q and k (B·h, 2, d), both fp32, saved for the backward."""
    from vitkern.triton_kernels import linear as tk

    o = bhnd_empty(q, q.shape[2])
    with on_device(q):
        gn, norms = tk.xca_forward(q, k, v, temperature, o, eps)
    return o, gn, norms


@_xca_fwd.register_fake
def _(q, k, v, temperature, eps):
    b, h, _, d = q.shape
    return (bhnd_empty(q, q.shape[2]), q.new_empty((b * h, d, d), dtype=torch.float32),
            q.new_empty((b * h, 2, d), dtype=torch.float32))


@kernel_op("xca_bwd")
def _xca_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, temperature: Tensor, gn: Tensor,
             norms: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton XCA backward: (dq, dk, dv, dtemperature (heads,) in the temperature's dtype)."""
    from vitkern.triton_kernels import linear as tk

    dq, dk, dv = (bhnd_empty(t, t.shape[2]) for t in (q, k, v))
    with on_device(q):
        dt = tk.xca_backward(do, q, k, v, temperature, gn, norms, dq, dk, dv, eps)
    return dq, dk, dv, dt.view(q.shape[0], q.shape[1]).sum(0).to(temperature.dtype)


@_xca_bwd.register_fake
def _(do, q, k, v, temperature, gn, norms, eps):
    return (bhnd_empty(q, q.shape[2]), bhnd_empty(k, k.shape[2]), bhnd_empty(v, v.shape[2]),
            torch.empty_like(temperature))


def _xca_setup(ctx, inputs, output):
    q, k, v, temperature, eps = inputs
    o, gn, norms = output
    ctx.save_for_backward(q, k, v, temperature, gn, norms)
    ctx.eps = eps
    ctx.mark_non_differentiable(gn, norms)


def _xca_backward(ctx, do, _dgn, _dnorms):
    q, k, v, temperature, gn, norms = ctx.saved_tensors
    dq, dk, dv, dtemp = _xca_bwd(do, q, k, v, temperature, gn, norms, ctx.eps)
    return dq, dk, dv, dtemp, None


_xca_fwd.register_autograd(_xca_backward, _xca_setup)


# --------------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------------


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: str = "elu1",
                     scale: float = 1.0, temperature: Union[Tensor, float, None] = None,
                     denom: str = "add", eps: float = 1e-6,
                     key_padding_mask: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Non-causal linear attention ``out_n = t_h·scale·φ(q_n)ᵀ(Σ_s φ(k_s)v_sᵀ) / D_n``.

    Args:
        q: (B, heads, N, d); k: (B, heads, M, d); v: (B, heads, M, e) — any strides.
        feature_map: φ, one of "elu1" (elu(x) + 1), "relu", "identity"; applied to q and k.
        scale: constant factor of the numerator (1.0 in every preset: the papers use none).
        temperature: per-head factor of the **numerator only** (L2ViT's learned ``temperature``,
            (heads, 1, 1) or any shape with ``heads`` elements; differentiable), or None.
        denom: ``D_n = φ(q_n)·Σ_s φ(k_s)`` then "add" → ``+ eps`` (fast-transformers 1e-6,
            EfficientViT 1e-15) or "clamp" → ``max(·, eps)`` (L2ViT's hard floor, eps = 100;
            no gradient flows through the denominator where the floor is active, as torch's
            ``clamp_min``).
        eps: the additive epsilon or the floor, >= 0.
        key_padding_mask: (B, M) bool, **True marks a padding key** (the ``nn.MultiheadAttention``
            convention): it contributes neither to φ(K)ᵀV nor to Σφ(K) and gets zero gradients.
            Needed for elu+1, whose φ(0) = 1 would count zero-padded keys.
        backend: "auto", "triton", "cuda", "eager" or "reference" (``auto`` runs "eager",
            :mod:`vitkern.eager.linear`, for CPU tensors).

    Presets: ``linear_attention(q, k, v, **PRESETS["katharopoulos" | "l2vit" | "efficientvit"])``.

    Returns:
        (B, heads, N, e) in the input dtype (fp32 accumulation and denominators).
    """
    op = "linear_attention"
    scale, eps = _check_linear(op, q, k, v, feature_map, scale, denom, eps, key_padding_mask)
    temp = _check_temperature(op, temperature, q, required=False)
    name = _backend(op, backend, q, v.shape[-1], xca=False,
                    backward=needs_grad(q, k, v, temp))
    if name == "eager":
        return LINEAR.eager(q, k, v, feature_map=feature_map, scale=scale, temperature=temp,
                            denom=denom, eps=eps, key_padding_mask=key_padding_mask)
    if name == "reference" or q.numel() == 0 or k.shape[2] == 0:
        return ref.linear_attention(q, k, v, feature_map=feature_map, scale=scale,
                                    temperature=temp, denom=denom, eps=eps,
                                    key_padding_mask=key_padding_mask)
    return _linear_fwd(q, k, v, temp, key_padding_mask, feature_map, scale, denom == "clamp",
                       eps)[0]


_CALLS = CallCache()


def xca_attention(q: Tensor, k: Tensor, v: Tensor, *, temperature: Union[Tensor, float],
                  eps: float = 1e-12, backend: str = "auto") -> Tensor:
    """XCiT's cross-covariance attention (timm ``XCA`` without the projections).

    Per (batch, head): every channel i of q and k is L2-normalised over the N tokens
    (``x / max(‖x‖, eps)``, ``F.normalize``), ``A_ij = softmax_j(τ_h·q̂_i·k̂_j)`` is a d×d map,
    and ``out[n, i] = Σ_j A_ij v[n, j]`` (out = V Aᵀ).

    Args:
        q, k, v: (B, heads, N, d), any N (a CLS token included: every token takes part); any
            strides — e.g. ``qkv.unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4)``.
        temperature: τ, multiplying the logits as XCiT's code does (the paper writes a division);
            a tensor of ``heads`` values (timm's (heads, 1, 1) parameter; differentiable) or a
            float.
        eps: the norm floor of ``F.normalize`` (1e-12), > 0.
        backend: "auto", "triton", "cuda", "eager" or "reference" (``auto`` runs "eager",
            :mod:`vitkern.eager.linear`, for CPU tensors).

    Returns:
        (B, heads, N, d) in the input dtype.
    """
    op = "xca_attention"
    grad = needs_grad(q, k, v, temperature)
    key = _CALLS.key(op, q, k, v, temperature, eps, backend, grad)
    plan = _CALLS.get(key)
    if plan is None:
        check_qkv(op, q, k, v)
        if tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
            raise ValueError(f"{op}: q, k, v must have one shape, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        eps = _check_float(op, "eps", eps, positive=True)
        temp = _check_temperature(op, temperature, q, required=True)
        name = _backend(op, backend, q, None, xca=True, backward=grad)
        _CALLS.put(key, (eps, name))
    else:
        (eps, name), temp = plan, _temperature(temperature, q)
    if name == "eager":
        return XCA.eager(q, k, v, temperature=temp, eps=eps)
    if name == "reference" or q.numel() == 0:
        return ref.xca_attention(q, k, v, temperature=temp, eps=eps)
    return _xca_fwd(q, k, v, temp, eps)[0]


# --------------------------------------------------------------------------------------------
# SOFT: Gaussian-kernel Nyström attention
# --------------------------------------------------------------------------------------------


@kernel_op("soft_attn_fwd")
def _soft_fwd(q: Tensor, landmarks: Tensor, v: Tensor, ainv: Tensor) -> tuple[Tensor, Tensor]:
    """Triton SOFT core: (o, state); state = (K1ᵀV | Ainv·K1ᵀV) fp32 (B·h, 2, m, e)."""
    from vitkern.triton_kernels import linear as tk

    o = bhnd_empty(v, q.shape[2])
    with on_device(q):
        state = tk.soft_forward(q, landmarks, v, ainv, o)
    return o, state


@_soft_fwd.register_fake
def _(q, landmarks, v, ainv):
    b, h, m = landmarks.shape[:3]
    return (bhnd_empty(v, q.shape[2]),
            q.new_empty((b * h, 2, m, v.shape[-1]), dtype=torch.float32))


@kernel_op("soft_attn_bwd")
def _soft_bwd(do: Tensor, q: Tensor, landmarks: Tensor, v: Tensor, ainv: Tensor,
              state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton SOFT backward: (dq, dlandmarks, dv, dainv), each in its input's dtype."""
    from vitkern.triton_kernels import linear as tk

    dq, dv = bhnd_empty(q, q.shape[2]), bhnd_empty(v, v.shape[2])
    with on_device(q):
        dl, dainv = tk.soft_backward(do, q, landmarks, v, ainv, state, dq, dv)
    return dq, dl.to(landmarks.dtype), dv, dainv.to(ainv.dtype)


@_soft_bwd.register_fake
def _(do, q, landmarks, v, ainv, state):
    return (bhnd_empty(q, q.shape[2]), torch.empty_like(landmarks), bhnd_empty(v, v.shape[2]),
            torch.empty_like(ainv))


def _soft_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    ctx.mark_non_differentiable(output[1])


def _soft_backward(ctx, do, _dstate):
    return _soft_bwd(do, *ctx.saved_tensors)


_soft_fwd.register_autograd(_soft_backward, _soft_setup)


def _check_int(op: str, name: str, x) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise TypeError(f"{op}: {name} must be an int >= 0, got {x!r}")
    return x


def newton_schulz_inverse(a: Tensor, iters: int = 20, reg: float = 0.01) -> Tensor:
    """SOFT's approximate inverse of ``A + reg·I`` for a (..., m, m) batch (any leading dims).

    Exactly the shipped iteration: ``α = 0.9·2 / (max row sum of A)²`` per matrix,
    ``P = A + reg·I``, ``V0 = α·P``, then ``iters`` times ``V = 2V − (V P) V``. It is **not**
    ``torch.linalg.inv``: with clustered landmarks 20 steps stop far from the inverse and the
    model was trained with that iterate. Backward: SOFT's ``dA = −Vᵀ G Vᵀ`` (the exact-inverse
    gradient at the iterate, computed once; the true gradient only where converged).

    Runs in PyTorch on every backend: m is SOFT's landmark count (49), so this is ~40 tiny
    batched matmuls that cuBLAS already runs at the launch-latency floor; a kernel would save
    launches, not work. Math in fp32 for 16-bit inputs (returned as fp32), fp64 stays fp64.
    """
    op = "newton_schulz_inverse"
    if not isinstance(a, Tensor) or not a.is_floating_point():
        raise TypeError(f"{op}: A must be a floating-point torch.Tensor")
    if a.dim() < 2 or a.shape[-1] != a.shape[-2] or a.shape[-1] == 0:
        raise ValueError(f"{op}: A must be a batch of non-empty square matrices (..., m, m), "
                         f"got shape {tuple(a.shape)}")
    iters = _check_int(op, "iters", iters)
    reg = _check_float(op, "reg", reg)
    return ref.newton_schulz_inverse(a, iters, reg)


def _check_soft(op, q, landmarks, v, ainv):
    check_qkv(op, q, landmarks, v)
    B, h, N, d = q.shape
    if landmarks.shape[:2] != q.shape[:2] or landmarks.shape[3] != d or landmarks.shape[2] == 0:
        raise ValueError(f"{op}: landmarks must have shape (B={B}, heads={h}, m>=1, d={d}), got "
                         f"{tuple(landmarks.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must have shape (B={B}, heads={h}, N={N}, e), got "
                         f"{tuple(v.shape)}")
    if ainv is not None:
        m = landmarks.shape[2]
        if not isinstance(ainv, Tensor) or not ainv.is_floating_point():
            raise TypeError(f"{op}: ainv must be a floating-point torch.Tensor or None")
        if tuple(ainv.shape) != (B, h, m, m):
            raise ValueError(f"{op}: ainv must have shape (B, heads, m, m) = {(B, h, m, m)}, "
                             f"got {tuple(ainv.shape)}")
        if ainv.device != q.device:
            raise ValueError(f"{op}: ainv is on {ainv.device}, q on {q.device}")


def soft_attention(q: Tensor, landmarks: Tensor, v: Tensor, ainv: Optional[Tensor] = None, *,
                   iters: int = 20, reg: float = 0.01, backend: str = "auto") -> Tensor:
    """SOFT's softmax-free Gaussian-kernel (Nyström) attention core.

    ``out = K1·(Ainv·(K1ᵀV))`` with ``K1[n, j] = exp(-½‖q_n − l_j‖²)`` computed on the fly
    (never stored as (N, m)); ``Ainv = newton_schulz_inverse(exp(-½‖l_i − l_j‖²), iters, reg)``
    when not given (the m×m kernel and the inverse run in fp32 PyTorch, differentiable through
    SOFT's custom backward).

    Args:
        q: (B, heads, N, d), **already scaled** by d**-¼ (SOFT scales Q, K = Q, before the
            landmark conv); any strides.
        landmarks: (B, heads, m, d), m >= 1 (SOFT: conv-downsampled q, LayerNorm, GELU).
        v: (B, heads, N, e).
        ainv: (B, heads, m, m) or None (then computed as above).
        iters, reg: the Newton–Schulz step count and shift (SOFT: 20, 0.01).
        backend: "auto", "triton", "cuda", "eager" or "reference" (``auto`` runs "eager",
            :mod:`vitkern.eager.linear`, for CPU tensors).

    Decisions (the spec's open points): the squared distance is ``‖q‖² + ‖l‖² − 2q·l`` (SOFT's
    torch form, used by its plain configs) **without a clamp at 0**; the kernel groups the
    products as ``K1·(Ainv·(K1ᵀV))`` (the reference keeps SOFT's ``(K1·Ainv)·(K1ᵀV)``: equal
    math, different rounding); rows are not normalised (as SOFT). Padded query tokens have
    non-zero K1 rows, so padding tokens must carry zero v.

    Returns:
        (B, heads, N, e) in the input dtype (fp32 accumulation).
    """
    op = "soft_attention"
    _check_soft(op, q, landmarks, v, ainv)
    iters = _check_int(op, "iters", iters)
    reg = _check_float(op, "reg", reg)
    m = landmarks.shape[2]
    # dispatched before Ainv is computed (eager computes it faster itself); a computed Ainv
    # needs gradients exactly when the landmarks do
    name = dispatch(SOFT, op, backend, inputs(q, m, v.shape[-1],
                                              needs_grad=needs_grad(q, landmarks, v, ainv)))
    if name == "eager":
        return SOFT.eager(q, landmarks, v, ainv, iters=iters, reg=reg)
    if ainv is None:
        lm = landmarks if landmarks.dtype == torch.float64 else landmarks.float()
        ainv = ref.newton_schulz_inverse(ref.gaussian_kernel(lm, lm), iters, reg)
    if name == "reference" or q.numel() == 0 or v.numel() == 0:
        return ref.soft_attention(q, landmarks, v, ainv)
    return _soft_fwd(q, landmarks, v, ainv)[0]
