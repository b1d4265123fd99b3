"""Triton-version adapters for running vitkern's kernels, kept in one place.

(``aot.py`` has its own adapter for the ahead-of-time compile API.)

* :func:`patch_interpreter_scalar_index`: Triton < 3.8's interpreter turns a scalar tensor into a
  Python int with ``int(array_of_shape_1)``, which NumPy >= 2.4 refuses ("only 0-dimensional
  arrays can be converted to Python scalars"). Every ``for i in range(lo, hi, BLOCK)`` over
  runtime bounds then fails under ``TRITON_INTERPRET=1``. Triton 3.8 squeezes first; the patch
  gives older interpreters the same ``__index__``. It touches nothing but the interpreter's own
  per-launch patch of ``tl.tensor`` and is a no-op where the interpreter already works.
"""
from __future__ import annotations

import numpy as np


def _numpy_refuses_1d_int() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def patch_interpreter_scalar_index() -> bool:
    """Make the interpreter's ``tl.tensor.__index__`` squeeze its one-element array; returns
    whether a patch was applied (False where NumPy or Triton needs none)."""
    if not _numpy_refuses_1d_int():
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:  # no interpreter in this Triton build
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_vitkern_squeezed", False):
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                       if self.handle.data.size == 1 else int(self.handle.data))

    _patch_lang_tensor._vitkern_squeezed = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
