"""AdaLog's calibration: Fast Progressive Combining Search (FPCS) and its per-op schedule
(Wu et al., ECCV 2024, Sec. 3.4; the schedule of its reference code, GoatWu/AdaLog).

Uniform asymmetric operands (step ``s``, zero point ``z``, codes ``[0, 2^b - 1]``) start from a grid of
``candidates`` pairs: ``candidates / Z`` steps between ``(P_p - P_(1-p)) / (2^b - 1)`` and
``(max - min) / (2^b - 1)`` for each of ``Z`` zero points around ``2^(b-1)``. FPCS keeps the ``width``
best pairs of every group, then ``steps - 1`` times puts ``candidates / width`` new steps evenly
around each kept one (spacing shrinking by ``candidates / width - 1/2`` per step), keeping the best
``width`` again and finally the best one. AdaLog's post-GELU quantizer searches its base first, then
range and base jointly, and refines the range the same way.

Per op (every op on the FP model's inputs and outputs, ``sequential`` off):

* Linear / Conv: weight by FPCS on its own squared error, input likewise, then ``rounds`` rounds of
  [weight, input] by FPCS on the squared error of the layer output;
* post-LayerNorm inputs (before the reparameterisation): per channel, by FPCS on their own error;
  after the fold the Linear is searched again as above (``passes.pipeline.CalibrateFolded``);
* fc2 (post-GELU, AdaLog quantizer): weight on its own error, then rounds of [base, range x base,
  range refinement; weight] on the output error;
* ``q @ k^T``: per-head uniform operands from entry ``-2`` of their grids, rounds of [a, b] by FPCS on
  the per-head output error; ``attn @ v``: rounds of [base of the post-softmax AdaLog quantizer over
  every ``q`` in its range, ``v`` by FPCS].

Output errors of Linear / Conv weights are evaluated exactly in Gram form (no candidate matmul over
the calibration rows, :func:`weight_output_error`). ``screen_images`` (0: off, AdaLog's exhaustive
scoring) scores every FPCS step of an activation on that many images and re-scores the
``screen_top_k`` best of the last step on all images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..nn.modules import QuantConv2d, QuantMatMul, QuantOp, _WeightOp
from ..quantizers import AdaLogQuantizer, Quantizer, UniformQuantizer
from ..quantizers import kernels
from ..quantizers.base import group_rows, row_quantiles
from ..quantizers.uniform import MIN_STEP
from .objectives import _group_sum
from .search import OpData, _subset, _take, evaluate_candidates

ACT_MIN_STEP = 1e-4  # AdaLog's floor on activation steps


@dataclass(frozen=True)
class FPCSConfig:
    """AdaLog's search settings (its 4-bit DeiT config: 128 candidates, width 16, 6 steps, 3 rounds)."""
    num_candidates: int = 128      # eq_n: candidates per FPCS step
    width: int = 16                # parents kept per step and group
    steps: int = 6                 # FPCS steps (the first on the percentile grid)
    rounds: int = 3                # alternating [weight, input] rounds on the output error
    grid_percentile: float = 90.0  # grid from the p-th to the 100th percentile range
    gelu_bases: int = 8            # post-GELU: bases kept from the base search ...
    gelu_ranges: int = 16          # ... times this many ranges, jointly scored ...
    gelu_width: int = 32           # ... keeping this many (range, base) pairs per refinement step
    q_range: tuple[int, int] = (10, 137)  # searched base numerators q (base 2^(q/37))
    screen_images: int = 8         # score FPCS steps of activations on this many images (0: all)
    screen_top_k: int = 8          # ... and re-score the best of the last step on all images
    memory_budget_mb: float = 256.0

    def __post_init__(self):
        ints = ("num_candidates", "width", "steps", "rounds", "gelu_bases", "gelu_ranges", "gelu_width")
        if any(isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int) or getattr(self, k) < 1
               for k in ints):
            raise ValueError(f"FPCS {', '.join(ints)} must be integers >= 1")
        if self.num_candidates < self.width or self.num_candidates < self.gelu_width:
            raise ValueError("FPCS needs at least as many candidates per step as it keeps (width, gelu_width)")
        if not 50 < self.grid_percentile <= 100:
            raise ValueError(f"FPCS grid percentile must be in (50, 100], got {self.grid_percentile}")
        lo, hi = (int(v) for v in self.q_range)
        if not 1 <= lo <= hi:
            raise ValueError(f"q_range must satisfy 1 <= min <= max, got {self.q_range!r}")
        object.__setattr__(self, "q_range", (lo, hi))
        if self.screen_images < 0 or self.screen_top_k < 0:
            raise ValueError("screen_images and screen_top_k must be >= 0")
        if self.memory_budget_mb <= 0:
            raise ValueError("memory budget must be positive")


