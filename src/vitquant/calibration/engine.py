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
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..nn.modules import QuantOp
from .checkpoint import CalibrationCheckpoint, restore
from ..quantizers.kernels import fused_kernels
from ..nn.wrap import calibration_units, quant_ops, quantization_disabled
from .search import OpData, alternating_search


class _StopForward(Exception):
    pass


@dataclass
class CalibrationReport:
    seconds: float = 0.0
    gradient_seconds: float = 0.0
    ops: dict = field(default_factory=dict)
    mixed_precision: Optional[dict] = None  # set by mixed-precision quantization
    resumed_units: int = 0  # calibration units loaded from a work directory instead of calibrated
    offloaded_bytes: int = 0  # collected activations kept on disk under a MemoryBudget
    collection_ranks: int = 1  # processes that collected the calibration data (torchrun: data-parallel)


def _batches(images: torch.Tensor, batch_size: int):
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size]


def collection_shard(n_images: int, batch_size: int) -> tuple[int, int]:
    """``(rank, world_size)`` of data-parallel collection: the torchrun process group when there
    are at least as many batches as ranks, else ``(0, 1)`` (every rank collects everything)."""
    from ..runtime import distributed
    rank, world = distributed()
    return (rank, world) if world <= math.ceil(n_images / batch_size) else (0, 1)


