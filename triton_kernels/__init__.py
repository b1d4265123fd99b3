"""Triton kernels of vitkern, installed as ``vitkern.triton_kernels``.

One module per op family; ``attention_core`` holds the softmax-attention math they share.
Each family module declares its capability (``unsupported``), its tile candidates, and the
specialisations the ahead-of-time check proves in ``aot_specs()``; ``tuning`` chooses tiles.
"""
KERNEL_MODULES = ("hilo", "window", "token", "linear", "ppma")