# -- the search itself ---------------------------------------------------------------------------


Score = Callable[[torch.Tensor, bool], torch.Tensor]  # (candidates [C, G, P], final step) -> error [C, G]


def fpcs(score: Score, grid: torch.Tensor, delta: torch.Tensor, width: int, new: int, steps: int,
         floor: float = 0.0) -> torch.Tensor:
    """FPCS (AdaLog Sec. 3.4): best parameters ``[G, P]`` from ``grid [C, G, P]``; coordinate 0 is
    refined, ``delta [G]`` is the grid's spacing in it."""
    err = score(grid, steps == 1)
    if steps == 1:
        return _take(grid, err.argmin(0)[None])[0]
    parents = _take(grid, err.topk(min(width, grid.shape[0]), 0, largest=False).indices)
    delta = delta.to(grid)
    for step in range(steps - 1):
        offsets = (torch.linspace(0, 1, new, dtype=grid.dtype) - 0.5)[:, None] * delta[None]  # [new, G]
        kids = parents[:, None].repeat(1, new, 1, 1)  # [W, new, G, P]
        kids[..., 0] = (kids[..., 0] + offsets[None]).clamp(min=floor)
        kids = kids.flatten(0, 1)
        delta = delta / (new - 0.5)
        last = step == steps - 2
        err = score(kids, last)
        parents = _take(kids, err.topk(1 if last else min(width, kids.shape[0]), 0, largest=False).indices)
    return parents[0]


