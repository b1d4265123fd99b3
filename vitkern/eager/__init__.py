"""The ``eager`` backend: fast composite PyTorch code for the CPU (and any device).

Each module here computes what the matching :mod:`vitkern.reference` function defines, with the
same signature, through PyTorch's fused primitives (``F.scaled_dot_product_attention`` on the
gathered kept tokens; PPMA's masks formed per block of query rows from the 1D row / column masks)
instead of the reference's literal formulation that materialises every N×N matrix. Everything is
differentiable through autograd and runs in fp16 / bf16 / fp32 / fp64 on any device. The
reference stays the definition and the oracle: ``tests/test_eager*.py`` check every output and
gradient against it.

Covered: :mod:`~vitkern.eager.token` (``token_attention``), :mod:`~vitkern.eager.ppma`
(``ppma_attention``), :mod:`~vitkern.eager.window` (``window_attention``: one gather per input
and SDPA per shift-mask pattern), :mod:`~vitkern.eager.linear` (``linear_attention``,
``xca_attention``, ``soft_attention``: fewer passes, fused into batched matmuls), each named as
its family's ``eager`` in the op's descriptor (:mod:`vitkern.ops._dispatch`). ``auto`` picks
``eager`` for CPU tensors of these ops; every other op runs its reference under
``backend="eager"`` (HiLo's and criss-cross PPMA's references are already their fastest form).
"""
