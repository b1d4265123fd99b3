"""Triton kernels of vitkern, installed as ``vitkern.triton_kernels``.

One module per op family; ``attention_core`` holds the softmax-attention math they share.
Each family module lists its ahead-of-time compile cases in ``aot_cases()``.
"""
KERNEL_MODULES = ("hilo", "window", "token", "linear", "ppma")
