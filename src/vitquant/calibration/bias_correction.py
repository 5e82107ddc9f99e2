"""Bias correction, Eqs. (13)-(15), Liu et al. 2021.

``E[Ô] = E[O] + E[eps_W X] + E[eps_X W] + E[eps_X eps_W]``: the expected output error of a
quantized Linear / Conv, measured per output channel on the calibration data, is subtracted from
the layer's bias (``_WeightOp.bias_correction``), so each output channel keeps its FP mean.

Applies to ops with a weight (every quantized Linear and the patch-embedding conv). The attention
matmuls (q @ k^T, attn @ v) have no bias and their "channels" are token positions, whose expected
error is a property of the data rather than of a layer, so they are not corrected.
"""
from __future__ import annotations

import torch

from ..nn.modules import _WeightOp
from ..nn.wrap import quantization_disabled
from .search import OpData


def _per_channel(t: torch.Tensor, ch: int) -> torch.Tensor:
    """``t`` as float64 ``[rows, channels]`` (channel dimension ``ch`` moved last)."""
    return t.double().movedim(ch, -1).reshape(-1, t.shape[ch])


@torch.no_grad()
def mean_output_error(op: _WeightOp, data: OpData, chunk: int = 8) -> torch.Tensor:
    """``E[Ô] - E[O]`` per output channel over the calibration data (quantized op, current
    scales and current correction, inputs as in ``data``)."""
    ch = op.output_group_dim("weight")
    total, count = None, 0
    n = data.output.shape[0]
    for s0 in range(0, n, chunk):
        y = op(*(t[s0:s0 + chunk] for t in data.inputs))
        err = _per_channel(y - data.output[s0:s0 + chunk], ch)
        total = err.sum(0) if total is None else total + err.sum(0)
        count += err.shape[0]
    return total / count


@torch.no_grad()
def correct_bias(op: _WeightOp, data: OpData) -> dict:
    """Fold the op's mean output error into its bias correction; returns the mean |error| per
    channel before and after."""
    before = mean_output_error(op, data)
    op.add_bias_correction(before)
    after = mean_output_error(op, data)
    return {"error_before": float(before.abs().mean()), "error_after": float(after.abs().mean())}


@torch.no_grad()
def output_errors(model: torch.nn.Module, images: torch.Tensor, ops: list[tuple[str, _WeightOp]],
                  fold: bool = False) -> dict[str, torch.Tensor]:
    """Mean output error per output channel of each op in ``ops`` on the inputs it receives in the
    model as configured now (one forward of ``images``). With ``fold`` each error is folded into
    the op's bias before the op runs, in execution order, so later ops see corrected inputs."""
    errors: dict[str, torch.Tensor] = {}

    def measure(name):
        def hook(op, args):
            y = op.forward(*args)  # .forward: no hooks re-entered
            with quantization_disabled(op):
                ref = op.forward(*args)
            err = _per_channel(y - ref, op.output_group_dim("weight")).mean(0)
            errors[name] = err
            if fold:
                op.add_bias_correction(err)
        return hook

    handles = [op.register_forward_pre_hook(measure(n)) for n, op in ops]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return errors


def remeasure_bias_correction(model: torch.nn.Module, images: torch.Tensor, ops) -> dict:
    """Eqs. (13)-(15) measured again in the model as it is configured now: every op that has a
    bias correction gets its mean output error on the inputs it actually receives folded into
    its bias (one forward of ``images``, in execution order). Used after a mixed-precision
    allocation: each bit-width's calibration measured the corrections with every other module
    at that same bit-width. Returns the mean |error| per channel before and after."""
    corrected = [(n, op) for n, op in ops if isinstance(op, _WeightOp) and op.bias_correction is not None]
    if not corrected:
        return {"ops": 0}
    before = output_errors(model, images, corrected, fold=True)
    after = output_errors(model, images, corrected)
    mean = lambda errs: float(torch.stack([e.abs().mean() for e in errs.values()]).mean())  # noqa: E731
    return {"ops": len(corrected), "error_before": mean(before), "error_after": mean(after)}
