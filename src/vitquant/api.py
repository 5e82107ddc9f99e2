"""Python API: ``quantize(model, calib_data, config)``, one verb."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .calibration.engine import CalibrationReport, calibrate
from .data import ImageSet
from .nn.wrap import is_wrapped, wrap_model
from .recipes import QuantConfig, attach_quantizers, calibrate_op, get_recipe


def quantize(model: nn.Module, calib_data: Union[torch.Tensor, ImageSet], config: Union[QuantConfig, str] = "ptq4vit",
             *, progress: bool = True) -> tuple[nn.Module, CalibrationReport]:
    """Wrap a timm ViT / DeiT / Swin in place, attach the config's quantizers and calibrate them.

    ``calib_data``: normalised images ``[N, 3, H, W]`` or an :class:`ImageSet` (no labels needed).
    ``config``: a :class:`QuantConfig` or a recipe name (``"ptq4vit"``, ``"base"``, ...).
    Returns the quantized model (quantization on; see ``quantization_disabled`` for FP) and the
    calibration report.
    """
    cfg = get_recipe(config) if isinstance(config, str) else config
    images = calib_data.tensors() if isinstance(calib_data, ImageSet) else calib_data
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError("calibration data must be a non-empty [N, 3, H, W] tensor or ImageSet")
    if not torch.isfinite(images).all():
        raise ValueError("calibration images contain NaN or infinite values")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"model parameter {name} contains NaN or infinite values")
    device = next(model.parameters()).device
    images = images.to(device)
    if not is_wrapped(model):
        wrap_model(model)
    model.eval()
    attach_quantizers(model, cfg)
    model.to(device)
    report = calibrate(model, images, calibrate_op(cfg), need_grad=cfg.hessian, batch_size=cfg.batch_size,
                       sequential=cfg.sequential, progress=progress)
    return model, report
