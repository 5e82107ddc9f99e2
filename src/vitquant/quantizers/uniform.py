"""Uniform quantizer ``Psi_D(Y) = clamp(round(Y / D), qmin, qmax)`` (Eq. 8, Liu et al. 2021)."""
from __future__ import annotations

import torch

from . import kernels
from .base import Quantizer, group_rows, least_mse, percentile_tuple, qdq_affine, qdq_affine_groups, qdq_part, reduce_to_groups, row_quantiles

MIN_STEP = 1e-8  # the step of a group with no range (a constant channel)


def group_percentile(x: torch.Tensor, q: float, group_dim: int | None, groups: int) -> torch.Tensor:
    """The ``q``-th percentile (0..100) of ``|x|`` per group ``[G]``, exact (kthvalue)."""
    flat = group_rows(x.detach().abs(), group_dim, groups)
    n = flat.shape[1]
    k = min(n, max(1, int(round(q / 100.0 * n))))
    return torch.stack([row.float().kthvalue(k).values for row in flat])


class UniformQuantizer(Quantizer):
    """Plain uniform quantizer, symmetric (no zero point) or asymmetric, signed or unsigned.

    Codes: signed symmetric ``[-2^(b-1), 2^(b-1)-1]``; unsigned or asymmetric ``[0, 2^b-1]``
    (asymmetric dequantizes ``(q - z) D`` with ``z = round(-min / D)``).
    Initial interval ``D0 = m / (qmax + 0.5)`` with ``m = max|x|`` (``2^(b-1)-0.5`` in the
    signed case, as PTQ4ViT) or a percentile of ``|x|``. With ``mse_percentiles`` each group's range
    is the one, among these percentiles (asymmetric: ``[P_(100-p), P_p]``, ``D = range / (2^b - 1)``),
    whose quantized operand has the least mean squared error (RepQ-ViT's initialisation); the range
    need not contain 0 (the zero point may lie outside the codes).
    """

    def __init__(self, bits: int, *, signed: bool = True, symmetric: bool = True, groups: int = 1,
                 group_dim: int | None = None, percentile: float | None = None,
                 mse_percentiles: tuple[float, ...] | None = None):
        super().__init__(bits, groups, group_dim)
        self.mse_percentiles = None if mse_percentiles is None else percentile_tuple(mse_percentiles, 50)
        self.signed = signed and symmetric
        self.symmetric = symmetric
        self.percentile = percentile
        if self.signed:
            self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            self.qmin, self.qmax = 0, 2 ** bits - 1
        self.register_buffer("lower", torch.zeros(groups))  # group minima, asymmetric only

    def _zero_point(self, s: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return torch.round(-self.grouped(self.lower, shape) / s)

    def zero_points(self) -> torch.Tensor:
        """The zero point of every group ``[G]`` (asymmetric; ``round(-min / D)``, maybe outside the codes)."""
        return torch.round(-self.lower / self.scale)

    def _codes(self, x, s, shape):
        q = (x / s).round_()
        if not self.symmetric:
            q += self._zero_point(s, shape)
        return q.clamp_(self.qmin, self.qmax)

    def _dequant(self, q, s, shape):
        q = q.to(s.dtype, copy=True)
        if not self.symmetric:
            q -= self._zero_point(s, shape)
        return q.mul_(s)

    def _fake_quant(self, x, s, shape, fused=False):
        if self.symmetric:
            return kernels.run_kernel(kernels.uniform_symmetric, x, s, float(self.qmin), float(self.qmax), fused=fused)
        return kernels.run_kernel(kernels.uniform_affine, x, s, self._zero_point(s, shape), float(self.qmin),
                                  float(self.qmax), fused=fused)

    def _mse_range(self, x: torch.Tensor) -> torch.Tensor:
        """Per group, the percentile range of least quantization MSE (RepQ-ViT); sets ``lower``."""
        rows = group_rows(x.detach().float(), self.group_dim, self.groups)  # [G, n]
        frac = [p / 100.0 for p in self.mse_percentiles]
        if self.symmetric:
            steps = (row_quantiles(rows.abs(), frac) / (self.qmax + 0.5)).clamp(min=MIN_STEP)
            lows = zeros = torch.zeros_like(steps)
        else:
            highs, lows = row_quantiles(rows, frac), row_quantiles(rows, [1.0 - f for f in frac])  # [P, G]
            steps = ((highs - lows) / (self.qmax - self.qmin)).clamp(min=MIN_STEP)
            zeros = torch.round(-lows / steps)
        best = least_mse(rows, [kernels.uniform_affine(rows, s[:, None], z[:, None], float(self.qmin), float(self.qmax))
                                for s, z in zip(steps, zeros)])
        pick = torch.arange(rows.shape[0])
        self.lower.copy_(lows[best, pick])
        return steps[best, pick]

    def initial_scale(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.mse_percentiles is not None:
            return self._mse_range(x)
        if not self.symmetric:
            hi = reduce_to_groups(x, self.group_dim, self.groups, "max").clamp(min=0)
            lo = reduce_to_groups(x, self.group_dim, self.groups, "min").clamp(max=0)
            if self.percentile is not None:
                hi = torch.minimum(hi, group_percentile(x.clamp(min=0), self.percentile, self.group_dim, self.groups))
                lo = -torch.minimum(-lo, group_percentile(x.clamp(max=0), self.percentile, self.group_dim, self.groups))
            self.lower.copy_(lo)
            return ((hi - lo) / (self.qmax - self.qmin)).clamp(min=1e-8).float()
        if self.percentile is not None:
            m = group_percentile(x, self.percentile, self.group_dim, self.groups)
        else:
            m = reduce_to_groups(x, self.group_dim, self.groups, "amax")
        return (m / (self.qmax + 0.5)).clamp(min=1e-8).float()

    def export_parts(self, x):
        if not self.symmetric:
            if self.groups != 1:  # e.g. per head: codes, steps and zero points (a triple)
                return [qdq_affine_groups(x, self.scale, self.zero_points(), self.group_dim, self.qmin, self.qmax)]
            return [(qdq_affine(x, self.scale, float(self.zero_points()[0]), self.qmin, self.qmax), None)]
        return [qdq_part(x, self.scale, self.group_dim, self.qmin, self.qmax)]

    def spec(self) -> dict:
        return super().spec() | {"signed": self.signed, "symmetric": self.symmetric, "percentile": self.percentile,
                                 "mse_percentiles": self.mse_percentiles}

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else ("unsigned" if self.symmetric else "asymmetric")
        return super().extra_repr() + f", {kind}"