def _my_batches(images: torch.Tensor, batch_size: int, shard: tuple[int, int]):
    """``(first image index, batch)`` of this rank's batches: every world-size-th batch."""
    rank, world = shard
    for i in range(0, images.shape[0], batch_size)[rank::world]:
        yield i, images[i:i + batch_size]


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MemoryBudget:
    """``--max-memory``: activations collected for calibration (calibration-unit data, gradients)
    go to disk-backed memory maps in ``offload_dir`` when keeping them in RAM would take the
    process over ``max_bytes``; the candidate search chunks its temporaries to a fraction of it."""

    def __init__(self, max_bytes: float, offload_dir: Optional[str] = None):
        self.max_bytes = float(max_bytes)
        self.offload_dir = offload_dir
        self.offloaded_bytes = 0

    @staticmethod
    def search_chunk_mb(max_memory_gb: float, default_mb: float = 256.0) -> float:
        """The candidate search's chunk budget under ``--max-memory``: an eighth of it, at most
        ``default_mb`` (the unbudgeted default)."""
        return min(default_mb, max_memory_gb * 1e9 / 8 / 2 ** 20)

    def empty(self, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if torch.device(device).type != "cpu" or resident_bytes() + nbytes <= 0.75 * self.max_bytes:
            return torch.empty(shape, dtype=dtype, device=device)
        fd, path = tempfile.mkstemp(dir=self.offload_dir, prefix="vitquant-activations-", suffix=".bin")
        os.close(fd)
        try:  # the mapping outlives the name; the file is gone when the tensor is freed
            t = torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        finally:
            os.unlink(path)
        self.offloaded_bytes += nbytes
        return t


_budget: Optional[MemoryBudget] = None


class _Rows:
    """Collects per-batch tensors into one preallocated tensor (no concatenation copy, so peak
    memory is the result's size, not twice it). A batch of ``n`` images may hold ``k * n`` rows
    (Swin folds its windows into the batch dimension). Under a :class:`MemoryBudget` the tensor may
    be a disk-backed memory map. ``world``: ranks collecting data-parallel (rows are summed)."""

    def __init__(self, images: int, world: int, dtype: torch.dtype | None = None):
        self.images, self.world, self.dtype, self.data = images, world, dtype, None

    def add(self, t: torch.Tensor, batch_images: int, first_image: int) -> None:
        per_image = t.shape[0] // batch_images
        if self.data is None:
            shape, dtype = (self.images * per_image, *t.shape[1:]), self.dtype or t.dtype
            self.data = (torch.empty(shape, dtype=dtype, device=t.device) if _budget is None
                         else _budget.empty(shape, dtype, t.device))
            if self.world > 1:
                self.data.zero_()
        self.data[first_image * per_image:first_image * per_image + t.shape[0]].copy_(t)

    def gathered(self) -> torch.Tensor:
        """The rows of every rank (data-parallel collection: each rank filled its own batches'
        rows, the others are zero, so a sum is exact)."""
        if self.world > 1:
            import torch.distributed as dist
            full = self.data.float()
            dist.all_reduce(full)
            self.data.copy_(full)
        return self.data


@contextlib.contextmanager
def _forward_hooks(ops: list[tuple[str, QuantOp]], make_hook):
    """Register ``make_hook(name)`` on every op for the duration of the block."""
    handles = [op.register_forward_hook(make_hook(name)) for name, op in ops]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def collect_gradients(model: nn.Module, images: torch.Tensor, batch_size: int,
                      dtype: torch.dtype = torch.bfloat16,
                      modules: Optional[list[tuple[str, nn.Module]]] = None) -> dict[str, torch.Tensor]:
    """``dL/dO`` of every quantized op's output (or of each of ``modules``), ``L = CE(logits, argmax
    logits)`` summed over images, through the FP model (quantization off). Stored in ``dtype``."""
    shard = collection_shard(images.shape[0], batch_size)
    grads: dict[str, _Rows] = {}
    batch_images = [0, 0]  # images in the batch, index of its first image

    def hook(name):
        def fn(module, args, output):
            if output.requires_grad:
                rows = grads.setdefault(name, _Rows(images.shape[0], shard[1], dtype))
                n, first = batch_images
                output.register_hook(lambda g: rows.add(g.detach(), n, first))
        return fn

    targets = quant_ops(model, active=True) if modules is None else modules
    with _forward_hooks(targets, hook), quantization_disabled(model), torch.enable_grad():
        for first, batch in _my_batches(images, batch_size, shard):
            batch_images[:] = batch.shape[0], first
            logits = model(batch)
            loss = nn.functional.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")
            loss.backward()
    model.zero_grad(set_to_none=True)
    return {k: v.gathered() for k, v in grads.items()}


def collect_unit_data(model: nn.Module, images: torch.Tensor, ops: list[tuple[str, QuantOp]],
                      batch_size: int, quantized_inputs: bool, need_output: bool = True,
                      need_inputs: bool = True) -> dict[str, OpData]:
    """Inputs and FP outputs of ``ops`` (one calibration unit) on the calibration images; each
    forward pass stops after the unit's last op. Under torchrun each rank runs its share of the
    batches and the rows are summed across ranks (data-parallel collection; every rank then
    searches on the same full data, so all ranks end with identical quantizers).

    With ``quantized_inputs`` ("sequential" mode) the inputs come from the model in which every
    earlier, already calibrated unit is quantized; the targets are still the FP model's outputs.
    ``need_output=False``: no FP outputs (a recipe without search or bias correction), one forward;
    ``need_inputs=False``: FP outputs only (one FP forward).
    """
    names = [n for n, _ in ops]
    n_images = images.shape[0]
    inputs_of: dict[str, list[_Rows]] = {}
    shard = collection_shard(n_images, batch_size)
    output_of = {n: _Rows(n_images, shard[1]) for n in names}
    batch_images = [0, 0]  # images in the batch, index of its first image

    def forward(fp: bool, inputs: bool, output: bool) -> None:
        def hook_for(name):
            def fn(module, args, out):
                if inputs:
                    for rows, a in zip(inputs_of.setdefault(name, [_Rows(n_images, shard[1]) for _ in args]), args):
                        rows.add(a.detach(), *batch_images)
                if output:
                    output_of[name].add(out.detach(), *batch_images)
                if name == names[-1]:
                    raise _StopForward
            return fn
        with _forward_hooks(ops, hook_for), \
                (quantization_disabled(model) if fp else contextlib.nullcontext()), torch.no_grad():
            for first, batch in _my_batches(images, batch_size, shard):
                batch_images[:] = batch.shape[0], first
                try:
                    model(batch)
                except _StopForward:
                    pass

    if quantized_inputs:
        if need_output:
            forward(fp=True, inputs=False, output=True)
        if need_inputs:
            forward(fp=False, inputs=True, output=False)
    else:
        forward(fp=True, inputs=need_inputs, output=need_output)
    return {n: OpData(inputs=tuple(r.gathered() for r in inputs_of[n]) if need_inputs else (),
                      output=output_of[n].gathered() if need_output else None) for n in names}


def calibrate(model: nn.Module, images: torch.Tensor, calibrate_op: Callable[[str, QuantOp, OpData], dict],
              *, need_grad: bool, batch_size: int = 4, sequential: bool = False, unit: str = "block",
              need_output: bool = True, progress: bool = True, checkpoint: Optional[CalibrationCheckpoint] = None,
              memory: Optional[MemoryBudget] = None, only: Optional[set[str]] = None,
              desc: str = "calibrating") -> CalibrationReport:
    """Calibrate every quantized op of a wrapped model, unit by unit, with ``calibrate_op``
    (the recipe's per-op step: initialise quantizers, search, extras).

    ``checkpoint``: finished units are saved there and, on a rerun, loaded instead of calibrated
    (resumable calibration, bit-identical to an uninterrupted run). ``memory``: keep collected
    activations within a budget (disk-backed when needed). ``unit="op"``: every op is its own unit
    (with ``sequential``: each op's inputs come from the model with all earlier ops quantized).
    ``only``: calibrate just these ops (by name), e.g. the Linears a reparameterisation changed.
    Runs with eager quantization kernels: the search sees many tensor shapes, each of which a
    fused kernel would have to compile for; the fused kernels are for inference."""
    global _budget
    previous, _budget = _budget, memory
    try:
        with fused_kernels(False):
            report = _calibrate(model, images, calibrate_op, need_grad=need_grad, batch_size=batch_size,
                                sequential=sequential, unit=unit, need_output=need_output, progress=progress,
                                checkpoint=checkpoint, only=only, desc=desc)
    finally:
        _budget = previous
    if memory is not None:
        report.offloaded_bytes = memory.offloaded_bytes
    return report


def _calibrate(model, images, calibrate_op, *, need_grad, batch_size, sequential, unit, need_output, progress,
               checkpoint, only=None, desc="calibrating") -> CalibrationReport:
    from tqdm.auto import tqdm

    report = CalibrationReport()
    t0 = time.perf_counter()
    model.eval()
    units = calibration_units(model, per_op=unit == "op")
    if only is not None:
        units = [(u, kept) for u, ops in units if (kept := [(n, op) for n, op in ops if n in only])]
    report.collection_ranks = collection_shard(images.shape[0], batch_size)[1]
    done = {}
    if checkpoint is not None:
        for i, (unit_name, ops) in enumerate(units):
            saved = checkpoint.load(i, unit_name)
            if saved is not None:
                done[i] = saved
    report.resumed_units = len(done)
    grads = {}
    if need_grad and len(done) < len(units):
        grads = collect_gradients(model, images, batch_size)
        report.gradient_seconds = time.perf_counter() - t0
    # Sequential per-op calibration: the FP outputs (targets) of a block's ops do not depend on the
    # quantizers being calibrated, so one FP forward collects them for the whole block; each op
    # then needs only the forward of the partly quantized model for its inputs.
    block_of: dict[str, list[str]] = {}
    if sequential and unit == "op" and need_output:
        for _, block_ops in calibration_units(model):
            names = [n for n, _ in block_ops if only is None or n in only]
            for n in names:
                block_of[n] = names
    fp_outputs: dict[str, torch.Tensor] = {}
    total = sum(len(ops) for _, ops in units)
    bar = tqdm(total=total, desc=desc, unit="layer", disable=not progress, dynamic_ncols=True)
    try:
        for index, (unit_name, ops) in enumerate(units):
            if index in done:  # finished by an earlier, interrupted run
                state, infos = done.pop(index)
                restore(ops, state)
                report.ops.update(infos)
                for name, _ in ops:
                    grads.pop(name, None)
                bar.update(len(ops))
                continue
            if block_of:
                first = ops[0][0]
                if first not in fp_outputs:
                    rest = block_of[first][block_of[first].index(first):]
                    group = [(n, op) for n, op in quant_ops(model) if n in rest]
                    fp_outputs.update({n: d.output for n, d in collect_unit_data(
                        model, images, group, batch_size, quantized_inputs=True, need_inputs=False).items()})
                data = collect_unit_data(model, images, ops, batch_size, quantized_inputs=True, need_output=False)
                for name, _ in ops:
                    data[name].output = fp_outputs.pop(name)
            else:
                data = collect_unit_data(model, images, ops, batch_size, quantized_inputs=sequential,
                                         need_output=need_output)
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
            if checkpoint is not None:
                checkpoint.save(index, unit_name, ops, {n: report.ops[n] for n, _ in ops})
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report
