"""Quantized checkpoints (save / load); the ONNX export comes here too."""
from .checkpoint import check_new_dir, load, read_manifest, save

__all__ = ["save", "load", "read_manifest", "check_new_dir"]
