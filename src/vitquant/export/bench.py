"""Throughput of a quantized model: PyTorch FP32 vs ONNX Runtime FP32 vs ONNX Runtime INT8 (QDQ)."""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..models import input_size
from ..nn.wrap import quantization_disabled
from .onnx import OrtModel, export_onnx, integer_kernels


def median_throughput(run: Callable[[torch.Tensor], object], x: torch.Tensor, warmup: int, repeats: int) -> float:
    """Images per second of ``run(x)``: ``warmup`` untimed calls, then the median of ``repeats`` timed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            run(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
    return x.shape[0] / statistics.median(times)


def benchmark_runtimes(model: nn.Module, batch_sizes: Sequence[int] = (1, 32), *, warmup: int = 3, repeats: int = 10,
                       threads: Optional[int] = None, int8_modes: Sequence[str] = ("exact",),
                       ort_static: bool = True, calib_images: Optional[torch.Tensor] = None) -> list[dict]:
    """Export ``model`` (wrapped, calibrated) to INT8 and FP32 ONNX in a temporary directory and
    time the runtimes side by side on the same random batch, per batch size. One row per batch
    size: ``batch, torch_fp32_ips, onnx_fp32_ips, onnx_int8_ips`` (the first of ``int8_modes``),
    ``onnx_int8_<mode>_ips`` per mode (``export_onnx``'s ``int8`` storage), ``int8_speedup``
    (INT8 over FP32 ONNX), ``accelerated`` (every quantized matmul runs as an integer kernel) and
    the per-op fusion report of :func:`integer_kernels`. With ``ort_static`` the FP32 export is also
    quantized by ONNX Runtime's own ``quantize_static`` (:mod:`vitquant.export.ort_static`) on
    ``calib_images`` (default: the checkpoint's calibration sample, else seeded Gaussian images) and
    timed as ``ort_static_int8_ips`` (``ort_static_speedup`` over FP32 ONNX)."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    size = input_size(model, (224, 224))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in int8_modes:
            export_onnx(model, f"{tmp}/int8_{mode}.onnx", int8=mode, verify=False)
        export_onnx(model, f"{tmp}/fp32.onnx", fp32=True, verify=False)
        kernels = integer_kernels(f"{tmp}/int8_{int8_modes[0]}.onnx", model)
        static = None
        if ort_static:
            from .ort_static import ort_quantize_static
            from .verify import verification_inputs
            images = calib_images if calib_images is not None else verification_inputs(model, n=32)[0]
            static = ort_quantize_static(f"{tmp}/fp32.onnx", f"{tmp}/ort_static.onnx", images)

        def torch_fp32(x):
            with quantization_disabled(model):
                return model(x)
        runtimes = {"torch_fp32": torch_fp32, "onnx_fp32": OrtModel(f"{tmp}/fp32.onnx", threads)}
        runtimes |= {f"onnx_int8_{mode}": OrtModel(f"{tmp}/int8_{mode}.onnx", threads) for mode in int8_modes}
        if static is not None:
            runtimes["ort_static_int8"] = OrtModel(f"{tmp}/ort_static.onnx", threads)
        for bs in batch_sizes:
            x = torch.randn(bs, 3, *size, generator=torch.Generator().manual_seed(0))
            row = {"batch": bs}
            for name, run in runtimes.items():
                row[f"{name}_ips"] = round(median_throughput(run, x, warmup, repeats), 3)
            row["onnx_int8_ips"] = row[f"onnx_int8_{int8_modes[0]}_ips"]
            row["int8"] = int8_modes[0]
            row["int8_speedup"] = round(row["onnx_int8_ips"] / row["onnx_fp32_ips"], 3)
            row["accelerated"] = kernels["accelerated"]
            if static is not None:
                row["ort_static_speedup"] = round(row["ort_static_int8_ips"] / row["onnx_fp32_ips"], 3)
                row["ort_static"] = static
            row |= {"integer_ops": kernels["integer_ops"], "float_matmuls_left": kernels["float_matmuls"],
                    "by_quantizer": kernels["by_quantizer"], "threads": threads, "repeats": repeats,
                    "warmup": warmup}
            rows.append(row)
    return rows
