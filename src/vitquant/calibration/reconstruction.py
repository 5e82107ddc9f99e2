"""Block reconstruction after calibration: AdaRound weights, LSQ activation steps, QDrop.

Per calibration unit (a transformer block, Swin's patch merging, or a lone op such as the patch
embedding and the head), in execution order (BRECQ, Li et al. 2021, Sec. 4):

* inputs: the unit's input in the model with every earlier unit quantized *and reconstructed*;
  target: the FP model's output of the unit on the same images;
* weights (AdaRound, Nagel et al. 2020, Eqs. (21)-(24)): every uniform weight quantizer's codes are
  ``floor(W / s) + h(V)`` with the rectified sigmoid ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma,
  0, 1)`` (``zeta = 1.1, gamma = -0.1``), ``V`` learned, initialised so that ``h(V)`` is the
  fractional part of ``W / s`` (the weight the rounding pass chose, if there is one); the regulariser
  ``lambda sum(1 - |2 h(V) - 1|^beta)`` with ``beta`` annealed linearly from 20 to 2 after a warm-up
  drives every ``h`` to 0 or 1; the final codes are ``floor(W / s) + [V >= 0]``, stored as the op's
  rounded weight (ordinary integer codes on the quantizer's own grid); the steps stay;
* activations (LSQ, Esser et al. 2020): every uniform activation quantizer's step is learned, its
  zero point kept, rounding straight-through; other quantizers (twin uniform, V-2SF / O-2SF, log2 /
  log-sqrt2, AdaLog) keep their calibrated parameters (their levels are discrete choices or their
  range split is not differentiable) and pass gradients straight through;
* QDrop (Wei et al. 2022, Sec. 4): while learning, each activation element is quantized with
  probability ``1 - drop_prob`` and left in FP otherwise;
* loss: the squared error of the unit output summed over channels, averaged over images and tokens
  (``mse``), or weighted elementwise by the squared gradient of the FP model's loss w.r.t. the unit
  output (``fisher``: BRECQ's diagonal Fisher, Eq. (10) there; gradients normalised to mean 1).

Deterministic: one generator per unit, seeded from ``seed`` and the unit's index, draws the batches
and the QDrop masks. Resumable per unit (the engine's :class:`CalibrationCheckpoint`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from ..nn.modules import QuantOp, _WeightOp
from ..nn.wrap import calibration_units, quantization_disabled
from ..quantizers import UniformQuantizer, grouped_scale
from ..quantizers.kernels import fused_kernels
from . import engine
from .checkpoint import CalibrationCheckpoint, restore

GAMMA, ZETA = -0.1, 1.1  # AdaRound's stretch of the sigmoid (Nagel et al. 2020, Sec. 4)
LOSSES = ("mse", "fisher")
# CPU / CUDA defaults: iterations per unit and images per iteration (CPU chosen on DeiT-Tiny, calibration
# images 33-128 of splits/calib.txt: README "Block reconstruction")
CPU_ITERS, CUDA_ITERS = 200, 2000
CPU_BATCH, CUDA_BATCH = 16, 32


@dataclass(frozen=True)
class ReconstructionConfig:
    """A reconstruction pass. ``iters`` per unit with ``batch_size`` images each (None: 200 x 16 on
    CPU, 2000 x 32 on CUDA); Adam learning rates ``lr_round`` (AdaRound's V) and ``lr_step`` (LSQ steps, on
    their logarithm, cosine decay); ``drop_prob`` QDrop's probability of leaving an activation in FP (0: off); ``loss`` "mse"
    or "fisher"; ``round_weight`` the regulariser's lambda, ``warmup`` the fraction of iterations
    without it, ``beta`` its start and end temperature; ``learn_steps``: LSQ on; ``keep_better``: a
    unit whose output error (hard rounding, no QDrop) is higher after learning than before keeps
    its calibrated rounding and steps (off: always commit what was learned, as BRECQ); ``seed``."""
    iters: Optional[int] = None
    batch_size: Optional[int] = None
    lr_round: float = 1e-2
    lr_step: float = 1e-3
    drop_prob: float = 0.5
    loss: Literal["mse", "fisher"] = "mse"
    round_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    learn_steps: bool = True
    keep_better: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.iters is not None and (isinstance(self.iters, bool) or not isinstance(self.iters, int)
                                       or self.iters < 1):
            raise ValueError(f"reconstruction iterations must be a positive integer, got {self.iters!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"reconstruction batch size must be a positive integer, got {self.batch_size!r}")
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f"QDrop probability must be in [0, 1), got {self.drop_prob}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown reconstruction loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if not (self.lr_round > 0 and self.lr_step > 0):
            raise ValueError("reconstruction learning rates must be > 0")
        if self.round_weight < 0 or not 0 <= self.warmup < 1:
            raise ValueError("the rounding regulariser needs round_weight >= 0 and warmup in [0, 1)")
        beta = tuple(float(b) for b in self.beta)
        if len(beta) != 2 or not beta[0] >= beta[1] > 0:
            raise ValueError(f"beta must be (start, end) with start >= end > 0, got {self.beta!r}")
        object.__setattr__(self, "beta", beta)

    def iterations(self, device) -> int:
        if self.iters is not None:
            return self.iters
        return CUDA_ITERS if torch.device(device).type == "cuda" else CPU_ITERS

    def batch(self, device) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return CUDA_BATCH if torch.device(device).type == "cuda" else CPU_BATCH


def _ste_round(u: torch.Tensor) -> torch.Tensor:
    return u + (u.round() - u).detach()


class AdaRoundWeight(nn.Module):
    """Stands in for a uniform weight quantizer while its unit is reconstructed: the soft-rounded
    weight ``s (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z)`` (Eq. (22), Nagel et al. 2020)."""

    def __init__(self, op: _WeightOp, q: UniformQuantizer):
        super().__init__()
        self.q, self.shape = q, op.weight.shape
        w = op.weight_to_quantize().detach().float()
        s, view = grouped_scale(q.scale.detach().float(), w.shape, q.group_dim)
        self.view = view
        self.register_buffer("s", s)
        self.register_buffer("z", torch.zeros_like(s) if q.symmetric else torch.round(-q.grouped(q.lower, w.shape) / s))
        u = w.reshape(view) / s
        self.register_buffer("floor", torch.floor(u))
        rest = (u - self.floor).clamp(0.0, 1.0 - 1e-6)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False
        self.enabled = self.calibrated = True

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def codes(self) -> torch.Tensor:
        """Integer codes as the quantizer stores them (``round(W / s) + z``, clamped)."""
        up = (self.v >= 0).to(self.floor.dtype)
        return (self.floor + up + self.z).clamp(self.q.qmin, self.q.qmax).reshape(self.shape)

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        if self.hard:
            return ((self.codes().reshape(self.view) - self.z) * self.s).reshape(self.shape)
        q = (self.floor + self.h() + self.z).clamp(self.q.qmin, self.q.qmax) - self.z
        return (q * self.s).reshape(self.shape)

    def regulariser(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)`` (Eq. (24), Nagel et al. 2020)."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class LearnedStep(nn.Module):
    """A uniform activation quantizer with a learned step and straight-through rounding, zero point
    fixed (LSQ, Esser et al. 2020, Eq. (1)). The step is learned in log space,
    ``s = s0 exp(log_ratio)``, so one learning rate suits steps of any magnitude."""

    def __init__(self, q: UniformQuantizer):
        super().__init__()
        self.q = q
        self.register_buffer("s0", q.scale.detach().float().clone())
        self.log_ratio = nn.Parameter(torch.zeros_like(self.s0))
        self.register_buffer("zero", torch.zeros_like(self.s0) if q.symmetric else q.zero_points().float())

    @property
    def step(self) -> torch.Tensor:
        return (self.s0 * self.log_ratio.exp()).clamp_min(1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, view = grouped_scale(self.step, x.shape, self.q.group_dim)
        z = grouped_scale(self.zero, x.shape, self.q.group_dim)[0]
        out = (_ste_round(x.reshape(view) / s) + z).clamp(self.q.qmin, self.q.qmax).sub(z).mul(s)
        return out.reshape(x.shape)

    def commit(self) -> None:
        """Write the learned step into the quantizer (the zero point stays the same integer)."""
        with torch.no_grad():
            step = self.step.detach().to(self.q.scale)
            self.q.scale.copy_(step)
            if not self.q.symmetric:
                self.q.lower.copy_(-self.zero.to(step) * step)


class ReconActivation(nn.Module):
    """Stands in for an activation quantizer while its unit is reconstructed: LSQ or the frozen
    quantizer with straight-through gradients, then QDrop."""

    def __init__(self, q, learn: bool, drop_prob: float, generator: torch.Generator):
        super().__init__()
        self.q = q
        self.learned = LearnedStep(q) if learn and isinstance(q, UniformQuantizer) else None
        self.drop_prob, self.generator = drop_prob, generator
        self.dropping = True
        self.enabled, self.calibrated = q.enabled, q.calibrated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.learned is not None:
            xq = self.learned(x)
        else:  # frozen: straight through, its forward recorded for no backward pass
            with torch.no_grad():
                delta = self.q(x) - x
            xq = x + delta
        if self.dropping and self.drop_prob > 0:
            keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.drop_prob
            xq = torch.where(keep, xq, x)
        return xq


def unit_io(model: nn.Module, module: nn.Module, images: torch.Tensor, batch_size: int, *, fp: bool,
            inputs: bool, output: bool) -> tuple[list[torch.Tensor], Optional[torch.Tensor], dict]:
    """The positional tensor inputs and the output of ``module`` over ``images`` (each forward stops
    after it), in the FP model (``fp``) or the model as it is; also its non-tensor keyword args."""
    n = images.shape[0]
    ins: list[engine._Rows] = []
    out = engine._Rows(n, 1)
    kwargs: dict = {}
    first = [0, 0]

    def hook(mod, args, kw, result):
        if inputs:
            if not ins:
                ins.extend(engine._Rows(n, 1) for _ in args)
                kwargs.update(kw)
            for rows, a in zip(ins, args):
                rows.add(a.detach(), *first)
        if output:
            out.add(result.detach(), *first)
        raise engine._StopForward

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with (quantization_disabled(model) if fp else contextlib.nullcontext()), torch.no_grad():
            for i in range(0, n, batch_size):
                batch = images[i:i + batch_size]
                first[:] = batch.shape[0], i
                try:
                    model(batch)
                except engine._StopForward:
                    pass
    finally:
        handle.remove()
    if any(torch.is_tensor(v) for v in kwargs.values()):
        raise ValueError(f"{type(module).__name__}: reconstruction needs tensor inputs as positional arguments")
    return [r.data for r in ins], out.data if output else None, kwargs


def _rec_loss(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Squared error summed over channels (last dim), mean over images and tokens; with ``weight``
    (squared output gradients, mean 1) the diagonal-Fisher weighted error."""
    err = (pred - target).pow(2)
    if weight is not None:
        err = err * weight
    return err.sum(-1).mean() if err.dim() > 1 else err.mean()


