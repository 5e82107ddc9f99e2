"""Mixed precision, Sec. 3.3 of Liu et al. 2021: one bit-width per MSA and per MLP module.

1. Calibrate the model once per candidate bit-width (the shared engine; parallel mode makes a
   module's scales at ``b`` bits independent of the other modules' bit-widths).
2. Sensitivity of each module: the nuclear norm (Eq. (16)) of its attention map ``A = q k^T``
   (MSA) or its output feature (MLP), on the calibration images; or, for comparison (Table 4),
   the average Hessian trace of the loss w.r.t. its weights (Hutchinson estimate, HAWQ-v2).
3. ``Omega_i(b) = sensitivity_i * ||Â_i(b) - A_i||^2`` (Eq. (17)); with Hessian sensitivity the
   perturbation is the weights' ``||Ŵ_i(b) - W_i||^2`` (HAWQ-v2).
4. Omega is additive over modules, so the budgeted minimum is found exactly by dynamic
   programming over the model size (:func:`allocate_bits`), not by the paper's sort.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .calibration.checkpoint import restore
from .calibration.engine import _StopForward, _batches, _forward_hooks
from .nn.modules import _WeightOp
from .nn.wrap import QuantModule, quant_ops, quantization_disabled, quantization_only


# -- exact budgeted allocation --------------------------------------------------------------------


@dataclass
class Allocation:
    bits: list[int]  # chosen bit-width per module
    omega: float  # total Omega of the choice
    cost_bits: int  # weight bits of the modules at the chosen bit-widths
    exact: bool  # False when costs had to be rounded up to keep the table small (still within budget)


def allocate_bits(num_weights: Sequence[int], choices: Sequence[int], omega: np.ndarray, budget_bits: float,
                  max_states: int = 4_000_000) -> Allocation:
    """Minimise ``sum_i omega[i, k_i]`` subject to ``sum_i num_weights[i] * choices[k_i] <= budget_bits``
    (0/1 multiple-choice knapsack). Costs are counted in units of ``gcd(num_weights)`` bits, which
    keeps the dynamic programme exact; only if that table would exceed ``max_states`` entries are
    costs rounded up to a coarser unit (the budget still holds; ``exact`` is then False)."""
    omega = np.asarray(omega, dtype=np.float64)
    m, k = omega.shape
    if m != len(num_weights) or k != len(choices):
        raise ValueError("omega must be [modules, choices]")
    unit = math.gcd(*[int(n) for n in num_weights])
    cap = int(budget_bits // unit)
    exact = cap <= max_states
    if not exact:
        unit *= math.ceil(cap / max_states)
        cap = int(budget_bits // unit)
    cost = np.array([[math.ceil(int(n) * b / unit) for b in choices] for n in num_weights], dtype=np.int64)
    if cost.min(1).sum() > cap:
        need = sum(min(int(n) * b for b in choices) for n in num_weights)
        raise ValueError(f"the mixed-precision budget cannot be met: even the lowest bit-widths need "
                         f"{need / 8e6:.3f} MB of module weights, the budget leaves {budget_bits / 8e6:.3f} MB")
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    picks = np.zeros((m, cap + 1), dtype=np.int64)
    for i in range(m):
        new = np.full(cap + 1, inf)
        for j in range(k):
            c = cost[i, j]
            if c > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[c:] = dp[:cap + 1 - c] + omega[i, j]
            better = cand < new  # strict: ties keep the lower bit-width (earlier choice)
            new[better] = cand[better]
            picks[i, better] = j
        dp = new
    c = int(np.argmin(dp))
    total = float(dp[c])
    chosen = [0] * m
    for i in range(m - 1, -1, -1):
        j = int(picks[i, c])
        chosen[i] = j
        c -= int(cost[i, j])
    bits = [int(choices[j]) for j in chosen]
    return Allocation(bits, total, sum(int(n) * b for n, b in zip(num_weights, bits)), exact)


# -- sensitivities ---------------------------------------------------------------------------------


@torch.no_grad()
def nuclear_norms(model: nn.Module, images: torch.Tensor, modules: list[QuantModule],
                  batch_size: int) -> dict[str, float]:
    """Mean nuclear norm (sum of singular values, Eq. (16)) of each module's attention map
    (per image and head) or output feature (per image), FP model."""
    sums = {m.name: 0.0 for m in modules}
    counts = {m.name: 0 for m in modules}
    outputs = {m.output: m.name for m in modules}
    ops = [(n, op) for n, op in quant_ops(model) if n in outputs]

    def hook(name):
        def fn(module, args, out):
            mats = out.double().reshape(-1, *out.shape[-2:])  # [images * heads, rows, cols]
            norms = torch.linalg.matrix_norm(mats, ord="nuc")
            sums[outputs[name]] += float(norms.sum())
            counts[outputs[name]] += norms.numel()
        return fn

    with _forward_hooks(ops, hook), quantization_disabled(model):
        for batch in _batches(images, batch_size):
            model(batch)
    return {n: sums[n] / max(1, counts[n]) for n in sums}


def module_weights(module: QuantModule) -> list[torch.Tensor]:
    return [op.weight for _, op in module.ops if isinstance(op, _WeightOp)]


def rademacher_vectors(params: dict[str, list[torch.Tensor]], samples: int, seed: int) -> dict[str, list[list[torch.Tensor]]]:
    """``samples`` random +-1 vectors per module (one tensor per weight), from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return {n: [[(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in ps] for _ in range(samples)]
            for n, ps in params.items()}


def hessian_traces(model: nn.Module, images: torch.Tensor, modules: list[QuantModule], batch_size: int,
                   samples: int = 8, seed: int = 0) -> dict[str, float]:
    """Average Hessian trace per weight of each module, ``tr(H_i) / n_i``, of
    ``L = CE(FP logits, FP top-1)`` (mean over images): Hutchinson's estimator with ``samples``
    Rademacher vectors per module, each supported on that module's weights only (as HAWQ-v2
    does per block; a vector over all modules at once is unbiased too but the cross-module
    Hessian terms make it far noisier). One Hessian-vector product per module, sample and batch:
    this is the expensive sensitivity of Table 4 of Liu et al."""
    params = {m.name: module_weights(m) for m in modules}
    vectors = rademacher_vectors(params, samples, seed)
    flat = [p for ps in params.values() for p in ps]
    traces = {n: 0.0 for n in params}
    n_images = images.shape[0]
    with quantization_disabled(model), torch.enable_grad():
        for batch in _batches(images, batch_size):
            logits = model(batch)
            loss = nn.functional.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum") / n_images
            grads = dict(zip(map(id, flat), torch.autograd.grad(loss, flat, create_graph=True)))
            for name, ps in params.items():
                g = [grads[id(p)] for p in ps]
                for vs in vectors[name]:
                    hv = torch.autograd.grad(g, ps, grad_outputs=vs, retain_graph=True)
                    traces[name] += sum(float((h * v).sum()) for h, v in zip(hv, vs)) / samples
            del grads, loss, logits
    model.zero_grad(set_to_none=True)
    return {n: traces[n] / sum(p.numel() for p in params[n]) for n in params}


# -- perturbations ---------------------------------------------------------------------------------


@torch.no_grad()
def module_outputs(model: nn.Module, images: torch.Tensor, module: QuantModule, batch_size: int,
                   quantized: bool, at: Optional[str] = None) -> list[torch.Tensor]:
    """The module's attention map / output feature (or the output of op ``at``) per batch of
    images, FP inputs; quantized with only this module's ops on (``quantized``) or fully FP.
    Each forward stops there."""
    name_op = [(n, op) for n, op in quant_ops(model) if n == (at or module.output)]
    captured: list[torch.Tensor] = []

    def hook(_):
        def fn(mod, args, out):
            captured.append(out.detach())
            raise _StopForward
        return fn

    ctx = quantization_only(model, [op for _, op in module.ops]) if quantized else quantization_disabled(model)
    with _forward_hooks(name_op, hook), ctx:
        for batch in _batches(images, batch_size):
            try:
                model(batch)
            except _StopForward:
                pass
    return captured


def output_error(model: nn.Module, images: torch.Tensor, module: QuantModule, batch_size: int,
                 reference: list[torch.Tensor], at: Optional[str] = None) -> float:
    """``||Â - A||^2`` summed over the images: the module's map (or op ``at``'s output) with only
    this module quantized (its current quantizers) against ``reference`` from :func:`module_outputs`."""
    quantized = module_outputs(model, images, module, batch_size, quantized=True, at=at)
    return sum(float((q.double() - r.double()).square().sum()) for q, r in zip(quantized, reference))


@torch.no_grad()
def logits_log_softmax(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(b).double().log_softmax(-1) for b in _batches(images, batch_size)])


