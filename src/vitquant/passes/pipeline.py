"""A recipe's ordered list of passes, and the runner ``vitquant.quantize`` uses.

Each pass does one thing to the model given the calibration context; a config's pipeline is
:func:`pipeline_for`. Today's passes:

* ``attach_quantizers``: every operand gets the quantizer of its site (``recipes.quantizer_table``);
* ``calibrate``: the one calibration engine, per block; per op it initialises the quantizers from
  their data, runs the recipe's search and, where the recipe says so, the bias correction
  (Eqs. 13-15, Liu et al. 2021) after every search round;
* ``reparameterize``: RepQ-ViT's scale reparameterisation of post-LayerNorm activations;
* ``calibrate_folded``: the Linears the fold changed, calibrated again on the folded model (AdaLog);
* ``round_weights``: ERQ's ridge step and GPTQ rounding of every weight, bias refitted
  (``calibration.weight_rounding``), last;
* ``reconstruct``: block reconstruction (AdaRound weights, LSQ activation steps, QDrop;
  ``calibration.reconstruction``), after everything else;
* ``check_mixed_precision_budget``, ``calibrate_bit_widths``, ``allocate_bits`` (Sec. 3.3, Liu et
  al. 2021; the allocation also re-measures the bias correction in the mixed model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class Context:
    """What the passes share: the model, the calibration images, the config, run options, and what
    earlier passes produced (``report``, per-bit-width ``states`` / ``reports``)."""
    model: nn.Module
    images: torch.Tensor
    cfg: Any
    device: Optional[torch.device] = None
    progress: bool = False
    checkpoint: Any = None
    memory: Any = None
    report: Any = None
    states: dict = field(default_factory=dict)
    reports: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # what each pass reports, by pass name (result files)
    recon_images: Optional[torch.Tensor] = None  # the reconstruction pass's images (None: ``images``)


class Pass:
    """One step of a recipe pipeline."""
    name = "pass"

    def run(self, ctx: Context) -> None:
        raise NotImplementedError


class AttachQuantizers(Pass):
    name = "attach_quantizers"

    def run(self, ctx):
        from ..recipes import attach_quantizers
        attach_quantizers(ctx.model, ctx.cfg)
        ctx.model.to(ctx.device)


class Calibrate(Pass):
    name = "calibrate"

    def run(self, ctx):
        from ..calibration.engine import calibrate
        from ..recipes import calibrate_op
        cfg = ctx.cfg
        ctx.report = calibrate(ctx.model, ctx.images, calibrate_op(cfg), need_grad=cfg.hessian,
                               batch_size=cfg.batch_size, sequential=cfg.sequential, unit=cfg.calibration_unit,
                               need_output=cfg.search is not None or cfg.bias_correction or cfg.fpcs is not None,
                               progress=ctx.progress, checkpoint=ctx.checkpoint, memory=ctx.memory)


class Reparameterize(Pass):
    """Scale reparameterisation of the post-LayerNorm activations (RepQ-ViT, Sec. 4.1): the
    calibrated per-channel grids are folded into LayerNorm and Linear, the deployed quantizer is
    per tensor, the folded weights' quantizers are re-initialised (``passes.reparam``)."""
    name = "reparameterize"

    def run(self, ctx):
        from .reparam import reparameterize_calibrated
        ctx.info[self.name] = reparameterize_calibrated(ctx.model)


class CalibrateFolded(Pass):
    """After the fold, search the folded Linears again (their per-tensor input and new weights) on
    the folded FP model's data, as AdaLog's code does; the ops' reports gain ``after_fold``."""
    name = "calibrate_folded"

    def run(self, ctx):
        from ..calibration.engine import calibrate
        from ..recipes import calibrate_op
        cfg = ctx.cfg
        folded = {n for info in ctx.info.get(Reparameterize.name, {}).values() for n in info["linears"]}
        if not folded:
            return
        r = calibrate(ctx.model, ctx.images, calibrate_op(cfg), need_grad=cfg.hessian, batch_size=cfg.batch_size,
                      sequential=cfg.sequential, unit=cfg.calibration_unit, need_output=True, progress=ctx.progress,
                      checkpoint=None if ctx.checkpoint is None else ctx.checkpoint.child("folded"),
                      memory=ctx.memory, only=folded)
        for name, info in r.ops.items():
            ctx.report.ops.setdefault(name, {})["after_fold"] = info
        ctx.report.seconds += r.seconds
        ctx.info[self.name] = {"ops": sorted(folded), "seconds": round(r.seconds, 3)}


