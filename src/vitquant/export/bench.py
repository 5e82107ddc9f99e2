"""Throughput of a quantized model: PyTorch FP32 vs ONNX Runtime FP32 / INT8 (QDQ) vs OpenVINO
FP32 / INT8 (the same files), side by side on one machine."""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..models import input_size
from ..nn.wrap import quantization_disabled
from .onnx import export_onnx, integer_kernels


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
                       ort_static: bool = True, calib_images: Optional[torch.Tensor] = None,
                       openvino: Optional[bool] = None, verify: bool = True) -> list[dict]:
    """Export ``model`` (wrapped, calibrated) to INT8 and FP32 ONNX in a temporary directory and
    time the runtimes side by side on the same random batch, per batch size. One row per batch
    size: ``batch, torch_fp32_ips, onnx_fp32_ips, onnx_int8_ips`` (the first of ``int8_modes``),
    ``onnx_int8_<mode>_ips`` per mode (``export_onnx``'s ``int8`` storage), ``int8_speedup``
    (INT8 over FP32 ONNX), ``accelerated`` (every quantized matmul runs as an integer kernel) and
    the per-op fusion report of :func:`integer_kernels`. With ``ort_static`` the FP32 export is also
    quantized by ONNX Runtime's own ``quantize_static`` (:mod:`vitquant.export.ort_static`) on
    ``calib_images`` (default: the checkpoint's calibration sample, else seeded Gaussian images) and
    timed as ``ort_static_int8_ips`` (``ort_static_speedup`` over FP32 ONNX).

    With ``openvino`` (default: when it is installed) the same FP32 and INT8 files also run in
    OpenVINO (:mod:`vitquant.export.openvino`) as ``openvino_fp32_ips`` / ``openvino_int8_<mode>_ips``.
    With ``verify`` every vitquant INT8 path (runtime x storage mode) is checked against the
    simulated model as the export check does (:func:`~vitquant.export.verify.check_export`):
    ``checks`` holds each result; a path that fails it (e.g. ``fast`` storage on a CPU without
    VNNI, whose u8 x s8 kernels saturate) is timed but never the best. Each row names the fastest
    FP32 runtime (``best_fp32``), the fastest verified INT8 path (``best_int8``) and
    ``best_speedup``, the one over the other."""
    from .onnx import runtime_model
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    size = input_size(model, (224, 224))
    rows = []
    if openvino is None:
        from .openvino import openvino_version
        openvino = openvino_version() is not None
    engines = {"onnx": "onnxruntime"} | ({"openvino": "openvino"} if openvino else {})
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
        runtimes = {"torch_fp32": torch_fp32}
        for prefix, engine in engines.items():
            runtimes[f"{prefix}_fp32"] = runtime_model(f"{tmp}/fp32.onnx", engine, threads)
            runtimes |= {f"{prefix}_int8_{mode}": runtime_model(f"{tmp}/int8_{mode}.onnx", engine, threads)
                         for mode in int8_modes}
        if static is not None:
            runtimes["ort_static_int8"] = runtime_model(f"{tmp}/ort_static.onnx", "onnxruntime", threads)
        checks = {}
        if verify:
            from .verify import check_export
            for prefix, engine in engines.items():
                for mode in int8_modes:
                    checks[f"{prefix}_int8_{mode}"] = check_export(model, f"{tmp}/int8_{mode}.onnx", runtime=engine,
                                                                   threads=threads, fp32_path=f"{tmp}/fp32.onnx")
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
            row |= _best_paths(row, [k for k, c in checks.items() if c["ok"]] if verify else None)
            row |= {"checks": checks, "integer_ops": kernels["integer_ops"],
                    "float_matmuls_left": kernels["float_matmuls"], "by_quantizer": kernels["by_quantizer"],
                    "threads": threads, "repeats": repeats, "warmup": warmup}
            rows.append(row)
    return rows


def _best_paths(row: dict, verified: Optional[Sequence[str]]) -> dict:
    """The fastest FP32 runtime and the fastest vitquant INT8 path among ``verified`` (all when
    None), by images/s."""
    fp32 = {k[:-len("_ips")]: v for k, v in row.items() if k.endswith("_fp32_ips")}
    int8 = {k[:-len("_ips")]: v for k, v in row.items() if k.endswith("_ips") and "_int8_" in k
            and not k.startswith("ort_static") and (verified is None or k[:-len("_ips")] in verified)}
    best_fp32 = max(fp32, key=fp32.get)
    out = {"best_fp32": best_fp32, "best_fp32_ips": fp32[best_fp32], "int8_paths_verified": sorted(int8)}
    if int8:
        best = max(int8, key=int8.get)
        out |= {"best_int8": best, "best_int8_ips": int8[best], "best_speedup": round(int8[best] / fp32[best_fp32], 3)}
    return out