def output_kl(model: nn.Module, images: torch.Tensor, module: QuantModule, batch_size: int,
              reference: torch.Tensor) -> float:
    """``KL(p_FP || p_Q)`` of the model's class probabilities, mean over the images, with only this
    module quantized (its current quantizers); ``reference``: the FP log-probabilities
    (:func:`logits_log_softmax` with quantization off). ZeroQ-style sensitivity."""
    with quantization_only(model, [op for _, op in module.ops]):
        q = logits_log_softmax(model, images, batch_size)
    return float((reference.exp() * (reference - q)).sum(-1).mean())


def weight_error(module: QuantModule) -> float:
    """``||Ŵ - W||^2`` over the module's weights (current quantizers)."""
    total = 0.0
    with torch.no_grad():
        for _, op in module.ops:
            if isinstance(op, _WeightOp) and op.weight_quantizer is not None:
                total += float((op.weight_quantizer.fake_quant(op.weight) - op.weight).double().square().sum())
    return total


@dataclass
class MixedPrecisionReport:
    choices: list[int]
    sensitivity: str
    module_budget_mb: float  # the part of the size budget left for the modules' weights
    modules: list[dict] = field(default_factory=list)
    omega: float = 0.0
    exact: bool = True
    omega_form: str = "paper"  # where perturbations are measured (MixedPrecisionConfig.omega)
    sensitivity_seconds: dict = field(default_factory=dict)
    perturbation_seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def choose_bits(model: nn.Module, images: torch.Tensor, modules: list[QuantModule], states: dict[int, dict],
                choices: Sequence[int], budget_bits: float, sensitivity: str, batch_size: int,
                hutchinson_samples: int = 8, progress: bool = False, omega_form: str = "paper") -> MixedPrecisionReport:
    """Sensitivities, perturbations at every candidate bit-width (``states[b]``: the model's
    quantizers calibrated at ``b`` bits), exact allocation; leaves the chosen states applied.

    ``omega_form="module_output"`` (nuclear sensitivity only) measures each module's perturbation at
    its output into the residual stream and divides its nuclear norm by the mean of its kind, so
    that MSA and MLP terms are in the same units (Eq. (17) mixes attention-map and feature
    errors, whose scales differ by orders of magnitude). ``omega_form="output_kl"`` takes Omega
    as the KL divergence of the model's class probabilities with only that module quantized
    (one full forward per module and bit-width; the nuclear norms are still reported)."""
    from tqdm.auto import tqdm
    t = time.perf_counter()
    nuc = nuclear_norms(model, images, modules, batch_size)
    times = {"nuclear": round(time.perf_counter() - t, 3)}
    traces: Optional[dict] = None
    if sensitivity == "hessian":
        t = time.perf_counter()
        traces = hessian_traces(model, images, modules, batch_size, hutchinson_samples)
        times["hessian"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    pert = np.zeros((len(modules), len(choices)))
    kl = traces is None and omega_form == "output_kl"
    if kl:
        with quantization_disabled(model):
            fp_log_probs = logits_log_softmax(model, images, batch_size)
    with tqdm(total=len(modules) * len(choices), desc="mixed precision", unit="config", disable=not progress) as bar:
        for i, m in enumerate(modules):
            at = m.last if omega_form == "module_output" else None
            reference = None if traces is not None or kl else module_outputs(model, images, m, batch_size,
                                                                             quantized=False, at=at)
            for j, b in enumerate(choices):
                restore(m.ops, states[b])
                if kl:
                    pert[i, j] = output_kl(model, images, m, batch_size, fp_log_probs)
                elif reference is None:
                    pert[i, j] = weight_error(m)
                else:
                    pert[i, j] = output_error(model, images, m, batch_size, reference, at=at)
                bar.update(1)
    pert_s = time.perf_counter() - t
    sens = np.array([traces[m.name] if traces is not None else 1.0 if kl else nuc[m.name] for m in modules])
    if traces is None and omega_form == "module_output":
        kind_mean = {k: np.mean([nuc[m.name] for m in modules if m.kind == k]) for k in {m.kind for m in modules}}
        sens = sens / np.array([kind_mean[m.kind] for m in modules])
    omega = sens[:, None] * pert
    alloc = allocate_bits([m.num_weights for m in modules], list(choices), omega, budget_bits)
    for m, b in zip(modules, alloc.bits):
        restore(m.ops, states[b])
    report = MixedPrecisionReport(list(choices), sensitivity, budget_bits / 8e6, omega=alloc.omega, exact=alloc.exact,
                                  omega_form=omega_form if traces is None else "hessian",
                                  sensitivity_seconds=times, perturbation_seconds=round(pert_s, 3))
    for i, (m, b) in enumerate(zip(modules, alloc.bits)):
        row = dict(name=m.name, kind=m.kind, bits=b, num_weights=m.num_weights, nuclear_norm=nuc[m.name],
                   omega={str(c): float(omega[i, j]) for j, c in enumerate(choices)})
        if traces is not None:
            row["hessian_trace"] = traces[m.name]
        report.modules.append(row)
    return report
