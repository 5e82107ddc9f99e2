"""Scale reparameterisation of post-LayerNorm activations (RepQ-ViT, Li et al. 2023, Sec. 4.1).

The inputs of qkv, fc1 and Swin's patch-merging reduction come straight from a LayerNorm and vary by
orders of magnitude across channels. They are quantized per channel, asymmetric: step ``s_c``, zero
point ``z_c``. Writing the per-tensor step and zero point as ``s~ = mean(s_c)``, ``z~ = round(mean(z_c))``
and the channel factors ``r_c = s_c / s~``, the activation

    X~_c = (X_c - t_c) / r_c,   t_c = -s_c (z_c - z~)

quantized per tensor with ``(s~, z~)`` has exactly the per-channel codes of ``X``:
``round(X~_c / s~) + z~ = round(X_c / s_c) + z_c``. The map is folded into the LayerNorm affine
(``gamma' = gamma / r``, ``beta' = (beta - t) / r``) and undone in the next Linear's input columns
(``W' = W diag(r)``, ``b' = b + W t``), so the float model is unchanged and the deployed quantizer is
per tensor. A constant channel (LayerNorm weight exactly 0, as in the shared DeiT-T weights, e.g.
``blocks.0.norm2`` channel 189) has no range (``s_c = 0``): it keeps ``r_c = 1`` and its value ``v_c``
is shifted to exactly 0 (``t_c = v_c``, restored exactly through the bias); RepQ-ViT's own code
divides by zero there.

RepQ-ViT's code takes the per-tensor zero point as the unrounded mean of the ``z_c``; here it is
rounded, which makes the folded per-tensor codes *equal* to the calibrated per-channel ones (the
claim of Sec. 4.1) and keeps an integer zero point for deployment.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def post_layernorm_pairs(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[tuple[str, nn.Module]]]]:
    """``(norm name, norm, [(linear name, linear), ...])`` for every LayerNorm whose output feeds only
    Linears: ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1`` of every ViT / DeiT / Swin block, and
    ``norm -> reduction`` of Swin's patch merging. Works on timm models, wrapped or not."""
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
        if hasattr(m, "norm1") and hasattr(attn, "qkv"):
            yield f"{prefix}norm1", m.norm1, [(f"{prefix}attn.qkv", attn.qkv)]
        if hasattr(m, "norm2") and hasattr(mlp, "fc1"):
            yield f"{prefix}norm2", m.norm2, [(f"{prefix}mlp.fc1", mlp.fc1)]
        if hasattr(m, "norm") and hasattr(m, "reduction"):
            yield f"{prefix}norm", m.norm, [(f"{prefix}reduction", m.reduction)]


