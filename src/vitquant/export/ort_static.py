"""The tool a user would pick instead of vitquant: ONNX Runtime's own static quantization
(``onnxruntime.quantization.quantize_static``) of the FP32 export, calibrated on the same images.
A baseline for speed (``vitquant bench``) and accuracy (``benchmarks/deploy.py``), nothing more:
vitquant's recipes never use it."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Optional

import torch

from ..io import _atomic

# ORT's documented recipe for CNN / transformer models on CPU: QDQ, per-channel int8 weights, uint8
# activations, MinMax calibration (``onnxruntime.quantization`` defaults otherwise).
ORT_STATIC_SETTINGS = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QUInt8",
                       "weight_type": "QInt8", "calibrate_method": "MinMax", "reduce_range": False,
                       "preprocess": "quant_pre_process (symbolic shape inference + ORT graph optimisation)"}


def ort_quantize_static(fp32_path: str | os.PathLike, out_path: str | os.PathLike, images: torch.Tensor,
                        batch_size: int = 8) -> dict:
    """Quantize the FP32 ONNX file ``fp32_path`` with ONNX Runtime's ``quantize_static`` (the
    settings of ``ORT_STATIC_SETTINGS``), calibrated on ``images`` ``[N, 3, H, W]`` (normalised, as
    the model takes them), and write it to ``out_path`` atomically. Returns the settings used."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if images is None or not len(images):
        raise ValueError("ONNX Runtime quantize_static needs at least one calibration image")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([images[i:i + batch_size].float().numpy() for i in range(0, len(images), batch_size)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        pre, out = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "int8.onnx")
        quant_pre_process(str(fp32_path), pre)
        quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=False)
        with open(out, "rb") as f:
            data = f.read()
    _atomic(out_path, lambda f: f.write(data))
    return dict(ORT_STATIC_SETTINGS, num_calib=len(images), batch_size=batch_size)


@contextlib.contextmanager
def _quiet_root_logger():
    """``onnxruntime.quantization`` logs one root-logger warning per per-channel LayerNorm weight it
    leaves per tensor (50 lines for deit_small, none of them about the result): errors only meanwhile."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
