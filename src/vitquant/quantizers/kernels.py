"""Fake-quantization kernels: one pure function per quantizer type, run eagerly or fused.

Eagerly, a fake quantizer is a chain of elementwise passes (divide, round, clamp, multiply, and
for twin quantizers two of each plus a select); on CPU these passes, not the matmuls, were the
cost of simulated-quantized inference (DeiT-Tiny: 1.34x the FP32 time). ``torch.compile`` fuses
each function into one loop over the tensor. The fused and the eager function compute the same
IEEE operations in the same order (every divisor is a tensor, so no division becomes a
multiplication by a reciprocal), and ``tests/test_kernels.py`` checks that they agree bit for
bit, rounding ties included.

Fusion is used for inference only (:meth:`Quantizer.forward` without autograd); the calibration
search keeps the eager path. It is on by default; ``VITQUANT_COMPILE=0`` or
:func:`set_fused_kernels(False) <set_fused_kernels>` turns it off. Where ``torch.compile`` cannot
build a kernel (no C++ compiler, unsupported platform) vitquant warns once and stays eager.
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Callable

import torch

# -- the kernels (pure functions of tensors and floats) -------------------------------------------


def uniform_symmetric(x: torch.Tensor, s: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """``clamp(round(x / s), qmin, qmax) * s`` (Eq. 8, Liu et al. 2021)."""
    return (x / s).round_().clamp_(qmin, qmax).mul_(s)


def uniform_channels(x: torch.Tensor, s: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """:func:`uniform_symmetric` with one step per channel (O-2SF); a separate function so that
    its compiled kernels (another broadcast pattern) have their own cache."""
    return uniform_symmetric(x, s, qmin, qmax)


def uniform_affine(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``, zero point ``z``."""
    return (x / s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


def twin_softmax_split(x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, levels: float):
    """Post-softmax twin uniform codes: (``x`` in R1, R1 value code, R2 value code)."""
    return x < levels * s1, (x / s1).round_().clamp_(0, levels - 1), (x / s2).round_().clamp_(0, levels - 1)


def twin_softmax(x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, levels: float) -> torch.Tensor:
    """PTQ4ViT post-softmax twin uniform: R1 (interval ``s1``) for ``x < levels * s1``, else R2."""
    in_r1, v1, v2 = twin_softmax_split(x, s1, s2, levels)
    return torch.where(in_r1, v1.mul_(s1), v2.mul_(s2))


def twin_gelu_split(x: torch.Tensor, s_pos: torch.Tensor, s_neg: torch.Tensor, levels: float):
    """Post-GELU twin uniform codes in R2 (non-negative) and R1 (negative); each is 0 outside its
    range, so their sum selects by sign."""
    return (x / s_pos).round_().clamp_(0, levels - 1), (x / s_neg).round_().clamp_(-levels, 0)


def twin_gelu(x: torch.Tensor, s_pos: torch.Tensor, s_neg: torch.Tensor, levels: float) -> torch.Tensor:
    """PTQ4ViT post-GELU twin uniform: non-negative values on ``s_pos``, negative on ``s_neg``."""
    pos, neg = twin_gelu_split(x, s_pos, s_neg, levels)
    return pos.mul_(s_pos).add_(neg.mul_(s_neg))


def two_scale_split(x: torch.Tensor, s_fine: torch.Tensor, s_coarse: torch.Tensor, qmin: float, qmax: float,
                    cmax: float):
    """V-2SF codes: (``x`` fits the fine range, fine value code, coarse value code)."""
    fine = (x / s_fine).round_()
    return (fine >= qmin) & (fine <= qmax), fine, (x / s_coarse).round_().clamp_(0.0, cmax)


def two_scale(x: torch.Tensor, s_fine: torch.Tensor, s_coarse: torch.Tensor, qmin: float, qmax: float,
              cmax: float) -> torch.Tensor:
    """TSPTQ-ViT V-2SF: the fine step ``s_fine`` where ``round(x / s_fine)`` fits ``[qmin, qmax]``,
    else the coarse step ``s_coarse = s_fine * 2^m`` (unsigned codes, clamped to ``[0, cmax]``)."""
    in_fine, fine, coarse = two_scale_split(x, s_fine, s_coarse, qmin, qmax, cmax)
    return torch.where(in_fine, fine.mul_(s_fine), coarse.mul_(s_coarse))


# -- dispatch ---------------------------------------------------------------------------------------

_compiled: dict[Callable, Callable] = {}
_state = {"enabled": os.environ.get("VITQUANT_COMPILE", "1").strip().lower() not in ("0", "false", "off", "no"),
          "failed": None}


def fused_kernels_enabled() -> bool:
    """Whether inference uses the fused (compiled) kernels."""
    return _state["enabled"] and _state["failed"] is None


def set_fused_kernels(enabled: bool) -> None:
    """Turn the fused kernels on or off for this process."""
    _state["enabled"] = bool(enabled)


@contextmanager
def fused_kernels(enabled: bool):
    """Temporarily turn the fused kernels on or off."""
    before = _state["enabled"]
    _state["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _state["enabled"] = before


def run_kernel(fn: Callable, *args, fused: bool = False) -> torch.Tensor:
    """``fn(*args)``, through its compiled version when ``fused`` and fusion is available."""
    if fused and fused_kernels_enabled() and not torch.compiler.is_compiling():
        compiled = _compiled.get(fn)
        if compiled is None:
            # Inductor imports cpp_extension, which logs a CUDA_HOME notice on CPU-only machines.
            log = logging.getLogger("torch.utils.cpp_extension")
            if log.level == logging.NOTSET:
                log.setLevel(logging.ERROR)
            # One kernel per broadcast pattern / rank / view-ness; several models or settings in
            # one process exceed dynamo's default of 8 variants, after which it runs eagerly.
            limit = getattr(torch._dynamo.config, "recompile_limit", None)
            if limit is not None and limit < 64:
                torch._dynamo.config.recompile_limit = 64
            compiled = _compiled[fn] = torch.compile(fn, dynamic=True)
        try:
            return compiled(*args)
        except Exception as e:  # no compiler / unsupported backend: stay eager, say so once
            _state["failed"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(f"vitquant: fused quantization kernels unavailable ({_state['failed']}); "
                          "using eager kernels (slower simulated-quantized inference)", RuntimeWarning, stacklevel=2)
    return fn(*args)
