"""Fake quantizers: uniform (all granularities) and PTQ4ViT twin uniform."""
from .base import Quantizer, grouped_scale
from .twin import TwinGeluQuantizer, TwinSoftmaxQuantizer
from .uniform import UniformQuantizer

__all__ = ["Quantizer", "UniformQuantizer", "TwinSoftmaxQuantizer", "TwinGeluQuantizer", "grouped_scale"]
