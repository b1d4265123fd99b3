"""Op families as descriptors, and the one generic backend dispatch over their declarations.

A :class:`Family` describes one op family: its reference (the definition), its
:mod:`vitkern.eager` implementation if it has one, and per GPU backend a :class:`Capability`:
what that backend declares it takes. A declaration states dtypes, head dims, training (inputs
that need gradients) and determinism as data, and hands the rest to ``check``, which asks the
kernel layer's own declaration: ``unsupported(...)`` of ``vitkern.triton_kernels.<family>``
(per mode and pass: windows, pooling, map widths, forward / backward head-dim limits), or for
``cuda`` the op's glue over vitkern._C's ``*_supported`` entry points (the C side declares its
dtypes, head dims and windows). The reference takes every input; so does an eager module. The
device rule is the backend's own, the same for every family: :func:`vitkern.backends.device_reason`.

:meth:`Capability.not_supported_reasons` lists why a backend refuses one call's :class:`Inputs`
(empty: it takes them), like xformers' ``AttentionOpBase.not_supported_reasons``.
:func:`dispatch` is the only place vitkern.ops chooses a backend: it walks the backends in
priority order (``cuda``, ``triton``, ``eager``, ``reference`` for ``auto``, ``cuda`` only where
:mod:`vitkern.cuda_auto` approves the kernels the call runs; or just the requested one) through
:func:`vitkern.backends.select`, stops at the first that accepts, and only when none does
computes the reasons of the backends it did not ask, once each, for the :class:`BackendError`.
Nothing here reads tensor values (no device sync); it all traces under ``torch.compile``.

Every family registers itself in :data:`FAMILIES`; ``tests/test_dispatch.py`` generates its test
matrix from these declarations (each backend forced on inputs at and beyond its declared limits:
accepted inputs run, refused ones raise a BackendError with the declared reason).
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from vitkern import backends, cuda_auto

__all__ = ["TRITON_DTYPES", "HeadDims", "Inputs", "inputs", "Capability", "Family", "FAMILIES",
           "dispatch", "CallCache"]

#: dtypes the Triton kernels take (the reference takes any float dtype, fp64 included).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Every family descriptor, by name (filled as the op modules are imported).
FAMILIES: dict[str, "Family"] = {}


class HeadDims(NamedTuple):
    """Head dims a backend takes: the multiples of ``multiple`` up to ``max``."""

    max: int
    multiple: int = 8

    def reason(self, d: int, backend: str) -> Optional[str]:
        if d % self.multiple == 0 and d <= self.max:
            return None
        if self.multiple == 1:
            return f"head_dim {d} > {self.max} not supported by {backend}"
        return (f"head_dim {d} not supported by {backend} (multiples of {self.multiple} up to "
                f"{self.max})")


class Inputs(NamedTuple):
    """One call as the declarations see it; built once per call from shapes and flags only."""

    x: Tensor                  # the tensor whose device and dtype the backends run on (q)
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    needs_grad: bool           # autograd will want gradients: the backward kernels must fit too
    args: Any                  # the family's own values (a tuple its checks unpack)
    other_dtypes: tuple        # (what, dtype) of further tensors a kernel reads in their dtype


def inputs(x: Tensor, *args, needs_grad: bool = False, head_dim: Optional[int] = None,
           other_dtypes: tuple = ()) -> Inputs:
    """:class:`Inputs` of a call on ``x`` (head dim: ``x``'s last dim unless given)."""
    return Inputs(x, x.device, x.dtype, x.shape[-1] if head_dim is None else head_dim,
                  needs_grad, args, other_dtypes)


def _names(dtypes) -> str:
    return ", ".join(str(t).removeprefix("torch.") for t in dtypes)


@dataclass(frozen=True)
class Capability:
    """What ``backend`` declares it takes for one family.

    dtypes: of ``x`` and of ``Inputs.other_dtypes`` (None: every floating dtype).
    head_dim: the generic head-dim rule (None: any, or the ``check`` decides).
    training: whether it runs inputs that need gradients (False: forward only; ``forward_only``
        says why). Head-dim limits of the backward passes alone are the kernel module's.
    deterministic: same bits every run, forward and backward (refused under
        ``torch.use_deterministic_algorithms(True)`` when False).
    check: ``check(inputs) -> reason or None``, the kernel layer's own declaration; asked only
        when the rules above pass (its limits may depend on them, e.g. fp32 vs 16-bit tiles).
    kernels: cuda only: the vitkern._C kernels a call runs, which ``auto`` takes only where
        :mod:`vitkern.cuda_auto` approves each one for the GPU and dtype.
    """

    backend: str
    dtypes: Optional[tuple] = None
    head_dim: Optional[HeadDims] = None
    training: bool = True
    forward_only: str = ""
    deterministic: bool = True
    check: Optional[Callable[[Inputs], Optional[str]]] = None
    kernels: Optional[Callable[[Inputs], tuple]] = None
    #: nothing declared: every input is taken (the reference, an eager module)
    open: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "open", self.dtypes is None and self.head_dim is None
                           and self.training and self.deterministic and self.check is None)

    @classmethod
    def triton(cls, **kw) -> "Capability":
        """A triton declaration: the Triton dtypes, plus ``kw``."""
        return cls("triton", dtypes=TRITON_DTYPES, **kw)

    def not_supported_reasons(self, inp: Inputs) -> list[str]:
        """Why this backend refuses ``inp``: every declared rule it breaks, else the ``check``'s
        reason; empty when it takes them. (The device is asked before, by :func:`dispatch`.)"""
        if self.open:
            return []
        why = []
        if self.dtypes is not None:  # x's dtype, then other tensors' where they differ
            for what, dtype in (("dtype", inp.dtype), *inp.other_dtypes):
                if dtype not in self.dtypes and (what == "dtype" or dtype != inp.dtype):
                    why.append(f"{what} {dtype} not supported by {self.backend} "
                               f"({_names(self.dtypes)})")
        if self.head_dim is not None and (r := self.head_dim.reason(inp.head_dim, self.backend)):
            why.append(r)
        if inp.needs_grad and not self.training:
            why.append(self.forward_only or f"{self.backend} is forward-only (inference)")
        if not self.deterministic and torch.are_deterministic_algorithms_enabled():
            why.append(f"{self.backend} is not deterministic and "
                       "torch.use_deterministic_algorithms(True) is set")
        if not why and self.check is not None and (r := self.check(inp)):
            why.append(r)
        return why


