"""PTQ4ViT twin uniform quantizers (Yuan et al., ECCV 2022, Sec. 4.1).

One b-bit code: one bit selects the range, b-1 bits hold the value; the two ranges have their
own intervals. ``scale`` holds the searched interval.
"""
from __future__ import annotations

import torch

from . import kernels
from .base import Quantizer, broadcast_groups, qdq_part, reduce_to_groups, split_at

GELU_MIN = 0.16997124254703522  # -min GELU(x), the fixed negative range of post-GELU twin


class TwinSoftmaxQuantizer(Quantizer):
    """Post-softmax twin uniform, values in [0, 1].

    R2 = [0, 1] with fixed ``D2 = 1 / 2^(b-1)``; R1 = [0, 2^(b-1) D1) with the searched
    ``D1 = 2^-i`` (``scale``). A value uses R1 when it lies in R1, else R2; each range codes
    ``clamp(round(x / D), 0, 2^(b-1) - 1)``. Code layout: ``range_bit * 2^(b-1) + value``
    (range_bit 1 = R2).
    """

    def __init__(self, bits: int, groups: int = 1, group_dim: int | None = None, max_exponent: int = 20):
        super().__init__(bits, groups, group_dim)
        self.levels = 2 ** (bits - 1)
        self.d2 = 1.0 / self.levels
        self.max_exponent = max_exponent

    def spec(self) -> dict:
        return super().spec() | {"max_exponent": self.max_exponent}

    def export_parts(self, x):
        """R1 part (values below ``levels * D1``, else 0) and R2 part, each unsigned on its step
        (softmax outputs are non-negative: the int8 range's saturation is the codes' top)."""
        r1, r2 = split_at(x, x < self.levels * broadcast_groups(self.scale, x, self.group_dim))
        return [qdq_part(r1, self.scale, self.group_dim, 0, self.levels - 1, nonnegative=True),
                qdq_part(r2, torch.tensor([self.d2]), None, 0, self.levels - 1, nonnegative=True)]

    def _args(self, x, s):
        return x, s, torch.full_like(s, self.d2), float(self.levels)

    def _fake_quant(self, x, s, shape, fused=False):
        return kernels.run_kernel(kernels.twin_softmax, *self._args(x, s), fused=fused)

    def _codes(self, x, s, shape):
        in_r1, v1, v2 = kernels.twin_softmax_split(*self._args(x, s))
        return torch.where(in_r1, v1, v2 + self.levels)

    def _dequant(self, q, s, shape):
        q = q.to(s.dtype)
        return torch.where(q < self.levels, q * s, (q - self.levels) * self.d2)

    def initial_scale(self, x):
        # Before the search: the split one power of two below R2 (D1 = D2 / 2).
        return torch.full((self.groups,), self.d2 / 2)

    def candidates(self, x, alpha, beta, n):
        """``D1 = 2^-i``, i = 0..max_exponent-1 (PTQ4ViT's split search), same for every group."""
        d1 = 2.0 ** -torch.arange(self.max_exponent, dtype=torch.float64)
        return d1.float()[:, None].expand(-1, self.groups).contiguous()


class TwinGeluQuantizer(Quantizer):
    """Post-GELU twin uniform.

    R1 holds negative values with the fixed interval ``0.16997 / 2^(b-1)`` (GELU >= -0.17),
    R2 the non-negative values with the searched interval ``D2`` (``scale``). The code is a
    b-bit signed integer whose sign bit selects the range: ``[-2^(b-1), -1]`` in R1,
    ``[0, 2^(b-1) - 1]`` in R2.
    """

    def __init__(self, bits: int, groups: int = 1, group_dim: int | None = None):
        super().__init__(bits, groups, group_dim)
        self.levels = 2 ** (bits - 1)
        self.d_neg = GELU_MIN / self.levels

    def _args(self, x, s):
        return x, s, torch.full_like(s, self.d_neg), float(self.levels)

    def _codes(self, x, s, shape):
        pos, neg = kernels.twin_gelu_split(*self._args(x, s))
        return pos.add_(neg)

    def _dequant(self, q, s, shape):
        q = q.to(s.dtype)
        return torch.where(q >= 0, q * s, q * self.d_neg)

    def export_parts(self, x):
        """Non-negative part on ``D2`` and negative part on the fixed step (each 0 outside)."""
        return [qdq_part(x, self.scale, self.group_dim, 0, self.levels - 1),
                qdq_part(x, torch.tensor([self.d_neg]), None, -self.levels, 0)]

    def _fake_quant(self, x, s, shape, fused=False):
        return kernels.run_kernel(kernels.twin_gelu, *self._args(x, s), fused=fused)

    def initial_scale(self, x):
        m = reduce_to_groups(x.detach().clamp(min=0), self.group_dim, self.groups, "max")
        return (m / (self.levels - 0.5)).clamp(min=1e-8).float()
