"""Sub-8-bit weight codes packed into bytes for saved checkpoints.

A b-bit code ``c`` in ``[qmin, qmin + 2^b - 1]`` is stored as ``c - qmin`` in b bits, little-endian
within the stream of all codes of the tensor (row-major), padded to a whole byte: ``ceil(n b / 8)``
bytes for ``n`` codes. ``unpack_codes(pack_codes(c)) == c`` exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def fits(codes: torch.Tensor, bits: int, qmin: int) -> bool:
    """Whether every code lies in the ``2^bits`` values from ``qmin``."""
    return bool(codes.numel()) and int(codes.min()) >= qmin and int(codes.max()) <= qmin + 2 ** bits - 1


def pack_codes(codes: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """``codes`` (integers in ``[qmin, qmin + 2^bits - 1]``) as a uint8 tensor of ``ceil(n bits / 8)`` bytes."""
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit codes")
    if not fits(codes, bits, qmin):
        raise ValueError(f"codes outside the {bits}-bit range from {qmin}")
    u = (codes.detach().cpu().reshape(-1).to(torch.int64) - qmin).numpy().astype(np.uint32)
    planes = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, qmin: int, shape) -> torch.Tensor:
    """The int64 codes of :func:`pack_codes`, reshaped to ``shape``."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (n * bits + 7) // 8:
        raise ValueError(f"packed codes: expected {(n * bits + 7) // 8} bytes for {n} {bits}-bit codes, "
                         f"got {packed.numel()} ({packed.dtype})")
    planes = np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits).astype(np.int64)
    u = (planes << np.arange(bits, dtype=np.int64)).sum(1)
    return torch.from_numpy(u + qmin).reshape(tuple(shape))
