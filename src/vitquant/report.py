"""Run provenance and the short result table printed by the CLI."""
from __future__ import annotations

import platform
import sys


ISA_FLAGS = {"avx2": "avx2", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
             "avx512_bf16": "avx512_bf16", "amx_tile": "amx_tile", "amx_int8": "amx_int8", "neon": "asimd",
             "dotprod": "asimddp"}


def cpu_info() -> dict:
    """The CPU a figure was measured on: model name, vendor, logical CPUs and the ISA features that
    decide quantized speed (and, for ONNX Runtime's u8 x s8 kernels, exactness): AVX2, AVX-512,
    VNNI (AVX-512 VNNI or AVX-VNNI), AMX. Read from ``/proc/cpuinfo``; elsewhere from ``platform``."""
    import os
    info = {"model": platform.processor() or None, "vendor": None, "logical_cpus": os.cpu_count(),
            "architecture": platform.machine()}
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # the first processor's block
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    info["model"] = fields.get("model name") or fields.get("Model") or info["model"]
    info["vendor"] = fields.get("vendor_id") or fields.get("CPU implementer")
    info["family_model_stepping"] = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping")) \
        if "cpu family" in fields else None
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    info["isa"] = {name: flag in flags for name, flag in ISA_FLAGS.items()} if flags else None
    if flags:
        info["isa"]["vnni"] = info["isa"]["avx512_vnni"] or info["isa"]["avx_vnni"]
    return info


def environment() -> dict:
    """Package versions and machine facts recorded with every result: CPU model and ISA features,
    torch's CPU capability (the kernels ATen dispatches to), thread count, ONNX Runtime version."""
    import numpy
    import timm
    import torch
    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:  # pragma: no cover - a declared dependency
        ort = None
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - older torch
        capability = None
    from .export.openvino import openvino_version
    from .quantizers.kernels import kernel_status
    return {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "onnxruntime": ort, "openvino": openvino_version(), "platform": platform.platform(),
            "processor": cpu_info(), "torch_cpu_capability": capability,
            "torch_threads": torch.get_num_threads(), "fused_kernels": kernel_status(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def layernorm_outliers(model) -> dict:
    """Per quantized LayerNorm input: its quantizer, channel count, O-2SF outlier channels and
    exponent ``m`` (outlier step = ``s * 2^m``)."""
    from .nn.modules import QuantLayerNorm
    from .quantizers import OutlierTwoScaleQuantizer
    out = {}
    for name, op in model.named_modules():
        q = getattr(op, "input_quantizer", None) if isinstance(op, QuantLayerNorm) else None
        if q is None:
            continue
        row = {"quantizer": "o2sf" if isinstance(q, OutlierTwoScaleQuantizer) else "uniform", "channels": op.channels}
        if isinstance(q, OutlierTwoScaleQuantizer):
            flags = q.outlier_flags()
            row.update(outliers=int(flags.sum()), exponent=int(q.scale[0, 1]), step=float(q.scale[0, 0]),
                       outlier_channels=flags.nonzero().flatten().tolist())
        out[name] = row
    return out


def print_summary(r: dict) -> None:
    evaluated = "quant_top1" in r
    rows = [("model", r["model"]), ("method", f"{r['method']} W{r['w_bits']}A{r['a_bits']}"),
            ("images", f"{r['num_calib']} calibration / " + (f"{r['num_eval']} evaluation" if evaluated
                                                              else "not evaluated (--no-eval)"))]
    if evaluated:
        rows += [("top-1 FP32 / quant", f"{r['fp32_top1']:.2f} / {r['quant_top1']:.2f} %  (drop {r['top1_drop']:.2f})"),
                 ("top-5 FP32 / quant", f"{r['fp32_top5']:.2f} / {r['quant_top5']:.2f} %"),
                 ("top-1 agreement", f"{r['top1_agreement']:.2f} %")]
    rows += [("model size", f"{r['model_size_mb']:.2f} MB (FP32 {r['fp32_model_size_mb']:.2f} MB)"),
             ("calibration", f"{r['calib_seconds']:.1f} s")]
    if evaluated:
        rows.append(("evaluation FP32 / quant", f"{r['fp32_eval_seconds']:.1f} / {r['eval_seconds']:.1f} s"))
    if r.get("setting") == "full":
        lo = r.get("layernorm_outliers", {})
        o2 = [v for v in lo.values() if v["quantizer"] == "o2sf"]
        what = (f"O-2SF, {sum(v['outliers'] for v in o2)} outlier channels in {sum(v['outliers'] > 0 for v in o2)}"
                f" of {len(o2)}" if o2 else f"uniform, {len(lo)}")
        rows.insert(2, ("setting", f"full (LayerNorm inputs quantized: {what} LayerNorms)"))
    mp = r.get("mixed_precision")
    if mp:
        at = [k for k, _ in rows].index("model size")
        rows.insert(at, ("mixed precision", f"{mp['size_mb']:.2f} MB (budget {mp['budget_mb']:.2f} MB), bits "
                         + " ".join(f"{m['bits']}" for m in mp["modules"]) + f"  [{mp['sensitivity']}]"))
    if r.get("saved"):
        sv = r["saved"]
        rows.append(("saved", f"{sv['dir']} ({sv['mb_on_disk']:.2f} MB on disk; computed model size "
                              f"{sv['model_size_mb']:.2f} MB)"))
    for path in r.get("plots", []):
        rows.append(("plot", path))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
