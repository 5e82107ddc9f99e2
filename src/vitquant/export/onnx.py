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
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import VitquantError
from ..io import _atomic
from ..models import input_size
from ..nn.wrap import quant_ops, quantization_disabled

INTEGER_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm",
               "QLinearConv", "ConvInteger", "QAttention")
# float-activation matmuls; MatMulNBits is ONNX Runtime's weight-only low-bit kernel (float input,
# packed <= 8-bit weight; FP32 input arithmetic in vitquant's sessions, see ``session``)
FLOAT_MATMULS = ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits")


@contextlib.contextmanager
def export_mode(model: nn.Module, int8: str = "exact") -> Iterator[nn.Module]:
    """Inside the block every quantized op writes its quantizers as QDQ ops, with 8-bit codes
    stored as ``int8`` says (see ``vitquant.quantizers.base.EXPORT_STORAGE``)."""
    from ..nn.modules import QuantLinear, _WeightOp
    from ..quantizers.base import EXPORT_STORAGE, STORAGE_MODES
    if int8 not in STORAGE_MODES:
        raise ValueError(f"int8 storage must be one of {', '.join(STORAGE_MODES)}, got {int8!r}")
    ops = [op for _, op in quant_ops(model)]
    before = EXPORT_STORAGE["mode"]
    EXPORT_STORAGE["mode"] = int8
    for op in ops:
        op.exporting = True
        if isinstance(op, _WeightOp):
            op.prepare_export(transpose=isinstance(op, QuantLinear))
    try:
        yield model
    finally:
        EXPORT_STORAGE["mode"] = before
        for op in ops:
            op.exporting = False
            op._export = None


