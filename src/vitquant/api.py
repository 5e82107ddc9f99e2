"""Python API: ``quantize(model, calib_data, config)``, one verb."""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Union

import torch
from torch import nn

from .calibration.bias_correction import remeasure_bias_correction
from .calibration.checkpoint import CalibrationCheckpoint, restore, snapshot, tensor_sha256
from .calibration.engine import CalibrationReport, MemoryBudget, calibrate
from .data import ImageSet
from .evaluate import model_size_mb
from .mixed_precision import choose_bits
from .nn.wrap import is_wrapped, quant_modules, quant_ops, wrap_model
from .recipes import QuantConfig, attach_quantizers, calibrate_op, get_recipe


def quantize(model: nn.Module, calib_data: Union[torch.Tensor, ImageSet], config: Union[QuantConfig, str] = "ptq4vit",
             *, progress: bool = True, work_dir: Optional[Union[str, os.PathLike]] = None,
             max_memory_gb: Optional[float] = None,
             recon_data: Optional[Union[torch.Tensor, ImageSet]] = None) -> tuple[nn.Module, CalibrationReport]:
    """Wrap a timm ViT / DeiT / Swin in place, attach the config's quantizers and calibrate them.

    ``calib_data``: normalised images ``[N, 3, H, W]`` or an :class:`ImageSet` (no labels needed).
    ``config``: a :class:`QuantConfig` or a recipe name (``"ptq4vit"``, ``"base"``, ...).
    ``work_dir``: save each calibrated block there; rerunning with the same model, config and
    images resumes from the last finished block (a different run refuses the directory).
    ``max_memory_gb``: keep calibration within this much RAM; collected activations go to
    disk-backed memory maps (in ``work_dir``, else the temp directory) when they would not fit.
    ``recon_data``: the images of the reconstruction pass (``config.reconstruction``), when it
    should see more (or other) images than calibration; default: ``calib_data``.
    Returns the quantized model (quantization on; see ``quantization_disabled`` for FP) and the
    calibration report.
    """
    cfg = get_recipe(config) if isinstance(config, str) else config
    images = _image_tensor(calib_data, "calibration")
    recon = None
    if recon_data is not None:
        if cfg.reconstruction is None:
            raise ValueError("reconstruction images given but the config has no reconstruction pass")
        recon = _image_tensor(recon_data, "reconstruction")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"model parameter {name} contains NaN or infinite values")
    device = next(model.parameters()).device
    images = images.to(device)
    recon = None if recon is None else recon.to(device)
    fingerprint = run_fingerprint(model, images, cfg)
    if recon is not None:
        fingerprint["recon_images"] = {"shape": list(recon.shape), "sha256": tensor_sha256(recon)}
    checkpoint = None if work_dir is None else CalibrationCheckpoint(work_dir, fingerprint)
    memory = None
    if max_memory_gb is not None:
        if max_memory_gb <= 0:
            raise ValueError(f"max memory must be positive, got {max_memory_gb}")
        memory = MemoryBudget(max_memory_gb * 1e9, None if work_dir is None else str(work_dir))
    if not is_wrapped(model):
        wrap_model(model)
    model.eval()
    model.vitquant_config = cfg  # recorded by vitquant.save
    from .passes.pipeline import Context, pipeline_for, run_pipeline
    ctx = Context(model, images, cfg, device, progress, checkpoint, memory, recon_images=recon)
    return model, run_pipeline(pipeline_for(cfg), ctx)


def _image_tensor(data, what: str) -> torch.Tensor:
    images = data.tensors() if isinstance(data, ImageSet) else data
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{what} data must be a non-empty [N, 3, H, W] tensor or ImageSet")
    if not torch.isfinite(images).all():
        raise ValueError(f"{what} images contain NaN or infinite values")
    return images


def run_fingerprint(model: nn.Module, images: torch.Tensor, cfg: QuantConfig) -> dict:
    """Everything that defines a calibration run's result: weights, config, images, versions."""
    from . import __version__
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return {"vitquant": __version__, "torch": torch.__version__, "model": type(model).__name__,
            "weights_sha256": h.hexdigest(), "config": cfg.to_dict(),
            "images": {"shape": list(images.shape), "sha256": tensor_sha256(images)}}