@dataclass(frozen=True)
class Family:
    """An op family: its reference, its eager module (or None) and its GPU backends'
    declarations (``cuda``, ``triton``; a family without one has no such kernel)."""

    name: str
    reference: Callable
    backends: tuple[Capability, ...]
    eager: Optional[Callable] = None
    caps: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        caps = {c.backend: c for c in self.backends}
        caps["reference"] = Capability("reference")
        if self.eager is not None:
            caps["eager"] = Capability("eager")
        object.__setattr__(self, "caps", caps)
        FAMILIES[self.name] = self

    def reason(self, op: str, name: str, inp: Inputs, explicit: bool) -> Optional[str]:
        """Why backend ``name`` refuses ``inp`` for ``op`` (None when it takes them);
        ``explicit``: asked for by name (not ``auto``)."""
        cap = self.caps.get(name)
        if cap is None:
            if name == "cuda":
                return f"no {op} kernel in vitkern._C yet"
            # no eager module: backend="eager" runs the reference, which is the op's PyTorch path
            return None if explicit else (f"no eager module for {op} (its reference is its "
                                          "PyTorch path)")
        why = backends.device_reason(name, inp.device, explicit)
        if why is not None:
            return why
        reasons = cap.not_supported_reasons(inp)
        if reasons:
            return "; ".join(reasons)
        if cap.kernels is not None and not explicit:
            return cuda_auto.reason(cap.kernels(inp), inp.device, inp.dtype)
        return None


