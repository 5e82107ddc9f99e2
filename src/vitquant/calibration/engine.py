"""THE calibration loop shared by every recipe.

For each calibration unit (a transformer block, a patch merging, the patch embedding, the head):
1. collect each op's FP inputs and FP output on the calibration images ("parallel" mode) or its
   inputs from the partly quantized model ("sequential" mode);
2. for every op of the unit, initialise its quantizers from the data and run the recipe's search.
Gradients ``dL/dO`` for the Hessian-guided objective are collected once, before the loop, by
back-propagating ``L = CE(FP logits, FP top-1 label)`` through the FP model (see README).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..nn.modules import QuantOp
from ..nn.wrap import calibration_units, quant_ops, quantization_disabled
from .search import OpData, alternating_search


class _StopForward(Exception):
    pass


@dataclass
class CalibrationReport:
    seconds: float = 0.0
    gradient_seconds: float = 0.0
    ops: dict = field(default_factory=dict)


def _batches(images: torch.Tensor, batch_size: int):
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size]


def collect_gradients(model: nn.Module, images: torch.Tensor, batch_size: int,
                      dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``dL/dO`` of every quantized op's output, ``L = CE(logits, argmax logits)`` summed over
    images, through the FP model (quantization off). Stored in ``dtype`` to save memory."""
    grads: dict[str, list] = {}
    handles = []

    def hook(name):
        def fn(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda g: grads.setdefault(name, []).append(g.detach().to(dtype)))
        return fn

    for name, op in quant_ops(model):
        handles.append(op.register_forward_hook(hook(name)))
    try:
        with quantization_disabled(model), torch.enable_grad():
            for batch in _batches(images, batch_size):
                logits = model(batch)
                loss = nn.functional.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")
                loss.backward()
        model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in grads.items()}


def collect_unit_data(model: nn.Module, images: torch.Tensor, ops: list[tuple[str, QuantOp]],
                      batch_size: int, quantized_inputs: bool) -> dict[str, OpData]:
    """Inputs and FP outputs of ``ops`` (one calibration unit) on the calibration images; each
    forward pass stops after the unit's last op.

    With ``quantized_inputs`` ("sequential" mode) the inputs come from the model in which every
    earlier, already calibrated unit is quantized; the targets are still the FP model's outputs.
    """
    names = [n for n, _ in ops]
    store = {n: {"inputs": [], "output": []} for n in names}

    def forward(fp: bool, inputs: bool, output: bool) -> None:
        def hook_for(name):
            def fn(module, args, out):
                if inputs:
                    store[name]["inputs"].append(tuple(a.detach().contiguous() for a in args))
                if output:
                    store[name]["output"].append(out.detach())
                if name == names[-1]:
                    raise _StopForward
            return fn
        handles = [op.register_forward_hook(hook_for(n)) for n, op in ops]
        try:
            with (quantization_disabled(model) if fp else contextlib.nullcontext()), torch.no_grad():
                for batch in _batches(images, batch_size):
                    try:
                        model(batch)
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()

    if quantized_inputs:
        forward(fp=True, inputs=False, output=True)
        forward(fp=False, inputs=True, output=False)
    else:
        forward(fp=True, inputs=True, output=True)
    return {n: OpData(inputs=tuple(torch.cat(parts) for parts in zip(*store[n]["inputs"])),
                      output=torch.cat(store[n]["output"])) for n in names}


def calibrate(model: nn.Module, images: torch.Tensor, calibrate_op: Callable[[str, QuantOp, OpData], dict],
              *, need_grad: bool, batch_size: int = 4, sequential: bool = False,
              progress: bool = True) -> CalibrationReport:
    """Calibrate every quantized op of a wrapped model, unit by unit, with ``calibrate_op``
    (the recipe's per-op step: initialise quantizers, search, extras)."""
    from tqdm.auto import tqdm

    report = CalibrationReport()
    t0 = time.perf_counter()
    model.eval()
    grads = {}
    if need_grad:
        grads = collect_gradients(model, images, batch_size)
        report.gradient_seconds = time.perf_counter() - t0
    units = calibration_units(model)
    total = sum(len(ops) for _, ops in units)
    bar = tqdm(total=total, desc="calibrating", unit="layer", disable=not progress, dynamic_ncols=True)
    try:
        for unit_name, ops in units:
            data = collect_unit_data(model, images, ops, batch_size, quantized_inputs=sequential)
            for name, op in ops:
                bar.set_postfix_str(name)
                t = time.perf_counter()
                d = data.pop(name)
                d.grad = grads.pop(name, None)
                info = calibrate_op(name, op, d) or {}
                info["seconds"] = round(time.perf_counter() - t, 3)
                report.ops[name] = info
                del d
                bar.update(1)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report