def mixed_precision_budget(model: nn.Module, cfg: QuantConfig) -> tuple[float, float]:
    """``(budget_mb, fixed_mb)``: the model-size budget of mixed precision (the model at the target
    bit-width, or ``target_size_mb``) and the size of everything outside the MSA / MLP modules
    (at ``w_bits``). Attaches fresh (uncalibrated) quantizers: sizes depend only on bit-widths.
    Raises ValueError when even the lowest bit choice cannot meet the budget."""
    mp = cfg.mixed_precision
    target = mp.target_bits or cfg.w_bits
    modules = quant_modules(model)
    attach_quantizers(model, cfg.replace(w_bits=target, a_bits=target, mixed_precision=None))
    target_mb = model_size_mb(model)
    attach_quantizers(model, cfg.replace(mixed_precision=None))
    fixed_mb = model_size_mb(model) - sum(m.num_weights * cfg.w_bits for m in modules) / 8e6
    budget_mb = mp.target_size_mb if mp.target_size_mb is not None else target_mb
    lowest = fixed_mb + sum(m.num_weights * min(mp.bit_choices(target)) for m in modules) / 8e6
    if lowest > budget_mb:
        raise ValueError(f"the mixed-precision budget cannot be met: even the lowest bit-widths need "
                         f"{lowest:.3f} MB, the budget is {budget_mb:.3f} MB")
    return budget_mb, fixed_mb


def calibrate_bit_widths(model: nn.Module, images: torch.Tensor, cfg: QuantConfig, bits, device=None,
                         progress: bool = False, checkpoint: Optional[CalibrationCheckpoint] = None,
                         memory: Optional[MemoryBudget] = None) -> tuple[dict, dict]:
    """Calibrate the wrapped model once per bit-width (weights and inputs alike) with ``cfg``'s
    single-precision recipe (mixed precision, Liu et al. 2021, Sec. 3.3). Returns the quantizer
    state (:func:`snapshot`) and the calibration report per bit-width; with ``checkpoint``, each
    bit-width's calibration is resumable in its own sub-directory."""
    if cfg.sequential:
        raise ValueError("mixed precision needs parallel calibration (a module's scales must not depend on "
                         "the other modules' bit-widths); drop --sequential")
    ops = quant_ops(model)
    states, reports = {}, {}
    for b in bits:
        single = cfg.replace(w_bits=b, a_bits=b, mixed_precision=None)
        attach_quantizers(model, single)
        if device is not None:
            model.to(device)
        if progress:
            print(f"calibrating at {b} bits", flush=True)
        reports[b] = calibrate(model, images, calibrate_op(single), need_grad=single.hessian,
                               batch_size=cfg.batch_size, progress=progress,
                               checkpoint=None if checkpoint is None else checkpoint.child(f"{b}bits", bits=b),
                               memory=memory)
        states[b] = snapshot(ops)
    return states, reports


def apply_mixed_precision(model: nn.Module, images: torch.Tensor, cfg: QuantConfig, states: dict, reports: dict,
                          progress: bool = False) -> CalibrationReport:
    """Choose and apply one bit-width per MSA / MLP module (``cfg.mixed_precision``) from the
    per-bit-width states of :func:`calibrate_bit_widths`; ops outside the modules (patch
    embedding, head) keep ``cfg.w_bits``. Returns the ``cfg.w_bits`` calibration report with the
    allocation in ``report.mixed_precision``."""
    mp = cfg.mixed_precision
    target = mp.target_bits or cfg.w_bits
    choices = mp.bit_choices(target)
    missing = sorted(set(mp.calibration_bits(cfg.w_bits)) - set(states))
    if missing:
        raise ValueError(f"no calibration at bit-widths {missing}")
    modules = quant_modules(model)
    if not modules:
        raise ValueError("the model has no MSA / MLP modules to give mixed precision")
    budget_mb, fixed_mb = mixed_precision_budget(model, cfg)
    restore(quant_ops(model), states[cfg.w_bits])
    mp_report = choose_bits(model, images, modules, states, choices, (budget_mb - fixed_mb) * 8e6, mp.sensitivity,
                            cfg.batch_size, mp.hutchinson_samples, progress, mp.omega)
    bias = None
    if cfg.bias_correction and mp.remeasure_bias:
        bias = remeasure_bias_correction(model, images, quant_ops(model))
    base = reports[cfg.w_bits]
    report = CalibrationReport(seconds=sum(r.seconds for r in reports.values()),
                               gradient_seconds=sum(r.gradient_seconds for r in reports.values()), ops=base.ops,
                               resumed_units=sum(r.resumed_units for r in reports.values()))
    report.mixed_precision = mp_report.to_dict() | {"budget_mb": budget_mb, "size_mb": model_size_mb(model),
                                                    "bias_remeasured": bias,
                                                    "calibration_seconds": {str(b): r.seconds for b, r in reports.items()}}
    return report
