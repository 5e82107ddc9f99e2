"""AdaLog's adaptive-base logarithmic quantizer (Wu et al., ECCV 2024, Sec. 3.2-3.3).

A log quantizer of base ``2^(q / r)`` (``r = 37`` fixed, the integer ``q`` searched): with range
``s`` and shift ``d``,

    c = clamp(round(-log2((x + d) / s) r / q), 0, 2^b - 1),   x^ = s 2^(-floor(c q / r)) T[(c q) mod r] - d

where ``T[j] = round(2^(-j/r) k) / k``, ``k = 2^(b+1) - 2``, is AdaLog's table of ``r`` mantissas (so
dequantization is a shift and a table lookup). Values whose code would reach ``2^b`` flush to
``-d``, as in AdaLog's code: ``2^b`` levels plus that bottom state (like RepQ-ViT's log quantizers,
this does not fit b bits). Inputs above ``s`` saturate at ``s``.

* post-softmax: ``d = 0``, ``s = 1`` (``fixed_range``): only the base is searched;
* post-GELU (AdaLog's shifted quantizer): ``d = 0.16997...`` (``-min GELU``), range and base
  searched jointly; the constant ``-d`` is folded into the next Linear's bias when deployed
  (AdaLog's bias reparameterisation).

Parameters per group: ``(s, q)``. The search (``candidates``) is the joint grid of every ``q`` in
``q_range`` times ``n`` ranges ``[alpha, beta] x s0``, ``s0 = max(x + d)`` (one range when fixed).
AdaLog's own coarse-to-fine search over the same space (FPCS) is not this grid.
"""
from __future__ import annotations

import math

import torch

from . import kernels
from .base import Quantizer, _constant, broadcast_groups, lookup_part, reduce_to_groups

GELU_SHIFT = 0.16997124254703522  # -min_x GELU(x), AdaLog's shift for post-GELU


class AdaLogQuantizer(Quantizer):
    """Adaptive-base log quantizer (module docstring)."""

    params_per_group = 2

    def __init__(self, bits: int, shift: float = 0.0, r: int = 37, q_range: tuple[int, int] = (10, 138),
                 fixed_range: bool = False, groups: int = 1, group_dim: int | None = None):
        super().__init__(bits, groups, group_dim)
        lo, hi = (int(v) for v in q_range)
        if not (isinstance(r, int) and r >= 1) or not 1 <= lo <= hi:
            raise ValueError(f"AdaLog needs an integer r >= 1 and 1 <= q_min <= q_max, got r={r!r}, q_range={q_range!r}")
        if not math.isfinite(shift) or shift < 0:
            raise ValueError(f"AdaLog shift must be finite and >= 0, got {shift!r}")
        self.shift, self.r, self.q_range, self.fixed_range = float(shift), r, (lo, hi), bool(fixed_range)
        self.levels = 2 ** bits
        self.table_den = 2 ** (bits + 1) - 2

    def _fake_quant(self, x, s, shape, fused=False):
        rng, q = s
        if not fused and self.groups == 1 and rng.numel() > 1:  # a search's candidates: one table each
            return kernels.adalog_quant_candidates(x, rng, q, self.shift, float(self.r), float(self.levels),
                                                   float(self.table_den))
        return kernels.run_kernel(kernels.adalog_quant, x, rng, q, self.shift, float(self.r), float(self.levels),
                                  float(self.table_den), fused=fused)

    def _codes(self, x, s, shape):
        rng, q = s
        c, flush = kernels.adalog_codes(x, rng, q, self.shift, float(self.r), float(self.levels))
        return torch.where(flush, torch.full_like(c, self.levels), c)

    def _dequant(self, codes, s, shape):
        rng, q = s
        c = codes.to(rng.dtype)
        v = kernels.adalog_value(c.clamp(max=self.levels - 1), rng, q, self.shift, float(self.r), float(self.table_den))
        return torch.where(c >= self.levels, torch.full_like(v, -self.shift), v)

    def _range0(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_range:
            return torch.ones(self.groups)
        return reduce_to_groups((x.detach() + self.shift).clamp(min=0), self.group_dim, self.groups, "max").clamp(min=1e-8)

    def initial_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Range ``max(x + d)`` (1 when fixed) and ``q = r`` (base 2)."""
        return torch.stack([self._range0(x).float(), torch.full((self.groups,), float(self.r))], -1)

    def candidates(self, x, alpha, beta, n):
        """Every ``q`` in ``q_range`` times ``n`` ranges in ``[alpha, beta) x s0`` (one when fixed)."""
        s0 = self._range0(x).double()
        factors = (torch.ones(1, dtype=torch.float64) if self.fixed_range
                   else alpha + torch.arange(n, dtype=torch.float64) * (beta - alpha) / n)
        rows = []
        for q in range(self.q_range[0], self.q_range[1] + 1):
            rng = factors[:, None] * s0[None, :]
            rows.append(torch.stack([rng, torch.full_like(rng, float(q))], -1))
        return torch.cat(rows).float()

    def set_scale(self, scale: torch.Tensor) -> None:
        scale = scale.reshape(self.scale.shape).clone()
        scale[:, 1] = scale[:, 1].round()  # the base numerator is an integer
        super().set_scale(scale)

    def export_parts(self, x):
        """No integer kernel applies to log codes: the graph computes each code in float (Add, Div,
        Clip, Log, Mul, Div, Round, Clip; the flushed values as code ``2^b``) and reads its value
        from a constant table of the ``2^b + 1`` states (one Gather); the consuming op stays a float op."""
        rng, q = (broadcast_groups(_constant(self.scale[:, i]), x, self.group_dim) for i in (0, 1))
        state = kernels.adalog_state(x, rng, q, self.shift, float(self.r), float(self.levels))
        return [(lookup_part(state, self.state_values(self.levels + 1), self.group_dim), None)]

    def spec(self) -> dict:
        return super().spec() | {"shift": self.shift, "r": self.r, "q_range": list(self.q_range),
                                 "fixed_range": self.fixed_range}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", AdaLog r={self.r}, shift={self.shift:g}, fixed_range={self.fixed_range}"
