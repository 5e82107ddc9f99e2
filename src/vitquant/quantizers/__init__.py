"""Fake quantizers: uniform (all granularities) and PTQ4ViT twin uniform."""
from . import kernels
from .base import Quantizer, grouped_scale
from .twin import TwinGeluQuantizer, TwinSoftmaxQuantizer
from .uniform import UniformQuantizer

__all__ = ["kernels", "Quantizer", "UniformQuantizer", "TwinSoftmaxQuantizer", "TwinGeluQuantizer", "grouped_scale"]
