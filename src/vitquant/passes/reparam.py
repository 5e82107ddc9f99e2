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
``blocks.0.norm2`` channel 189) has no range (``s_c = 0``): it keeps ``r_c = 1`` and is shifted onto the
grid like any other (RepQ-ViT's own code divides by zero there).
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


def channel_factors(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """From per-channel ranges ``[lo, hi]`` of a post-LayerNorm activation: the factors ``r`` and
    shifts ``t`` of the fold, and the per-tensor step ``s~`` and zero point ``z~`` that then give the
    per-channel asymmetric ``bits``-bit codes (module docstring)."""
    levels = 2 ** bits - 1
    lo, hi = torch.minimum(lo.double(), torch.zeros_like(lo.double())), torch.maximum(hi.double(), torch.zeros_like(hi.double()))
    s = (hi - lo) / levels
    live = s > 0
    if not bool(live.any()):
        raise ValueError("every channel is constant zero: nothing to reparameterise")
    s_mean = float(s[live].mean())
    s = torch.where(live, s, torch.full_like(s, s_mean))  # constant channel: the mean step, r = 1
    z = (-lo / s).round().clamp(0, levels)
    z_mean = int(round(float(z.mean())))
    r = s / s_mean
    t = -s * (z - z_mean)
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


@torch.no_grad()
def reparameterize(model: nn.Module, ranges: dict[str, tuple[torch.Tensor, torch.Tensor]], bits: int) -> dict:
    """Fold the channel factors of every post-LayerNorm activation named in ``ranges`` (LayerNorm
    name -> per-channel (min, max) of its output on the calibration data) into ``model``; returns
    per LayerNorm the per-tensor step and zero point that now quantize its output."""
    done = {}
    for name, norm, linears in post_layernorm_pairs(model):
        if name not in ranges:
            continue
        lo, hi = ranges[name]
        r, t, step, zero = channel_factors(lo, hi, bits)
        fold_channel_factors(norm, [lin for _, lin in linears], r, t)
        done[name] = {"step": step, "zero_point": zero, "constant_channels": int(((hi - lo) <= 0).sum()),
                      "factor_range": [float(r.min()), float(r.max())]}
    return done
