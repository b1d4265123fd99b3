"""``python -m vitkern info``: versions, device, and which backends are available and why not."""
from __future__ import annotations

import argparse
import platform
import sys


def info() -> str:
    import torch

    import vitkern
    from vitkern import backends

    lines = [f"vitkern   {vitkern.__version__}", f"python    {platform.python_version()}",
             f"torch     {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        lines.append(f"triton    {triton.__version__}")
    except ImportError:
        lines.append("triton    not installed")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device    {props.name} (sm_{props.major}{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("device    CPU only (no CUDA device)")
    lines.append(f"interpret TRITON_INTERPRET={'1' if backends.interpreting() else '0'}")
    lines.append("backends:")
    for name, (ok, why) in backends.backend_status().items():
        lines.append(f"  {name:<9} {'yes' if ok else 'no ':<3}  {why}")
    lines.append(f"auto picks, in order: {', '.join(backends.AUTO_ORDER)} "
                 "(CPU tensors: reference; cuda only where approved)")
    lines.append(f"cuda {backends.cuda_auto_summary()}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkern")
    parser.add_argument("command", choices=["info"], nargs="?", default="info")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
