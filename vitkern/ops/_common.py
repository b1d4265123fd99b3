"""Pieces every op family shares: argument checks, output allocation, device guard (backend
choice: :mod:`vitkern.ops._dispatch`)."""
from __future__ import annotations

import contextlib
import inspect
import os

import torch
from torch import Tensor


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_qkv(op: str, q, k, v, layout: str = "4-D (B, heads, N, head_dim)") -> None:
    """q, k, v: floating-point tensors of one dtype on one device with as many dims as ``layout``
    says (4 by default; token attention's packed varlen tensors are 3-D); shapes are per op."""
    ndim = 4 if layout.startswith("4-D") else 3
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")


#: dtypes autocast casts (fp64 and integer tensors it leaves alone, as PyTorch's autocast does).
AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_inputs(*tensors):
    """``tensors`` as :func:`torch.autocast` would hand them to ``F.scaled_dot_product_attention``.

    Custom ops are invisible to autocast, so the public ops apply SDPA's rule themselves: inside
    ``torch.autocast`` for the device type of the first tensor, every fp32 / fp16 / bf16 tensor
    is cast to the autocast dtype (a mixed fp32 / bf16 q, k, v, e.g. q after an fp32 norm on a
    GPU, then runs in bf16 like SDPA instead of failing the same-dtype check). fp64 tensors, None
    entries and calls outside autocast are returned unchanged. Callers pass the activations (q,
    k, v); learned biases keep their dtype (the kernels read them in fp32, the reference adds
    them in the compute dtype), and each input's gradient comes back in its own dtype.
    """
    first = tensors[0]
    if not isinstance(first, Tensor):
        first = next((t for t in tensors if isinstance(t, Tensor)), None)
    kind = None if first is None else first.device.type
    if kind not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(kind):
        return tensors  # (meta tensors and the like have no autocast state: asking raises)
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in AUTOCAST_ELIGIBLE else t
                 for t in tensors)


def autocast_off(t: Tensor):
    """A context that turns autocast off for ``t``'s device: the reference path then computes in
    the dtype :func:`autocast_inputs` gave its inputs, as it does outside autocast (not half in
    fp32 where autocast would run a softmax in fp32, nor in bf16 for an ``out=`` call)."""
    kind = t.device.type
    if kind not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def check_values(t: Tensor) -> bool:
    """Whether an op validates the *values* of the index tensor ``t`` (range, uniqueness, prefix
    sums): always for CPU tensors (free), for GPU tensors only with ``VITKERN_DEBUG=1`` (reading
    values back is a device sync, which an op must not do on every call), never inside
    ``torch.compile``. Invalid indices on a GPU without it are the caller's error."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("VITKERN_DEBUG", "0") not in ("", "0")


def index_value_problem(idx: Tensor, n: int):
    """What is wrong with the values of a (rows, K) index tensor whose entries must lie in
    [0, n) and be distinct within each row: None, ("range", min, max) or ("repeat", row,
    value). Reads values back (see :func:`check_values`): the ops word the error."""
    lo, hi = idx.min().item(), idx.max().item()
    if lo < 0 or hi >= n:
        return "range", lo, hi
    srt = idx.sort(dim=1).values
    same = srt[:, 1:] == srt[:, :-1]
    rows = same.any(dim=1)
    if not rows.any().item():
        return None
    row = int(rows.nonzero()[0, 0])
    return "repeat", row, int(srt[row, 1:][same[row]][0])


def check_hw(op: str, hw, n_tokens: int) -> tuple[int, int]:
    """``hw`` is a pair of positive ints whose product is the token count."""
    if (not isinstance(hw, (tuple, list)) or len(hw) != 2
            or not all(is_int(x) and x > 0 for x in hw)):
        raise ValueError(f"{op}: hw must be a pair of positive ints (H, W), got {hw!r}")
    H, W = hw
    if n_tokens != H * W:
        raise ValueError(f"{op}: q has N={n_tokens} tokens but hw={tuple(hw)} gives H*W={H * W}")
    return H, W


def check_scale(op: str, scale, head_dim: int) -> float:
    """The logit scale, head_dim**-0.5 by default."""
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def bhnd_empty(like: Tensor, n: int, zero: bool = False) -> Tensor:
    """(B, heads, n, d) output stored as (B, n, heads, d): kernels write through strides, and
    ``o.transpose(1, 2).reshape(B, n, heads * d)`` folds heads into channels for free."""
    b, h, _, d = like.shape
    if zero:
        return like.new_zeros((b, n, h, d)).transpose(1, 2)
    return torch.empty_strided((b, h, n, d), (n * h * d, d, h * d, 1), dtype=like.dtype,
                               device=like.device)  # one call: the same view, ~1 µs less


def lse_empty(q: Tensor, n: int | None = None) -> Tensor:
    """fp32 (B, heads, n) per-row softmax statistics (n = q's token count by default)."""
    return q.new_empty((*q.shape[:2], q.shape[2] if n is None else n), dtype=torch.float32)


def on_device(t: Tensor):
    """Launch on the tensor's GPU (not the current one); a no-op for interpreted CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _byte_span(t: Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses the elements of ``t`` occupy."""
    extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) if t.numel() else -1
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def check_out_overlap(op: str, out: Tensor, **inputs) -> None:
    """Refuse an ``out=`` that overlaps itself (a broadcast view) or shares memory with an input:
    the kernels write ``out`` while they still read the inputs, so any overlap, exact aliasing
    included, could give a wrong answer. Spans are compared conservatively (two views that
    interleave without touching the same element are refused too)."""
    if out.numel() == 0 or torch.compiler.is_compiling():  # traced: no addresses to compare
        return
    if any(st == 0 and n > 1 for n, st in zip(out.shape, out.stride())) or \
            torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"{op}: out overlaps itself (a broadcast or expanded view); pass a "
                         "tensor whose elements are distinct memory")
    lo, hi = _byte_span(out)
    for name, t in inputs.items():
        if t is None or t.numel() == 0 or t.device != out.device:
            continue
        tlo, thi = _byte_span(t)
        if lo < thi and tlo < hi:
            raise ValueError(f"{op}: out shares memory with {name}; the kernel would overwrite "
                             f"{name} while reading it. Pass a separate out tensor (or none)")