def reconstruct_unit(index: int, unit: str, module: nn.Module, ops: list[tuple[str, QuantOp]],
                     inputs: list[torch.Tensor], kwargs: dict, target: torch.Tensor,
                     fisher: Optional[torch.Tensor], rc: ReconstructionConfig, iters: int, batch: int,
                     bar=None) -> dict:
    """Learn the rounding and steps of one unit (see the module docstring); returns its report."""
    seed = rc.seed * 1_000_003 + index
    gen = torch.Generator().manual_seed(seed)  # batches (CPU); QDrop masks on the data's device
    mask_gen = torch.Generator(device=target.device).manual_seed(seed + 1)
    rounders: dict[str, AdaRoundWeight] = {}
    acts: list[tuple[QuantOp, str, nn.Module, ReconActivation]] = []
    frozen: list[str] = []
    for name, op in ops:
        for operand, q in op.quantizers().items():
            if not op._applies(q):
                continue
            if operand == "weight":
                if isinstance(q, UniformQuantizer) and isinstance(op, _WeightOp):
                    rounders[name] = AdaRoundWeight(op, q).to(op.weight.device)
                    op.set_quantizer("weight", rounders[name])
                else:
                    frozen.append(f"{name}.weight")
                continue
            wrapper = ReconActivation(q, rc.learn_steps, rc.drop_prob, mask_gen)
            op.set_quantizer(operand, wrapper)
            acts.append((op, operand, q, wrapper))
            if wrapper.learned is None:
                frozen.append(f"{name}.{operand}")
    weights_to_restore = {p: p.requires_grad for p in module.parameters()}
    for p in list(weights_to_restore):
        p.requires_grad_(False)
    steps = [a.learned.log_ratio for *_, a in acts if a.learned is not None]
    for p in [r.v for r in rounders.values()] + steps:  # the only parameters learned
        p.requires_grad_(True)
    opt_w = torch.optim.Adam([r.v for r in rounders.values()], lr=rc.lr_round) if rounders else None
    opt_a = torch.optim.Adam(steps, lr=rc.lr_step) if steps else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=iters, eta_min=0.0) if opt_a else None
    n = target.shape[0]
    warm = int(rc.warmup * iters)
    t0 = time.perf_counter()
    losses = []

    def batch_rows(idx):
        return [x[idx] for x in inputs], target[idx], None if fisher is None else fisher[idx]

    def eval_error() -> float:
        """Relative squared error of the unit output, hard rounding, no QDrop; with the Fisher loss
        weighted as the loss is (the guard then judges the objective that was optimised)."""
        for r in rounders.values():
            r.hard = True
        for *_, a in acts:
            a.dropping = False
        for _, op in ops:  # drop cached quantized weights (soft or hard rounding)
            op.refresh()
        tot = 0.0
        with torch.no_grad():
            for i in range(0, n, batch):
                idx = torch.arange(i, min(n, i + batch))
                xs, y, g = batch_rows(idx)
                err, ref = (module(*xs, **kwargs) - y) ** 2, y ** 2
                if g is not None:
                    err, ref = err * g, ref * g
                tot += float(err.sum()) / float(ref.sum().clamp_min(1e-30)) * len(idx)
        for *_, a in acts:
            a.dropping = True
        for r in rounders.values():
            r.hard = False
        for _, op in ops:
            op.refresh()
        return tot / n

    try:
        with fused_kernels(False):
            before = eval_error()
            iters_run = iters if rounders or steps else 0
            module.train(False)
            for it in range(iters_run):
                idx = torch.randperm(n, generator=gen)[:min(batch, n)]
                xs, y, g = batch_rows(idx)
                with torch.enable_grad():
                    rec = _rec_loss(module(*xs, **kwargs), y, g)
                    reg = torch.zeros(())
                    if rounders and it >= warm and rc.round_weight > 0:
                        t = (it - warm) / max(1, iters - warm)
                        beta = rc.beta[1] + (rc.beta[0] - rc.beta[1]) * (1 - t)
                        reg = rc.round_weight * sum(r.regulariser(beta) for r in rounders.values())
                    loss = rec + reg
                    for o in (opt_w, opt_a):
                        if o is not None:
                            o.zero_grad(set_to_none=True)
                    loss.backward()
                for o in (opt_w, opt_a):
                    if o is not None:
                        o.step()
                if sched is not None:
                    sched.step()
                losses.append(rec.item())
                if bar is not None:
                    bar.update(1)
                    if it % 10 == 0 or it == iters_run - 1:
                        bar.set_postfix_str(f"{unit} it {it + 1}/{iters_run} loss {losses[-1]:.4g} "
                                            f"reg {float(reg.detach()):.4g}")
            after = eval_error()
    finally:
        for p, req in weights_to_restore.items():
            p.requires_grad_(req)
    # commit: hard codes become the op's rounded weight; learned steps go into the quantizers (unless
    # learning made the unit worse and keep_better holds: then the calibrated quantizers go back)
    kept = rc.keep_better and after > before
    changed = 0
    for name, op in ops:
        r = rounders.get(name)
        if r is None:
            continue
        if kept:
            op.set_quantizer("weight", r.q)
            continue
        q = r.q
        with torch.no_grad():
            codes = r.codes()
            w = q.dequantize(codes).to(op.weight.dtype)
            if not torch.equal(q.quantize(w), codes.to(torch.int64)):
                raise RuntimeError(f"{name}: learned codes do not survive the quantizer's rounding")
            changed += int((codes.to(torch.int64) != q.quantize(op.weight_to_quantize().detach())).sum())
        op.set_quantizer("weight", q)
        op.set_rounded_weight(w)
    for op, operand, q, wrapper in acts:
        if wrapper.learned is not None and not kept:
            wrapper.learned.commit()
        op.set_quantizer(operand, q)
    for _, op in ops:
        op.refresh()
    return {"iters": iters_run, "seconds": round(time.perf_counter() - t0, 3),
            "error_before": before, "error_after": before if kept else after, "error_learned": after,
            "kept_calibration": kept,
            "loss_first": losses[0] if losses else None, "loss_last": float(sum(losses[-10:]) / max(1, len(losses[-10:])))
            if losses else None,
            "adaround_ops": sorted(rounders), "learned_steps": len(steps), "frozen": frozen,
            "codes_changed": changed}


