"""OpenVINO as a second runtime for vitquant's ONNX exports (CPU, integer kernels through oneDNN).

OpenVINO reads the QDQ graph as it is and runs each ``DequantizeLinear -> MatMul`` on int8
kernels, with the float ops around them fused (LayerNorm, GELU, Softmax, the attention reshapes).
vitquant compiles every model at FP32 inference precision: OpenVINO's default on CPUs with
AVX-512 BF16 or AMX is bfloat16 for the float ops, a precision the model was never calibrated at.
The package is optional (``pip install vitquant[openvino]``)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import VitquantError

# The compile settings of every OpenVINO model vitquant runs: one stream (one request at a time,
# as ONNX Runtime's sessions), FP32 float ops, the latency hint (no batching of requests), no
# dynamic quantization (OpenVINO's default on AVX-512 CPUs quantizes the float input of a matmul
# over int8 weights to int8 on the fly, e.g. AdaLog's post-GELU fc2: measured 0.019 max logit
# difference on a tiny ViT, 3e-8 without it), no pinning of the caller's threads.
COMPILE_SETTINGS = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                    "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0, "ENABLE_CPU_PINNING": False}


def openvino_version() -> Optional[str]:
    """The installed OpenVINO's version (from the package metadata: nothing is imported), or None."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("openvino")
    except PackageNotFoundError:
        return None


def require_openvino() -> None:
    if openvino_version() is None:
        raise VitquantError("the OpenVINO runtime is not installed: pip install 'vitquant[openvino]' "
                            "(or pip install openvino)")


class OpenVinoModel:
    """An exported model compiled by OpenVINO for the CPU, callable like the PyTorch model (logits)."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None):
        require_openvino()
        import openvino as ov

        from .onnx import open_exported, warn_fast_without_vnni
        settings = dict(COMPILE_SETTINGS) | ({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})

        def compile_for_cpu(p):
            core = ov.Core()
            return core.compile_model(core.read_model(p), "CPU", settings)
        self.path, self.metadata, self.compiled = open_exported(path, compile_for_cpu, "OpenVINO ")
        precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        if "32" not in precision:  # the hint is a request; verify what was compiled
            raise VitquantError(f"OpenVINO compiled {self.path} at {precision}, not FP32")
        self.precision = "f32"
        warn_fast_without_vnni(self.path, self.metadata, "OpenVINO")
        self.request = self.compiled.create_infer_request()
        width = self.compiled.outputs[0].get_partial_shape()[-1]
        self.num_classes = width.get_length() if width.is_static else None

    def eval(self) -> "OpenVinoModel":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.request.infer({0: x.detach().cpu().float().numpy()})
        return torch.from_numpy(out[self.compiled.outputs[0]].copy())
