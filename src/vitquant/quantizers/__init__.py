"""Fake quantizers: uniform (all granularities), PTQ4ViT twin uniform, TSPTQ-ViT two-scaled,
RepQ-ViT log2 / log-sqrt2, AdaLog adaptive-base log."""
from . import kernels
from .adalog import AdaLogQuantizer
from .base import Quantizer, grouped_scale
from .log2 import LogQuantizer
from .twin import TwinGeluQuantizer, TwinSoftmaxQuantizer
from .two_scale import OutlierTwoScaleQuantizer, ValueTwoScaleQuantizer
from .uniform import UniformQuantizer

QUANTIZER_TYPES = {c.__name__: c for c in (UniformQuantizer, TwinSoftmaxQuantizer, TwinGeluQuantizer,
                                            ValueTwoScaleQuantizer, OutlierTwoScaleQuantizer, LogQuantizer,
                                            AdaLogQuantizer)}

__all__ = ["QUANTIZER_TYPES", "kernels", "Quantizer", "UniformQuantizer", "TwinSoftmaxQuantizer", "TwinGeluQuantizer",
           "ValueTwoScaleQuantizer", "OutlierTwoScaleQuantizer", "LogQuantizer", "AdaLogQuantizer", "grouped_scale"]