def minmax_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-channel asymmetric ``bits``-bit grid of ranges ``[lo, hi]`` (widened to contain 0):
    step, zero point and which channels are constant (``lo == hi``: no range)."""
    constant = hi.double() <= lo.double()
    lo, hi = lo.double().clamp(max=0), hi.double().clamp(min=0)
    step = (hi - lo) / (2 ** bits - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return step, torch.where(constant, torch.zeros_like(step), (-lo / safe).round()), constant


def channel_factors(step: torch.Tensor, zero: torch.Tensor, constant: torch.Tensor,
                    value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """From a per-channel asymmetric grid (``step``, integer ``zero`` point) of a post-LayerNorm
    activation: the factors ``r`` and shifts ``t`` of the fold, and the per-tensor step ``s~`` and zero
    point ``z~`` that then give the same codes (module docstring). ``constant`` channels (no range)
    hold ``value``; they get ``r = 1`` and move to exactly 0."""
    step, zero, value = step.double(), zero.double(), value.double()
    live = ~constant.bool()
    if not bool(live.any()):
        raise ValueError("every channel is constant: nothing to reparameterise")
    s_mean = float(step[live].mean())
    z_mean = int(round(float(zero[live].mean())))
    r = torch.where(live, step / s_mean, torch.ones_like(step))
    t = torch.where(live, -step * (zero - z_mean), value)
    return r.float(), t.float(), s_mean, z_mean


@torch.no_grad()
def fold_channel_factors(norm: nn.Module, linears: list[nn.Module], r: torch.Tensor, t: torch.Tensor) -> None:
    """Replace the LayerNorm output ``X`` by ``(X - t) / r`` (its affine) and undo it in each Linear's
    input columns, in place: the float function of the model is unchanged."""
    if not bool((r > 0).all()) or not bool(torch.isfinite(r).all() and torch.isfinite(t).all()):
        raise ValueError("channel factors must be positive and finite")
    if norm.weight is None or norm.bias is None:
        raise ValueError("reparameterisation needs a LayerNorm with affine weight and bias")
    r, t = r.to(norm.weight), t.to(norm.weight)
    for lin in linears:
        shift = lin.weight @ t  # the output the shift removes, added back through the bias
        lin.weight.mul_(r)
        if lin.bias is None:
            lin.bias = nn.Parameter(shift.clone())
        else:
            lin.bias.add_(shift)
        if hasattr(lin, "refresh"):
            lin.refresh()  # a QuantLinear caches its quantized weight
    norm.bias.sub_(t).div_(r)
    norm.weight.div_(r)


def _fold(norm: nn.Module, linears: list, step, zero, constant, value) -> dict:
    r, t, s_mean, z_mean = channel_factors(step, zero, constant, value)
    fold_channel_factors(norm, [lin for _, lin in linears], r, t)
    return {"step": s_mean, "zero_point": z_mean, "constant_channels": int(constant.sum()),
            "factor_range": [float(r.min()), float(r.max())], "linears": [n for n, _ in linears]}


@torch.no_grad()
def reparameterize(model: nn.Module, ranges: dict[str, tuple[torch.Tensor, torch.Tensor]], bits: int) -> dict:
    """Fold the channel factors of every post-LayerNorm activation named in ``ranges`` (LayerNorm
    name -> per-channel (min, max) of its output on the calibration data) into ``model``, with the
    per-channel min-max grid at ``bits``; returns per LayerNorm the per-tensor step and zero point that
    now quantize its output."""
    done = {}
    for name, norm, linears in post_layernorm_pairs(model):
        if name in ranges:
            lo, hi = ranges[name]
            step, zero, constant = minmax_grid(lo, hi, bits)
            done[name] = _fold(norm, linears, step, zero, constant, lo)
    return done


@torch.no_grad()
def reparameterize_calibrated(model: nn.Module) -> dict:
    """The fold for a wrapped model whose post-LayerNorm inputs carry calibrated per-channel
    asymmetric quantizers (recipe site ``post_layernorm``, granularity ``in_channel``): fold their
    grids, give each Linear the equivalent per-tensor quantizer, and re-initialise the folded
    Linears' weight quantizers on the new weights (RepQ-ViT's re-calibration). Returns what
    :func:`reparameterize` returns."""
    from ..quantizers import UniformQuantizer
    from ..quantizers.uniform import MIN_STEP
    done = {}
    for name, norm, linears in post_layernorm_pairs(model):
        q = linears[0][1].quantizer("input")
        if q is None:
            continue
        if len(linears) != 1 or not isinstance(q, UniformQuantizer) or q.symmetric \
                or q.groups != linears[0][1].in_features:
            raise ValueError(f"{name}: reparameterisation needs one following Linear with a per-channel "
                             f"asymmetric uniform input quantizer")
        if not q.calibrated:
            raise ValueError(f"{name}: the input quantizer of {linears[0][0]} is not calibrated")
        step = q.scale.detach().clone()
        constant = step <= MIN_STEP
        zero = q.zero_points()
        done[name] = _fold(norm, linears, step, zero, constant, q.lower.detach().clone())
        per_tensor = UniformQuantizer(q.bits, symmetric=False, percentile=q.percentile,
                                      mse_percentiles=q.mse_percentiles).to(step.device)
        s_mean, z_mean = done[name]["step"], done[name]["zero_point"]
        per_tensor.set_scale(torch.tensor([s_mean]))
        per_tensor.lower.fill_(-z_mean * float(per_tensor.scale))
        lin = linears[0][1]
        lin.set_quantizer("input", per_tensor)
        wq = lin.weight_quantizer
        if wq is not None:
            wq.set_scale(wq.initial_scale(lin.weight.detach()))
            lin.refresh()
    return done