def reconstruct(model: nn.Module, images: torch.Tensor, rc: ReconstructionConfig, *, batch_size: int = 32,
                device="cpu", progress: bool = True, checkpoint: Optional[CalibrationCheckpoint] = None,
                memory: Optional[engine.MemoryBudget] = None) -> dict:
    """Reconstruct every calibration unit of a calibrated model in order; returns the report
    (per unit: iterations, seconds, relative output error before / after, what was learned)."""
    from tqdm.auto import tqdm
    iters = rc.iterations(device)
    units = calibration_units(model)
    report: dict = {"iters": iters, "batch_size": rc.batch(device), "units": {}}
    t0 = time.perf_counter()
    previous, engine._budget = engine._budget, memory
    model.eval()
    try:
        fisher_all = {}
        finished = {} if checkpoint is None else {i: d for i, (u, _) in enumerate(units)
                                                  if (d := checkpoint.load(i, u)) is not None}
        todo = [i for i in range(len(units)) if i not in finished]
        if rc.loss == "fisher" and todo:
            mods = [(u, model.get_submodule(u)) for i, (u, ops) in enumerate(units) if i in todo]
            fisher_all = engine.collect_gradients(model, images, batch_size, torch.float32, modules=mods)
        bar = tqdm(total=iters * len(todo), desc="reconstructing", unit="it", disable=not progress,
                   dynamic_ncols=True)
        try:
            for index, (unit, ops) in enumerate(units):
                if index in finished:
                    state, info = finished.pop(index)
                    restore(ops, state)
                    report["units"][unit] = info[unit] | {"resumed": True}
                    continue
                module = model.get_submodule(unit)
                _, target, _ = unit_io(model, module, images, batch_size, fp=True, inputs=False, output=True)
                inputs, _, kwargs = unit_io(model, module, images, batch_size, fp=False, inputs=True, output=False)
                g = fisher_all.pop(unit, None)
                if g is not None:
                    g = g.float().pow(2)
                    g = g / g.mean().clamp_min(1e-30)
                info = reconstruct_unit(index, unit, module, ops, inputs, kwargs, target, g, rc, iters,
                                        rc.batch(device), bar)
                report["units"][unit] = info
                del inputs, target, g
                if checkpoint is not None:
                    checkpoint.save(index, unit, ops, {unit: info})
        finally:
            bar.close()
    finally:
        engine._budget = previous
    done = [u for u in report["units"].values() if "error_after" in u]
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["mean_error_before"] = sum(u["error_before"] for u in done) / max(1, len(done))
    report["mean_error_after"] = sum(u["error_after"] for u in done) / max(1, len(done))
    report["loss"], report["drop_prob"] = rc.loss, rc.drop_prob
    return report


__all__ = ["ReconstructionConfig", "reconstruct", "reconstruct_unit", "AdaRoundWeight", "LearnedStep",
           "ReconActivation", "unit_io"]
