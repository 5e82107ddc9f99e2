"""Distances between FP and quantized layer outputs, reduced per scale group (lower is better).

Every objective takes candidate outputs ``y [C, *out]``, the FP target ``[*out]`` and (for the
Hessian-guided metric) the gradient ``dL/dO [*out]``, and returns ``[C, G]``: one summed distance
per candidate and scale group. Sums (not means) keep them additive over calibration chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch


def _dims_except(ndim: int, keep: tuple[int, ...]) -> list[int]:
    return [d for d in range(ndim) if d not in keep]


def _group_sum(v: torch.Tensor, group_dim: Optional[int], groups: int) -> torch.Tensor:
    """Sum ``v [C, *rest]`` to ``[C, G]`` with groups along ``group_dim`` of ``rest``."""
    if group_dim is None or groups == 1:
        return v.reshape(v.shape[0], -1).sum(1, keepdim=True)
    d = group_dim % (v.dim() - 1) + 1
    v = v.unflatten(d, (groups, -1))
    return v.sum(dim=_dims_except(v.dim(), (0, d)))


def _rowwise(y, target, group_dim, groups, fn):
    """Apply a similarity ``fn`` along the last dim (split into groups when they lie there)."""
    if group_dim is not None and groups > 1 and group_dim % target.dim() == target.dim() - 1:
        y = y.unflatten(-1, (groups, -1))
        target = target.unflatten(-1, (groups, -1))
        sim = fn(y, target)  # [C, *out[:-1], G]
        return sim.reshape(sim.shape[0], -1, groups).sum(1)
    return _group_sum(fn(y, target), group_dim, groups)


def mse(y, target, grad, group_dim, groups):
    """Squared error ``sum (Ô - O)^2``."""
    d = y.sub_(target)
    return _group_sum(d.square_(), group_dim, groups)


def hessian(y, target, grad, group_dim, groups):
    """Hessian-guided distance ``sum (g * (Ô - O))^2`` with ``g = dL/dO`` (PTQ4ViT Eq. (9),
    diagonal Fisher approximation of the Hessian)."""
    if grad is None:
        raise ValueError("the Hessian-guided objective needs output gradients")
    d = y.sub_(target).mul_(grad)
    return _group_sum(d.square_(), group_dim, groups)


def _cos(a, b):
    """Cosine similarity along the last dim; ``b`` broadcasts over ``a``'s candidate dim."""
    dot = torch.linalg.vecdot(a, b)
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return dot / norms.clamp_min(1e-12)


def _pearson(a, b):
    """Pearson correlation along the last dim (``a`` is a fresh tensor, centred in place)."""
    return _cos(a.sub_(a.mean(-1, keepdim=True)), b - b.mean(-1, keepdim=True))


def cosine(y, target, grad, group_dim, groups):
    """Negative cosine similarity of each output row (BasePTQ / EasyQuant metric)."""
    return -_rowwise(y, target, group_dim, groups, _cos)


def _per_sample_groups(v: torch.Tensor, group_dim: Optional[int], groups: int) -> torch.Tensor:
    """``v [C, B, *out]`` as ``[C, B, G, n]``: every element of one sample's scale group in a row."""
    c, b = v.shape[:2]
    if group_dim is None or groups == 1:
        return v.reshape(c, b, 1, -1)
    d = group_dim % (v.dim() - 1) + 1
    return v.unflatten(d, (groups, -1)).movedim(d, 2).reshape(c, b, groups, -1)


def pearson(y, target, grad, group_dim, groups):
    """Negative Pearson correlation of each sample's output (all its elements, per scale group),
    summed over samples: ``-sum_i Gamma(Ô_i, O_i)``, Eq. (12), Liu et al. 2021."""
    a = _per_sample_groups(y, group_dim, groups)
    t = _per_sample_groups(target[None], group_dim, groups)
    return -_pearson(a, t).sum(1)


def ranking_pairs(width: int, max_pairs: int) -> torch.Tensor:
    """Column pairs ``[2, P]`` (p < q) of the ranking loss: all ``width (width - 1) / 2`` pairs when
    there are at most ``max_pairs``, else ``max_pairs`` of them drawn without replacement by a fixed
    seed (the same pairs for every row, head, image and candidate; deterministic)."""
    pairs = torch.triu_indices(width, width, offset=1)
    if pairs.shape[1] <= max_pairs:
        return pairs
    pick = torch.randperm(pairs.shape[1], generator=torch.Generator().manual_seed(0))[:max_pairs]
    return pairs[:, pick.sort().values]


def ranking_loss(y, target, theta: float, max_pairs: int, group_dim=None, groups=1):
    """Hinge ranking loss of attention maps, Eq. (10), Liu et al. 2021:
    ``Phi((Â_p - Â_q) sign(A_p - A_q))`` with ``Phi(m) = max(0, theta - m)``, over column pairs
    p < q of every row of every head, averaged over the pairs and rows of each sample and summed
    over samples. ``y [C, B, *out]`` (last dim: keys), ``target [B, *out]``; returns ``[C, G]``."""
    pairs = ranking_pairs(target.shape[-1], max_pairs).to(target.device)
    rows = target[0].numel() // target.shape[-1]
    total = None
    step = max(1, target.shape[-1])  # pair blocks no wider than a row: temporaries <= output size
    for i in range(0, pairs.shape[1], step):
        p, q = pairs[0, i:i + step], pairs[1, i:i + step]
        sign = torch.sign(target[..., p] - target[..., q])
        m = (y[..., p] - y[..., q]).mul_(sign)
        hinge = m.neg_().add_(theta).clamp_(min=0).sum(-1)  # [C, B, *out[:-1]]
        part = _group_sum(hinge, group_dim, groups)
        total = part if total is None else total + part
    return total / (rows * pairs.shape[1])


@dataclass(frozen=True)
class RankingPearson:
    """Objective of the q @ k^T op, Eq. (11), Liu et al. 2021: ``gamma * L_rank - Gamma`` per
    sample (ranking loss averaged over pairs, see :func:`ranking_loss`), summed over samples."""
    # Defaults chosen by experiment (benchmarks/liu2021_ranking_params.py, README): the lowest
    # held-out KL of the 64-pair settings, gamma in {0.1, 1, 10} x theta in {0, 0.1}. theta is in
    # units of q @ k^T before the 1/sqrt(head_dim) scaling.
    theta: float = 0.1
    gamma: float = 1.0
    max_pairs: int = 64

    def __call__(self, y, target, grad, group_dim, groups):
        rank = ranking_loss(y, target, self.theta, self.max_pairs, group_dim, groups)
        return pearson(y, target, grad, group_dim, groups).add_(rank, alpha=self.gamma)


OBJECTIVES = {"mse": mse, "hessian": hessian, "cosine": cosine, "pearson": pearson}
NEEDS_GRAD = {"hessian"}

Objective = Callable[..., torch.Tensor]


def get_objective(name: Union[str, Objective]) -> Objective:
    """An objective by name, or the callable itself (e.g. :class:`RankingPearson`)."""
    if callable(name):
        return name
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}") from None
