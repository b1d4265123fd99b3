"""No op call waits on the GPU (issue 15): the host queues kernels and returns.

After a warm-up call (compiling and autotuning synchronise, once per specialisation), each
family's op runs forward and backward under ``torch.cuda.set_sync_debug_mode("error")``, which
raises on any synchronising CUDA call: a value read back (``.item()``, ``.tolist()``, a tensor in
an ``if``), a blocking copy, an explicit synchronize. Index checks that would need a value are
done on CPU tensors only, or under ``VITKERN_DEBUG=1`` (tests/test_window.py and
tests/test_token.py prove the unchecked path reads nothing on the CPU). The cases are
tests/test_dispatch.py's, in fp16 with d = 32, on the triton backend. Runs in the GPU tier's
suite stage; skipped without a CUDA device.
"""
from __future__ import annotations

import pytest
import torch

from vitkern import backends

from test_dispatch import CALLS, _first

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", sorted(CALLS))
def test_op_call_does_not_synchronise(name, monkeypatch):
    monkeypatch.delenv("VITKERN_DEBUG", raising=False)
    op, make, call = CALLS[name]
    x = make(torch.float16, 32, True)
    try:
        _first(call(x, "triton")).float().sum().backward()  # warm-up: compiles, autotunes
    except backends.BackendError as exc:
        pytest.skip(f"triton refuses the case: {exc}")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _first(call(x, "triton")).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
