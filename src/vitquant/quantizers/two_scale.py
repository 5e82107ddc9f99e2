"""TSPTQ-ViT two-scaled scaling factors (Tai, Lin, Wu, ICASSP 2023), as read in METHODS.md.

Both quantizers have two searched parameters per group, ``scale[..., 0]`` (a step) and
``scale[..., 1] = m`` (an integer exponent): the second step is the first times ``2^m``, a
shift in integer arithmetic.

* **V-2SF** (:class:`ValueTwoScaleQuantizer`), for post-Softmax and post-GELU activations: one
  b-bit code = 1 range bit + a (b-1)-bit value. Values whose fine code ``round(x / s)`` fits the
  value range keep the least-significant bits (fine step ``s``); larger values keep the
  most-significant bits, i.e. the code of the coarse step ``s * 2^m``.
* **O-2SF** (:class:`OutlierTwoScaleQuantizer`), for LayerNorm inputs (the residual stream):
  one b-bit signed code per value, one step ``s`` for the whole tensor, and a 1-bit flag per
  channel: channels whose calibrated range exceeds what ``s`` can represent (outliers) use
  ``s * 2^m``.
"""
from __future__ import annotations

import math

import torch

from . import kernels
from .base import Quantizer, broadcast_groups, group_rows, qdq, qdq_part, reduce_to_groups, split_at


def _exponent_grid(base: torch.Tensor, exponents: range, alpha: float, beta: float, n: int) -> torch.Tensor:
    """Candidates ``[n * len(exponents), G, 2]`` of (step, m): for every exponent m, ``n``
    steps ``f * base / 2^m`` with ``f`` in ``[alpha, beta)``."""
    factors = alpha + torch.arange(n, dtype=torch.float64) * (beta - alpha) / n
    rows = []
    for m in exponents:
        step = factors[:, None] * base.double()[None, :] / 2.0 ** m
        rows.append(torch.stack([step, torch.full_like(step, float(m))], dim=-1))
    return torch.cat(rows).float()


class ValueTwoScaleQuantizer(Quantizer):
    """V-2SF: fine step ``s`` for values whose code fits, coarse step ``s * 2^m`` for the rest.

    Value codes, b-1 bits: unsigned ``[0, 2^(b-1) - 1]`` in both ranges (post-Softmax), or
    (``signed``, post-GELU) signed ``[-2^(b-2), 2^(b-2) - 1]`` in the fine range, which holds the
    small values including all of GELU's negative part (>= -0.17), and unsigned in the coarse
    range, which only holds large positive values. Code layout: ``range_bit * 2^(b-1) + (value
    mod 2^(b-1))``, range_bit 1 = coarse. Searched: the coarse step (``[alpha, beta] x max|x| /
    (2^(b-1) - 0.5)``) jointly with ``m`` in ``1..max_exponent``.
    """

    params_per_group = 2

    def __init__(self, bits: int, *, signed: bool = False, groups: int = 1, group_dim: int | None = None,
                 max_exponent: int = 8):
        if bits < 3:
            raise ValueError("V-2SF needs at least 3 bits (1 range bit and a value of >= 2 bits)")
        super().__init__(bits, groups, group_dim)
        self.signed = signed
        self.half = 2 ** (bits - 1)  # value codes per range
        self.qmin, self.qmax = (-(2 ** (bits - 2)), 2 ** (bits - 2) - 1) if signed else (0, self.half - 1)
        self.cmax = self.half - 1  # coarse range: unsigned
        self.max_exponent = max_exponent

    def _args(self, x, s):
        fine, m = s
        return x, fine, fine * torch.exp2(m), float(self.qmin), float(self.qmax), float(self.cmax)

    def _fake_quant(self, x, s, shape, fused=False):
        return kernels.run_kernel(kernels.two_scale, *self._args(x, s), fused=fused)

    def _codes(self, x, s, shape):
        in_fine, fine, coarse = kernels.two_scale_split(*self._args(x, s))
        value = torch.where(in_fine, fine, coarse)
        return torch.remainder(value, self.half) + (~in_fine) * self.half

    def _dequant(self, q, s, shape):
        fine, m = s
        q = q.to(fine.dtype)
        coarse = q >= self.half
        value = torch.remainder(q, self.half)
        if self.signed:  # two's complement in the fine range only
            value = torch.where(~coarse & (value > self.qmax), value - self.half, value)
        return value * torch.where(coarse, fine * torch.exp2(m), fine)

    def _coarse_base(self, x: torch.Tensor) -> torch.Tensor:
        m = reduce_to_groups(x.detach(), self.group_dim, self.groups, "amax")
        return (m / (self.cmax + 0.5)).clamp(min=1e-8)

    def initial_scale(self, x):
        m0 = min(3, self.max_exponent)
        return torch.stack([self._coarse_base(x) / 2 ** m0, torch.full((self.groups,), float(m0))], -1).float()

    def candidates(self, x, alpha, beta, n):
        return _exponent_grid(self._coarse_base(x), range(1, self.max_exponent + 1), alpha, beta,
                              max(20, math.ceil(n / 4)))

    def spec(self) -> dict:
        return super().spec() | {"signed": self.signed, "max_exponent": self.max_exponent}

    def export_parts(self, x):
        """Fine part (values whose fine code fits, else 0) and coarse part, each on its step."""
        fine, m = (torch.tensor(self.scale[:, i].tolist()) for i in (0, 1))
        coarse = fine * 2.0 ** m
        code = torch.round(x / broadcast_groups(fine, x, self.group_dim))
        in_fine = (code >= self.qmin) & (code <= self.qmax)
        fine_part, coarse_part = split_at(x, in_fine)
        return [qdq_part(fine_part, fine, self.group_dim, self.qmin, self.qmax),
                qdq_part(coarse_part, coarse, self.group_dim, 0, self.cmax)]

    def extra_repr(self):
        return super().extra_repr() + f", V-2SF {'signed' if self.signed else 'unsigned'}"


