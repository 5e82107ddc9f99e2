"""Distances between FP and quantized layer outputs, reduced per scale group (lower is better).

Every objective takes candidate outputs ``y [C, *out]``, the FP target ``[*out]`` and (for the
Hessian-guided metric) the gradient ``dL/dO [*out]``, and returns ``[C, G]``: one summed distance
per candidate and scale group. Sums (not means) keep them additive over calibration chunks.
"""
from __future__ import annotations

from typing import Optional

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


def pearson(y, target, grad, group_dim, groups):
    """Negative Pearson correlation of each output row (Eq. (12), Liu et al. 2021)."""
    return -_rowwise(y, target, group_dim, groups, _pearson)


OBJECTIVES = {"mse": mse, "hessian": hessian, "cosine": cosine, "pearson": pearson}
NEEDS_GRAD = {"hessian"}


def get_objective(name: str):
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}") from None
