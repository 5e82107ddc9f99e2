"""Export self-check: the ONNX graph, run in ONNX Runtime (or OpenVINO), computes the calibrated model.

Two runtimes never agree bit for bit: LayerNorm, softmax, GELU and matmul accumulation round
differently. On a float model that is a relative logit difference of ~1e-6; a quantized model
turns it into occasional code flips (a value within an ulp of a rounding boundary takes the
neighbouring code), which later blocks amplify. So the check compares the ONNX Runtime logits with
the simulated model's against a *noise floor measured on the same model and inputs*:

* ``fp32_runtime_*_diff``: the two runtimes on the same float model (the export of the model with
  quantization off), the rounding noise of the runtimes themselves;
* ``noise_floor_*_diff``: how far the simulated quantized model moves under rounding perturbations of that
  size: computed in float64 instead of float32, and on inputs perturbed by the runtimes' relative
  difference (a few seeded draws).

The export passes when the *mean* |ORT - simulated| logit difference is at most ``tolerance``
(default 2) times the larger of the two floors' mean differences. Code flips are sparse, so they
move the mean little; a real defect (a wrong step, a saturating integer kernel, a mis-exported
quantizer) moves most logits. The max difference is recorded too (it is dominated by the one
image with the most flips, so it separates the two less well).
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
from typing import Optional

import torch
from torch import nn

from ..errors import VitquantError
from ..models import input_size

DEFAULT_TOLERANCE = 2.0
PERTURBATION_DRAWS = 3


class ExportMismatch(VitquantError):
    """The exported graph does not compute what the simulated model computes."""


def verification_inputs(model: nn.Module, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Inputs for the check: the calibration sample saved with the checkpoint when there is one,
    else seeded standard-normal images of the model's input size. Returns (inputs, source)."""
    sample = getattr(model, "vitquant_calibration_sample", None)
    if sample is not None and len(sample):
        return sample[:n].float(), "calibration images"
    size = input_size(model, (224, 224))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *size, generator=g), f"random inputs (seed {seed})"


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).float()


def _top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def _diffs(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of ``|a - b|``."""
    e = (a.double() - b.double()).abs()
    return float(e.max()), float(e.mean())


def noise_floor(model: nn.Module, x: torch.Tensor, relative_noise: float,
                draws: int = PERTURBATION_DRAWS) -> tuple[float, float]:
    """(max, mean) logit change of ``model`` under rounding-sized perturbations, the largest over
    float64 instead of float32 and inputs scaled by ``1 + relative_noise * N(0, 1)`` (seeded draws)."""
    from ..quantizers.kernels import fused_kernels
    ref = _logits(model, x)
    m64 = copy.deepcopy(model).double()
    with fused_kernels(False):
        found = [_diffs(_logits(m64, x.double()), ref)]
    del m64
    eps = max(relative_noise, 2.0 ** -24)
    g = torch.Generator().manual_seed(1)
    for _ in range(draws):
        found.append(_diffs(_logits(model, x * (1 + eps * torch.randn(x.shape, generator=g))), ref))
    return max(f[0] for f in found), max(f[1] for f in found)


def check_export(model: nn.Module, onnx_path: str | os.PathLike, inputs: Optional[torch.Tensor] = None, *,
                 fp32: bool = False, tolerance: float = DEFAULT_TOLERANCE, threads: Optional[int] = None,
                 source: Optional[str] = None, runtime: str = "onnxruntime",
                 fp32_path: Optional[str | os.PathLike] = None) -> dict:
    """Run ``onnx_path`` in ``runtime`` (ONNX Runtime, or OpenVINO: ``export.onnx.RUNTIMES``) and
    the simulated ``model`` on ``inputs``; return the figures (max and mean |logit difference|,
    top-1 agreement, noise floor, allowed mean difference, ``ok``). ``fp32``: the export is of the
    float model (quantization disabled). ``fp32_path``: the FP32 export of ``model``, when one is
    at hand (else it is exported here), for the runtime's own float rounding noise."""
    import contextlib

    from ..nn.wrap import quantization_disabled
    from .onnx import export_onnx, runtime_model
    if inputs is None:
        inputs, source = verification_inputs(model)
    model.eval()

    def ctx():
        return quantization_disabled(model) if fp32 else contextlib.nullcontext()
    with ctx():
        sim = _logits(model, inputs)
    got = runtime_model(onnx_path, runtime, threads)(inputs).float()
    diff_max, diff_mean = _diffs(got, sim)
    # the two runtimes on the same float model
    with quantization_disabled(model):
        fp_torch = _logits(model, inputs)
        if fp32:
            fp_runtime = got
        elif fp32_path is not None:
            fp_runtime = runtime_model(fp32_path, runtime, threads)(inputs).float()
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "fp32.onnx")
                export_onnx(model, path, fp32=True, verify=False)
                fp_runtime = runtime_model(path, runtime, threads)(inputs).float()
    fp_max, fp_mean = _diffs(fp_runtime, fp_torch)
    scale = float(fp_torch.abs().mean()) or 1.0
    with ctx():
        floor_max, floor_mean = noise_floor(model, inputs, fp_max / (float(fp_torch.abs().max()) or 1.0))
    allowed = tolerance * max(floor_mean, fp_mean, 1e-7 * scale)
    ok = math.isfinite(diff_max) and diff_mean <= allowed
    return {"runtime": runtime, "inputs": source or "given", "num_inputs": int(inputs.shape[0]),
            "max_logit_diff": diff_max, "mean_logit_diff": diff_mean, "top1_agreement": _top1_agreement(got, sim),
            "fp32_runtime_max_diff": fp_max, "fp32_runtime_mean_diff": fp_mean,
            "noise_floor_max_diff": floor_max, "noise_floor_mean_diff": floor_mean,
            "tolerance": tolerance, "allowed_mean_diff": allowed, "ok": ok}


def describe(check: dict) -> str:
    """One line for the CLI."""
    who = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}.get(check.get("runtime"), "ONNX Runtime")
    return (f"export check on {check['num_inputs']} {check['inputs']}: {who} vs simulated |logit difference| "
            f"mean {check['mean_logit_diff']:.3g} (allowed {check['allowed_mean_diff']:.3g} = {check['tolerance']:g} x "
            f"noise floor {check['allowed_mean_diff'] / check['tolerance']:.3g}), max {check['max_logit_diff']:.3g} "
            f"(noise floor {max(check['noise_floor_max_diff'], check['fp32_runtime_max_diff']):.3g}), "
            f"top-1 agreement {100 * check['top1_agreement']:.1f} %")