class OutlierTwoScaleQuantizer(Quantizer):
    """O-2SF: signed b-bit codes along the last (channel) dimension; one step ``s`` per tensor,
    ``s * 2^m`` for the channels flagged as outliers: those whose calibrated ``max|x|`` exceeds
    ``(qmax + 0.5) s``, the largest value ``s`` can represent. ``m = 0`` is plain per-tensor
    uniform quantization (so the search can always fall back to it).

    Searched: ``m`` in ``0..max_exponent`` jointly with ``s`` (``[alpha, beta] x
    max|x| / (qmax + 0.5) / 2^m``); the flags follow from ``s`` and the channel ranges.
    """

    params_per_group = 2

    def __init__(self, bits: int, channels: int, max_exponent: int = 6):
        super().__init__(bits)
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.max_exponent = max_exponent
        self.register_buffer("channel_max", torch.zeros(channels))  # calibrated max|x| per channel

    def _outliers(self, step):
        """Channels whose calibrated max|x| exceeds the largest value step ``step`` represents."""
        return self.channel_max > (self.qmax + 0.5) * step

    def _channel_step(self, s):
        step, m = s  # [*lead, 1, ..., 1]
        return torch.where(self._outliers(step), step * torch.exp2(m), step)  # [*lead, 1, ..., C]

    def _fake_quant(self, x, s, shape, fused=False):
        return kernels.run_kernel(kernels.uniform_channels, x, self._channel_step(s), float(self.qmin),
                                  float(self.qmax), fused=fused)

    def _codes(self, x, s, shape):
        return (x / self._channel_step(s)).round_().clamp_(self.qmin, self.qmax)

    def _dequant(self, q, s, shape):
        return q.to(s[0].dtype) * self._channel_step(s)

    def outlier_flags(self) -> torch.Tensor:
        """Channels using the coarse step ``s * 2^m`` (bool ``[C]``); none when ``m = 0``."""
        step, m = self.scale[0]
        return self._outliers(step) & (m > 0)

    def _base(self) -> torch.Tensor:
        return (self.channel_max.max() / (self.qmax + 0.5)).clamp(min=1e-8).reshape(1)

    def _observe(self, x: torch.Tensor) -> None:
        """Calibrated channel ranges: ``max|x|`` per channel of the calibration data."""
        x = x.detach()
        if x.shape[-1] != self.channel_max.numel():
            raise ValueError(f"O-2SF expects {self.channel_max.numel()} channels, got {x.shape[-1]}")
        self.channel_max.copy_(group_rows(x, -1, x.shape[-1]).abs().amax(1))

    def initial_scale(self, x):
        self._observe(x)
        ratio = float(self.channel_max.max() / self.channel_max.median().clamp(min=1e-8))
        m0 = min(self.max_exponent, max(0, math.ceil(math.log2(max(ratio, 1.0)))))
        return torch.stack([self._base() / 2 ** m0, torch.tensor([float(m0)])], -1).float()

    def candidates(self, x, alpha, beta, n):
        self._observe(x)
        grid = _exponent_grid(self._base(), range(0, self.max_exponent + 1), alpha, beta,
                              max(20, math.ceil(n / 4)))
        # a step that flags every channel is plain uniform with step s * 2^m: write it as (s * 2^m, 0)
        every = self._outliers(grid[:, 0, 0, None]).all(1)
        grid[every, 0, 0] *= torch.exp2(grid[every, 0, 1])
        grid[every, 0, 1] = 0.0
        return grid

    def export_parts(self, x):
        """One per-channel QDQ along the last axis: the outlier channels' step is ``s * 2^m``."""
        step, m = (float(v) for v in self.scale[0])
        steps = [step * 2.0 ** m if flag else step for flag in self._outliers(step).tolist()]
        return [(qdq(x, torch.tensor(steps), -1, self.qmin, self.qmax), None)]

    def spec(self) -> dict:
        return {"bits": self.bits, "channels": self.channel_max.numel(), "max_exponent": self.max_exponent}

    def extra_repr(self):
        return super().extra_repr() + f", O-2SF channels={self.channel_max.numel()}"
