"""Search strategy: batched candidate grids and alternating operand rounds (PTQ4ViT Sec. 4.3,
Liu et al. 2021 Sec. 3.2).

All candidates of one operand are evaluated as batched tensor ops; candidates and calibration
samples are chunked so that one chunk's temporaries stay within ``memory_budget_mb``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..nn.modules import QuantOp
from .objectives import get_objective


@dataclass
class OpData:
    """Calibration data of one op: FP inputs, FP output and (optionally) dL/d output, all
    batch-first over calibration images."""
    inputs: tuple
    output: torch.Tensor
    grad: Optional[torch.Tensor] = None

    def operand(self, op: QuantOp, name: str) -> torch.Tensor:
        if name == "weight":
            return op.weight.detach()
        index = {"input": 0, "a": 0, "b": 1}[name]
        return self.inputs[index]


def _chunk_sizes(op: QuantOp, data: OpData, operand: str, n_cand: int, budget_bytes: float) -> tuple[int, int]:
    """(samples per chunk, candidates per chunk) so that temporaries fit the budget."""
    n = data.output.shape[0]
    per = data.output[0].numel()
    if operand != "weight":
        per += data.operand(op, operand)[0].numel()
    per_pair = 3 * 4 * per  # output, elementwise temporaries and candidate operand, float32
    pairs = max(1, int(budget_bytes // per_pair))
    if pairs >= n:
        return n, max(1, min(n_cand, pairs // n))
    return pairs, 1


@torch.no_grad()
def evaluate_candidates(op: QuantOp, data: OpData, operand: str, candidates: torch.Tensor,
                        objective: str, memory_budget_mb: float) -> torch.Tensor:
    """Distance ``[C, G]`` of each candidate ``[C, G]`` (or ``[C, G, P]``) of ``operand``
    (others fixed)."""
    fn = get_objective(objective)
    q = op.quantizer(operand)
    group_dim = op.output_group_dim(operand)
    groups = q.groups if group_dim is not None else 1
    n_cand = candidates.shape[0]
    bs, cs = _chunk_sizes(op, data, operand, n_cand, memory_budget_mb * 2 ** 20)
    total = torch.zeros(n_cand, groups, dtype=torch.float64, device=candidates.device)
    n = data.output.shape[0]
    for s0 in range(0, n, bs):
        inputs = op.prepare_inputs(tuple(t[s0:s0 + bs] for t in data.inputs), operand)
        target = data.output[s0:s0 + bs]
        grad = None if data.grad is None else data.grad[s0:s0 + bs].float()
        for c0 in range(0, n_cand, cs):
            y = op.candidate_outputs(inputs, operand, candidates[c0:c0 + cs])
            total[c0:c0 + cs] += fn(y, target, grad, group_dim, groups).double()
    if groups != q.groups:  # the op's output does not separate this operand's groups
        total = total.expand(-1, q.groups)
    return total


def _subset(data: OpData, n: int) -> OpData:
    """``n`` calibration images evenly spread over the set (deterministic)."""
    total = data.output.shape[0]
    idx = torch.linspace(0, total - 1, n).round().long().to(data.output.device)
    return OpData(tuple(t[idx] for t in data.inputs), data.output[idx],
                  None if data.grad is None else data.grad[idx])


def _take(grid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [k, G]`` of each group's candidates from ``grid [C, G]`` or ``[C, G, P]``."""
    if grid.dim() == 3:
        idx = idx[..., None].expand(-1, -1, grid.shape[2])
    return grid.gather(0, idx)


def _best(grid: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The lowest-distance parameters of each group ``[G]`` (or ``[G, P]``) and the summed
    distance of the choice."""
    idx = scores.argmin(dim=0)[None]
    return _take(grid, idx).squeeze(0), float(scores.gather(0, idx).sum())


def search_operand(op: QuantOp, data: OpData, operand: str, grid: torch.Tensor, objective: str,
                   memory_budget_mb: float, screen_images: int = 0, screen_top_k: int = 0) -> tuple[torch.Tensor, float]:
    """Best scale ``[G]`` of ``operand`` on ``grid`` ``[C, G]`` and its distance.

    Exhaustive when ``screen_images`` is 0 or covers the calibration set. Otherwise two stages:
    every candidate is scored on ``screen_images`` images, then the ``screen_top_k`` best of each
    group are re-scored on all images and the final choice is made by that exact score.
    """
    n = data.output.shape[0]
    c = grid.shape[0]
    if not screen_images or screen_images >= n or screen_top_k >= c:
        return _best(grid, evaluate_candidates(op, data, operand, grid, objective, memory_budget_mb))
    rough = evaluate_candidates(op, _subset(data, screen_images), operand, grid, objective, memory_budget_mb)
    top = rough.topk(screen_top_k, dim=0, largest=False).indices  # [k, G]
    short = _take(grid, top)  # [k, G(, P)]: the k best of each group, groups independent
    return _best(short, evaluate_candidates(op, data, operand, short, objective, memory_budget_mb))


@dataclass
class SearchResult:
    rounds_run: int
    searches_run: int
    searches_skipped: int
    best_distance: float


@torch.no_grad()
def alternating_search(op: QuantOp, data: OpData, objective: str, alpha: float, beta: float,
                       num_candidates: int, rounds: int, memory_budget_mb: float,
                       screen_images: int = 0, screen_top_k: int = 0,
                       order: Optional[tuple[str, ...]] = None,
                       after_round: Optional[Callable[[], None]] = None) -> SearchResult:
    """Alternate over the op's operands (weight then input, or a then b): search each operand's
    scale on its candidate grid with the others fixed, for at most ``rounds`` rounds; stop early
    when a round changes no scale (the objective has converged).

    ``after_round`` runs after every round (e.g. bias correction, Liu et al. 2021 Sec. 3.2).
    A search whose fixed operands have not changed since its last run would return the same
    scale, so it is skipped (exact, not an approximation) unless ``after_round`` ran since.
    """
    quantizers = op.quantizers()
    order = order or tuple(quantizers)
    grids = {name: quantizers[name].candidates(data.operand(op, name), alpha, beta, num_candidates)
             .to(data.output.device) for name in order}
    seen: dict[str, list] = {}
    run = skipped = rounds_run = 0
    best = float("nan")
    for _ in range(rounds):
        rounds_run += 1
        changed = False
        for name in order:
            others = [quantizers[o].scale.clone() for o in order if o != name]
            if name in seen and all(torch.equal(a, b) for a, b in zip(seen[name], others)):
                skipped += 1
                continue
            seen[name] = others
            new, best = search_operand(op, data, name, grids[name], objective, memory_budget_mb,
                                       screen_images, screen_top_k)
            changed |= not torch.equal(new.to(quantizers[name].scale), quantizers[name].scale)
            quantizers[name].set_scale(new)
            op.refresh()
            run += 1
        if after_round is not None:
            after_round()
            seen.clear()  # the op itself changed: every search must run again
        if not changed and run:
            break
    return SearchResult(rounds_run=rounds_run, searches_run=run, searches_skipped=skipped, best_distance=best)