def export_onnx(model: nn.Module, path: str | os.PathLike, *, fp32: bool = False, opset: int = 17,
                metadata: Optional[dict] = None, verify: bool = True, verify_inputs: Optional[torch.Tensor] = None,
                tolerance: Optional[float] = None, threads: Optional[int] = None, int8: str = "exact") -> dict:
    """Write ``model`` (wrapped and calibrated; with ``fp32`` its FP32 version) as ONNX to ``path``
    (atomically); the batch dimension is dynamic. ``metadata`` (str -> str) goes into the model's
    metadata_props. Returns a summary (node counts, and with ``verify`` the export check).

    ``int8="exact"`` (default) stores every 8-bit code that a matmul consumes as uint8 (signed
    codes with zero point 128): ONNX Runtime then runs u8 x u8 integer kernels, exact on every x86
    CPU. ``"fast"`` keeps signed codes int8 (u8 x s8 kernels): faster where the CPU has VNNI, but
    on AVX2-only CPUs those kernels add pairs of products in saturating 16-bit arithmetic and
    compute wrong results (measured: ``benchmarks/deploy.py``, README "Deploy").

    ``verify`` (default): before ``path`` is written, the graph runs in ONNX Runtime on
    ``verify_inputs`` (default: the checkpoint's calibration sample, else seeded random images) and
    is compared with the simulated model (:mod:`vitquant.export.verify`); beyond the rounding
    noise floor it raises :class:`~vitquant.export.verify.ExportMismatch` and writes nothing."""
    import onnx

    from .verify import DEFAULT_TOLERANCE, ExportMismatch, check_export, describe
    size = input_size(model, (224, 224))
    example = torch.zeros(1, 3, *size)
    ctx = quantization_disabled(model) if fp32 else contextlib.nullcontext()
    model.eval()
    with tempfile.TemporaryDirectory() as tmp, ctx, export_mode(model, int8), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python-side constants (scales) are expected
        raw = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, (example,), raw, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False, do_constant_folding=False)
        m = onnx.load(raw)
    import json
    weight_bits = {} if fp32 else {n: op.weight_quantizer.bits for n, op in quant_ops(model)
                                   if op._applies(getattr(op, "weight_quantizer", None))}
    storage = "float32" if fp32 else "8-bit codes (uint8 / int8 DequantizeLinear; narrower codes in 8-bit storage)"
    for k, v in ((metadata or {}) | {"vitquant.int8": int8, "vitquant.weight_bits": json.dumps(weight_bits),
                                     "vitquant.weight_storage": storage}).items():
        m.metadata_props.add(key=k, value=str(v))
    onnx.checker.check_model(m)
    data = m.SerializeToString()
    check = None
    if verify:
        with tempfile.TemporaryDirectory() as tmp:
            candidate = os.path.join(tmp, "candidate.onnx")
            with open(candidate, "wb") as f:
                f.write(data)
            check = check_export(model, candidate, verify_inputs, fp32=fp32, threads=threads,
                                 tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)
        if not check["ok"]:
            raise ExportMismatch(f"the exported graph does not compute the simulated model: {describe(check)}; "
                                 f"{path} not written")
    _atomic(path, lambda f: f.write(data))
    ops = Counter(n.op_type for n in m.graph.node)
    n_weights = sum(1 for n in m.graph.node if n.op_type == "Constant" and n.attribute and len(n.attribute[0].t.dims) >= 2
                    and n.attribute[0].t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    return {"path": str(path), "opset": opset, "int8": int8, "nodes": dict(ops), "int8_weights": n_weights,
            "weight_storage": storage, "weight_bits": sorted(set(weight_bits.values())),
            "bytes": Path(path).stat().st_size, "check": check}


def session(path: str | os.PathLike, threads: Optional[int] = None, optimized_path: Optional[str] = None):
    """An ONNX Runtime CPU session (all graph optimisations, so QDQ pairs fuse into integer kernels).

    A dequantized low-bit weight feeding a *float* MatMul (a Linear whose input quantizer has no
    integer form, e.g. AdaLog after GELU) is fused by ONNX Runtime into ``MatMulNBits``, which by
    default (``session.qdq_matmulnbits_accuracy_level`` 4) quantizes its float input to int8 on the
    fly: a quantization the model was never calibrated with. vitquant's sessions set the level to 1
    (FP32 input), so the graph computes what was calibrated; run exported files the same way."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _module_path(node_name: str) -> str:
    """The module path of a node traced by the TorchScript exporter: ``/blocks/blocks.0/attn/qkv/MatMul``
    -> ``blocks.0.attn.qkv`` (a scope that extends its parent's name replaces it)."""
    parts: list[str] = []
    for p in node_name.strip("/").split("/")[:-1]:
        if parts and p.startswith(parts[-1] + "."):
            parts[-1] = p
        else:
            parts.append(p)
    return ".".join(parts)


def integer_kernels(path: str | os.PathLike, model: Optional[nn.Module] = None) -> dict:
    """The ops of the graph ONNX Runtime actually runs after its optimisations: counts of integer
    kernels and of MatMul / Conv left in floating point.

    With ``model`` (the exported one), every quantized op is traced to the kernels it became:
    ``ops`` maps op name -> ``"integer"`` / ``"float"`` (a float op has at least one float MatMul /
    Gemm / Conv), ``by_quantizer`` counts them per op type and input quantizers, and
    ``accelerated`` is True when every quantized matmul (Linear and activation-activation) runs as
    an integer kernel (convolutions are reported, not required)."""
    import onnx
    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, "optimized.onnx")
        session(path, optimized_path=opt)
        nodes = list(onnx.load(opt).graph.node)
    ops = Counter(n.op_type for n in nodes)
    integer = {k: v for k, v in ops.items() if k in INTEGER_OPS}
    result = {"integer_ops": integer, "float_matmuls": sum(ops.get(k, 0) for k in FLOAT_MATMULS),
              "float_convs": ops.get("Conv", 0) + ops.get("FusedConv", 0),
              "quantize_ops": ops.get("QuantizeLinear", 0) + ops.get("DynamicQuantizeLinear", 0),
              "accelerated": bool(integer)}
    if model is None:
        return result
    names = {name for name, _ in quant_ops(model)}
    kernels: dict[str, set] = {}
    for n in nodes:
        if n.op_type in INTEGER_OPS or n.op_type in FLOAT_MATMULS or n.op_type in ("Conv", "FusedConv"):
            path = _module_path(n.name)
            if path not in names:  # an op called once per head: the exporter numbers the calls' scopes
                path = re.sub(r"_\d+$", "", path)
            kernels.setdefault(path, set()).add("integer" if n.op_type in INTEGER_OPS else "float")
    from ..nn.modules import QuantConv2d
    per_op, by_quantizer, matmuls = {}, {}, []
    for name, op in quant_ops(model, active=True):
        found = kernels.get(name)
        if not found:
            continue  # no matmul / conv of its own (LayerNorm inputs)
        kind = "float" if "float" in found else "integer"
        per_op[name] = kind
        if not isinstance(op, QuantConv2d):
            matmuls.append(kind)
        inputs = ", ".join(f"{k} {type(q).__name__}" for k, q in op.quantizers().items() if k != "weight")
        key = f"{type(op).__name__}({inputs})"
        counts = by_quantizer.setdefault(key, {"integer": 0, "float": 0})
        counts[kind] += 1
    result |= {"ops": per_op, "by_quantizer": by_quantizer,
               "accelerated": bool(matmuls) and all(k == "integer" for k in matmuls)}
    return result


def predict_logits(sess, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits of an ONNX Runtime session on normalised images ``[N, 3, H, W]``."""
    name = sess.get_inputs()[0].name
    out = [torch.from_numpy(sess.run(None, {name: images[i:i + batch_size].numpy()})[0])
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def warn_fast_without_vnni(path: str, metadata: dict, runtime: str) -> None:
    """Warn when a file exported with ``--int8 fast`` runs on an x86 CPU without VNNI, where the
    u8 x s8 integer kernels of ONNX Runtime and OpenVINO saturate (measured under an emulated
    Haswell: ``tests/test_onnx.py``, ``tests/test_openvino.py``)."""
    if metadata.get("vitquant.int8") != "fast":
        return
    from ..report import cpu_info
    cpu = cpu_info()
    if cpu["architecture"] in ("x86_64", "AMD64") and cpu["isa"] and not cpu["isa"]["vnni"]:
        warnings.warn(f"vitquant: {path} was exported with --int8 fast (u8 x s8 integer kernels); this CPU "
                      f"({cpu['model']}) has no VNNI, where {runtime}'s u8 x s8 kernels saturate and "
                      "compute wrong results: export with --int8 exact (the default)", RuntimeWarning, stacklevel=3)


def open_exported(path: str | os.PathLike, open_runtime, who: str = "") -> tuple[str, dict, object]:
    """``(path, metadata, open_runtime(path))`` for an exported file; a missing or unreadable file
    (onnx's DecodeError, the runtime's own parse errors) is one :class:`VitquantError` line."""
    import onnx
    path = str(path)
    if not os.path.isfile(path):
        raise VitquantError(f"ONNX file not found: {path}")
    try:
        metadata = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        return path, metadata, open_runtime(path)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitquantError(f"{who}cannot read ONNX file {path} (corrupt or truncated?): {first}") from None


class OrtModel:
    """An exported model under ONNX Runtime, callable like the PyTorch model (logits tensor)."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None):
        self.path, self.metadata, self.session = open_exported(path, lambda p: session(p, threads))
        self.input_name = self.session.get_inputs()[0].name
        width = self.session.get_outputs()[0].shape[-1]
        self.num_classes = width if isinstance(width, int) else None
        warn_fast_without_vnni(self.path, self.metadata, "ONNX Runtime")

    def eval(self) -> "OrtModel":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0])


RUNTIMES = ("onnxruntime", "openvino")


def runtime_model(path: str | os.PathLike, runtime: str = "onnxruntime", threads: Optional[int] = None):
    """An exported file under one of ``RUNTIMES``, callable like the PyTorch model (logits)."""
    if runtime == "onnxruntime":
        return OrtModel(path, threads)
    if runtime == "openvino":
        from .openvino import OpenVinoModel
        return OpenVinoModel(path, threads)
    raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
