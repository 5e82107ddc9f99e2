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


class QuantOp(nn.Module):
    """Base class of quantized ops. ``role`` says what the op is (qkv, proj, fc1, fc2, head,
    reduction, patch_embed, matmul_qk, matmul_av, linear)."""

    operand_names: tuple[str, ...] = ()

    def __init__(self, role: str):
        super().__init__()
        self.role = role
        self.quant_enabled = True

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
        # Bias correction (Eqs. (13)-(15), Liu et al. 2021): the expected output error per output
        # channel, subtracted from the bias while quantization is on (the FP bias is untouched;
        # an op without bias gets one this way).
        self.register_buffer("bias_correction", None)

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

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if wq is None or not self.quant_enabled or not wq.enabled or not wq.calibrated:
            return self.weight
        if self.training or torch.is_grad_enabled():
            return wq(self.weight)
        if self._wq_cache is None or self._wq_cache.device != self.weight.device:
            self._wq_cache = wq(self.weight).detach()
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

    def forward(self, a, b):
        return torch.matmul(self._q("a", a), self._q("b", b))

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
        return F.layer_norm(self._q("input", x), self.normalized_shape, self.weight, self.bias, self.eps)

    def candidate_outputs(self, inputs, operand, scales):
        (x,) = inputs
        return F.layer_norm(self.input_quantizer.fake_quant(x, scales), self.normalized_shape,
                            self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.role}: {self.normalized_shape}, eps={self.eps}"
