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