def dispatch(family: Family, op: str, backend: str, inp: Inputs) -> str:
    """The backend that runs ``op`` on ``inp``: ``backend`` ("auto", a name, or
    ``VITKERN_BACKEND`` for auto) checked against ``family``'s declarations; raises
    :class:`vitkern.errors.BackendError` listing every backend and its reason when it is refused
    (or, for auto, when none accepts). ``"eager"`` of a family without an eager module runs its
    reference and comes back as ``"reference"``."""
    name = backends.select(op, backend, lambda name, explicit: family.reason(op, name, inp,
                                                                              explicit))
    return "reference" if name == "eager" and family.eager is None else name


_ATOMS = frozenset((int, float, bool, str, type(None)))


def _environment_reader():
    """A function returning (VITKERN_BACKEND, TRITON_INTERPRET) as set now. ``os.environ.get``
    costs ~0.8 µs (it encodes the name, then decodes the value); reading os.environ's own dict
    with the names encoded once costs ~0.04 µs and sees every change made through os.environ
    (monkeypatch.setenv included). Falls back to os.environ.get where that dict is absent."""
    env = os.environ
    data, encode = getattr(env, "_data", None), getattr(env, "encodekey", None)
    if not isinstance(data, dict) or encode is None:
        return lambda: (env.get("VITKERN_BACKEND"), env.get("TRITON_INTERPRET"))
    backend, interpret = encode("VITKERN_BACKEND"), encode("TRITON_INTERPRET")
    return lambda: (data.get(backend), data.get(interpret))


_environment = _environment_reader()


class CallCache:
    """What an op's checks and :func:`dispatch` derive from a call, kept per call signature.

    Both read only metadata: tensors' shapes, dtypes and devices, the call's other arguments,
    whether autograd wants gradients, and global state (``VITKERN_BACKEND``, ``TRITON_INTERPRET``,
    deterministic mode), which :meth:`key` puts in the key. A repeated call (every layer of a
    model, every step) looks its checked arguments and backend up instead of recomputing them
    (~12 µs on a 2-core CPU). Errors are never cached: a refused call raises again. Checks that
    read values are not part of it: the ops run them on every call (CPU index tensors' values)
    or do not cache such calls (``out=`` overlap, ``max_seqlen`` computed from ``cu_seqlens``).

    State that changes only by rebuilding or re-approving (vitkern._C, ``cuda_auto``'s
    approvals) is read once per signature: :meth:`clear_all` forgets every cached call.
    """

    _all: "weakref.WeakSet[CallCache]" = weakref.WeakSet()

    def __init__(self, size: int = 1024):
        self.size = size
        self._entries: dict = {}
        CallCache._all.add(self)

    @classmethod
    def clear_all(cls) -> None:
        """Forget the cached calls of every op (e.g. after approving CUDA kernels)."""
        for cache in list(cls._all):
            cache._entries.clear()

    @staticmethod
    def key(*items) -> Optional[tuple]:
        """The signature of a call: tensors as (type, shape, dtype, device), other items with
        their type (``True``, ``1`` and ``1.0`` are equal keys, but not equally valid). None
        inside ``torch.compile``, which traces the checks once per graph anyway (a cache lookup
        there would become a guard on the cache's contents)."""
        if torch.compiler.is_compiling():
            return None
        key = [_environment(), torch.are_deterministic_algorithms_enabled()]
        for x in items:  # a loop, not a function per item: this runs on every call
            t = type(x)
            if t in _ATOMS:
                key.append((t, x))
            elif isinstance(x, Tensor):
                key.append((t, x.shape, x.dtype, x.device))
            elif t is tuple or t is list:  # (H, W)-like pairs: their items' types too
                key.append((t, tuple(x), tuple(map(type, x))))
            else:
                key.append((t, x))
        return tuple(key)

    def get(self, key):
        """The value kept for ``key`` (None: none, or no key)."""
        try:
            return None if key is None else self._entries.get(key)
        except TypeError:  # an unhashable argument (e.g. a list): not cached
            return None

    def put(self, key, value):
        """Keep ``value`` for ``key`` (unless None or unhashable); returns ``value``."""
        if key is None:
            return value
        if len(self._entries) >= self.size:
            self._entries.clear()
        try:
            self._entries[key] = value
        except TypeError:
            pass
        return value
