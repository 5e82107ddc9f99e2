"""Quantized ops, owned attention modules and timm model wrapping."""
from .attention import QuantAttention, QuantWindowAttention
from .modules import QuantConv2d, QuantLayerNorm, QuantLinear, QuantMatMul, QuantOp
from .wrap import calibration_units, is_wrapped, quant_ops, quantization_disabled, wrap_model

__all__ = ["QuantAttention", "QuantWindowAttention", "QuantConv2d", "QuantLayerNorm", "QuantLinear", "QuantMatMul", "QuantOp",
           "calibration_units", "is_wrapped", "quant_ops", "quantization_disabled", "wrap_model"]
