"""Process-level settings that make calibration and simulated-quantized inference fast on CPU."""
from __future__ import annotations

import ctypes
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_tuned = False


def tune_runtime(mmap_threshold: int = 1 << 30) -> dict:
    """Two process-wide settings, applied once (the CLI and benchmarks call this; API users may
    call it at start-up). Returns what was applied.

    * glibc ``mallopt``: keep large temporaries on the heap instead of an mmap/munmap per
      allocation. The candidate search allocates and frees tensors of hundreds of MB thousands of
      times; with glibc's defaults each one faults its pages in again (measured on DeiT-Tiny: half
      of the calibration wall time was kernel time).
    * ``torch.set_flush_denormal(True)``: softmax outputs such as e^-100 are subnormal floats, and
      x86 arithmetic on them is slow (measured: quantized evaluation 1.40x -> 1.26x the FP32 time).
      Values below 1.2e-38 become 0, which is what any quantizer maps them to anyway.
    """
    global _tuned
    applied = {"flush_denormal": bool(torch.set_flush_denormal(True)), "mallopt": False}
    if _tuned or not sys.platform.startswith("linux"):
        applied["mallopt"] = _tuned
        return applied
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold) == 1)
    except (OSError, AttributeError):
        ok = False
    _tuned = applied["mallopt"] = bool(ok)
    return applied


# -- torch.distributed (torchrun) ------------------------------------------------------------------


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): gloo on CPU, NCCL on
    CUDA (each rank on its ``LOCAL_RANK`` device). Returns ``(rank, world_size)``; ``(0, 1)`` alone."""
    import os

    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return distributed()[0] == 0
