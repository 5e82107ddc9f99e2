"""Process-level settings that make calibration fast on CPU."""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_tuned = False


def tune_allocator(mmap_threshold: int = 1 << 30) -> bool:
    """Keep large temporaries on the glibc heap instead of mmap/munmap per allocation.

    The candidate search allocates and frees tensors of hundreds of MB thousands of times; with
    glibc's defaults each one is a fresh mmap whose pages fault in again (measured on DeiT-Tiny:
    half of the calibration wall time was kernel time). Called by the CLI; API users may call it
    once at start-up. Returns False where it does not apply (non-glibc platforms).
    """
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return _tuned
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold) == 1
    except (OSError, AttributeError):
        return False
    _tuned = bool(ok)
    return _tuned
