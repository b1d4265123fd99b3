"""vitkern's exceptions, in one place (every layer imports them from here: no upward imports).

* :class:`BackendError` — no backend accepts an op's inputs, or the requested one refuses them
  (the message lists each backend's reason).
* :class:`UnsupportedModule` — a module's ``from_timm`` (or a patcher) cannot reproduce the given
  third-party module; ``patch_model`` leaves it in place and reports the reason.
"""
from __future__ import annotations

__all__ = ["BackendError", "UnsupportedModule"]


class BackendError(ValueError):
    """No backend accepts the given inputs (or the requested one refuses them)."""


class UnsupportedModule(ValueError):
    """Raised by a ``from_timm`` that cannot reproduce the given timm module; the message says why."""
