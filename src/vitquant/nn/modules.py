"""Quantized ops: every op of the PTQ4ViT setting as an explicit, hookable module.

Each op has named *operands* (``weight``/``input`` or ``a``/``b``), each with an optional
quantizer, and can evaluate its output for a batch of candidate scales of one operand
(:meth:`QuantOp.candidate_outputs`), which is what the calibration search needs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import Quantizer


def _total(parts) -> torch.Tensor:
    """Sum of tensors without a leading ``0 +`` (keeps the exported graph free of dead adds)."""
    parts = list(parts)
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def _scaled(t: torch.Tensor, *factors) -> torch.Tensor:
    """``t`` times the product of the factors that are not None (:func:`_factor`), one multiplication."""
    f = _factor(*factors)
    return t if f is None else t * f


def _zero_point_matmul(a: torch.Tensor, za: Optional[torch.Tensor], b: torch.Tensor,
                       zb: Optional[torch.Tensor]) -> torch.Tensor:
    """``(A - z_a) @ (B - z_b)`` for integer codes ``A [.., M, K]``, ``B [.., K, N]`` and zero points
    that broadcast over the matrices (one per head): ``A @ B - z_a (1 B - K z_b) - (A 1) z_b``, the
    corrections formed at row / column size, so two passes over the output. The codes' own matmul
    keeps its QDQ inputs, so ONNX Runtime runs it as an integer kernel; the sums are exact float
    integers (below 2^24 for 8-bit codes and K <= 256)."""
    out = torch.matmul(a, b)
    if za is not None:
        cols = b.sum(-2, keepdim=True)
        out = out - za * (cols if zb is None else cols - zb * a.shape[-1])
    if zb is not None:
        out = out - a.sum(-1, keepdim=True) * zb
    return out


def _factor(*factors) -> Optional[torch.Tensor]:
    """The product of the factors that are not None (None if all are): one pass over a matmul's
    output for its per-head steps and any output scale."""
    out = None
    for f in factors:
        if f is not None:
            out = f if out is None else out * f
    return out


class _ExportWeight:
    """Integer weight codes, their steps and the channel axis (a plain object: ONNX tracing passes
    it to the symbolic function untouched)."""

    def __init__(self, codes: torch.Tensor, steps: torch.Tensor, axis: int, zero: Optional[torch.Tensor] = None):
        self.codes, self.steps, self.axis, self.zero = codes, steps, axis, zero


class _DequantizedWeight(torch.autograd.Function):
    """``(codes - zero) * steps`` in PyTorch; ``DequantizeLinear(8-bit codes, steps, zero, axis)`` in ONNX.
    Asymmetric weights: uint8 codes and per-channel zero points, or with ``--int8 fast`` both shifted by
    -128 into int8 (the same values; ONNX Runtime's u8 x u8 kernel with per-column zero points ran no
    faster than the FP32 matmul, README "Deploy")."""

    @staticmethod
    def forward(ctx, anchor, w: _ExportWeight):
        shape = [1] * w.codes.dim()
        shape[w.axis] = -1
        codes = w.codes.float() if w.zero is None else w.codes.float() - w.zero.float().reshape(shape)
        return codes * w.steps.reshape(shape)

    @staticmethod
    def symbolic(g, anchor, w: _ExportWeight):
        from ..quantizers.base import EXPORT_STORAGE
        if w.zero is not None and EXPORT_STORAGE["mode"] == "exact":  # asymmetric: uint8 codes and zero points
            codes, zero = w.codes.to(torch.uint8), w.zero.to(torch.uint8)
        elif w.zero is not None:  # the same values as int8 codes - 128 and zero points - 128: u8 x s8 kernels
            codes, zero = (w.codes.to(torch.int16) - 128).to(torch.int8), (w.zero.to(torch.int16) - 128).to(torch.int8)
        elif EXPORT_STORAGE["mode"] == "exact":  # uint8 code + 128 (see EXPORT_STORAGE)
            codes, zero = (w.codes.to(torch.int16) + 128).to(torch.uint8), torch.full(w.steps.shape, 128, dtype=torch.uint8)
        else:
            codes, zero = w.codes, torch.zeros(w.steps.shape, dtype=torch.int8)
        return g.op("DequantizeLinear", g.op("Constant", value_t=codes), g.op("Constant", value_t=w.steps),
                    g.op("Constant", value_t=zero), axis_i=w.axis)


class QuantOp(nn.Module):
    """Base class of quantized ops. ``role`` says what the op is (qkv, proj, fc1, fc2, head,
    reduction, patch_embed, matmul_qk, matmul_av, linear)."""

    operand_names: tuple[str, ...] = ()

    def __init__(self, role: str):
        super().__init__()
        self.role = role
        self.quant_enabled = True
        self.exporting = False  # ONNX export: quantizers as QDQ ops (see vitquant.export.onnx)

    def quantizer(self, operand: str) -> Optional[Quantizer]:
        return getattr(self, f"{operand}_quantizer")

    def set_quantizer(self, operand: str, q: Optional[Quantizer]) -> None:
        setattr(self, f"{operand}_quantizer", q)
        self._invalidate()

    def _invalidate(self) -> None:
        pass

    def refresh(self) -> None:
        """Call after changing a weight or a quantizer's scale in place (drops cached values)."""
        self._invalidate()

    def quantizers(self) -> dict[str, Quantizer]:
        return {n: q for n in self.operand_names if (q := self.quantizer(n)) is not None}

    def _q(self, operand: str, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer(operand)
        if q is None or not self.quant_enabled:
            return x
        return q(x)

    def _applies(self, q: Optional[Quantizer]) -> bool:
        """Whether quantizer ``q`` of this op acts now (present, enabled, calibrated, op on)."""
        return q is not None and self.quant_enabled and q.enabled and q.calibrated

    def _parts(self, operand: str, x: torch.Tensor, group: Optional[int] = None
               ) -> list[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """``x`` as QDQ-written ``(part, factor, zero)`` triples, ``sum((part - zero) * factor)`` its
        quantized value (ONNX export, see ``Quantizer.export_parts``; ``zero``: per-group zero points
        of integer codes, else None). ``group``: ``x`` is that group's slice alone (one head), written
        with that group's parameters (:meth:`Quantizer.group`)."""
        q = self.quantizer(operand)
        if not self._applies(q):
            return [(x, None, None)]
        if group is not None and q.groups > 1:
            q = q.group(group)
        parts = q.export_parts(x)
        return [p if len(p) == 3 else (*p, None) for p in parts]

    def _values(self, operand: str, x: torch.Tensor) -> list[torch.Tensor]:
        """The parts of :meth:`_parts` as the values that they are (a zero point, where one is
        left, subtracted in float, so the consumer runs in float)."""
        return [_scaled(p if z is None else p - z, f) for p, f, z in self._parts(operand, x)]

    def output_group_dim(self, operand: str) -> Optional[int]:
        """Dimension of the op output (batch first) along which ``operand``'s scale groups act
        independently, or None when every group affects every output element."""
        return None

    def prepare_inputs(self, inputs: tuple, operand: str) -> tuple:
        """Quantize the activation operands that stay fixed while ``operand`` is searched."""
        names = [n for n in self.operand_names if n != "weight"]
        return tuple(x if n == operand else self._q(n, x) for n, x in zip(names, inputs))

    def candidate_outputs(self, inputs: tuple, operand: str, scales: torch.Tensor) -> torch.Tensor:
        """Outputs ``[C, *out]`` for candidate scales ``[C, G]`` of ``operand``; ``inputs`` come
        from :meth:`prepare_inputs` (fixed operands already quantized)."""
        raise NotImplementedError


class _WeightOp(QuantOp):
    """An op with a weight and an input: Linear or Conv2d."""

    operand_names = ("weight", "input")

    def __init__(self, module: nn.Module, role: str):
        super().__init__(role)
        self.weight = module.weight
        self.bias = module.bias
        self.weight_quantizer: Optional[Quantizer] = None
        self.input_quantizer: Optional[Quantizer] = None
        self._wq_cache: Optional[torch.Tensor] = None
        self._export: Optional[_ExportWeight] = None  # set by prepare_export for ONNX tracing
        # Bias correction (Eqs. (13)-(15), Liu et al. 2021): the expected output error per output
        # channel, subtracted from the bias while quantization is on (the FP bias is untouched;
        # an op without bias gets one this way).
        self.register_buffer("bias_correction", None)
        # A weight-rounding pass (``calibration.weight_rounding``: GPTQ, ERQ's ridge step) stores the
        # quantized weight it chose here, already on the weight quantizer's grid (the quantizer maps
        # it to itself); None: the weight is rounded to nearest. Used only while quantization is on.
        self.register_buffer("rounded_weight", None)

    def weight_to_quantize(self) -> torch.Tensor:
        """What the weight quantizer rounds: the rounding pass's weight if there is one, else the weight."""
        return self.weight if self.rounded_weight is None else self.rounded_weight

    def set_rounded_weight(self, w: Optional[torch.Tensor]) -> None:
        """Install (or, with None, drop) a rounding pass's on-grid weight."""
        self.rounded_weight = None if w is None else w.detach().to(self.weight).reshape(self.weight.shape).clone()
        self._invalidate()

    def output_bias(self) -> Optional[torch.Tensor]:
        """The bias the op applies: the layer's bias, minus the bias correction when quantized."""
        if self.bias_correction is None or not self.quant_enabled:
            return self.bias
        return -self.bias_correction if self.bias is None else self.bias - self.bias_correction

    def add_bias_correction(self, error: torch.Tensor) -> None:
        """Fold a further expected output error ``E[Ô] - E[O]`` (per output channel) into the bias."""
        error = error.detach().to(self.weight.dtype)
        self.bias_correction = error.clone() if self.bias_correction is None else self.bias_correction + error

    def _invalidate(self) -> None:
        self._wq_cache = None

    def prepare_export(self, transpose: bool = False) -> None:
        """Before ONNX tracing: the weight's integer codes (``[in, out]`` with ``transpose``) and
        per-output-channel steps, written into the graph as int8 constants + DequantizeLinear."""
        wq = self.weight_quantizer
        self._export = None
        if not self._applies(wq):
            return
        asymmetric = not getattr(wq, "symmetric", True)
        lo, hi = (0, 255) if asymmetric else (-128, 127)  # uint8 codes with zero points, or int8 codes
        if wq.qmin < lo or wq.qmax > hi:
            raise ValueError(f"{self.role}: weight codes [{wq.qmin}, {wq.qmax}] do not fit 8 bits; ONNX export "
                             "supports weights of <= 8 bits")
        with torch.no_grad():
            codes = wq.quantize(self.weight_to_quantize().detach())
            per = self.weight.shape[0] // wq.scale.numel()
            steps = wq.scale.detach().float().repeat_interleave(per)
            zero = None
            if asymmetric:
                zero = wq.zero_points().detach().repeat_interleave(per)
                if bool((zero < 0).any() or (zero > 255).any()):
                    raise ValueError(f"{self.role}: a weight zero point lies outside [0, 255]; it cannot be "
                                     "stored in uint8")
                zero = zero.to(torch.int16)
            else:
                codes = codes.to(torch.int8)
        self._export = _ExportWeight(codes.t().contiguous() if transpose else codes, steps.contiguous(), int(transpose),
                                     zero)

    def export_weight(self, anchor: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """The weight for ONNX export (``[in, out]`` with ``transpose``): int8 codes and a
        DequantizeLinear in the graph; ``anchor`` is any traced tensor of the forward pass."""
        if self._export is None:
            return self.weight.t() if transpose else self.weight
        return _DequantizedWeight.apply(anchor, self._export)

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if not self._applies(wq):
            return self.weight
        if self.training or torch.is_grad_enabled():
            return wq(self.weight_to_quantize())
        if self._wq_cache is None or self._wq_cache.device != self.weight.device:
            self._wq_cache = wq(self.weight_to_quantize()).detach()
        return self._wq_cache

    def _apply(self, fn, recurse=True):  # device moves must drop the cached quantized weight
        self._wq_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._wq_cache = None
        return super()._load_from_state_dict(*args, **kwargs)


class QuantLinear(_WeightOp):
    def __init__(self, module: nn.Linear, role: str = "linear"):
        super().__init__(module, role)
        self.in_features, self.out_features = module.in_features, module.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exporting:  # one integer matmul per input part, then the bias
            flat = x.dim() == 2  # [batch, in] (the head): as [batch, 1, in], else ONNX Runtime fuses
            if flat:             # MatMul + Add into a float Gemm before its QDQ fusion can see it
                x = x.unsqueeze(1)
            w = self.export_weight(x, transpose=True)
            y = _total(torch.matmul(v, w) for v in self._values("input", x))
            bias = self.output_bias()
            y = y if bias is None else y + bias
            return y.squeeze(1) if flat else y
        return F.linear(self._q("input", x), self.quantized_weight(), self.output_bias())

    def output_group_dim(self, operand):
        return -1 if operand == "weight" else None

    def candidate_outputs(self, inputs, operand, scales):
        (x,) = inputs
        if operand == "weight":
            w = self.weight_quantizer.fake_quant(self.weight, scales)  # [C, out, in]
            y = torch.matmul(x.reshape(-1, self.in_features), w.transpose(1, 2))  # [C, rows, out]
            if (bias := self.output_bias()) is not None:
                y += bias
            return y.reshape(scales.shape[0], *x.shape[:-1], self.out_features)
        xq = self.input_quantizer.fake_quant(x, scales)  # [C, *x]
        return F.linear(xq, self.quantized_weight(), self.output_bias())

    def extra_repr(self):
        return f"{self.role}: in={self.in_features}, out={self.out_features}"


class QuantConv2d(_WeightOp):
    """Patch-embedding convolution (weight quantized per output channel in PTQ4ViT)."""

    def __init__(self, module: nn.Conv2d, role: str = "patch_embed"):
        super().__init__(module, role)
        self.conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                              groups=module.groups)
        if module.padding_mode != "zeros":
            raise ValueError("only zero-padded convolutions are supported")
        self.out_channels = module.out_channels

    def forward(self, x):
        if self.exporting:
            w, bias = self.export_weight(x), self.output_bias()
            y = _total(F.conv2d(v, w, None, **self.conv_args) for v in self._values("input", x))
            return y if bias is None else y + bias.reshape(1, -1, 1, 1)
        return F.conv2d(self._q("input", x), self.quantized_weight(), self.output_bias(), **self.conv_args)

    def output_group_dim(self, operand):
        return 1 if operand == "weight" else None

    def candidate_outputs(self, inputs, operand, scales):
        (x,) = inputs
        c = scales.shape[0]
        if operand == "weight":
            w = self.weight_quantizer.fake_quant(self.weight, scales)  # [C, O, I, kh, kw]
            bias = self.output_bias()
            bias = None if bias is None else bias.repeat(c)
            y = F.conv2d(x, w.flatten(0, 1), bias, **self.conv_args)  # [B, C*O, H, W]
            return y.unflatten(1, (c, self.out_channels)).transpose(0, 1)
        xq = self.input_quantizer.fake_quant(x, scales).flatten(0, 1)
        y = F.conv2d(xq, self.quantized_weight(), self.output_bias(), **self.conv_args)
        return y.unflatten(0, (c, x.shape[0]))


class QuantMatMul(QuantOp):
    """``a @ b`` with both operands quantized (q @ k^T and attn @ v); operands are
    ``[B, heads, rows, cols]`` so per-head scales group along dim 1."""

    operand_names = ("a", "b")

    def __init__(self, role: str, num_heads: int = 1):
        super().__init__(role)
        self.num_heads = num_heads
        self.a_quantizer: Optional[Quantizer] = None
        self.b_quantizer: Optional[Quantizer] = None

    def forward(self, a, b, export_scale: Optional[float] = None, head: Optional[int] = None):
        if self.exporting:
            return self._export_matmul(a, b, export_scale, head)
        if export_scale is not None or head is not None:
            raise ValueError("export_scale and head are for ONNX export only; use QuantMatMul.scaled")
        return torch.matmul(self._q("a", a), self._q("b", b))

    def scaled(self, a: torch.Tensor, b: torch.Tensor, scale: float, head: Optional[int] = None) -> torch.Tensor:
        """``self(a, b) * scale`` (attention's ``(q @ k^T) * scale``; calibration sees the matmul's own
        output); in ONNX export the scale joins the per-head steps' product, one multiplication over
        the scores instead of three. ``head``: export only, ``a`` and ``b`` are that head's alone."""
        if self.exporting:
            return self(a, b, export_scale=scale, head=head)
        return self(a, b) * scale

    def has_group_operands(self) -> bool:
        """Whether an active operand quantizer has one set of parameters per head."""
        return any(self._applies(q) and q.groups > 1 for q in self.quantizers().values())

    def _export_matmul(self, a, b, scale: Optional[float] = None, head: Optional[int] = None) -> torch.Tensor:
        """One integer matmul per pair of parts (two-range operands have two); per-head steps factor
        out of each head's matmul, ``(A'/s_a)(B'/s_b) s_a s_b``, applied with the output scale at once.
        For one ``head`` every step and zero point is per tensor, inside the integer kernel."""
        pairs = [(pa, za, pb, zb, _factor(fa, fb)) for pa, fa, za in self._parts("a", a, head)
                 for pb, fb, zb in self._parts("b", b, head)]
        fold = scale is not None and any(f is not None for *_, f in pairs)  # else one Mul after the sum
        out = _total(_scaled(_zero_point_matmul(pa, za, pb, zb), f, scale if fold else None)
                     for pa, za, pb, zb, f in pairs)
        return out if fold or scale is None else out * scale

    def output_group_dim(self, operand):
        q = self.quantizer(operand)
        return 1 if q is not None and q.groups > 1 else None

    def candidate_outputs(self, inputs, operand, scales):
        a, b = inputs
        if operand == "a":
            return torch.matmul(self.a_quantizer.fake_quant(a, scales), b)
        return torch.matmul(a, self.b_quantizer.fake_quant(b, scales))

    def extra_repr(self):
        return self.role


class QuantLayerNorm(QuantOp):
    """LayerNorm with a quantized input (the residual stream; TSPTQ-ViT's fully quantized
    setting). The normalisation, its affine parameters and its output stay FP32. Parameters are
    shared with the timm module and keep its names (``norm1.weight``, ...)."""

    operand_names = ("input",)

    def __init__(self, module: nn.LayerNorm, role: str = "layernorm"):
        super().__init__(role)
        self.normalized_shape = tuple(module.normalized_shape)
        self.eps = module.eps
        self.weight, self.bias = module.weight, module.bias
        self.input_quantizer: Optional[Quantizer] = None

    @property
    def channels(self) -> int:
        return self.normalized_shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exporting:
            x = _total(self._values("input", x))
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(self._q("input", x), self.normalized_shape, self.weight, self.bias, self.eps)

    def candidate_outputs(self, inputs, operand, scales):
        (x,) = inputs
        return F.layer_norm(self.input_quantizer.fake_quant(x, scales), self.normalized_shape,
                            self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.role}: {self.normalized_shape}, eps={self.eps}"
