"""ONNX export in QDQ form and ONNX Runtime execution.

Every quantizer becomes standard ``QuantizeLinear`` / ``DequantizeLinear`` pairs (int8 or uint8,
per-channel where the quantizer has groups); weights are stored as int8 initializers feeding a
``DequantizeLinear``. Quantizers with two ranges (PTQ4ViT twin uniform, TSPTQ-ViT V-2SF) become
two QDQ'd tensors, each zero outside its range, and the op consuming them runs once per part; the
results are added (``Quantizer.export_parts``). ONNX Runtime fuses ``DequantizeLinear -> MatMul``
into integer kernels (``MatMulIntegerToFloat``); :func:`integer_kernels` reports what it fused.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from ..io import _atomic
from ..nn.wrap import quant_ops, quantization_disabled

INTEGER_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm",
               "QLinearConv", "ConvInteger", "QAttention")


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every quantized op writes its quantizers as QDQ ops."""
    from ..nn.modules import QuantLinear, _WeightOp
    ops = [op for _, op in quant_ops(model)]
    for op in ops:
        op.exporting = True
        if isinstance(op, _WeightOp):
            op.prepare_export(transpose=isinstance(op, QuantLinear))
    try:
        yield model
    finally:
        for op in ops:
            op.exporting = False
            op._export = None


def export_onnx(model: nn.Module, path: str | os.PathLike, *, fp32: bool = False, opset: int = 17,
                metadata: Optional[dict] = None) -> dict:
    """Write ``model`` (wrapped and calibrated; with ``fp32`` its FP32 version) as ONNX to ``path``
    (atomically); the batch dimension is dynamic. ``metadata`` (str -> str) goes into the model's
    metadata_props. Returns a summary (node counts)."""
    import onnx
    size = getattr(getattr(model, "patch_embed", None), "img_size", (224, 224))
    example = torch.zeros(1, 3, *size)
    ctx = quantization_disabled(model) if fp32 else contextlib.nullcontext()
    model.eval()
    with tempfile.TemporaryDirectory() as tmp, ctx, export_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python-side constants (scales) are expected
        raw = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, (example,), raw, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False, do_constant_folding=False)
        m = onnx.load(raw)
    for k, v in (metadata or {}).items():
        m.metadata_props.add(key=k, value=str(v))
    onnx.checker.check_model(m)
    _atomic(path, lambda f: f.write(m.SerializeToString()))
    ops = Counter(n.op_type for n in m.graph.node)
    int8 = sum(1 for n in m.graph.node if n.op_type == "Constant" and n.attribute
               and n.attribute[0].t.data_type == onnx.TensorProto.INT8 and len(n.attribute[0].t.dims) >= 2)
    return {"path": str(path), "opset": opset, "nodes": dict(ops), "int8_weights": int8,
            "bytes": Path(path).stat().st_size}


def session(path: str | os.PathLike, threads: Optional[int] = None, optimized_path: Optional[str] = None):
    """An ONNX Runtime CPU session (all graph optimisations, so QDQ pairs fuse into integer kernels)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def integer_kernels(path: str | os.PathLike) -> dict:
    """The ops of the graph ONNX Runtime actually runs after its optimisations: counts of integer
    kernels and of MatMul / Conv left in floating point."""
    import onnx
    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, "optimized.onnx")
        session(path, optimized_path=opt)
        ops = Counter(n.op_type for n in onnx.load(opt).graph.node)
    integer = {k: v for k, v in ops.items() if k in INTEGER_OPS}
    return {"integer_ops": integer, "float_matmuls": ops.get("MatMul", 0) + ops.get("FusedMatMul", 0)
            + ops.get("Gemm", 0), "float_convs": ops.get("Conv", 0) + ops.get("FusedConv", 0),
            "quantize_ops": ops.get("QuantizeLinear", 0) + ops.get("DynamicQuantizeLinear", 0)}


def predict_logits(sess, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits of an ONNX Runtime session on normalised images ``[N, 3, H, W]``."""
    name = sess.get_inputs()[0].name
    out = [torch.from_numpy(sess.run(None, {name: images[i:i + batch_size].numpy()})[0])
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


class OrtModel:
    """An exported model under ONNX Runtime, callable like the PyTorch model (logits tensor)."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None):
        import onnx
        self.path = str(path)
        self.session = session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = {p.key: p.value for p in onnx.load(self.path, load_external_data=False).metadata_props}

    def eval(self) -> "OrtModel":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0])