def percentile_grid(x: torch.Tensor, q: Quantizer, cfg: FPCSConfig, zero_points: int,
                    floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaLog's initial uniform grid ``[C, G, 2]`` of (step, zero point) for the groups of ``q`` on
    ``x``, and its step spacing ``[G]``: ``C / Z`` steps from ``(P_p - P_(1-p))`` to ``(max - min)``
    over ``2^b - 1`` for each of ``Z`` zero points ``2^(b-1) - Z/2 .. 2^(b-1) + Z/2 - 1`` (at most ``C``
    of them: a conv weight at 8 bits has 128, above that more than AdaLog's 128 candidates)."""
    zero_points = min(zero_points, cfg.num_candidates)
    rows = group_rows(x.detach().float(), q.group_dim, q.groups)
    p = cfg.grid_percentile / 100.0
    hi, lo = row_quantiles(rows, [p, 1.0]), row_quantiles(rows, [1.0 - p, 0.0])  # [2, G]
    d_min, d_max = hi[0] - lo[0], hi[1] - lo[1]
    n_scale = cfg.num_candidates // zero_points
    levels = 2 ** q.bits - 1
    frac = torch.linspace(0, 1, n_scale)
    steps = ((d_min[None] + frac[:, None] * (d_max - d_min)[None]) / levels).clamp(min=floor)  # [S, G]
    half = 2 ** (q.bits - 1)
    zeros = torch.arange(half - zero_points // 2, half - zero_points // 2 + zero_points, dtype=torch.float32)
    grid = torch.stack([steps.repeat(zero_points, 1), zeros.repeat_interleave(n_scale)[:, None].expand(-1, q.groups)], -1)
    spacing = steps[1] - steps[0] if n_scale > 1 else torch.zeros(q.groups)
    return grid.to(x.device), spacing.to(x.device)


class AffinePairs(Quantizer):
    """Search-time view of an asymmetric :class:`UniformQuantizer` whose parameters per group are
    (step, zero point), so that both are candidates: ``(clamp(round(x / s) + z, 0, 2^b - 1) - z) s``."""

    params_per_group = 2

    def __init__(self, like: UniformQuantizer):
        super().__init__(like.bits, like.groups, like.group_dim)
        self.qmin, self.qmax = float(like.qmin), float(like.qmax)
        self.scale = torch.stack([like.scale, like.zero_points()], -1).clone()
        self.calibrated = like.calibrated

    def _fake_quant(self, x, s, shape, fused=False):
        step, zero = s
        return kernels.uniform_affine(x, step, zero, self.qmin, self.qmax)


def set_affine(q: UniformQuantizer, pair: torch.Tensor) -> None:
    """Give ``q`` the (step, zero point) ``[G, 2]`` of a search."""
    q.set_scale(pair[:, 0])
    q.lower.copy_((-pair[:, 1] * q.scale).to(q.lower))


def _chunk(per_candidate: int, budget_mb: float) -> int:
    return max(1, int(budget_mb * 2 ** 20 // (3 * 4 * max(1, per_candidate))))


def self_error(q: Quantizer, x: torch.Tensor, budget_mb: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Squared error ``[C, G]`` of ``x`` quantized by ``q`` with each candidate (AdaLog's "_self" searches)."""
    def score(cands, final=True):
        out, c = [], _chunk(x.numel(), budget_mb)
        for i in range(0, cands.shape[0], c):
            d = q.fake_quant(x, cands[i:i + c]).sub_(x)
            out.append(_group_sum(d.square_(), q.group_dim, q.groups).double())
        return torch.cat(out)
    return score


def weight_output_error(op: _WeightOp, data: OpData, q: Quantizer, budget_mb: float):
    """Exact squared output error ``[C, G]`` per output channel of weight candidates, with the input
    as the op quantizes it now. With ``R = Y - b - X W^T``, ``D = W_q - W``:
    ``|X D_o - R_o|^2 = |R_o|^2 - 2 D_o (X^T R)_o + D_o (X^T X) D_o^T`` (float64)."""
    (x,) = op.prepare_inputs(data.inputs, "weight")
    w = op.weight.detach()
    if isinstance(op, QuantConv2d):
        a = op.conv_args
        if a["groups"] != 1:
            raise ValueError("FPCS weight search supports ungrouped convolutions only")
        rows = F.unfold(x, w.shape[2:], dilation=a["dilation"], padding=a["padding"], stride=a["stride"])
        rows = rows.transpose(1, 2).reshape(-1, rows.shape[1])
        y = data.output.flatten(2).transpose(1, 2).reshape(-1, w.shape[0])
    else:
        rows, y = x.reshape(-1, w.shape[1]), data.output.reshape(-1, w.shape[0])
    w2 = w.reshape(w.shape[0], -1).double()
    rows = rows.double()
    bias = op.output_bias()
    r = y.double() - rows @ w2.T - (0 if bias is None else bias.double())
    gram, cross, base = rows.T @ rows, (rows.T @ r).T, r.square().sum(0)  # [K, K], [O, K], [O]
    if q.group_dim is None or q.groups != w.shape[0]:
        raise ValueError("the FPCS weight search needs one weight group per output channel")

    def score(cands, final=True):
        out, c = [], _chunk(w.numel() * 2, budget_mb)
        for i in range(0, cands.shape[0], c):
            d = (q.fake_quant(w, cands[i:i + c]) - w).reshape(-1, *w2.shape).double()  # [c, O, K]
            out.append(base - 2 * (d * cross).sum(-1) + ((d @ gram) * d).sum(-1))
        return torch.cat(out)
    return score


def output_error(op: QuantOp, data: OpData, operand: str, cfg: FPCSConfig) -> Score:
    """Squared error ``[C, G]`` of the op output for candidates of ``operand`` (the op's quantizer of
    it must accept them); coarse steps on ``screen_images`` images, the last step's best
    ``screen_top_k`` re-scored on all."""
    n = data.output.shape[0]
    screen = cfg.screen_images and cfg.screen_images < n
    small = _subset(data, cfg.screen_images) if screen else data

    def score(cands, final):
        err = evaluate_candidates(op, small, operand, cands, "mse", cfg.memory_budget_mb)
        if screen and final and cfg.screen_top_k < cands.shape[0]:
            top = err.topk(max(1, cfg.screen_top_k), 0, largest=False).indices
            exact = evaluate_candidates(op, data, operand, _take(cands, top), "mse", cfg.memory_budget_mb)
            err = torch.full_like(err, float("inf")).scatter_(0, top, exact)
        return err
    return score


# -- per operand ---------------------------------------------------------------------------------


def _zero_points(q: UniformQuantizer, role: str) -> int:
    """AdaLog's number of zero points on the grid: weights ``min(16, 2^(b-1))`` (conv ``2^(b-1)``),
    activations ``min(16, 2^b)``, matmul operands ``min(16, 2^(b-1))``."""
    half = 2 ** (q.bits - 1)
    return {"weight": min(16, half), "conv_weight": half, "input": min(16, 2 * half), "matmul": min(16, half)}[role]


def _grid(op: QuantOp, operand: str, x: torch.Tensor, role: str, cfg: FPCSConfig, cache: Optional[dict]):
    """The operand's initial grid and spacing (computed once per op calibration when ``cache`` is given)."""
    key = (operand, role)
    if cache is not None and key in cache:
        return cache[key]
    q = op.quantizer(operand)
    floor = MIN_STEP if role in ("weight", "conv_weight") else ACT_MIN_STEP
    out = percentile_grid(x, q, cfg, _zero_points(q, role), floor) + (floor,)
    if cache is not None:
        cache[key] = out
    return out


def search_uniform(op: QuantOp, operand: str, x: torch.Tensor, role: str, cfg: FPCSConfig,
                   score_for: Callable[[Quantizer], Score], cache: Optional[dict] = None) -> None:
    """FPCS of a uniform asymmetric operand; the result is written into its quantizer."""
    q = op.quantizer(operand)
    grid, delta, floor = _grid(op, operand, x, role, cfg, cache)
    view = AffinePairs(q).to(x.device)
    op.set_quantizer(operand, view)
    try:
        best = fpcs(score_for(view), grid, delta, cfg.width, cfg.num_candidates // cfg.width, cfg.steps, floor)
    finally:
        op.set_quantizer(operand, q)
    set_affine(q, best)
    op.refresh()


def init_uniform(op: QuantOp, operand: str, x: torch.Tensor, role: str, cfg: FPCSConfig,
                 cache: Optional[dict] = None) -> None:
    """AdaLog's starting point of operands searched only against the output: grid entry ``-2``."""
    set_affine(op.quantizer(operand), _grid(op, operand, x, role, cfg, cache)[0][-2])
    op.refresh()


def positive_percentiles(x: torch.Tensor, fractions: list[float]) -> torch.Tensor:
    """Nearest-rank percentiles of the positive values of ``x`` (rank ``ceil(n f) - 1``; 0 when none),
    as AdaLog's post-GELU range."""
    v = x.detach().reshape(-1).float()
    v = v[v > 0].sort().values
    if v.numel() == 0:
        return torch.zeros(len(fractions))
    ranks = [max(0, min(v.numel() - 1, int(torch.tensor(v.numel() * f, dtype=torch.float64).ceil()) - 1))
             for f in fractions]
    return v[ranks].cpu()


def search_base(op: QuantOp, operand: str, cfg: FPCSConfig, score: Score, keep: int = 1) -> torch.Tensor:
    """Every base ``q`` of an AdaLog quantizer with its current range: the ``keep`` best ``[keep, G, 2]``."""
    aq: AdaLogQuantizer = op.quantizer(operand)
    qs = torch.arange(cfg.q_range[0], cfg.q_range[1] + 1, dtype=torch.float32)
    grid = aq.scale.detach()[None].repeat(len(qs), 1, 1)
    grid[..., 1] = qs[:, None].to(grid)
    err = score(grid, keep == 1)
    return _take(grid, err.topk(min(keep, len(qs)), 0, largest=False).indices)


def search_gelu(op: _WeightOp, data: OpData, cfg: FPCSConfig, ud: torch.Tensor) -> None:
    """AdaLog's post-GELU activation search: bases, then ``gelu_ranges`` ranges in ``ud`` x the kept
    bases jointly, then FPCS refinement of the range."""
    aq: AdaLogQuantizer = op.input_quantizer
    score = output_error(op, data, "input", cfg)
    bases = search_base(op, "input", cfg, score, keep=cfg.gelu_bases)[:, :, 1]  # [B, G]
    ranges = ud[0] + (ud[1] - ud[0]) * torch.linspace(0, 1, cfg.gelu_ranges)
    grid = torch.stack([ranges.repeat(bases.shape[0])[:, None].expand(-1, aq.groups).to(bases),
                        bases.repeat_interleave(cfg.gelu_ranges, 0)], -1)
    delta = torch.full((aq.groups,), float(ranges[1] - ranges[0]) if cfg.gelu_ranges > 1 else 0.0)
    best = fpcs(score, grid, delta, cfg.gelu_width, cfg.num_candidates // cfg.gelu_width, cfg.steps, floor=1e-8)
    aq.set_scale(best)
    op.refresh()


# -- per op --------------------------------------------------------------------------------------


def _changed(before: list[torch.Tensor], op: QuantOp) -> bool:
    return any(not torch.equal(a, q.scale) for a, q in zip(before, op.quantizers().values()))


def _snap(op: QuantOp) -> list[torch.Tensor]:
    return [q.scale.clone() for q in op.quantizers().values()]


def calibrate_linear(op: _WeightOp, data: OpData, cfg: FPCSConfig) -> dict:
    """Linear / Conv with uniform weight and (optional) uniform input: AdaLog's schedule."""
    wq, iq = op.weight_quantizer, op.input_quantizer
    w = op.weight.detach()
    wrole = "conv_weight" if isinstance(op, QuantConv2d) else "weight"
    budget = cfg.memory_budget_mb
    x = data.inputs[0]
    grids: dict = {}
    if iq is not None and iq.groups > 1:  # post-LayerNorm, before the fold: per channel, own error only
        wq.set_scale(wq.initial_scale(w))
        search_uniform(op, "input", x, "input", cfg, lambda v: self_error(v, x, budget))
        _mark_constant_channels(iq, x)
        return {"search": "per-channel input (own error), before reparameterisation"}
    if iq is None:  # AdaLog's patch embedding: FP input, weight from grid entry -2
        init_uniform(op, "weight", w, wrole, cfg, grids)
    else:
        search_uniform(op, "weight", w, wrole, cfg, lambda v: self_error(v, w, budget), grids)
        search_uniform(op, "input", x, "input", cfg, lambda v: self_error(v, x, budget), grids)
    rounds = 0
    for _ in range(cfg.rounds):
        before = _snap(op)
        search_uniform(op, "weight", w, wrole, cfg, lambda v: weight_output_error(op, data, v, budget), grids)
        if iq is not None:
            search_uniform(op, "input", x, "input", cfg, lambda v: output_error(op, data, "input", cfg), grids)
        rounds += 1
        if not _changed(before, op):  # the next round would repeat this one exactly
            break
    return {"search": "fpcs", "rounds": rounds}


def _mark_constant_channels(q: UniformQuantizer, x: torch.Tensor) -> None:
    """Channels without range (max == min, e.g. a LayerNorm weight of exactly 0) get step
    ``MIN_STEP`` and their value as the minimum, so that the reparameterisation moves them to 0
    exactly (AdaLog's code floors their step at 1e-4 and clips the value instead)."""
    rows = group_rows(x.detach().float(), q.group_dim, q.groups)
    lo, hi = rows.amin(1), rows.amax(1)
    const = hi <= lo
    if bool(const.any()):
        q.scale[const] = MIN_STEP
        q.lower[const] = lo[const].to(q.lower)


def calibrate_gelu_linear(op: _WeightOp, data: OpData, cfg: FPCSConfig) -> dict:
    """fc2 with AdaLog's shifted quantizer on its post-GELU input."""
    w, x, budget = op.weight.detach(), data.inputs[0], cfg.memory_budget_mb
    aq: AdaLogQuantizer = op.input_quantizer
    grids: dict = {}
    search_uniform(op, "weight", w, "weight", cfg, lambda v: self_error(v, w, budget), grids)
    ud = positive_percentiles(x, [cfg.grid_percentile / 100.0, 1.0]) + aq.shift
    start = float(ud[0] + (ud[1] - ud[0]) * (cfg.num_candidates - 2) / max(1, cfg.num_candidates - 1))
    aq.set_scale(torch.stack([torch.full((aq.groups,), start), torch.full((aq.groups,), float(aq.r))], -1))
    op.refresh()
    rounds = 0
    for _ in range(cfg.rounds):
        before = _snap(op)
        search_gelu(op, data, cfg, ud)
        search_uniform(op, "weight", w, "weight", cfg, lambda v: weight_output_error(op, data, v, budget), grids)
        rounds += 1
        if not _changed(before, op):
            break
    return {"search": "fpcs", "rounds": rounds, "range": float(aq.scale[0, 0]), "base_q": int(aq.scale[0, 1])}


def calibrate_matmul(op: QuantMatMul, data: OpData, cfg: FPCSConfig) -> dict:
    """``q @ k^T`` (two uniform operands) or ``attn @ v`` (AdaLog post-softmax, uniform ``v``)."""
    a, b = data.inputs
    log_a = isinstance(op.a_quantizer, AdaLogQuantizer)
    grids: dict = {}
    if log_a:
        op.a_quantizer.set_scale(op.a_quantizer.initial_scale(a))
    else:
        init_uniform(op, "a", a, "matmul", cfg, grids)
    init_uniform(op, "b", b, "matmul", cfg, grids)
    rounds = 0
    for _ in range(cfg.rounds):
        before = _snap(op)
        if log_a:
            best = search_base(op, "a", cfg, output_error(op, data, "a", cfg))[0]
            op.a_quantizer.set_scale(best)
            op.refresh()
        else:
            search_uniform(op, "a", a, "matmul", cfg, lambda v: output_error(op, data, "a", cfg), grids)
        search_uniform(op, "b", b, "matmul", cfg, lambda v: output_error(op, data, "b", cfg), grids)
        rounds += 1
        if not _changed(before, op):
            break
    info = {"search": "fpcs", "rounds": rounds}
    if log_a:
        info["base_q"] = int(op.a_quantizer.scale[0, 1])
    return info


def calibrate_op_fpcs(cfg: FPCSConfig):
    """The per-op step of the ``adalog`` recipe (module docstring)."""
    @torch.no_grad()
    def step(name: str, op: QuantOp, data: OpData) -> dict:
        if isinstance(op, QuantMatMul):
            return calibrate_matmul(op, data, cfg)
        if isinstance(op, _WeightOp):
            if isinstance(op.input_quantizer, AdaLogQuantizer):
                return calibrate_gelu_linear(op, data, cfg)
            return calibrate_linear(op, data, cfg)
        raise ValueError(f"{name}: the FPCS search has no schedule for {type(op).__name__}")
    return step
