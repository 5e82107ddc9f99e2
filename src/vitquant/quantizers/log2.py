"""Log-domain quantizers for post-softmax activations (RepQ-ViT, Li et al. 2023, Sec. 4.2).

Attention probabilities in ``[0, 1]`` are power-law distributed: a log grid keeps the many small
values and the few large ones. With step ``s`` (the searched ``scale``, the largest representable
value) and ``k`` levels per octave (``k = 1``: log2; ``k = 2``: log-sqrt2, RepQ-ViT's choice),

    q = clamp(round(-k log2(x / s)), 0, L - 1),   x^ = s 2^(-q / k)

where ``2^(-q/2)`` is computed as RepQ-ViT's integer-friendly form ``2^(-ceil(q/2)) (1 + (q mod 2)
(sqrt2 - 1))`` (a shift and, for odd codes, one constant multiply). Values below the smallest level
flush to 0. ``zero="code"`` (default) spends one of the ``2^b`` codes on 0, so a b-bit quantizer
really has ``2^b`` states (``L = 2^b - 1`` levels + zero); ``zero="extra"`` is RepQ-ViT's own
convention, ``2^b`` levels plus an implicit zero (``2^b + 1`` states: it does not fit b bits; use it
only to reproduce their figures). Codes: ``q`` for the levels, ``L`` for zero.
"""
from __future__ import annotations

import torch

from . import kernels
from .base import (Quantizer, _constant, broadcast_groups, group_rows, least_mse, lookup_part, percentile_tuple,
                   reduce_to_groups, row_quantiles)

class LogQuantizer(Quantizer):
    """Log2 (``per_octave=1``) or log-sqrt2 (``per_octave=2``) quantizer for non-negative values."""

    def __init__(self, bits: int, per_octave: int = 2, zero: str = "code", groups: int = 1,
                 group_dim: int | None = None, mse_percentiles: tuple[float, ...] | None = None):
        super().__init__(bits, groups, group_dim)
        self.mse_percentiles = None if mse_percentiles is None else percentile_tuple(mse_percentiles, 0)
        if per_octave not in (1, 2):
            raise ValueError(f"per_octave must be 1 (log2) or 2 (log-sqrt2), got {per_octave!r}")
        if zero not in ("code", "extra"):
            raise ValueError(f"zero must be 'code' or 'extra', got {zero!r}")
        self.per_octave, self.zero = per_octave, zero
        self.levels = 2 ** bits - 1 if zero == "code" else 2 ** bits  # non-zero levels

    def _args(self, x, s):
        return x, s, float(self.per_octave), float(self.levels)

    def _fake_quant(self, x, s, shape, fused=False):
        return kernels.run_kernel(kernels.log_quant, *self._args(x, s), fused=fused)

    def _codes(self, x, s, shape):
        q, flush = kernels.log_codes(*self._args(x, s))
        return torch.where(flush, torch.full_like(q, self.levels), q)

    def _dequant(self, q, s, shape):
        q = q.to(s.dtype)
        value = kernels.log_value(q.clamp(max=self.levels - 1), s, float(self.per_octave))
        return torch.where(q >= self.levels, torch.zeros_like(value), value)

    def initial_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The largest value: nothing saturates (the search scales it by ``[alpha, beta]``). With
        ``mse_percentiles``: the percentile of ``x``, among these, whose quantized ``x`` has the least
        mean squared error (RepQ-ViT's initialisation)."""
        if self.mse_percentiles is not None:
            rows = group_rows(x.detach().float(), self.group_dim, self.groups)
            steps = row_quantiles(rows, [p / 100.0 for p in self.mse_percentiles]).clamp(min=1e-8)  # [P, G]
            best = least_mse(rows, [kernels.log_quant(rows, s[:, None], float(self.per_octave), float(self.levels))
                                    for s in steps])
            return steps[best, torch.arange(rows.shape[0])]
        return reduce_to_groups(x.detach().clamp(min=0), self.group_dim, self.groups, "max").clamp(min=1e-8).float()

    def export_parts(self, x):
        """No integer kernel applies to log codes: the graph computes each code in float (Div, Log,
        Mul, Round, Clip; zero and the flushed values as code ``L``) and reads its value from a
        constant table of the ``L + 1`` states (one Gather); the consuming matmul stays a float MatMul."""
        s = broadcast_groups(_constant(self.scale), x, self.group_dim)
        state = kernels.log_state(x, s, float(self.per_octave), float(self.levels))
        return [(lookup_part(state, self.state_values(self.levels + 1), self.group_dim), None)]

    def spec(self) -> dict:
        return super().spec() | {"per_octave": self.per_octave, "zero": self.zero,
                                 "mse_percentiles": self.mse_percentiles}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {'log2' if self.per_octave == 1 else 'log-sqrt2'}, zero={self.zero}"