def needs_grad(*tensors) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (None entries, and anything
    not a tensor, which the op's checks then refuse, ignored)."""
    if torch.is_grad_enabled():
        for t in tensors:
            if isinstance(t, Tensor) and t.requires_grad:
                return True
    return False


# --------------------------------------------------------------------------------------------
# custom ops with an eager fast path
# --------------------------------------------------------------------------------------------


def _dispatcher_needed() -> bool:
    """Whether calls must go through the ``torch.library`` dispatcher: under ``torch.compile`` /
    export, a dispatch or torch-function mode (FakeTensorMode, FlopCounterMode, …) or a
    functorch transform (vmap, grad)."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active())


class KernelOp:
    """A ``torch.library`` custom op (``vitkern::name``) that eager calls run without the
    dispatcher.

    The custom op (``.op``; ``torch.ops.vitkern.<name>``) is what ``torch.compile``, export,
    ``opcheck``, dispatch modes and tensor subclasses see. A plain eager call (the common one)
    skips its ~25 µs of dispatcher and autograd redispatch (measured on a 2-core CPU): it calls
    the implementation directly, through a :class:`torch.autograd.Function` built from the same
    ``setup_context`` / ``backward`` when autograd will want gradients. Both routes run the
    same implementation and the same backward, so they give the same bits.
    """

    def __init__(self, name: str, fn, mutates_args=()):
        self.name = name
        self.fn = fn
        self.op = torch.library.custom_op(f"vitkern::{name}", fn, mutates_args=mutates_args)
        self.function = None  # the autograd.Function of register_autograd, if any
        params = list(inspect.signature(fn).parameters)
        self.mutated = tuple(params.index(n) for n in mutates_args)

    def register_fake(self, fake):
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward, setup_context) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self.fn

        def forward(ctx, *args):
            # ctx-style forward: a Function with a separate setup_context binds its arguments
            # with inspect.signature on every apply (~30 µs a call)
            out = fn(*args)
            setup_context(ctx, args, out)
            return out

        self.function = type(f"{self.name}_function", (torch.autograd.Function,), dict(
            forward=staticmethod(forward), backward=staticmethod(backward)))

    def __call__(self, *args):
        if _dispatcher_needed():
            return self.op(*args)
        grad = torch.is_grad_enabled()
        for a in args:
            if isinstance(a, Tensor):
                if type(a) is not Tensor:  # a tensor subclass (DTensor, …) dispatches itself
                    return self.op(*args)
                if grad and a.requires_grad:
                    # without a backward (e.g. a backward op under create_graph=True) the
                    # dispatcher says so, as before
                    return (self.op if self.function is None else self.function.apply)(*args)
        out = self.fn(*args)
        for i in self.mutated:  # as the dispatcher does: autograd sees the in-place write
            torch.autograd.graph.increment_version(args[i])
        return out


def kernel_op(name: str, mutates_args=()):
    """Decorator: the function as a :class:`KernelOp` named ``vitkern::name``."""
    return lambda fn: KernelOp(name, fn, mutates_args)
