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
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
        lines.append(f"triton    {triton.__version__}")
    except ImportError:
        lines.append("triton    not installed")
    import numpy

    lines.append(f"numpy     {numpy.__version__}")
    tested = ", ".join(f"{k} {lo}" + (f"-{hi}" if hi != lo else "")
                       for k, (lo, hi) in vitkern.TESTED.items())
    outside = [f"{k} {v}" for k, v in versions.items() if not _within(v, *vitkern.TESTED[k])]
    lines.append(f"tested    {tested}" + (f" (untested here: {', '.join(outside)})" if outside
                                           else ""))
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
                 "(CPU tensors: eager where the op has an eager module, else reference; cuda only "
                 "where approved)")
    lines.append(f"cuda {backends.cuda_auto_summary()}")
    return "\n".join(lines)


def _within(version: str, lo: str, hi: str) -> bool:
    """Whether ``version`` (e.g. "2.14.1+cu130") lies in the release range [lo, hi] (major.minor)."""
    def minor(v):
        return tuple(int(x) for x in v.split("+")[0].split(".")[:2])
    return minor(lo) <= minor(version) <= minor(hi)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkern")
    parser.add_argument("command", choices=["info"], nargs="?", default="info")
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