class RoundWeights(Pass):
    """Weight rounding better than nearest (``calibration.weight_rounding``: ERQ's ridge step, GPTQ,
    bias refit), every weight op in execution order on its input in the model with all earlier ops
    quantized and rounded, against the FP model's output; the ops' reports gain ``rounding``."""
    name = "round_weights"

    def run(self, ctx):
        from ..calibration.engine import calibrate
        from ..calibration.weight_rounding import round_op
        from ..nn.modules import _WeightOp
        from ..nn.wrap import quant_ops
        rc = ctx.cfg.rounding
        ops = {n for n, op in quant_ops(ctx.model) if isinstance(op, _WeightOp) and op.role in rc.roles
               and op._applies(op.weight_quantizer)}
        r = calibrate(ctx.model, ctx.images, round_op(rc), need_grad=False, batch_size=ctx.cfg.batch_size,
                      sequential=True, unit="op", need_output=True, progress=ctx.progress,
                      checkpoint=None if ctx.checkpoint is None else ctx.checkpoint.child("rounding"),
                      memory=ctx.memory, only=ops, desc="rounding weights")
        for name, info in r.ops.items():
            ctx.report.ops.setdefault(name, {})["rounding"] = info
        ctx.report.seconds += r.seconds
        rounded = [i for i in r.ops.values() if "error_after" in i]
        ctx.info[self.name] = {
            "ops": len(rounded), "skipped": sorted(n for n, i in r.ops.items() if "skipped" in i),
            "seconds": round(r.seconds, 3),
            "mean_error_nearest": sum(i["error_nearest"] for i in rounded) / max(1, len(rounded)),
            "mean_error_after": sum(i["error_after"] for i in rounded) / max(1, len(rounded))}


class Reconstruct(Pass):
    """Block reconstruction (``calibration.reconstruction``): per unit in execution order, the
    rounding of every uniform weight and the steps of the uniform activations learned on the
    quantized model's inputs against the FP outputs; resumable per unit in the work directory."""
    name = "reconstruct"

    def run(self, ctx):
        from ..calibration.reconstruction import reconstruct
        rc = ctx.cfg.reconstruction
        images = ctx.images if ctx.recon_images is None else ctx.recon_images
        info = reconstruct(ctx.model, images, rc, batch_size=ctx.cfg.batch_size,
                           device=ctx.device or "cpu", progress=ctx.progress,
                           checkpoint=None if ctx.checkpoint is None else ctx.checkpoint.child("reconstruction"),
                           memory=ctx.memory)
        for unit, u in info["units"].items():
            ctx.report.ops.setdefault(unit, {})["reconstruction"] = u
        ctx.report.seconds += info["seconds"]
        ctx.info[self.name] = {k: v for k, v in info.items() if k != "units"} | {"images": int(images.shape[0])}


class CheckMixedPrecisionBudget(Pass):
    """An impossible size budget fails before any calibration."""
    name = "check_mixed_precision_budget"

    def run(self, ctx):
        from ..api import mixed_precision_budget
        mixed_precision_budget(ctx.model, ctx.cfg)


class CalibrateBitWidths(Pass):
    name = "calibrate_bit_widths"

    def run(self, ctx):
        from ..api import calibrate_bit_widths
        cfg = ctx.cfg
        ctx.states, ctx.reports = calibrate_bit_widths(ctx.model, ctx.images, cfg,
                                                       cfg.mixed_precision.calibration_bits(cfg.w_bits), ctx.device,
                                                       ctx.progress, ctx.checkpoint, ctx.memory)


class AllocateBits(Pass):
    name = "allocate_bits"

    def run(self, ctx):
        from ..api import apply_mixed_precision
        ctx.report = apply_mixed_precision(ctx.model, ctx.images, ctx.cfg, ctx.states, ctx.reports, ctx.progress)


def pipeline_for(cfg) -> list[Pass]:
    """The ordered passes of ``cfg``."""
    if cfg.mixed_precision is not None:
        passes = [CheckMixedPrecisionBudget(), CalibrateBitWidths(), AllocateBits()]
    else:
        passes = [AttachQuantizers(), Calibrate()]
        if cfg.reparameterize:
            passes.append(Reparameterize())
            if cfg.fpcs is not None:
                passes.append(CalibrateFolded())
    if getattr(cfg, "rounding", None) is not None:
        passes.append(RoundWeights())
    if getattr(cfg, "reconstruction", None) is not None:
        passes.append(Reconstruct())
    return passes


def run_pipeline(passes: list[Pass], ctx: Context):
    """Run ``passes`` in order; the report records their names (``report.pipeline``) and what
    they reported (``report.pass_info``)."""
    for p in passes:
        p.run(ctx)
    ctx.report.pipeline = [p.name for p in passes]
    ctx.report.pass_info = ctx.info
    return ctx.report
