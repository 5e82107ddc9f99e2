"""Fake quantizers: uniform (all granularities), PTQ4ViT twin uniform, TSPTQ-ViT two-scaled."""
from . import kernels
from .base import Quantizer, grouped_scale
from .twin import TwinGeluQuantizer, TwinSoftmaxQuantizer
from .two_scale import OutlierTwoScaleQuantizer, ValueTwoScaleQuantizer
from .uniform import UniformQuantizer

__all__ = ["kernels", "Quantizer", "UniformQuantizer", "TwinSoftmaxQuantizer", "TwinGeluQuantizer",
           "ValueTwoScaleQuantizer", "OutlierTwoScaleQuantizer", "grouped_scale"]
